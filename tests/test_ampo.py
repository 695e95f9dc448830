"""Advantage estimators against hand-computed values (docs/protocol.md, AMPO advantage)."""

from __future__ import annotations

import math
import uuid

import numpy as np
import pytest
import torch

from learner.ampo import ampo_advantages, grpo_advantages, mode_term_groups

# The worked example of docs/protocol.md, AMPO advantage (one group of 8, two samples per mode).
MODES = [1, 1, 2, 2, 3, 3, 4, 4]
REWARDS = [0.5, 0.6, 0.7, 0.5, 0.8, 0.6, 0.9, 0.7]
LENGTHS = [30, 40, 150, 170, 400, 420, 800, 760]
SAMPLE_TERM = [-1.154, -0.444, 0.266, -1.154, 0.977, -0.444, 1.687, 0.266]
MODE_TERM = [-1.015, -0.564, 0.338, 1.240]  # per mode 1..4
FINAL = [-2.169, -1.459, -0.297, -1.718, 1.315, -0.106, 2.927, 1.507]
TIE_FINAL = [0.739, 0.739, 0.513, 0.513, -0.192, -0.192, -0.867, -0.867]


def one_group(n: int) -> list[str]:
    return ["g"] * n


def expected_mode_term(rewards: list[float]) -> np.ndarray:
    """Per-sample A − A^S recomputed from the formulas (independent of the vectorised code)."""
    means = [np.mean([r for r, m in zip(rewards, MODES) if m == k]) for k in (1, 2, 3, 4)]
    mu, sd = np.mean(means), np.std(means, ddof=1)
    return np.array([(means[m - 1] - mu) / (sd + 1e-6) for m in MODES])


# --------------------------------------------------------------------------------------------------- GRPO / A^S


def test_grpo_worked_example_sample_term() -> None:
    np.testing.assert_allclose(grpo_advantages(REWARDS, one_group(8)), SAMPLE_TERM, atol=1e-3)


def test_grpo_uses_unbiased_std() -> None:
    # rewards 0 and 1: mean 0.5, unbiased std sqrt(0.5) → ±0.5/0.7071 = ±0.7071
    out = grpo_advantages([0.0, 1.0], [7, 7])
    np.testing.assert_allclose(out, [-math.sqrt(0.5), math.sqrt(0.5)], atol=1e-5)


def test_grpo_group_of_one_returns_reward() -> None:
    out = grpo_advantages([0.3, -2.0, 0.8], ["a", "b", "c"])
    np.testing.assert_allclose(out, [0.3, -2.0, 0.8], atol=1e-5)


def test_grpo_equal_rewards_give_zero() -> None:
    np.testing.assert_array_equal(grpo_advantages([0.4] * 5, one_group(5)), np.zeros(5))


def test_grpo_groups_are_independent() -> None:
    out = grpo_advantages([0.0, 1.0, 5.0, 5.0, 3.0], ["x", "x", "y", "y", "z"])
    np.testing.assert_allclose(out, [-math.sqrt(0.5), math.sqrt(0.5), 0.0, 0.0, 3.0], atol=1e-5)


def test_grpo_returns_float64_numpy() -> None:
    out = grpo_advantages(torch.tensor([1.0, 2.0], dtype=torch.bfloat16), torch.tensor([0, 0]))
    assert isinstance(out, np.ndarray) and out.dtype == np.float64 and out.shape == (2,)


def test_grpo_empty_input() -> None:
    assert grpo_advantages([], []).shape == (0,)


# --------------------------------------------------------------------------------------------------- AMPO maths


def test_ampo_worked_example() -> None:
    out = ampo_advantages(REWARDS, LENGTHS, MODES, one_group(8))
    np.testing.assert_allclose(out, FINAL, atol=1e-3)
    np.testing.assert_allclose(out - grpo_advantages(REWARDS, one_group(8)), [MODE_TERM[m - 1] for m in MODES],
                               atol=1e-3)


def test_worked_example_mode_means() -> None:
    means = [np.mean([r for r, m in zip(REWARDS, MODES) if m == k]) for k in (1, 2, 3, 4)]
    np.testing.assert_allclose(means, [0.55, 0.60, 0.70, 0.80], atol=1e-12)
    np.testing.assert_allclose(expected_mode_term(REWARDS)[::2], MODE_TERM, atol=1e-3)


def test_ampo_tie_uses_length_branch() -> None:
    out = ampo_advantages([0.5] * 8, LENGTHS, MODES, one_group(8))
    np.testing.assert_allclose(out, TIE_FINAL, atol=1e-3)


