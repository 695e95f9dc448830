"""Behaviour cloning: record checks with indices, templating with response-only loss, training and vLLM loading."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from learner.bc import BCDataError, build_messages, infer_seqlen, load_bc_records, run_bc, tokenize_record
from learner.config import BCConfig, LearnerConfig
from reward.modes import MODE_SECTIONS, format_response

GOOD = {"system": "You think in levels.", "instruction": "Turn 0: greet Ann.", "input": "", "output": "Hello!"}


def demo_records(count: int = 16) -> list[dict[str, str]]:
    """Alpaca records whose outputs are canonical four-mode responses (reward.modes.format_response)."""
    records = []
    for i in range(count):
        mode = 1 + i % 4
        sections = {name: f"{name.lower()} note {i % 3}" for name in MODE_SECTIONS[mode]}
        answer = f"Hello, how are you today? I would like to talk about the money {i % 5}."
        records.append(
            {
                "system": "Choose a thinking level and answer.",
                "instruction": f"Turn {i % 6}: Leo Williams said:",
                "input": "",
                "output": format_response(mode, sections, answer),
            }
        )
    return records


def test_bad_records_are_reported_with_index_and_field() -> None:
    records = [
        GOOD,
        {"instruction": "", "output": "x"},
        "not a record",
        {"instruction": "a", "output": 3},
        {"instruction": "a", "output": "b", "input": 5},
        {"output": "only an answer"},
    ]
    with pytest.raises(BCDataError) as info:
        load_bc_records(records)
    message = str(info.value)
    assert "5 problem(s)" in message
    assert "record 1: field 'instruction' is empty" in message
    assert "record 2: expected a record with instruction/output, got str" in message
    assert "record 3: field 'output': Input should be a valid string (got 3)" in message
    assert "record 4: field 'input': Input should be a valid string (got 5)" in message
    assert "record 5: field 'instruction': Field required" in message
    assert "record 0" not in message


def test_every_bad_field_of_a_record_is_named() -> None:
    with pytest.raises(BCDataError) as info:
        load_bc_records([{"instruction": " ", "output": 3, "system": ["s"]}])
    message = str(info.value)
    assert "1 problem(s)" in message
    for problem in ("field 'instruction' is empty", "field 'system': Input", "field 'output': Input"):
        assert problem in message, message


def test_record_files_json_and_jsonl(tmp_path: Path) -> None:
    (tmp_path / "d.json").write_text(json.dumps([GOOD, GOOD]))
    assert len(load_bc_records(tmp_path / "d.json")) == 2
    (tmp_path / "d.jsonl").write_text(json.dumps(GOOD) + "\n\n{broken\n")
    with pytest.raises(BCDataError, match=re.escape(f"{tmp_path / 'd.jsonl'}: line 3: not valid JSON")):
        load_bc_records(tmp_path / "d.jsonl")
    with pytest.raises(BCDataError, match="not found"):
        load_bc_records(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text(json.dumps([GOOD, {**GOOD, "output": ""}]))
    with pytest.raises(BCDataError, match=re.escape(f"{tmp_path / 'bad.json'}: row 1: field 'output' is empty")):
        load_bc_records(tmp_path / "bad.json")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(BCDataError, match="no behaviour-cloning records"):
        load_bc_records(tmp_path / "empty.jsonl")


def test_chat_and_response_only_tokens(tiny_model_dir: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    record = {**GOOD, "input": "Ann is a teacher."}
    messages = build_messages(record)
    assert [m["role"] for m in messages] == ["system", "user", "assistant"]
    assert messages[1]["content"] == "Turn 0: greet Ann.\nAnn is a teacher."
    assert [m["role"] for m in build_messages({**GOOD, "system": ""})] == ["user", "assistant"]

    example = tokenize_record(tokenizer, record, cutoff_len=1024)
    prompt = tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
    assert tokenizer.decode(example.input_ids[: example.prompt_len]) == prompt
    assert tokenizer.decode(example.input_ids[example.prompt_len :]) == "Hello!<|im_end|>\n"

    cut = tokenize_record(tokenizer, record, cutoff_len=16)
    assert len(cut.input_ids) == 16 and cut.loss_tokens > 0


def test_infer_seqlen_matches_llamafactory() -> None:
    assert infer_seqlen(10, 5, 100) == (10, 5)  # fits
    assert infer_seqlen(300, 10, 100) == (90, 10)  # short response kept whole, prompt cut
    assert infer_seqlen(10, 300, 100) == (10, 90)  # short prompt kept whole, response cut
    assert infer_seqlen(200, 200, 100) == (50, 50)  # both cut in proportion


@pytest.mark.slow
def test_bc_lowers_the_loss_and_the_export_loads_in_vllm(ray_local, tiny_model_dir: Path, tmp_path: Path) -> None:
    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams

    config = BCConfig(lr=1e-2, warmup_ratio=0.1, epochs=4, batch_size=4, cutoff_len=512)
    learner = LearnerConfig(num_ranks=1, micro_batch_size=4, mixed_precision="fp32", gradient_checkpointing=True)
    out = run_bc(config, demo_records(16), tiny_model_dir, tmp_path / "bc_model", learner=learner)

    history = [json.loads(line) for line in (out / "bc_metrics.jsonl").read_text().splitlines()]
    assert len(history) == 16  # 4 epochs × 4 steps
    first = sum(h["loss"] for h in history if h["epoch"] == 0) / 4
    last = sum(h["loss"] for h in history if h["epoch"] == 3) / 4
    print(f"BC loss: first epoch {first:.3f}, last epoch {last:.3f}")
    assert last < 0.7 * first
    assert history[0]["lr"] < history[1]["lr"] and history[-1]["lr"] < history[4]["lr"]  # warm-up, then cosine

    # The exported folder is what vLLM serves: its log-probs of a greedy continuation match transformers' on
    # the same folder (fp32 both).
    import torch
    from transformers import AutoModelForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(out)
    prompt = tokenizer.apply_chat_template(
        build_messages(demo_records(1)[0])[:-1], tokenize=False, add_generation_prompt=True
    )
    llm = LLM(model=str(out), dtype="float32", max_model_len=1024, enforce_eager=True, kv_cache_memory_bytes=64 << 20)
    generated = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=12, logprobs=0))[0].outputs[0]
    tokens = list(generated.token_ids)
    engine = [step[token].logprob for step, token in zip(generated.logprobs, tokens)]
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(torch.tensor([prompt_ids + tokens])).logits[0].double().log_softmax(-1)
    reference = [logits[len(prompt_ids) - 1 + i, t].item() for i, t in enumerate(tokens)]
    gap = max(abs(a - b) for a, b in zip(engine, reference))
    print(f"vLLM on the BC export: {generated.text!r}, max |vLLM - transformers| log-prob {gap:.1e}")
    assert len(tokens) == 12 and gap < 1e-3
