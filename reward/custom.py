"""Custom rewards: replace the judge reward with your own function (``reward.custom_reward: "module:function"``).

Contract. The reward pool still runs the format check first: a response that breaks the format earns -2 and the
function is not called. For every well-formed response the pool calls ``function(context)`` with a
:class:`CustomRewardContext` instead of asking the judge. The function returns a finite float (or an awaitable of
one; async functions are awaited in the reward actor's event loop), which becomes the sample's reward as is: no
goal-progress or length factor is applied on top (``context.length_score`` is there to combine it yourself). If it
raises or returns something that is not a finite number, the sample is marked invalid with the reason
``custom_reward_error`` and gets no reward, like a judge failure. The function runs inside a Ray actor, so its
module must be importable there (an installed package, or one of this repository's packages).

``answer_length_reward`` below is a minimal example and the one the tests use.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from actors.records import Sample
from reward.modes import ParsedResponse

CustomReward = Callable[["CustomRewardContext"], "float | Awaitable[float]"]


@dataclass(frozen=True)
class CustomRewardContext:
    """Everything the pool knows about one well-formed sample when the custom reward is asked.

    * ``sample``: the sampled response as generated (text, token ids, policy version, ...);
    * ``parsed``: the format check's result (``mode``, quoted ``answer``);
    * ``state``: the RL state of the group (``Group.request.context``: turn, dialog, names, goals, state_reward);
    * ``actor``: "agent1" or "agent2", the side that speaks at this turn;
    * ``answer_tokens``: policy-tokenizer tokens of the answer (quotes included, thinking excluded);
    * ``length_score``: the answer-length score for those tokens (``reward.scores.answer_length_score``).
    """

    sample: Sample
    parsed: ParsedResponse
    state: Mapping[str, Any]
    actor: str
    answer_tokens: int
    length_score: float


def load_custom_reward(spec: str) -> CustomReward:
    """Import ``"package.module:function"``. Raises ValueError for a malformed spec or a missing or
    non-callable attribute, ImportError when the module cannot be imported."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"custom_reward {spec!r} must look like 'package.module:function'")
    module = importlib.import_module(module_name)
    function = getattr(module, attr, None)
    if function is None:
        raise ValueError(f"custom_reward {spec!r}: module {module_name!r} has no attribute {attr!r}")
    if not callable(function):
        raise ValueError(f"custom_reward {spec!r} is not callable")
    return function


def answer_length_reward(context: CustomRewardContext) -> float:
    """Example: reward short answers only, ignoring the judge (the answer-length score alone)."""
    return context.length_score
