"""Behaviour cloning of the thinking modes (docs/protocol.md, BC data) on the learner's FSDP2 machinery.

Records are alpaca-style, as the reference's LLaMA-Factory registration maps them: ``system`` (optional),
``instruction``, ``input`` (optional) and ``output``. Each becomes one chat — the system message when ``system``
is non-empty, the user turn ``instruction + ("\\n" + input if input)``, the assistant turn ``output`` — templated
with the policy tokenizer's own chat template. The prompt is the template with the generation prompt (exactly what
the rollout engine will be given), the response is the rest of the templated chat (the answer plus the template's
end-of-turn tokens); the loss is the token-mean NLL over response tokens only (``train_on_prompt=false``),
normalised over all response tokens of the optimiser step (the modern HF Trainer convention).

Sequences longer than ``cutoff_len`` are truncated the way LLaMA-Factory does it (``infer_seqlen``: a short
response is kept whole and the prompt cut, otherwise both are cut in proportion, each keeping its beginning).
The schedule is cosine with linear warm-up over ``ceil(warmup_ratio × total_steps)`` steps (transformers'
``get_cosine_schedule_with_warmup``, as LLaMA-Factory uses), one optimiser step per ``batch_size`` records
(the last batch of an epoch may be smaller), records shuffled each epoch with a seeded generator.

Bad records are found before anything starts, and reported together with their index and field.
"""

from __future__ import annotations

import json
import logging
import math
import random
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, ValidationError

from actors.jsonrows import read_json_rows
from learner.config import BCConfig, LearnerConfig
from reward.modes import parse_response

# learner.worker (torch) is imported where it is used: `ampo data check` and the other CLI commands check records
# through this module and start without loading torch.
if TYPE_CHECKING:
    from learner.batches import BCExample

__all__ = [
    "BCDataError",
    "BCRecord",
    "build_messages",
    "load_bc_records",
    "parse_bc_record",
    "run_bc",
    "tokenize_record",
]

log = logging.getLogger(__name__)

_REQUIRED = ("instruction", "output")
_MAX_REPORTED = 20
METRICS_FILE = "bc_metrics.jsonl"


class BCDataError(ValueError):
    """Behaviour-cloning records that cannot be used; the message names each bad record (file, row) and field."""


class BCRecord(BaseModel):
    """One alpaca BC record: the system prompt, the turn prompt, an (often empty) input and the response."""

    model_config = ConfigDict(extra="ignore", strict=True, frozen=True)

    system: str = ""
    instruction: str
    input: str = ""
    output: str


def parse_bc_record(row: Any, where: str, *, check_format: bool = False) -> BCRecord:
    """Check one alpaca record; `where` ("<file>: row 3", "record 3") starts every error message.

    ``instruction`` and ``output`` must be non-empty strings, ``system`` and ``input`` strings when given (null
    counts as not given). ``check_format`` also requires the output to pass the thinking-mode format checker, which
    demonstrations for AMPO's BC phase must. Raises :class:`BCDataError` naming every bad field of the record.
    """
    if not isinstance(row, Mapping):
        raise BCDataError(f"{where}: expected a record with instruction/output, got {type(row).__name__}")
    given = {name: value for name, value in row.items() if value is not None}
    problems = [
        f"field {name!r} is empty" for name in _REQUIRED if isinstance(given.get(name), str) and not given[name].strip()
    ]
    try:
        record = BCRecord.model_validate(given)
    except ValidationError as exc:
        for error in exc.errors():
            name = ".".join(str(p) for p in error["loc"]) or "record"
            problems.append(f"field {name!r}: {error['msg']} (got {error.get('input')!r:.80})")
    if problems:
        raise BCDataError(f"{where}: " + "; ".join(problems))
    if check_format:
        parsed = parse_response(record.output)
        if not parsed.valid:
            raise BCDataError(f"{where}: field 'output' is not a thinking-mode response: {parsed.reason}")
    return record


def load_bc_records(
    records_or_path: str | Path | Sequence[Mapping[str, Any]], *, check_format: bool = False
) -> list[BCRecord]:
    """Read and check alpaca records from a JSON list, a JSONL file, or an in-memory sequence.

    Every record is checked by :func:`parse_bc_record`. Raises :class:`BCDataError` listing every bad record, by
    file and row (or by index for an in-memory sequence), and for an empty set of records.
    """
    if isinstance(records_or_path, (str, Path)):
        source = f"{Path(records_or_path)}: "
        rows, label = read_json_rows(records_or_path, error=BCDataError, what="alpaca records"), f"{source}row"
    else:
        source, rows, label = "", list(records_or_path), "record"
    if not rows:
        raise BCDataError(f"{source}no behaviour-cloning records")
    problems: list[str] = []
    records: list[BCRecord] = []
    for index, row in enumerate(rows):
        try:
            records.append(parse_bc_record(row, f"{label} {index}", check_format=check_format))
        except BCDataError as exc:
            problems.append(str(exc))
    if problems:
        shown = problems[:_MAX_REPORTED]
        more = f"\n... and {len(problems) - _MAX_REPORTED} more" if len(problems) > _MAX_REPORTED else ""
        raise BCDataError(f"{len(problems)} problem(s) in the behaviour-cloning records:\n" + "\n".join(shown) + more)
    return records


