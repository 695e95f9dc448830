"""The Sotopia episode evaluator and the summariser of evaluation results (docs/protocol.md, Evaluation).

**Evaluation.** A finished episode record (the authors' result fields: ``env_id``, ``complete_intro``, ``dialog``,
``actor_role``, agent names and goals, optionally ``hard``, ``modes``, ``tokens``) is judged once on the seven
Sotopia dimensions for both agents, each as ``[reasoning, score]`` within its range (``reward.prompts.DIMENSIONS``:
BEL 0..10, REL -5..5, KNO 0..10, SEC -10..0, SOC -10..0, FIN -5..5, GOAL 0..10). An answer that cannot be parsed or
breaks a range is sent back once to the same judge with a request to reformat it as valid JSON; if that fails too,
or the judge cannot be reached after its retries, the episode is **excluded** with the reason, and no score is
written (the reference writes a reward of -100 and skips it later; we never store a made-up number).

**Summary.** Over the included episodes, per dimension and for ``overall``, the mean and population standard
deviation (``numpy.std``, ddof 0, as the reference) of

* the actor (the evaluated model's side, ``actor_role``), the opponent, and their per-episode average
  ``(actor + opponent) / 2``;
* ``overall`` per episode = mean of the actor's 7 dimensions, of the opponent's 7, and of all 14 for the average;

for all episodes and for the hard subset: an episode is hard when its record says ``hard: true`` or its real
episode id ``env_id`` is among the given hard ids (never a list position). Records may carry ``modes``
(the thinking mode of each of the actor's turns, None for a format error) and ``tokens`` (the response tokens of
each of those turns); the summary then reports how often each mode was used and its mean tokens, over every record
(exclusion is a judging failure, not a property of the episode's generation).

From a shell: ``python -m reward.evaluator results.json --hard-ids sotopia_hard.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import statistics
from collections import Counter, defaultdict
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from actors.jsonrows import read_json_rows
from prompts import DEFAULT_PROMPTS, PromptSet
from reward.answers import AnswerError, extract_json_object, to_score
from reward.judge import JudgeClient
from reward.prompts import DIMENSIONS, EVAL_AGENT_KEYS, EVAL_SCHEMA, evaluation_prompt, reformat_prompt

AgentScores = dict[str, tuple[str, float]]
"""Dimension name -> (reasoning, score)."""

EXCLUDED_REWARD = -100.0
"""The reference's marker of an unevaluated episode in ``rewards`` (read for compatibility, never written)."""
OVERALL = "overall"
INVALID_MODE = "invalid"
"""Key under which turns whose format was broken (mode None) are counted."""
NO_THINKING = "no thinking"
"""Key under which the turns of a policy evaluated without thinking modes are counted."""


def _agent_scores(entry: Any, who: str) -> AgentScores:
    if not isinstance(entry, dict):
        raise AnswerError("unparseable", f"{who} is not an object")
    scores: AgentScores = {}
    for dim in DIMENSIONS:
        item = entry.get(dim.name)
        if isinstance(item, dict):  # tolerated: {"reasoning": ..., "score": ...}
            item = [item.get("reasoning", ""), item.get("score")]
        if not isinstance(item, (list, tuple)) or len(item) != 2:
            raise AnswerError("unparseable", f"{who}.{dim.name} must be a [reasoning, score] pair")
        reasoning, score = item
        scores[dim.name] = (str(reasoning), to_score(score, dim.low, dim.high, f"{who}.{dim.name}"))
    return scores


def parse_evaluation(text: str) -> tuple[AgentScores, AgentScores]:
    """Parse the evaluator's answer into agent1's and agent2's scores. Raises ``AnswerError``: ``unparseable``
    for missing keys or shapes, ``out_of_range`` for a score outside its dimension's range."""
    data = extract_json_object(text)
    first, second = EVAL_AGENT_KEYS
    return _agent_scores(data.get(first), first), _agent_scores(data.get(second), second)


@dataclass(frozen=True)
class EpisodeEvaluation:
    """The outcome of evaluating one episode: both agents' scores, or the reason it is excluded."""

    agent1: AgentScores | None
    agent2: AgentScores | None
    excluded: bool
    reason: str | None = None
    reformatted: bool = False
    calls: int = 0


