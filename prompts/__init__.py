"""Every text the system sends to a model, as template files a run can replace.

The project's own templates ship in this folder; the config's ``prompts`` section names the file of each one
(``ampo:<name>.txt`` is the shipped file, any other value a path). Templates are Jinja2 text: ``{{ name }}`` inserts a
value, ``{% if %}``/``{% for %}`` lines vanish from the output, and the file's last newline is dropped (editors add
one). Each template has a fixed set of values it may use and a subset it must use; a template that uses an unknown
value, misses a required one, or does not parse fails when the run starts, naming the file and the value.

=============  ====================================================  ==============================================
template       what it is                                            values (required ones in bold)
=============  ====================================================  ==============================================
system         the thinking-mode system prompt of the policy         (none)
turn           the user message of the speaker at one turn           **background**, **dialog**, name, turn
background     the scenario block inside the turn prompt and the     **scenario**, **agent1_goal**, **agent2_goal**,
               evaluator's intro                                     agent1_name, agent2_name, agent1_background,
                                                                     agent2_background
goal_judge     the reward judge's goal-progress question             **history**, **agent1_goal**, **agent2_goal**,
                                                                     agent1_name, agent2_name
evaluator      the 7-dimension episode evaluator's question          **intro**, **dialog**, schema
reformat       the one retry of a judge answer that did not parse    **text**, schema
demo           the expert's request for one demonstration            **turn_prompt**, **keys**, level, mode_name,
                                                                     sections, example
=============  ====================================================  ==============================================

``docs/fidelity.md`` describes what each value holds and compares the layouts with the authors'.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import jinja2
from jinja2 import meta

BUILTIN_PREFIX = "ampo:"
"""A template path starting with this names a file shipped in this folder (``ampo:turn.txt``)."""

HERE = Path(__file__).resolve().parent


@dataclass(frozen=True)
class TemplateSpec:
    """The values one template may use, and those it must use."""

    required: frozenset[str]
    optional: frozenset[str] = frozenset()

    @property
    def known(self) -> frozenset[str]:
        return self.required | self.optional


SPECS: dict[str, TemplateSpec] = {
    "system": TemplateSpec(frozenset()),
    "turn": TemplateSpec(frozenset({"background", "dialog"}), frozenset({"name", "turn"})),
    "background": TemplateSpec(
        frozenset({"scenario", "agent1_goal", "agent2_goal"}),
        frozenset({"agent1_name", "agent2_name", "agent1_background", "agent2_background"}),
    ),
    "goal_judge": TemplateSpec(frozenset({"history", "agent1_goal", "agent2_goal"}), frozenset({"agent1_name", "agent2_name"})),
    "evaluator": TemplateSpec(frozenset({"intro", "dialog"}), frozenset({"schema"})),
    "reformat": TemplateSpec(frozenset({"text"}), frozenset({"schema"})),
    "demo": TemplateSpec(frozenset({"turn_prompt", "keys"}), frozenset({"level", "mode_name", "sections", "example"})),
}
"""Every template by name (the fields of the config's ``prompts`` section)."""


class TemplateError(ValueError):
    """A template file that cannot serve its role; the message names the file and what is wrong."""


def _environment() -> jinja2.Environment:
    # StrictUndefined: a value the caller does not pass is an error, never an empty string in a prompt.
    return jinja2.Environment(
        undefined=jinja2.StrictUndefined, keep_trailing_newline=False, trim_blocks=True, lstrip_blocks=True,
        autoescape=False,
    )


_ENV = _environment()


@functools.lru_cache(maxsize=64)
def _compile(text: str) -> jinja2.Template:
    return _ENV.from_string(text)


def resolve_path(path: str) -> Path:
    """The file a ``prompts.*`` value names: ``ampo:<name>`` in this folder, anything else as a path."""
    if path.startswith(BUILTIN_PREFIX):
        return HERE / path[len(BUILTIN_PREFIX):]
    return Path(path).expanduser()


@dataclass(frozen=True)
class PromptTemplate:
    """One checked template: its role (``name``), where it came from (``source``) and its text."""

    name: str
    source: str
    text: str

    @classmethod
    def parse(cls, name: str, source: str, text: str) -> PromptTemplate:
        """Check ``text`` against the values of template ``name``; raises TemplateError naming ``source``."""
        spec = SPECS.get(name)
        if spec is None:
            raise TemplateError(f"unknown template {name!r}; the templates are {sorted(SPECS)}")
        try:
            used = meta.find_undeclared_variables(_ENV.parse(text))
        except jinja2.TemplateSyntaxError as exc:
            raise TemplateError(f"{source} (prompts.{name}), line {exc.lineno}: {exc.message}") from None
        unknown = sorted(used - spec.known)
        if unknown:
            raise TemplateError(
                f"{source} (prompts.{name}) uses the unknown placeholder {{{{ {unknown[0]} }}}}"
                f"{' (and ' + ', '.join(unknown[1:]) + ')' if unknown[1:] else ''}; "
                f"this template may use {sorted(spec.known) or 'no placeholders'}"
            )
        missing = sorted(spec.required - used)
        if missing:
            raise TemplateError(
                f"{source} (prompts.{name}) lacks the required placeholder {{{{ {missing[0]} }}}}"
                f"{' (and ' + ', '.join(missing[1:]) + ')' if missing[1:] else ''}"
            )
        return cls(name, source, text)

    @classmethod
    def load(cls, name: str, path: str) -> PromptTemplate:
        """Read and check the file ``path`` names (see :func:`resolve_path`)."""
        file = resolve_path(path)
        try:
            text = file.read_text(encoding="utf-8")
        except OSError as exc:
            raise TemplateError(f"prompts.{name}: cannot read {file}: {exc.strerror or exc}") from None
        return cls.parse(name, str(file), text)

    @property
    def placeholders(self) -> frozenset[str]:
        return frozenset(meta.find_undeclared_variables(_ENV.parse(self.text)))

    def render(self, **values: Any) -> str:
        """The prompt. Every known value may be passed; those the template does not use are ignored."""
        unknown = sorted(set(values) - SPECS[self.name].known)
        if unknown:  # a caller bug, not a user error: the caller and SPECS disagree
            raise TypeError(f"template {self.name!r} has no values {unknown}")
        return _compile(self.text).render(**values)


@dataclass(frozen=True)
class PromptSet:
    """One template per role; :data:`DEFAULT_PROMPTS` holds the shipped ones."""

    system: PromptTemplate
    turn: PromptTemplate
    background: PromptTemplate
    goal_judge: PromptTemplate
    evaluator: PromptTemplate
    reformat: PromptTemplate
    demo: PromptTemplate

    @classmethod
    def load(cls, paths: dict[str, str]) -> PromptSet:
        """Load a template per field from ``paths`` (template name -> path); a missing name gets the shipped file."""
        unknown = sorted(set(paths) - set(SPECS))
        if unknown:
            raise TemplateError(f"unknown templates {unknown}; the templates are {sorted(SPECS)}")
        return cls(**{f.name: PromptTemplate.load(f.name, paths.get(f.name, default_path(f.name))) for f in fields(cls)})

    def sources(self) -> dict[str, str]:
        """Template name -> the file it was read from (for logs and run records)."""
        return {f.name: getattr(self, f.name).source for f in fields(self)}


def default_path(name: str) -> str:
    """The config value naming the shipped file of template ``name``."""
    return f"{BUILTIN_PREFIX}{name}.txt"


DEFAULT_PROMPTS: PromptSet = PromptSet.load({})
"""The project's own templates."""
