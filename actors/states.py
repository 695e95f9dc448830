"""RL states: frozen Sotopia dialogue prefixes the policy answers one utterance at a time (docs/protocol.md, RL states).

Two on-disk layouts are read, both as JSON (a list or JSON lines) or Parquet:

* **raw records**, the authors' training records: `dialog`, `env_id`, `turn`, `instruction`,
  `agent1_name`, `agent2_name`, `agent1_goal`, `agent2_goal`, `rollout`,
  `state = {agent1: {score}, agent2: {score}, step}` (judge goal scores of the prefix, 0–10);
* **training rows**, what the authors' preprocessing writes and `write_states` writes: `data_source`,
  `prompt` (chat messages: system + user), `ability`, `reward_model = {style, turn, dialog, agent1_name,
  agent2_name, agent1_goal, agent2_goal, state_reward}`, `extra_info = {split, index, env_id, turn,
  rollout}`.

Both become `RLState`. Every validation error names the file, the row and the field.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from actors.jsonrows import read_json_rows
from actors.prompts import dialog_line, open_slot, remove_tags, render_turn_prompt, speaker_of
from actors.sotopia import SotopiaDataset
from prompts import DEFAULT_PROMPTS, PromptSet


class StateScores(BaseModel):
    """The judge's goal scores (0–10) of both agents for the dialogue before the actor speaks."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    agent1: float = Field(ge=0, le=10)
    agent2: float = Field(ge=0, le=10)


class RLState(BaseModel):
    """One training prompt: the dialogue up to the open slot of the speaker at `turn`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    env_id: int = Field(ge=0)
    """Episode id (index into the scenario combos)."""
    turn: int = Field(ge=0)
    """Turn of the open slot; even → agent1 speaks, odd → agent2."""
    dialog: tuple[str, ...]
    """Dialogue lines; the last one is the open slot `Turn t: <speaker> said:`."""
    instruction: str
    """The speaker's full turn prompt (the user message)."""
    agent1_name: str
    agent2_name: str
    agent1_goal: str
    agent2_goal: str
    prior: StateScores
    """Goal scores of the prefix, the `s0` of the goal-progress reward."""
    rollout: int = 0
    """Which simulated episode this state comes from (logging only)."""
    system_prompt: str | None = None
    """The system message baked into training rows; None for raw records (the caller supplies it)."""

    @field_validator("dialog")
    @classmethod
    def _open_slot_last(cls, dialog: tuple[str, ...]) -> tuple[str, ...]:
        if not dialog:
            raise ValueError("must hold at least the open slot line")
        if not dialog[-1].rstrip().endswith("said:"):
            raise ValueError(f"the last line must be the open slot 'Turn t: <name> said:', got {dialog[-1]!r}")
        return dialog

    @model_validator(mode="after")
    def _turn_matches_slot(self) -> RLState:
        if not self.dialog[-1].startswith(f"Turn {self.turn}:"):
            raise ValueError(f"turn {self.turn} does not match the open slot {self.dialog[-1]!r}")
        return self

    @property
    def state_id(self) -> str:
        return f"{self.env_id}:{self.rollout}:{self.turn}"

    @property
    def actor(self) -> int:
        """1 when agent1 speaks at this turn, else 2."""
        return 1 if self.turn % 2 == 0 else 2

    def reward_context(self) -> dict[str, Any]:
        """What the reward service needs about this state (the authors' `reward_model` field)."""
        return {
            "turn": self.turn,
            "dialog": list(self.dialog),
            "agent1_name": self.agent1_name,
            "agent2_name": self.agent2_name,
            "agent1_goal": self.agent1_goal,
            "agent2_goal": self.agent2_goal,
            "state_reward": {"agent1": {"score": self.prior.agent1}, "agent2": {"score": self.prior.agent2}},
        }

    def messages(self, system_prompt: str) -> list[dict[str, str]]:
        return [{"role": "system", "content": system_prompt}, {"role": "user", "content": self.instruction}]


def chat_token_counter(model_path: str | Path) -> Callable[[list[dict[str, str]]], int]:
    """The length of a chat once templated by the policy's tokenizer (with the generation prompt), as the engine
    will see it."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path)

    def count(messages: list[dict[str, str]]) -> int:
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
        return len(ids)

    return count


def text_token_counter(model_path: str | Path) -> Callable[[str], int]:
    """The number of tokens the policy's tokenizer makes of a piece of generated text (no special tokens)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    return lambda text: len(tokenizer(text, add_special_tokens=False)["input_ids"])


