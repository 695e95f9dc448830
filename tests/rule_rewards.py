"""The rule-reward setup shared by the learning check and the reliability tests: a rule reward for
``reward.custom_reward: "tests.rule_rewards:..."``, short demonstrations, and a behaviour-cloned tiny policy.

The reward functions run inside the reward actors, which import this module from the repository root (Ray puts
the driver's working directory on the workers' ``sys.path``), so ``tests`` resolves as a namespace package there.
"""

from __future__ import annotations

from pathlib import Path

from actors.sotopia import SotopiaDataset
from actors.states import RLState, make_state
from learner.config import BCConfig, LearnerConfig
from reward.custom import CustomRewardContext
from reward.modes import format_response

SYSTEM = "Reply in a thinking mode."
INSTRUCTION = "Turn 0: speak."
ANSWERS = ("Sure, see you then.", "Hello there.", "Let us meet at noon.", "That works for me.")
TARGET_ANSWER = ANSWERS[1]


def prefer_greeting(context: CustomRewardContext) -> float:
    """1 when the answer (without its quotes) is ``TARGET_ANSWER``, else 0.

    Why this rule: after behaviour cloning on level-1 demonstrations with four answers, the tiny model picks the
    answer at one token (its first character, right after the opening quote) with probability about 1/4 each, so
    a policy gradient can move it within a few dozen steps. (A rule on the thinking level does not work here: the
    2-layer model does not learn to make the thinking block depend on the level it wrote a few tokens before, so
    half of its level-1/level-2 samples break the format whatever the reward.)
    """
    return 1.0 if context.parsed.answer_text == TARGET_ANSWER else 0.0


def demo_records(count: int) -> list[dict[str, str]]:
    """Level-1 alpaca records cycling through the four answers."""
    return [
        {"system": SYSTEM, "instruction": INSTRUCTION, "input": "", "output": format_response(1, None, ANSWERS[i % len(ANSWERS)])}
        for i in range(count)
    ]


def short_prompt_states(count: int) -> list[RLState]:
    """Bundled-scenario states (valid reward contexts) whose prompt is the demonstrations' prompt: short prompts
    keep the tiny model's steps fast and the cloned format in distribution."""
    dataset = SotopiaDataset.load()
    return [
        make_state(dataset, i, [], (5.0, 5.0)).model_copy(update={"instruction": INSTRUCTION, "system_prompt": SYSTEM})
        for i in range(count)
    ]


def bc_policy(model_dir: Path, out_dir: Path, learner: LearnerConfig | None = None) -> Path:
    """The tiny random model behaviour-cloned on 512 demonstrations (6 epochs of 64 steps, seconds on a CPU): it
    then writes well-formed level-1 responses to the short prompt most of the time. Needs a running Ray."""
    from learner.bc import run_bc

    learner = learner or LearnerConfig(num_ranks=1, micro_batch_size=4, backend="gloo")
    config = BCConfig(lr=3e-3, warmup_ratio=0.05, epochs=6, batch_size=8, cutoff_len=256)
    return run_bc(config, demo_records(512), model_dir, out_dir, learner=learner, seed=1)


def flat_on_half(context: CustomRewardContext) -> float:
    """1 for every well-formed answer when agent 1's name has an even length (with format errors scored 1 too, a
    group there carries no gradient under GRPO), else `prefer_greeting`."""
    if len(context.state["agent1_name"]) % 2 == 0:
        return 1.0
    return prefer_greeting(context)
