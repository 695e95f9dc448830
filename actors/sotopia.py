"""Sotopia scenario data: typed profiles and episodes, loaded from the Sotopia JSON layout.

A scenario folder holds four files:

* ``agents.json``: a dict of agent profiles keyed by their ``pk``;
* ``envs.json``: a dict of environment profiles (scenario, one goal per agent, relationship) keyed by ``pk``;
* ``env_agent_combos.json``: a list of ``{pk, env_id, agent_ids: [agent1, agent2]}``. The list index is the
  **episode id** used everywhere else (evaluation records, RL states, the hard subset);
* ``sotopia_hard.json``: the list of episode ids that form the hard subset.

The project ships a small scenario set written for it (``actors/scenarios/``, the default); the public benchmark
files load the same way. The records are validated strictly (no type coercion, no unknown fields) because a silently
coerced or misspelt field would change every prompt rendered from it; each error names the file, the record (its
``pk`` or list index) and the field. Cross-references (combo -> environment and agents, hard id -> episode) are
checked when a :class:`SotopiaDataset` is built, so a dataset object is always consistent.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from enum import IntEnum
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

BUNDLED_SCENARIOS = Path(__file__).resolve().parent / "scenarios"
"""The scenario set written for this project, used when no folder is given."""

AGENTS_FILE = "agents.json"
ENVS_FILE = "envs.json"
COMBOS_FILE = "env_agent_combos.json"
HARD_FILE = "sotopia_hard.json"


class ScenarioDataError(ValueError):
    """A scenario file is missing, is not valid JSON, or holds a record that does not fit the layout."""


class Relationship(IntEnum):
    """How well the two agents know each other (Sotopia's ``RelationshipType``). It decides how much of the other
    agent's profile original Sotopia shows (see ``actors.prompts``)."""

    STRANGER = 0
    KNOW_BY_NAME = 1
    ACQUAINTANCE = 2
    FRIEND = 3
    ROMANTIC = 4
    FAMILY = 5


_STRICT = ConfigDict(strict=True, extra="forbid", frozen=True)


class AgentProfile(BaseModel):
    """One character. The fields used by the prompts are required; the descriptive extras (big five, values, MBTI,
    ...) default to empty because no prompt reads them."""

    model_config = _STRICT

    pk: str = Field(min_length=1)
    first_name: str = Field(min_length=1)
    last_name: str
    age: int = Field(ge=0)
    occupation: str
    gender: Literal["Man", "Woman", "Nonbinary"]
    gender_pronoun: str
    public_info: str
    personality_and_values: str
    secret: str
    big_five: str = ""
    moral_values: list[str] = []
    schwartz_personal_values: list[str] = []
    decision_making_style: str = ""
    model_id: str = ""
    mbti: str = ""

    @property
    def name(self) -> str:
        """Full name as the prompts print it: ``"<first> <last>"``."""
        return f"{self.first_name} {self.last_name}"


class EnvironmentProfile(BaseModel):
    """One social scenario: the shared situation, one private goal per agent, and the agents' relationship.

    Goals and the scenario may carry Sotopia's markup (``<extra_info>``, ``<strategy_hint>``,
    ``<clarification_hint>``, ``<p viewer="...">``); it is kept here verbatim and interpreted by the renderer."""

    model_config = _STRICT

    pk: str = Field(min_length=1)
    codename: str
    source: str = ""
    scenario: str
    agent_goals: list[str] = Field(min_length=2, max_length=2)
    relationship: int = Field(ge=min(Relationship), le=max(Relationship))
    age_constraint: str | None = None
    occupation_constraint: str | None = None
    agent_constraint: list[list[str]] | None = None

    @property
    def relation(self) -> Relationship:
        """The relationship as an enum (stored as the plain int of the JSON files)."""
        return Relationship(self.relationship)


class EpisodeCombo(BaseModel):
    """One episode: an environment played by an ordered agent pair (``agent_ids[0]`` is agent 1, who speaks first)."""

    model_config = _STRICT

    pk: str = Field(min_length=1)
    env_id: str
    agent_ids: list[str] = Field(min_length=2, max_length=2)


def _validation_message(error: ValidationError) -> str:
    """Every problem of one record as ``field 'a.b': message``, joined; pydantic's own text is too long for a log."""
    parts = []
    for item in error.errors():
        where = ".".join(str(part) for part in item["loc"]) or "(record)"
        parts.append(f"field '{where}': {item['msg']}")
    return "; ".join(parts)


def _read_json(path: Path) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ScenarioDataError(f"{path}: file not found (a scenario folder needs {AGENTS_FILE}, {ENVS_FILE}, "
                                f"{COMBOS_FILE} and {HARD_FILE})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise ScenarioDataError(
            f"{path}: invalid JSON at line {error.lineno} column {error.colno}: {error.msg}"
        ) from None


def _load_keyed(path: Path, model: type[AgentProfile] | type[EnvironmentProfile]) -> dict[str, Any]:
    """A dict file (agents, envs): every value validated, and its key must equal its ``pk``."""
    raw = _read_json(path)
    if not isinstance(raw, dict):
        raise ScenarioDataError(f"{path}: expected a JSON object keyed by pk, found {type(raw).__name__}")
    records: dict[str, Any] = {}
    for key, value in raw.items():
        try:
            record = model.model_validate(value)
        except ValidationError as error:
            raise ScenarioDataError(f"{path}: record '{key}': {_validation_message(error)}") from None
        if record.pk != key:
            raise ScenarioDataError(f"{path}: record '{key}': field 'pk': {record.pk!r} does not match its key")
        records[key] = record
    return records


def _load_combos(path: Path) -> list[EpisodeCombo]:
    raw = _read_json(path)
    if not isinstance(raw, list):
        raise ScenarioDataError(f"{path}: expected a JSON list of episodes, found {type(raw).__name__}")
    combos = []
    for index, value in enumerate(raw):
        try:
            combos.append(EpisodeCombo.model_validate(value))
        except ValidationError as error:
            raise ScenarioDataError(f"{path}: record {index}: {_validation_message(error)}") from None
    return combos


def _load_hard_ids(path: Path) -> list[int]:
    raw = _read_json(path)
    if not isinstance(raw, list):
        raise ScenarioDataError(f"{path}: expected a JSON list of episode ids, found {type(raw).__name__}")
    for index, value in enumerate(raw):
        # bool is an int subclass in Python; `true` is not an episode id.
        if not isinstance(value, int) or isinstance(value, bool):
            raise ScenarioDataError(f"{path}: record {index}: expected an integer episode id, found {value!r}")
    return raw


@dataclass(frozen=True)
class SotopiaDataset:
    """A consistent set of agents, environments, episodes and the hard subset.

    Construction checks the cross-references, so every episode id in ``range(len(dataset))`` resolves to an
    environment and two distinct agents, and every hard id is such an episode id.
    """

    agents: dict[str, AgentProfile]
    envs: dict[str, EnvironmentProfile]
    combos: tuple[EpisodeCombo, ...]
    hard_ids: tuple[int, ...]
    source: Path | None = None
    """The folder it was loaded from; error messages name files in it."""
    _hard: frozenset[int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        folder = self.source or Path(".")
        for index, combo in enumerate(self.combos):
            where = f"{folder / COMBOS_FILE}: record {index} (pk '{combo.pk}')"
            if combo.env_id not in self.envs:
                raise ScenarioDataError(f"{where}: field 'env_id': unknown environment '{combo.env_id}' "
                                        f"(not in {ENVS_FILE})")
            for slot, agent_id in enumerate(combo.agent_ids):
                if agent_id not in self.agents:
                    raise ScenarioDataError(f"{where}: field 'agent_ids.{slot}': unknown agent '{agent_id}' "
                                            f"(not in {AGENTS_FILE})")
            if combo.agent_ids[0] == combo.agent_ids[1]:
                raise ScenarioDataError(f"{where}: field 'agent_ids': both agents are '{combo.agent_ids[0]}'")
        seen: set[int] = set()
        for index, episode_id in enumerate(self.hard_ids):
            where = f"{folder / HARD_FILE}: record {index}"
            if not 0 <= episode_id < len(self.combos):
                raise ScenarioDataError(f"{where}: episode id {episode_id} is out of range ({COMBOS_FILE} has "
                                        f"{len(self.combos)} episodes, ids 0..{len(self.combos) - 1})")
            if episode_id in seen:
                raise ScenarioDataError(f"{where}: episode id {episode_id} is listed twice")
            seen.add(episode_id)
        object.__setattr__(self, "_hard", frozenset(seen))

    @classmethod
    def load(cls, folder: Path | None = None) -> SotopiaDataset:
        """Load a folder in the Sotopia layout; ``None`` loads the scenario set bundled with the project."""
        folder = Path(folder) if folder is not None else BUNDLED_SCENARIOS
        return cls(
            agents=_load_keyed(folder / AGENTS_FILE, AgentProfile),
            envs=_load_keyed(folder / ENVS_FILE, EnvironmentProfile),
            combos=tuple(_load_combos(folder / COMBOS_FILE)),
            hard_ids=tuple(_load_hard_ids(folder / HARD_FILE)),
            source=folder,
        )

    def __len__(self) -> int:
        """Number of episodes (entries of ``env_agent_combos.json``)."""
        return len(self.combos)

    def episode(self, episode_id: int) -> tuple[EnvironmentProfile, AgentProfile, AgentProfile]:
        """The environment, agent 1 and agent 2 of an episode id."""
        if not 0 <= episode_id < len(self.combos):
            raise IndexError(f"episode id {episode_id} is out of range: the dataset has {len(self.combos)} episodes")
        combo = self.combos[episode_id]
        return self.envs[combo.env_id], self.agents[combo.agent_ids[0]], self.agents[combo.agent_ids[1]]

    def is_hard(self, episode_id: int) -> bool:
        """Whether an episode id belongs to the hard subset (by real episode id, never by list position)."""
        return episode_id in self._hard

    def episodes(self, hard_only: bool = False) -> list[int]:
        """Episode ids in file order: all of them, or only the hard subset."""
        return [i for i in range(len(self.combos)) if not hard_only or i in self._hard]
