"""The one validated configuration of a run.

Each role owns the pydantic model of its section (`actors/config.py`, `reward/config.py`,
`learner/config.py`); this module composes them into the file users edit, loads it from YAML,
applies dotted command-line overrides (`learner.lr=3e-7`) and turns validation failures into
errors that name the field: a mistyped key names the closest valid one, a wrong type names the
expected type.
"""

from __future__ import annotations

import difflib
import re
import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, Field, ValidationError, model_validator

from actors.config import ConfigSection, DataConfig, RolloutConfig
from learner.config import AlgorithmConfig, BCConfig, LearnerConfig
from prompts import PromptSet, TemplateError
from prompts import default_path as default_prompt_path
from reward.config import JudgeConfig, RewardConfig


class ClusterConfig(ConfigSection):
    """Where the roles run."""

    address: str = "local"
    """Ray cluster to join: `local` starts a private single-node Ray on 127.0.0.1, `auto` joins the cluster
    this process runs in (what `ray job submit` gives), or a `ray://host:port` address."""
    num_cpus: int | None = Field(None, ge=1)
    """CPUs of the local Ray node (local mode only; null: all)."""
    ray_task_history: int = Field(10_000, ge=1)
    """Task attempts Ray's control plane (GCS) keeps for the dashboard's task table, local mode only. Each costs
    about 3.5 KiB of GCS memory and a run makes tens of thousands an hour, so Ray's default of 100,000 lets the GCS
    grow by some 350 MiB before it levels off (docs/reliability.md, Chaos and soak). On a cluster set
    `RAY_task_events_max_num_task_in_gcs` in the environment of `ray start` on the head node instead."""
    rollout_gpus_per_actor: float = Field(0.0, ge=0)
    """GPUs in each rollout actor's placement bundle (0 on CPU; rollout.tensor_parallel_size on GPU)."""
    learner_gpus_per_rank: float = Field(0.0, ge=0)
    """GPUs in each learner rank's placement bundle (0 on CPU, 1 on GPU)."""
    learner_cpus_per_rank: int = Field(1, ge=1)
    """CPUs in each learner rank's placement bundle; without GPUs also the rank's torch thread count (Ray sets
    a CPU actor's OMP_NUM_THREADS to its CPUs)."""
    pin_learner_cpus: bool = False
    """Local mode on a CPU-only Linux machine: reserve the last `learner_cpus_per_rank × learner.num_ranks` cores
    for the learner ranks and keep this process, Ray and every other role off them (CPU affinity), so that
    generation and learning do not preempt each other, as they would not on separate GPUs. Ignored (with a
    warning) when no core would be left for the other roles."""
    reward_cpus_per_actor: float = Field(0.5, gt=0)
    """CPUs reserved for each reward actor."""
    rollout_resources: dict[str, float] = {}
    """Custom Ray resources the rollout role asks for in total, shared out over its actors, to pin it to node types:
    {"rollout_node": 1} puts every rollout actor on nodes started with `--resources '{"rollout_node": 1}'`."""
    learner_resources: dict[str, float] = {}
    """Custom Ray resources the learner role asks for in total, shared out over its ranks (e.g. {"learner_node": 1}:
    every rank on nodes started with `--resources '{"learner_node": 1}'`)."""
    run_dir: Path = Path("runs/default")
    """Run directory: resolved config, rollouts (Parquet), metrics (JSONL), checkpoints, reports. `{section.field}`
    placeholders are filled from the config, e.g. `runs/llama-{algorithm.estimator}-seed{cluster.seed}` gives a
    GRPO baseline or another seed its own folder."""
    seed: int = 1
    """Global seed (torch, numpy, python)."""


class ChatModelConfig(JudgeConfig):
    """A model behind an OpenAI-compatible chat API that plays in episodes (the partner of vs-partner evaluations, or
    an API model as the evaluated policy): an endpoint like the judge's, plus how its replies are sampled."""

    temperature: float = Field(0.0, ge=0)
    """Sampling temperature of the partner's replies (paper: 0 for GPT-4o; the authors' configs use 0.7 for the
    reasoning models QwQ-32B and DeepSeek-R1)."""
    top_p: float = Field(1.0, gt=0, le=1)
    """Nucleus-sampling mass of the partner's replies (paper: 1, no truncation)."""


