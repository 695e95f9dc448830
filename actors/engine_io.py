"""What goes into a vLLM engine and what comes out of it: the engine's arguments from the rollout config, the
sampling parameters of a group, and the group record built from the engine's streamed outputs, each token tagged
with the policy version that produced it (`actors/rollout.py` explains why deltas, `logprobs=0` and no incremental
detokenisation). Pure functions of their inputs, so the rollout actor, the benches and the tests share them."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from actors.config import RolloutConfig
from actors.precision import resolve_dtype
from actors.records import Group, GroupRequest, Sample, SamplingSpec

if TYPE_CHECKING:
    from vllm import SamplingParams
    from vllm.outputs import RequestOutput

WORKER_EXTENSION = "actors.weights.WeightUpdateExtension"


class RolloutError(RuntimeError):
    """A rollout actor could not do what it was asked."""


class IncompleteGroupError(RolloutError):
    """The engine returned fewer than n finished samples for a group."""


def engine_kwargs(config: RolloutConfig, model_path: str | Path) -> dict[str, Any]:
    """vLLM engine arguments from the rollout config; shared by the actor and the overhead bench so both
    measure the same engine."""
    kwargs: dict[str, Any] = dict(
        model=str(model_path),
        dtype=resolve_dtype(config.dtype, what="rollout engine"),
        max_model_len=config.max_model_len,
        gpu_memory_utilization=config.gpu_memory_utilization,
        enforce_eager=config.enforce_eager,
        enable_chunked_prefill=config.enable_chunked_prefill,
        max_num_batched_tokens=config.max_num_batched_tokens,
        tensor_parallel_size=config.tensor_parallel_size,
        seed=config.seed,
        worker_extension_cls=WORKER_EXTENSION,
        disable_log_stats=True,
        # The behaviour log-probs must be those of the distribution the tokens were drawn from, which is what the
        # learner recomputes: softmax(logits / temperature). vLLM's default, raw_logprobs, is taken before the
        # temperature, so at any temperature but 1 the importance weights would compare two different things.
        logprobs_mode="processed_logprobs",
    )
    if config.kv_cache_memory_bytes is not None:
        kwargs["kv_cache_memory_bytes"] = config.kv_cache_memory_bytes
    return kwargs


def sampling_params(spec: SamplingSpec) -> SamplingParams:
    """Engine sampling parameters of a group: DELTA outputs (the new tokens of each completion as they come, so
    that each can be tagged with the policy version serving then: `VersionedOutput`), the sampled token's log-prob
    at every position, no incremental detokenisation (see the module doc)."""
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    return SamplingParams(
        n=spec.n,
        temperature=spec.temperature,
        top_p=spec.top_p,
        top_k=spec.top_k,
        max_tokens=spec.max_tokens,
        logprobs=0,
        output_kind=RequestOutputKind.DELTA,
        detokenize=False,
    )


@dataclass
class VersionedCompletion:
    """One completion of a request, merged from its deltas: tokens, log-prob positions (None once a delta came
    without them), the policy version of each token, and the finish reason."""

    index: int
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[Any] | None = field(default_factory=list)
    versions: list[int] = field(default_factory=list)
    finish_reason: str | None = None


class VersionedOutput:
    """The engine's delta outputs of one request merged into its final output, each token tagged with the policy
    version that produced it.

    Rule: the tokens of a delta get the version that was served when the previous delta was taken (the request's
    start version for the first). vLLM merges every token put for a request since the last take into the next
    delta, so they were produced under that version or a newer one, provided the tokens produced before an update's
    pause were put before the version changed: the actor switches its version only after the engine has paused and
    the weights have loaded, by when vLLM's output handler has delivered them. A tag is thus never newer than the
    truth (staleness is never under-estimated), and at most one delta older after an update."""

    def __init__(self, start_version: int) -> None:
        self.finished = False
        self._completions: dict[int, VersionedCompletion] = {}
        self._tag = start_version

    def add(self, output: RequestOutput, serving_version: int) -> None:
        for delta in output.outputs:
            merged = self._completions.setdefault(delta.index, VersionedCompletion(delta.index))
            new = list(delta.token_ids)
            merged.token_ids.extend(new)
            merged.versions.extend([self._tag] * len(new))
            if delta.logprobs is None or len(delta.logprobs) != len(new):
                merged.logprobs = None
            elif merged.logprobs is not None:
                merged.logprobs.extend(delta.logprobs[i] for i in range(len(new)))
            if delta.finish_reason is not None:
                merged.finish_reason = delta.finish_reason
        self.finished = output.finished
        self._tag = serving_version

    @property
    def outputs(self) -> list[VersionedCompletion]:
        return list(self._completions.values())


def group_from_output(
    request: GroupRequest,
    prompt_token_ids: list[int],
    output: VersionedOutput | RequestOutput | None,
    version: int,
    decode: Callable[[list[int]], str],
) -> Group:
    """Turn the engine's final output into a Group, or raise `IncompleteGroupError` if any of the n
    samples is missing, unfinished, aborted or lacks a log-prob. `decode` turns response ids into text;
    completions that carry `versions` give each sample its token versions."""
    n = request.sampling.n
    completions = list(output.outputs) if output is not None else []
    if output is None or not output.finished or len(completions) != n:
        raise IncompleteGroupError(
            f"group {request.group_id}: the engine returned {len(completions)} of {n} samples"
            + ("" if output is None or output.finished else " (request not finished)")
        )
    samples = []
    for completion in sorted(completions, key=lambda c: c.index):
        reason = completion.finish_reason
        if reason is None or reason == "abort":
            raise IncompleteGroupError(
                f"group {request.group_id}: sample {completion.index} ended with finish reason {reason!r}"
            )
        tokens = tuple(completion.token_ids)
        positions = completion.logprobs
        if positions is None or len(positions) != len(tokens):
            raise IncompleteGroupError(
                f"group {request.group_id}: sample {completion.index} has {len(tokens)} tokens but "
                f"{0 if positions is None else len(positions)} log-prob positions"
            )
        logprobs = tuple(float(positions[i][token].logprob) for i, token in enumerate(tokens))
        samples.append(
            Sample(
                group_id=request.group_id,
                state_id=request.state_id,
                index=completion.index,
                prompt_token_ids=tuple(prompt_token_ids),
                response_token_ids=tokens,
                behaviour_logprobs=logprobs,
                policy_version=version,
                text=decode(list(tokens)),
                finish_reason=reason,
                token_versions=tuple(getattr(completion, "versions", ())),
            )
        )
    return Group(request=request, samples=tuple(samples))