def test_ampo_tie_with_distinct_rewards_inside_modes() -> None:
    # Every mode averages 0.5 but the rewards differ, so A^S is non-zero and the length branch is added to it.
    rewards = [0.4, 0.6, 0.3, 0.7, 0.5, 0.5, 0.2, 0.8]
    out = ampo_advantages(rewards, LENGTHS, MODES, one_group(8))
    np.testing.assert_allclose(out - grpo_advantages(rewards, one_group(8)), TIE_FINAL, atol=1e-3)


def test_ampo_tie_with_equal_lengths_gives_zero() -> None:
    out = ampo_advantages([0.5] * 8, [100] * 8, MODES, one_group(8))
    np.testing.assert_array_equal(out, np.zeros(8))


def test_near_tie_within_tolerance_uses_length_branch() -> None:
    rewards = [0.5] * 8
    rewards[6] = rewards[7] = 0.5 + 1e-12  # mode 4's mean differs by 1e-12
    out = ampo_advantages(rewards, LENGTHS, MODES, one_group(8))
    np.testing.assert_allclose(out, TIE_FINAL, atol=1e-3)


def test_zero_tolerance_is_the_reference_exact_test() -> None:
    # The same 1e-12 wobble with tie_tolerance=0 is no tie: the reward branch runs on a std of ~1e-12.
    rewards = [0.5] * 8
    rewards[6] = rewards[7] = 0.5 + 1e-12
    exact = ampo_advantages(rewards, LENGTHS, MODES, one_group(8), tie_tolerance=0.0)
    mode_term = exact - grpo_advantages(rewards, one_group(8))
    np.testing.assert_allclose(mode_term, expected_mode_term(rewards), atol=1e-9)
    assert np.abs(mode_term).max() < 1e-5


def test_difference_above_tolerance_uses_reward_branch() -> None:
    rewards = [0.5] * 8
    rewards[6] = rewards[7] = 0.6
    out = ampo_advantages(rewards, LENGTHS, MODES, one_group(8))
    np.testing.assert_allclose(out - grpo_advantages(rewards, one_group(8)), expected_mode_term(rewards), atol=1e-9)
    # one mode 0.1 above three equal ones: mode term −0.5 for modes 1–3 and +1.5 for mode 4
    np.testing.assert_allclose(expected_mode_term(rewards), [-0.5] * 6 + [1.5] * 2, atol=1e-4)


# --------------------------------------------------------------------------------------------------- eligibility


def test_invalid_sample_disables_mode_term_for_its_group_only() -> None:
    bad_rewards = [-2.0] + REWARDS[1:]
    bad_modes = [-1] + MODES[1:]
    rewards = REWARDS + bad_rewards
    out = ampo_advantages(rewards, LENGTHS + LENGTHS, MODES + bad_modes, ["ok"] * 8 + ["bad"] * 8)
    np.testing.assert_allclose(out[:8], FINAL, atol=1e-3)
    np.testing.assert_allclose(out[8:], grpo_advantages(bad_rewards, one_group(8)), atol=1e-12)


@pytest.mark.parametrize("bad_mode", [0, 5, 2.5, float("nan"), -1.0])
def test_any_mode_outside_one_to_four_is_invalid(bad_mode: float) -> None:
    modes = [1, 1, 2, 2, 3, 3, 4, 4, bad_mode]
    rewards = REWARDS + [0.1]
    out = ampo_advantages(rewards, LENGTHS + [10], modes, one_group(9))
    np.testing.assert_allclose(out, grpo_advantages(rewards, one_group(9)), atol=1e-12)


def test_fewer_than_four_modes_no_mode_term() -> None:
    modes = [1, 1, 2, 2, 3, 3, 3, 3]
    out = ampo_advantages(REWARDS, LENGTHS, modes, one_group(8))
    np.testing.assert_allclose(out, SAMPLE_TERM, atol=1e-3)


def test_mode_with_single_sample_no_mode_term() -> None:
    modes = [1, 1, 2, 2, 3, 3, 3, 4]
    out = ampo_advantages(REWARDS, LENGTHS, modes, one_group(8))
    np.testing.assert_allclose(out, SAMPLE_TERM, atol=1e-3)


def test_group_of_one_gives_reward() -> None:
    out = ampo_advantages([0.7], [100], [3], ["solo"])
    np.testing.assert_allclose(out, [0.7], atol=1e-5)