class EvalConfig(ConfigSection):
    """Sotopia evaluation: full episodes judged on 7 dimensions (docs/protocol.md, Evaluation)."""

    every_steps: int = Field(50, ge=0)
    """Evaluate every this many learner steps (0: only before and after training)."""
    full_every_steps: int = Field(150, ge=0)
    """At multiples of this, evaluate all episodes instead of the hard subset (the authors' validation schedule)."""
    hard_only: bool = True
    """Periodic evaluations play only the hard subset."""
    max_turns: int = Field(20, ge=1)
    """Utterances per episode (Sotopia: 20)."""
    max_episodes: int | None = Field(None, ge=1)
    """Cap on episodes per evaluation (null: all)."""
    judge: JudgeConfig = JudgeConfig(max_tokens=4096)
    """Episode evaluator (paper: gpt-4o-2024-08-06, temperature 0)."""
    partner: ChatModelConfig | None = None
    """Partner model reached through an OpenAI-compatible API; null plays self-play."""
    policy: ChatModelConfig | None = None
    """The evaluated policy as a model behind an OpenAI-compatible API (Table 1's API-model rows, e.g. GPT-4o);
    null evaluates `rollout.model` (or the checkpoint given to `ampo eval --policy`) on a local vLLM engine."""
    thinking: bool = True
    """The evaluated policy gets the thinking system prompt (`prompts.system`) and its utterance is its answer block;
    false evaluates it as a plain instruct model (Table 1's base rows): user message only, its quoted reply read as
    the partner's is."""


class PromptsConfig(ConfigSection):
    """Every text the system sends to a model is a template file: `ampo:<name>.txt` is the project's own file
    (shipped in the package's `prompts/` folder), any other value a path. Templates are Jinja2 text (`{{ name }}`
    inserts a value); one that uses an unknown value or misses a required one stops the run at start-up, naming the
    file. docs/fidelity.md lists what each template holds, side by side with the authors' prompts."""

    system: str = default_prompt_path("system")
    """The policy's system prompt: the four thinking modes and the output format (no values)."""
    turn: str = default_prompt_path("turn")
    """The speaker's user message at one turn. Values: background, dialog (required), name, turn."""
    background: str = default_prompt_path("background")
    """The scenario block of the turn prompt and of the evaluator's intro. Values: scenario, agent1_goal, agent2_goal
    (required), agent1_name, agent2_name, agent1_background, agent2_background."""
    goal_judge: str = default_prompt_path("goal_judge")
    """The reward judge's goal-progress question. Values: history, agent1_goal, agent2_goal (required), agent1_name,
    agent2_name."""
    evaluator: str = default_prompt_path("evaluator")
    """The 7-dimension episode evaluator's question, rubric included. Values: intro, dialog (required), schema."""
    reformat: str = default_prompt_path("reformat")
    """The one retry of an evaluator answer that did not parse. Values: text (required), schema."""
    demo: str = default_prompt_path("demo")
    """The expert's request for one demonstration. Values: turn_prompt, keys (required), level, mode_name, sections,
    example."""

    @model_validator(mode="after")
    def _templates_check(self) -> PromptsConfig:
        try:
            self.load()
        except TemplateError as exc:
            raise ValueError(str(exc)) from None
        return self

    def load(self) -> PromptSet:
        """The checked templates."""
        return PromptSet.load(self.model_dump())


class LoggingConfig(ConfigSection):
    """What a run writes and exposes."""

    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    """Log level."""
    metrics_port: int = Field(9400, ge=0, le=65535)
    """Port of the Prometheus endpoint a local-mode Ray exports every role's series on (0: pick a free one;
    `configs/prometheus-local.yml` scrapes 9400). On a cluster, Ray's own export ports serve them."""
    save_rollouts: bool = True
    """Write every scored group to `<run_dir>/rollouts/*.parquet`."""
    run_name: str | None = Field(None, min_length=1)
    """The `run` tag of every Prometheus series (it keeps concurrent runs on one cluster apart), also the W&B project
    and run name; null: the name of `cluster.run_dir`."""
    tensorboard: bool = False
    """Also write every `metrics.jsonl` record as TensorBoard scalars to `<run_dir>/tensorboard/` (needs the
    tensorboard package, or tensorboardX: `pip install tensorboard`)."""
    wandb: bool = False
    """Also log every `metrics.jsonl` record to Weights & Biases in offline mode (`WANDB_MODE=offline`, files in
    `<run_dir>/wandb/`, project and run named after the run; `wandb sync` uploads them later). Needs `pip install
    wandb`."""