def fit_states(
    states: Sequence[RLState],
    count_tokens: Callable[[list[dict[str, str]]], int],
    max_prompt_tokens: int,
    default_system_prompt: str,
) -> tuple[list[RLState], int]:
    """The states whose templated prompt (system prompt, or ``default_system_prompt`` when the state has none, plus
    the turn prompt) is at most ``max_prompt_tokens`` long, in order, and how many were dropped. The authors' data
    loader drops longer rows the same way (its prompt limit is 6144 tokens), rather than cutting a prompt."""
    kept = [s for s in states if count_tokens(s.messages(s.system_prompt or default_system_prompt)) <= max_prompt_tokens]
    return kept, len(states) - len(kept)


class StateDataError(ValueError):
    """A state file or row is malformed; the message names the file, the row and the field."""


def read_states(path: str | Path) -> list[RLState]:
    """Read RL states from JSON, JSON lines or Parquet, in either layout (see module docstring)."""
    path = Path(path)
    return [_parse_row(row, path, index) for index, row in enumerate(_read_rows(path))]


def check_states(path: str | Path, max_errors: int = 10) -> tuple[int, list[str]]:
    """Validate every row; return (number of valid rows, the first `max_errors` error messages)."""
    path = Path(path)
    valid, errors = 0, []
    for index, row in enumerate(_read_rows(path)):
        try:
            _parse_row(row, path, index)
            valid += 1
        except StateDataError as exc:
            if len(errors) < max_errors:
                errors.append(str(exc))
    return valid, errors


def _read_rows(path: Path) -> list[Any]:
    """The rows of a state file: Parquet, or JSON (a list or JSON lines)."""
    if path.suffix != ".parquet":
        return read_json_rows(path, error=StateDataError, what="state records")
    if not path.is_file():
        raise StateDataError(f"{path}: file not found")
    try:
        return pq.read_table(path).to_pylist()
    except pa.ArrowInvalid as exc:
        raise StateDataError(f"{path}: not a readable Parquet file: {exc}") from None


def _parse_row(row: Any, path: Path, index: int) -> RLState:
    where = f"{path}: row {index}"
    if not isinstance(row, dict):
        raise StateDataError(f"{where}: expected a record, got {type(row).__name__}")
    try:
        fields = _training_row_fields(row) if "reward_model" in row else _raw_record_fields(row)
        return RLState.model_validate(fields)
    except KeyError as exc:
        raise StateDataError(f"{where}: missing field {exc.args[0]!r}") from None
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(p) for p in first["loc"]) or "record"
        field = {"prior.agent1": "state.agent1.score", "prior.agent2": "state.agent2.score"}.get(field, field)
        raise StateDataError(f"{where}: field {field!r}: {first['msg']} (got {first.get('input')!r})") from None


def _raw_record_fields(row: dict[str, Any]) -> dict[str, Any]:
    state = row["state"]
    return {
        "env_id": row["env_id"],
        "turn": row["turn"],
        "dialog": row["dialog"],
        "instruction": row["instruction"],
        "agent1_name": row["agent1_name"],
        "agent2_name": row["agent2_name"],
        "agent1_goal": row["agent1_goal"],
        "agent2_goal": row["agent2_goal"],
        "rollout": row.get("rollout", 0),
        "prior": {"agent1": _score(state, "agent1"), "agent2": _score(state, "agent2")},
    }


def _training_row_fields(row: dict[str, Any]) -> dict[str, Any]:
    reward_model, extra = row["reward_model"], row.get("extra_info") or {}
    prompt = row["prompt"]
    roles = {message["role"]: message["content"] for message in prompt}
    if "user" not in roles:
        raise KeyError("prompt[user]")
    state = reward_model["state_reward"]
    return {
        "env_id": extra.get("env_id", 0),
        "turn": reward_model["turn"],
        "dialog": reward_model["dialog"],
        "instruction": roles["user"],
        "system_prompt": roles.get("system"),
        "agent1_name": reward_model["agent1_name"],
        "agent2_name": reward_model["agent2_name"],
        "agent1_goal": reward_model["agent1_goal"],
        "agent2_goal": reward_model["agent2_goal"],
        "rollout": extra.get("rollout", 0),
        "prior": {"agent1": _score(state, "agent1"), "agent2": _score(state, "agent2")},
    }


def _score(state: dict[str, Any], agent: str) -> Any:
    value = state[agent]
    return value["score"] if isinstance(value, dict) else value