def test_all_equal_rewards_sample_term_zero() -> None:
    # no mode term (only two modes), equal rewards → A^S = 0
    out = ampo_advantages([0.3] * 4, [5, 6, 7, 8], [1, 1, 2, 2], one_group(4))
    np.testing.assert_array_equal(out, np.zeros(4))


def test_modes_as_floats_and_strings() -> None:
    expected = ampo_advantages(REWARDS, LENGTHS, MODES, one_group(8))
    np.testing.assert_allclose(ampo_advantages(REWARDS, LENGTHS, [float(m) for m in MODES], one_group(8)), expected)
    np.testing.assert_allclose(ampo_advantages(REWARDS, LENGTHS, [str(m) for m in MODES], one_group(8)), expected)


# --------------------------------------------------------------------------------------------------- ordering and ids


def test_shuffled_interleaved_groups_match_sorted() -> None:
    tie_rewards = [0.5] * 8
    rewards = np.array(REWARDS + tie_rewards + [0.3, 0.9])
    lengths = np.array(LENGTHS * 2 + [10, 20])
    modes = np.array(MODES * 2 + [1, 4])
    groups = np.array(["a"] * 8 + ["b"] * 8 + ["c"] * 2, dtype=object)
    sorted_out = ampo_advantages(rewards, lengths, modes, groups)
    np.testing.assert_allclose(sorted_out[:8], FINAL, atol=1e-3)
    np.testing.assert_allclose(sorted_out[8:16], TIE_FINAL, atol=1e-3)

    perm = np.random.default_rng(0).permutation(len(rewards))
    shuffled = ampo_advantages(rewards[perm], lengths[perm], modes[perm], groups[perm])
    np.testing.assert_allclose(shuffled, sorted_out[perm], atol=1e-12)


def test_round_robin_interleaving() -> None:
    # Two groups interleaved sample by sample, as repeat-interleave layouts produce.
    rewards = [v for pair in zip(REWARDS, [0.5] * 8) for v in pair]
    lengths = [v for pair in zip(LENGTHS, LENGTHS) for v in pair]
    modes = [v for pair in zip(MODES, MODES) for v in pair]
    groups = [1, 2] * 8
    out = ampo_advantages(rewards, lengths, modes, groups)
    np.testing.assert_allclose(out[0::2], FINAL, atol=1e-3)
    np.testing.assert_allclose(out[1::2], TIE_FINAL, atol=1e-3)


@pytest.mark.parametrize(
    "make_ids",
    [
        lambda: [uuid.UUID(int=1)] * 8 + [uuid.UUID(int=2)] * 8,
        lambda: [str(uuid.UUID(int=1))] * 8 + [str(uuid.UUID(int=2))] * 8,
        lambda: np.array(["p1"] * 8 + ["p2"] * 8),
        lambda: np.array([10] * 8 + [-3] * 8),
        lambda: torch.tensor([4] * 8 + [9] * 8),
        lambda: [("prompt", 1)] * 8 + [("prompt", 2)] * 8,
    ],
    ids=["uuid", "uuid-str", "np-str", "np-int", "torch-int", "tuple"],
)
def test_group_id_kinds(make_ids) -> None:  # noqa: ANN001 - a parametrised factory
    out = ampo_advantages(REWARDS + [0.5] * 8, LENGTHS * 2, MODES * 2, make_ids())
    np.testing.assert_allclose(out, FINAL + TIE_FINAL, atol=1e-3)


@pytest.mark.parametrize("kind", ["list", "numpy", "torch", "torch-float32"])
def test_input_containers(kind: str) -> None:
    convert = {
        "list": list,
        "numpy": np.asarray,
        "torch": lambda v: torch.tensor(v, dtype=torch.float64),
        "torch-float32": lambda v: torch.tensor(v, dtype=torch.float32),
    }[kind]
    out = ampo_advantages(convert(REWARDS), convert(LENGTHS), convert(MODES), one_group(8))
    assert isinstance(out, np.ndarray) and out.dtype == np.float64
    np.testing.assert_allclose(out, FINAL, atol=1e-3)


# --------------------------------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("argument", "kwargs"),
    [
        ("lengths", dict(lengths=LENGTHS[:7])),
        ("modes", dict(modes=MODES + [1])),
        ("group_ids", dict(group_ids=one_group(9))),
        ("group_ids", dict(group_ids=np.zeros(7))),
    ],
)
def test_length_mismatch_names_argument(argument: str, kwargs: dict) -> None:
    args = dict(rewards=REWARDS, lengths=LENGTHS, modes=MODES, group_ids=one_group(8)) | kwargs
    with pytest.raises(ValueError, match=argument):
        ampo_advantages(**args)