class Config(ConfigSection):
    """A whole AMPO run."""

    cluster: ClusterConfig = ClusterConfig()
    """Ray placement and the run directory."""
    rollout: RolloutConfig = RolloutConfig()
    """vLLM rollout actors."""
    reward: RewardConfig = RewardConfig()
    """Reward service and judge."""
    learner: LearnerConfig = LearnerConfig()
    """FSDP learner."""
    algorithm: AlgorithmConfig = AlgorithmConfig()
    """AMPO / GRPO."""
    bc: BCConfig = BCConfig()
    """Behaviour cloning."""
    data: DataConfig = DataConfig()
    """Scenarios, RL states, demonstrations."""
    eval: EvalConfig = EvalConfig()
    """Sotopia evaluation."""
    prompts: PromptsConfig = PromptsConfig()
    """Prompt templates."""
    logging: LoggingConfig = LoggingConfig()
    """Logs and metrics."""


class ConfigError(ValueError):
    """A config file or override is wrong; the message names the field."""


EXPERIMENT_FIELDS: tuple[str, ...] = (
    "algorithm.estimator", "algorithm.groups_per_step", "algorithm.max_staleness", "algorithm.clip_ratio",
    "algorithm.kl_coef", "algorithm.kl_clamp", "algorithm.entropy_coef", "algorithm.tis_cap", "algorithm.adv_eps",
    "algorithm.tie_tolerance",
    "learner.lr", "learner.betas", "learner.weight_decay", "learner.warmup_steps", "learner.grad_clip",
    "rollout.model", "rollout.n", "rollout.temperature", "rollout.top_p", "rollout.top_k", "rollout.max_response_tokens",
    "rollout.max_prompt_tokens", "rollout.seed",
    "reward.judge.model", "reward.length_target", "reward.length_scale", "reward.judge_failure_as_zero",
    "reward.custom_reward",
    "data.train_states", "data.shuffle", "data.seed", "cluster.seed",
    "prompts.system", "prompts.turn", "prompts.background", "prompts.goal_judge",
)
"""The fields that define an experiment: a checkpoint resumes only into a config that agrees on all of them.
Everything else (placement, sizes of pools, timeouts, logging, `algorithm.total_steps`) may change on resume."""


def experiment_differences(saved: dict[str, Any], current: Config) -> list[str]:
    """``field: saved -> current`` for each experiment field on which a checkpoint's config (its YAML, as a mapping)
    and ``current`` differ; a field the saved config lacks counts as its default."""
    from omegaconf import OmegaConf

    before = OmegaConf.merge(OmegaConf.create(Config().model_dump(mode="json")), OmegaConf.create(saved))
    now = OmegaConf.create(current.model_dump(mode="json"))
    return [
        f"{key}: {OmegaConf.select(before, key)!r} -> {OmegaConf.select(now, key)!r}"
        for key in EXPERIMENT_FIELDS
        if OmegaConf.select(before, key) != OmegaConf.select(now, key)
    ]


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Load `path` (YAML; None: all defaults), apply `key.sub=value` overrides, validate."""
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(raw).__name__}")
    for item in overrides:
        _apply_override(raw, item)
    return validate_config(raw, source=str(path) if path else "defaults")


def validate_config(raw: dict[str, Any], source: str = "config") -> Config:
    """``raw`` (a file's sections plus overrides) merged onto every default, then validated. The merge keeps the
    defaults of a nested section that ``raw`` only partly sets: `eval.judge.model=foo` must leave the evaluator's
    own default `max_tokens: 4096`, not the judge section's general 1024."""
    from omegaconf import OmegaConf

    defaults = OmegaConf.create(Config().model_dump(mode="json"))
    merged = OmegaConf.to_container(OmegaConf.merge(defaults, OmegaConf.create(raw)))
    try:
        config = Config.model_validate(merged)
    except ValidationError as exc:
        raise ConfigError(f"{source}: " + "; ".join(_describe(err) for err in exc.errors())) from None
    config.cluster.run_dir = _fill_placeholders(str(config.cluster.run_dir), config, source)
    return config


_PLACEHOLDER = re.compile(r"\{([a-z_]+(?:\.[a-z_]+)+)\}")


def _fill_placeholders(text: str, config: Config, source: str) -> Path:
    """`{section.field}` in a path replaced by that field's value."""

    def value(match: re.Match[str]) -> str:
        node: Any = config
        for part in match.group(1).split("."):
            if not isinstance(node, BaseModel) or part not in type(node).model_fields:
                raise ConfigError(f"{source}: cluster.run_dir names an unknown field {{{match.group(1)}}}")
            node = getattr(node, part)
        return str(node)

    return Path(_PLACEHOLDER.sub(value, text))


def _apply_override(raw: dict[str, Any], item: str) -> None:
    key, sep, text = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {item!r} must look like section.field=value")
    node = raw
    parts = key.strip().split(".")
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if child is None:  # an optional section left null (eval.partner): the override starts it
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"override {item!r}: {part!r} is a value, not a section")
        node = child
    # YAML parsing gives numbers, booleans, null and lists their natural types; "3e-7" stays a string
    # in YAML 1.1 and pydantic then converts it to the float the field expects.
    node[parts[-1]] = yaml.safe_load(text) if text.strip() else ""