TRAINING_ROW_SCHEMA = pa.schema(
    [
        ("data_source", pa.string()),
        ("prompt", pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))),
        ("ability", pa.string()),
        (
            "reward_model",
            pa.struct(
                [
                    ("style", pa.string()),
                    ("turn", pa.int64()),
                    ("dialog", pa.list_(pa.string())),
                    ("agent1_name", pa.string()),
                    ("agent2_name", pa.string()),
                    ("agent1_goal", pa.string()),
                    ("agent2_goal", pa.string()),
                    (
                        "state_reward",
                        pa.struct(
                            [
                                ("agent1", pa.struct([("score", pa.float32())])),
                                ("agent2", pa.struct([("score", pa.float32())])),
                                ("step", pa.int64()),
                            ]
                        ),
                    ),
                ]
            ),
        ),
        (
            "extra_info",
            pa.struct(
                [
                    ("split", pa.string()),
                    ("index", pa.int64()),
                    ("env_id", pa.int64()),
                    ("turn", pa.int64()),
                    ("rollout", pa.int64()),
                ]
            ),
        ),
    ]
)


def training_rows(states: Iterable[RLState], system_prompt: str, split: str = "train") -> list[dict[str, Any]]:
    """States as rows of the authors' training Parquet (docs/protocol.md, RL states)."""
    rows = []
    for index, state in enumerate(states):
        rows.append(
            {
                "data_source": "sotopia",
                "prompt": state.messages(system_prompt),
                "ability": "reason",
                "reward_model": {
                    "style": "model",
                    "turn": state.turn,
                    "dialog": list(state.dialog),
                    "agent1_name": state.agent1_name,
                    "agent2_name": state.agent2_name,
                    "agent1_goal": state.agent1_goal,
                    "agent2_goal": state.agent2_goal,
                    "state_reward": {
                        "agent1": {"score": state.prior.agent1},
                        "agent2": {"score": state.prior.agent2},
                        "step": state.turn,
                    },
                },
                "extra_info": {
                    "split": split,
                    "index": index,
                    "env_id": state.env_id,
                    "turn": state.turn,
                    "rollout": state.rollout,
                },
            }
        )
    return rows


def write_states(states: Iterable[RLState], path: str | Path, system_prompt: str) -> Path:
    """Write states as the authors' training Parquet, atomically (temp file, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    table = pa.Table.from_pylist(training_rows(states, system_prompt), schema=TRAINING_ROW_SCHEMA)
    tmp = path.with_name(path.name + ".tmp")
    pq.write_table(table, tmp)
    tmp.replace(path)
    return path


def load_hub_states(dataset: str, filename: str, revision: str | None = None) -> list[RLState]:
    """Download one state file of a Hugging Face dataset (e.g. the authors' `iiiiwis/AMPO`) and read it.
    Needs network access to the Hub; offline machines pass a local file to `read_states` instead."""
    from huggingface_hub import hf_hub_download

    local = hf_hub_download(repo_id=dataset, filename=filename, repo_type="dataset", revision=revision)
    return read_states(local)


def make_state(
    dataset: SotopiaDataset,
    episode_id: int,
    utterances: Sequence[str],
    prior: tuple[float, float],
    *,
    rollout: int = 0,
    hide_private_info: bool = False,
    prompts: PromptSet = DEFAULT_PROMPTS,
) -> RLState:
    """The state at turn `len(utterances)` of episode `episode_id`: the dialogue so far (quoted utterances,
    agent1 first) plus the open slot of whoever speaks next, with the judge's goal scores `prior` of it."""
    env, agent1, agent2 = dataset.episode(episode_id)
    turn = len(utterances)
    names = (agent1.name, agent2.name)
    dialog = [dialog_line(t, names[speaker_of(t) - 1], u) for t, u in enumerate(utterances)]
    dialog.append(open_slot(turn, names[speaker_of(turn) - 1]))
    return RLState(
        env_id=episode_id,
        turn=turn,
        dialog=tuple(dialog),
        instruction=render_turn_prompt(env, agent1, agent2, turn, dialog, hide_private_info, prompts),
        agent1_name=agent1.name,
        agent2_name=agent2.name,
        agent1_goal=remove_tags(env.agent_goals[0]),
        agent2_goal=remove_tags(env.agent_goals[1]),
        prior=StateScores(agent1=prior[0], agent2=prior[1]),
        rollout=rollout,
    )