def test_grpo_length_mismatch_names_argument() -> None:
    with pytest.raises(ValueError, match="group_ids"):
        grpo_advantages([0.1, 0.2], ["a"])


def test_non_finite_reward_rejected() -> None:
    with pytest.raises(ValueError, match="rewards"):
        ampo_advantages([0.1, float("nan")], [1, 2], [1, 1], ["a", "a"])


def test_two_dimensional_input_rejected() -> None:
    with pytest.raises(ValueError, match="rewards"):
        grpo_advantages([[0.1, 0.2]], ["a"])


def test_unhashable_group_id_rejected() -> None:
    with pytest.raises(ValueError, match="hashable"):
        grpo_advantages([0.1, 0.2], [["a"], ["a"]])


def test_bad_options_rejected() -> None:
    with pytest.raises(ValueError, match="tie_tolerance"):
        ampo_advantages(REWARDS, LENGTHS, MODES, one_group(8), tie_tolerance=-1.0)
    with pytest.raises(ValueError, match="eps"):
        ampo_advantages(REWARDS, LENGTHS, MODES, one_group(8), eps=0.0)


def test_many_groups_match_per_group_results() -> None:
    # 100k samples in groups of 16: every group equals its own single-group result.
    rng = np.random.default_rng(1)
    n_groups, size = 6250, 16
    rewards = rng.random(n_groups * size)
    lengths = rng.integers(20, 2000, n_groups * size).astype(float)
    modes = rng.integers(1, 5, n_groups * size)
    modes[rng.random(n_groups * size) < 0.01] = -1
    groups = np.repeat(np.arange(n_groups), size)
    out = ampo_advantages(rewards, lengths, modes, groups)
    for g in rng.choice(n_groups, 20, replace=False):
        sl = slice(g * size, (g + 1) * size)
        np.testing.assert_allclose(out[sl], ampo_advantages(rewards[sl], lengths[sl], modes[sl], groups[sl]),
                                   atol=1e-12)


def test_mode_term_groups_marks_the_groups_ampo_treats_differently() -> None:
    # Groups in order of first appearance: "full" has each mode twice; "err" one format error; "thin" mode 4 once;
    # "three" only modes 1-3.
    modes = [1, 1, 2, 2, 3, 3, 4, 4] + [1, 1, 2, 2, 3, 3, 4, -1] + [1, 1, 2, 2, 3, 3, 3, 4] + [1, 1, 2, 2, 3, 3, 3, 3]
    ids = ["full"] * 8 + ["err"] * 8 + ["thin"] * 8 + ["three"] * 8
    np.testing.assert_array_equal(mode_term_groups(modes, ids), [True, False, False, False])
    # Exactly the groups whose advantages differ from GRPO's (rewards all distinct, so no group's term is zero).
    rewards = np.linspace(0.0, 1.0, len(modes))
    lengths = np.arange(len(modes), dtype=float) * 10
    differs = ~np.isclose(ampo_advantages(rewards, lengths, modes, ids), grpo_advantages(rewards, ids))
    np.testing.assert_array_equal(differs.reshape(4, 8).any(axis=1), [True, False, False, False])


def test_informative_groups_hand_checked():
    from learner.ampo import informative_groups

    every_mode = [1, 1, 2, 2, 3, 3, 4, 4]
    rewards = [0.5] * 8 + [0.5] * 8 + [1.0, 0.0, 1.0, 1.0] + [-2.0] * 4 + [0.3]
    modes = every_mode + [1] * 8 + [1, 1, 2, 2] + [-1] * 4 + [1]
    lengths = [10, 10, 20, 20, 30, 30, 40, 40] + [10] * 8 + [5] * 4 + [5] * 4 + [5]
    groups = ["tie-all-modes"] * 8 + ["tie-one-mode"] * 8 + ["varied"] * 4 + ["all-errors"] * 4 + ["lone"]
    args = (rewards, lengths, modes, groups)
    # A tie with every mode twice: AMPO's length term separates the modes (informative); GRPO sees only zeros.
    # One mode only: no mode term, so zeros for both. Varied rewards: both. All −2: zeros for both. A lone
    # sample: A = 0.3 / (1 + eps) != 0 for both.
    assert informative_groups(*args, estimator="ampo").tolist() == [True, False, True, False, True]
    assert informative_groups(*args, estimator="grpo").tolist() == [False, False, True, False, True]
    with pytest.raises(ValueError, match="estimator"):
        informative_groups(*args, estimator="ppo")