class EpisodeEvaluator:
    """Evaluates finished episodes with a judge client (temperature 0; one reformat retry, as Sotopia does).
    ``prompts`` holds the evaluator and reformat templates (the run's ``prompts`` section)."""

    def __init__(self, client: JudgeClient, prompts: PromptSet = DEFAULT_PROMPTS) -> None:
        self.client = client
        self.prompts = prompts

    async def evaluate(self, record: Mapping[str, Any]) -> EpisodeEvaluation:
        """Judge one episode record (needs ``complete_intro`` and ``dialog``)."""
        prompt = evaluation_prompt(str(record["complete_intro"]), [str(line) for line in record["dialog"]], self.prompts)
        first = await self.client.chat(prompt, temperature=0.0, schema=EVAL_SCHEMA)
        calls = first.calls
        if first.failure is not None:
            return EpisodeEvaluation(None, None, excluded=True, reason=first.failure, calls=calls)
        try:
            agent1, agent2 = parse_evaluation(first.text or "")
            return EpisodeEvaluation(agent1, agent2, excluded=False, calls=calls)
        except AnswerError:
            pass
        retry = reformat_prompt(first.text or "", EVAL_SCHEMA, self.prompts)
        second = await self.client.chat(retry, temperature=0.0, schema=EVAL_SCHEMA)
        calls += second.calls
        if second.failure is not None:
            return EpisodeEvaluation(None, None, excluded=True, reason=second.failure, calls=calls)
        try:
            agent1, agent2 = parse_evaluation(second.text or "")
        except AnswerError as exc:
            return EpisodeEvaluation(None, None, excluded=True, reason=exc.kind, calls=calls)
        return EpisodeEvaluation(agent1, agent2, excluded=False, reformatted=True, calls=calls)

    async def evaluate_all(self, records: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
        """Evaluate records concurrently (the client's concurrency limit applies); returns annotated copies."""
        records = list(records)
        evaluations = await asyncio.gather(*(self.evaluate(r) for r in records))
        return [annotate(r, e) for r, e in zip(records, evaluations)]


def annotate(record: Mapping[str, Any], evaluation: EpisodeEvaluation) -> dict[str, Any]:
    """A copy of ``record`` with ``agent1_scores``/``agent2_scores`` (dimension -> [reasoning, score]; empty when
    excluded), ``excluded`` and ``exclusion_reason``."""
    out = dict(record)
    for key, scores in (("agent1_scores", evaluation.agent1), ("agent2_scores", evaluation.agent2)):
        out[key] = {name: [reason, score] for name, (reason, score) in (scores or {}).items()}
    out["excluded"] = evaluation.excluded
    out["exclusion_reason"] = evaluation.reason
    return out


# ---- summary ----------------------------------------------------------------------------------------------------


def load_results(path: str | Path) -> list[dict[str, Any]]:
    """Episode records from a JSON list or a JSON-lines (`.jsonl`) file; errors name the file and the line or row."""
    records = read_json_rows(path, what="episode records")
    for index, record in enumerate(records):
        if not isinstance(record, dict):
            raise ValueError(f"{path}: row {index}: expected an episode object, got {type(record).__name__}")
    return records


@dataclass(frozen=True)
class Stat:
    """Mean and population standard deviation over ``n`` episodes (NaN when n = 0)."""

    mean: float
    std: float
    n: int

    @staticmethod
    def of(values: Sequence[float]) -> Stat:
        if not values:
            return Stat(math.nan, math.nan, 0)
        array = np.asarray(values, dtype=float)
        return Stat(float(array.mean()), float(array.std()), len(values))


@dataclass(frozen=True)
class SubsetSummary:
    """Per dimension name and ``overall``: the actor's, the opponent's and the average's statistics."""

    episodes: int
    actor: dict[str, Stat]
    opponent: dict[str, Stat]
    average: dict[str, Stat]


@dataclass(frozen=True)
class ModeUsage:
    """Turns per mode ("1".."4", "invalid", or "no thinking" for a policy evaluated without thinking modes), their
    share of all turns, and per mode the mean response tokens and the mean thinking tokens (the thinking block, 0 in
    mode 1), where the records carry them."""

    turns: dict[str, int]
    share: dict[str, float]
    mean_tokens: dict[str, float]
    mean_thinking_tokens: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class ResultsSummary:
    """The whole summary of a results file."""

    records: int
    excluded: int
    exclusion_reasons: dict[str, int]
    all: SubsetSummary
    hard: SubsetSummary
    modes: ModeUsage | None
    hard_modes: ModeUsage | None


def _is_excluded(record: Mapping[str, Any]) -> bool:
    rewards = record.get("rewards")
    return bool(
        record.get("excluded")
        or not record.get("agent1_scores")
        or not record.get("agent2_scores")
        or (isinstance(rewards, list) and rewards and rewards[-1] == EXCLUDED_REWARD)
    )


def _is_hard(record: Mapping[str, Any], hard_ids: Collection[int]) -> bool:
    return bool(record.get("hard")) or record.get("env_id") in hard_ids


def _score(scores: Mapping[str, Any], name: str) -> float:
    entry = scores[name]
    return float(entry[1] if isinstance(entry, (list, tuple)) else entry)


def _subset(records: Sequence[Mapping[str, Any]]) -> SubsetSummary:
    columns: dict[str, dict[str, list[float]]] = {side: defaultdict(list) for side in ("actor", "opponent", "average")}
    for record in records:
        role = record.get("actor_role", "agent1")
        if role not in ("agent1", "agent2"):
            raise ValueError(f"episode {record.get('env_id')}: actor_role must be agent1 or agent2, got {role!r}")
        other = "agent2" if role == "agent1" else "agent1"
        actor_scores, opponent_scores = record[f"{role}_scores"], record[f"{other}_scores"]
        mine = [_score(actor_scores, d.name) for d in DIMENSIONS]
        theirs = [_score(opponent_scores, d.name) for d in DIMENSIONS]
        for dim, a, o in zip(DIMENSIONS, mine, theirs):
            columns["actor"][dim.name].append(a)
            columns["opponent"][dim.name].append(o)
            columns["average"][dim.name].append((a + o) / 2)
        columns["actor"][OVERALL].append(sum(mine) / len(mine))
        columns["opponent"][OVERALL].append(sum(theirs) / len(theirs))
        columns["average"][OVERALL].append((sum(mine) + sum(theirs)) / (len(mine) + len(theirs)))
    keys = [d.name for d in DIMENSIONS] + [OVERALL]
    stats = {side: {key: Stat.of(columns[side][key]) for key in keys} for side in columns}
    return SubsetSummary(len(records), stats["actor"], stats["opponent"], stats["average"])


def _modes(records: Sequence[Mapping[str, Any]]) -> ModeUsage | None:
    turns: Counter[str] = Counter()
    tokens: dict[str, list[float]] = defaultdict(list)
    thinking: dict[str, list[float]] = defaultdict(list)
    for record in records:
        modes = record.get("modes")
        if modes is None:
            continue
        lengths, thought = record.get("tokens"), record.get("thinking_tokens")
        for name, values in (("token", lengths), ("thinking-token", thought)):
            if values is not None and len(values) != len(modes):
                raise ValueError(f"episode {record.get('env_id')}: {len(modes)} modes but {len(values)} {name} counts")
        for i, mode in enumerate(modes):
            key = INVALID_MODE if mode is None else mode if isinstance(mode, str) else str(int(mode))
            turns[key] += 1
            if lengths is not None:
                tokens[key].append(float(lengths[i]))
            if thought is not None and thought[i] is not None:
                thinking[key].append(float(thought[i]))
    if not turns:
        return None
    total = sum(turns.values())
    order = sorted(turns, key=lambda k: (k == INVALID_MODE, k))
    return ModeUsage(
        turns={k: turns[k] for k in order},
        share={k: turns[k] / total for k in order},
        mean_tokens={k: sum(tokens[k]) / len(tokens[k]) for k in order if tokens[k]},
        mean_thinking_tokens={k: sum(thinking[k]) / len(thinking[k]) for k in order if thinking[k]},
    )


def summarise(records: Sequence[Mapping[str, Any]], hard_ids: Collection[int] = ()) -> ResultsSummary:
    """Summarise evaluated episode records (see the module docstring for every figure)."""
    included = [r for r in records if not _is_excluded(r)]
    excluded = [r for r in records if _is_excluded(r)]
    hard_records = [r for r in records if _is_hard(r, hard_ids)]
    reasons = Counter(str(r.get("exclusion_reason") or "no scores") for r in excluded)
    return ResultsSummary(
        records=len(records),
        excluded=len(excluded),
        exclusion_reasons=dict(reasons),
        all=_subset(included),
        hard=_subset([r for r in included if _is_hard(r, hard_ids)]),
        modes=_modes(records),
        hard_modes=_modes(hard_records),
    )


def _cell(stat: Stat) -> str:
    return "n/a" if stat.n == 0 else f"{stat.mean:.2f} ± {stat.std:.2f}"


def render_summary(summary: ResultsSummary, style: Literal["markdown", "text"] = "markdown") -> str:
    """The summary as tables (one per subset, rows = dimensions and overall, columns = actor, opponent,
    average), followed by the mode usage. ``markdown`` gives pipe tables, ``text`` aligned columns."""
    names = {d.name: f"{d.code} ({d.name})" for d in DIMENSIONS} | {OVERALL: "overall"}
    lines = [
        f"episodes: {summary.records}, evaluated: {summary.records - summary.excluded}, excluded: {summary.excluded}"
        + (f" {summary.exclusion_reasons}" if summary.exclusion_reasons else "")
    ]
    for title, subset in (("all", summary.all), ("hard", summary.hard)):
        header = ["dimension", "actor", "opponent", "average"]
        rows = [
            [names[key], _cell(subset.actor[key]), _cell(subset.opponent[key]), _cell(subset.average[key])]
            for key in names
        ]
        lines += ["", f"{title} ({subset.episodes} episodes)", *_table(header, rows, style)]
    for title, usage in (("modes, all", summary.modes), ("modes, hard", summary.hard_modes)):
        if usage is None:
            continue
        header = ["mode", "turns", "share", "mean tokens", "mean thinking tokens"]
        rows = [
            [
                key,
                str(usage.turns[key]),
                f"{usage.share[key]:.1%}",
                f"{usage.mean_tokens[key]:.1f}" if key in usage.mean_tokens else "n/a",
                f"{usage.mean_thinking_tokens[key]:.1f}" if key in usage.mean_thinking_tokens else "n/a",
            ]
            for key in usage.turns
        ]
        lines += ["", title, *_table(header, rows, style)]
    return "\n".join(lines) + "\n"


def _table(header: list[str], rows: list[list[str]], style: str) -> list[str]:
    if style == "markdown":
        return [
            "| " + " | ".join(header) + " |",
            "|" + "|".join(" --- " for _ in header) + "|",
            *("| " + " | ".join(row) + " |" for row in rows),
        ]
    if style != "text":
        raise ValueError(f"unknown style {style!r}; expected 'markdown' or 'text'")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    return ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in [header, *rows]]


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m reward.evaluator RESULTS [--hard-ids sotopia_hard.json] [--style text]``: print the summary."""
    parser = argparse.ArgumentParser(description="Summarise a Sotopia evaluation results file (JSON list or JSONL).")
    parser.add_argument("results", type=Path)
    parser.add_argument("--hard-ids", type=Path, help="JSON list of hard episode ids (e.g. sotopia_hard.json)")
    parser.add_argument("--style", choices=("markdown", "text"), default="markdown")
    args = parser.parse_args(argv)
    hard_ids = set(json.loads(args.hard_ids.read_text())) if args.hard_ids else set()
    print(render_summary(summarise(load_results(args.results), hard_ids), style=args.style), end="")


if __name__ == "__main__":
    main()


RunMode = Literal["self_play", "vs_partner"]


def run_mode_of(records: Sequence[Mapping[str, Any]]) -> RunMode:
    """A results file's protocol: the records' own `run_mode`, else (the authors' files) vs-partner when the model
    also played agent 2."""
    modes = {r.get("run_mode") for r in records} - {None}
    if modes:
        if len(modes) > 1:
            raise ValueError(f"one results file mixes run modes {sorted(modes)}")
        return modes.pop()  # type: ignore[return-value]
    return "vs_partner" if any(r.get("actor_role") == "agent2" for r in records) else "self_play"


def table1_markdown(runs: Sequence[tuple[RunMode, ResultsSummary]]) -> str:
    """The layout of the paper's Table 1 (self-play and vs-partner, all and hard episodes, GOAL and overall) over
    one or several runs of one policy: each cell is the mean over the runs of that protocol, ± the standard
    deviation between runs when there are several (the paper averages four). Self-play cells read the average of
    the two agents (both are the model); vs-partner cells read the model's side (the actor)."""
    header = ["runs"] + [f"{protocol} {subset} {metric}" for protocol in ("self-play", "vs partner")
                         for subset in ("Sotopia", "Hard") for metric in ("GOAL", "overall")]
    cells = [", ".join(f"{sum(m == mode for m, _ in runs)} {mode.replace('_', '-')}" for mode in ("self_play", "vs_partner"))]
    for mode in ("self_play", "vs_partner"):
        chosen = [s for m, s in runs if m == mode]
        for subset in ("all", "hard"):
            for metric in ("goal", OVERALL):
                values = [
                    (getattr(s, subset).average if mode == "self_play" else getattr(s, subset).actor)[metric].mean
                    for s in chosen
                    if getattr(s, subset).episodes
                ]
                if not values:
                    cells.append("—")
                elif len(values) == 1:
                    cells.append(f"{values[0]:.2f}")
                else:
                    cells.append(f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}")
    return "\n".join(_table(header, [cells], "markdown"))