def build_messages(record: Mapping[str, str]) -> list[dict[str, str]]:
    """The chat of one record: [system], user = instruction (+ "\\n" + input), assistant = output."""
    user = record["instruction"] + ("\n" + record["input"] if record.get("input") else "")
    messages = [{"role": "system", "content": record["system"]}] if record.get("system") else []
    return [*messages, {"role": "user", "content": user}, {"role": "assistant", "content": record["output"]}]


def tokenize_record(tokenizer: Any, record: Mapping[str, str], cutoff_len: int, index: int = 0) -> BCExample:
    """Template and tokenise one record (see the module docstring); ``index`` only names it in errors."""
    return _tokenize(tokenizer, record, cutoff_len, index)[0]


def _tokenize(tokenizer: Any, record: Mapping[str, str], cutoff_len: int, index: int) -> tuple[BCExample, bool]:
    """The example and whether it was truncated."""
    from learner.batches import BCExample

    messages = build_messages(record)
    prompt_text = tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
    full_text = tokenizer.apply_chat_template(messages, tokenize=False)
    if not full_text.startswith(prompt_text):
        raise BCDataError(
            f"record {index}: the chat template renders the prompt differently with and without the answer; "
            "cannot separate the response tokens"
        )
    prompt = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
    response = tokenizer(full_text[len(prompt_text) :], add_special_tokens=False)["input_ids"]
    keep_prompt, keep_response = infer_seqlen(len(prompt), len(response), cutoff_len)
    if keep_prompt < 1 or keep_response < 1:
        raise BCDataError(f"record {index}: nothing of the prompt or the response fits in cutoff_len={cutoff_len}")
    example = BCExample(input_ids=tuple(prompt[:keep_prompt] + response[:keep_response]), prompt_len=keep_prompt)
    return example, keep_prompt + keep_response < len(prompt) + len(response)


def infer_seqlen(source_len: int, target_len: int, cutoff_len: int) -> tuple[int, int]:
    """LLaMA-Factory's truncation rule: how many prompt and response tokens to keep within ``cutoff_len``."""
    if target_len * 2 < cutoff_len:
        max_target_len = cutoff_len
    elif source_len * 2 < cutoff_len:
        max_target_len = cutoff_len - source_len
    else:
        max_target_len = int(cutoff_len * (target_len / (source_len + target_len)))
    new_target_len = min(max_target_len, target_len)
    new_source_len = min(max(cutoff_len - new_target_len, 0), source_len)
    return new_source_len, new_target_len


def run_bc(
    config: BCConfig,
    records_or_path: str | Path | Sequence[Mapping[str, Any]],
    model_path: str | Path,
    out_dir: str | Path,
    *,
    learner: LearnerConfig | None = None,
    seed: int = 1,
    ray_options: dict[str, Any] | None = None,
    cpu_cores: Sequence[Sequence[int]] | None = None,
) -> Path:
    """Behaviour-clone ``model_path`` on the records and export the result as a HF folder at ``out_dir``.

    ``learner`` supplies ranks, backend, micro-batch size, mixed precision, gradient checkpointing, AdamW betas and
    weight decay (the learning rate and schedule come from ``config``). Needs a running Ray (the ranks are actors).
    The folder holds the model, its tokenizer and ``bc_metrics.jsonl`` (one line per optimiser step); it is the RL
    phase's initial policy and reference. Raises :class:`BCDataError` for bad records before starting any rank.
    """
    import ray
    from transformers import AutoTokenizer

    from learner.group import LearnerGroup
    from learner.worker import Schedule

    if not ray.is_initialized():
        raise RuntimeError("run_bc runs its learner ranks as Ray actors: start Ray first (ray.init)")
    learner = learner or LearnerConfig()
    records = [record.model_dump() for record in load_bc_records(records_or_path)]
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    tokenized = [_tokenize(tokenizer, r, config.cutoff_len, i) for i, r in enumerate(records)]
    examples = [example for example, _ in tokenized]
    truncated = sum(cut for _, cut in tokenized)
    steps_per_epoch = math.ceil(len(examples) / config.batch_size)
    total_steps = steps_per_epoch * config.epochs
    warmup = math.ceil(total_steps * config.warmup_ratio)
    log.info(
        "behaviour cloning: %d records (%d truncated to %d tokens), %d epochs × %d steps, warm-up %d",
        len(examples),
        truncated,
        config.cutoff_len,
        config.epochs,
        steps_per_epoch,
        warmup,
    )
    schedule = Schedule(lr=config.lr, kind="cosine", warmup_steps=warmup, total_steps=total_steps)
    group = LearnerGroup(
        learner, model_path, algorithm=None, schedule=schedule, seed=seed, ray_options=ray_options, cpu_cores=cpu_cores
    )
    history: list[dict[str, float]] = []
    try:
        rng = random.Random(seed)
        step = 0
        for epoch in range(config.epochs):
            order = list(range(len(examples)))
            rng.shuffle(order)
            for start in range(0, len(order), config.batch_size):
                metrics = group.bc_step([examples[i] for i in order[start : start + config.batch_size]])
                step += 1
                history.append({"epoch": epoch, "step": step, **metrics})
                log.info("BC epoch %d step %d/%d: loss %.4f, lr %.3g", epoch, step, total_steps, metrics["loss"], metrics["lr"])
        out = group.export_hf(out_dir)
    finally:
        group.shutdown()
    with open(out / METRICS_FILE, "w") as handle:
        for row in history:
            handle.write(json.dumps(row) + "\n")
    return out