def _describe(err: dict[str, Any]) -> str:
    loc = tuple(str(p) for p in err["loc"])
    dotted = ".".join(loc)
    if err["type"] == "extra_forbidden":
        valid = _field_names_at(loc[:-1])
        close = difflib.get_close_matches(loc[-1], valid, n=1, cutoff=0.5)
        hint = f"; did you mean {'.'.join(loc[:-1] + (close[0],))!r}?" if close else ""
        return f"unknown key {dotted!r}{hint} (valid keys here: {', '.join(valid)})"
    if err["type"] == "value_error":  # a rule of the field itself: its message says what to do
        return f"{dotted}: {err['msg'].removeprefix('Value error, ')}"
    expected = _field_type_at(loc)
    got = err.get("input")
    shown = repr(got) if not isinstance(got, dict) else "a mapping"
    return f"field {dotted!r} expects {expected}, got {shown}: {err['msg']}"


def _model_at(loc: tuple[str, ...]) -> type[BaseModel] | None:
    model: type[BaseModel] = Config
    for part in loc:
        field = model.model_fields.get(part)
        if field is None:
            return None
        sub = _submodel(field.annotation)
        if sub is None:
            return None
        model = sub
    return model


def _submodel(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        sub = _submodel(arg)
        if sub is not None:
            return sub
    return None


def _field_names_at(loc: tuple[str, ...]) -> list[str]:
    model = _model_at(loc)
    return list(model.model_fields) if model else []


def _field_type_at(loc: tuple[str, ...]) -> str:
    model = _model_at(loc[:-1])
    field = model.model_fields.get(loc[-1]) if model else None
    if field is None:
        return "a valid value"
    return _type_name(field.annotation)


def _type_name(annotation: Any) -> str:
    if isinstance(annotation, type):
        return annotation.__name__
    return str(annotation).replace("typing.", "").replace("pathlib.", "")


def dump_config(config: Config) -> str:
    """The resolved config as YAML. Configs hold no secrets (keys are read from the environment or a
    key file at run time), so the dump is safe to write into run directories."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)


def config_template(config: Config | None = None) -> str:
    """The full config as commented YAML: every field with its value and its docstring."""
    config = config or Config()
    lines: list[str] = []
    _template_lines(config, lines, indent=0)
    return "\n".join(lines) + "\n"


def _template_lines(model: BaseModel, lines: list[str], indent: int) -> None:
    pad = "  " * indent
    for name, field in type(model).model_fields.items():
        value = getattr(model, name)
        for doc_line in (field.description or "").split("\n"):
            lines.append(f"{pad}# {' '.join(doc_line.split())}".rstrip())
        if isinstance(value, BaseModel):
            lines.append(f"{pad}{name}:")
            _template_lines(value, lines, indent + 1)
        else:
            text = yaml.safe_dump({name: _plain(value)}, default_flow_style=True, width=10_000).strip()
            lines.append(f"{pad}{text[1:-1] if text.startswith('{') else text}")
        if indent == 0:
            lines.append("")


def _plain(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, tuple):
        return list(value)
    return value
