"""Group-relative advantages for GRPO and AMPO (docs/protocol.md, AMPO advantage; paper Algorithm 1).

Every sample is one sampled response. It carries a scalar reward ``r_i``, a response length ``l_i`` (full response
tokens including EOS), a thinking mode ``m_i`` in {1, 2, 3, 4} (anything else marks an invalid sample, normally -1)
and a group id: all responses to the same prompt share one id.

Both estimators are pure functions over flat per-sample inputs. They accept lists, numpy arrays or torch tensors and
always return a one-dimensional ``numpy.float64`` array with one advantage per sample, in input order; callers convert
and broadcast it to tokens themselves. The maths is vectorised with ``np.bincount`` over dense group codes, so the
order of the samples does not matter and 100k samples take a few milliseconds.

Deviation from the authors' code, which picks the length branch of the mode term only when every mode-mean reward
equals the mean of means *exactly*. Here the test is ``max_k |r̄_k − μ_r| <= tie_tolerance``,
so means that agree up to rounding still count as a tie instead of being divided by a near-zero std.
``tie_tolerance=0`` restores the exact test.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable
from typing import Any

import numpy as np
import torch

__all__ = ["MODES", "ampo_advantages", "grpo_advantages", "informative_groups", "mode_term_groups", "moving_groups"]

# The four thinking modes, in the code's "Thinking Level" numbering.
MODES: tuple[int, ...] = (1, 2, 3, 4)
_NUM_MODES = len(MODES)
# A mode contributes a mean to the mode term only when it has at least this many samples in the group.
_MIN_SAMPLES_PER_MODE = 2

ArrayLike = np.ndarray | torch.Tensor | Iterable[float]
GroupIds = np.ndarray | torch.Tensor | Iterable[Hashable]


def grpo_advantages(rewards: ArrayLike, group_ids: GroupIds, *, eps: float = 1e-6) -> np.ndarray:
    """Sample-level (GRPO) advantage.

    For the group ``G`` of sample ``i``::

        |G| == 1:  mean = 0, std = 1
        otherwise: mean = mean_{j∈G} r_j,  std = sqrt( Σ_{j∈G} (r_j − mean)² / (|G| − 1) )
        A_i = (r_i − mean) / (std + eps)

    A group whose rewards are all equal gets A = 0; a lone sample gets A = r_i / (1 + eps).

    Returns a float64 array of shape (N,). Raises ValueError when the inputs differ in length, are not
    one-dimensional, or a reward is not finite.
    """
    _check_eps(eps)
    r = _float_vector(rewards, "rewards")
    _check_finite(r, "rewards")
    codes, n_groups = _group_codes(group_ids, len(r))
    return _sample_term(r, codes, n_groups, eps)


def ampo_advantages(
    rewards: ArrayLike,
    lengths: ArrayLike,
    modes: ArrayLike,
    group_ids: GroupIds,
    *,
    eps: float = 1e-6,
    tie_tolerance: float = 1e-8,
) -> np.ndarray:
    """AMPO advantage ``A_i = A^S_i + A^M_{m_i}``.

    ``A^S`` is :func:`grpo_advantages`. The mode term ``A^M`` exists for a group only when the group has no invalid
    sample (mode outside 1..4) and each of the four modes has at least 2 samples (which also implies |G| > 1).
    For such a group, with ``r̄_k`` / ``l̄_k`` the mean reward / length of the samples in mode ``k``::

        μ_r = mean_k r̄_k,  σ_r = unbiased std_k r̄_k        (over the 4 mode means, divisor 3)
        μ_l = mean_k l̄_k,  σ_l = unbiased std_k l̄_k

        tie      := max_k |r̄_k − μ_r| <= tie_tolerance
        A^M_k    = tanh( −(l̄_k − μ_l) / (σ_l + eps) )     if tie   (shorter modes are preferred)
                 = (r̄_k − μ_r) / (σ_r + eps)              otherwise

    Groups without a mode term get ``A = A^S``. Returns a float64 array of shape (N,).

    Raises ValueError naming the offending argument when the inputs differ in length or are not one-dimensional,
    when a reward or length is not finite, or when ``eps <= 0`` or ``tie_tolerance < 0``.
    """
    _check_eps(eps)
    if tie_tolerance < 0:
        raise ValueError(f"tie_tolerance must be >= 0, got {tie_tolerance}")
    r = _float_vector(rewards, "rewards")
    n = len(r)
    lens = _float_vector(lengths, "lengths", expected=n)
    mode_idx = _mode_index(_float_vector(modes, "modes", expected=n))
    _check_finite(r, "rewards")
    _check_finite(lens, "lengths")
    codes, n_groups = _group_codes(group_ids, n)

    table = _mode_term_table(r, lens, mode_idx, codes, n_groups, eps, tie_tolerance)
    # A sample with mode index -1 reads column 3, which is harmless: an invalid sample disables the mode term of its
    # whole group, so that group's row of the table is all zeros.
    return _sample_term(r, codes, n_groups, eps) + table[codes, mode_idx]


def _sample_term(r: np.ndarray, codes: np.ndarray, n_groups: int, eps: float) -> np.ndarray:
    """Vectorised A^S over dense group codes (see :func:`grpo_advantages`)."""
    count = np.bincount(codes, minlength=n_groups)
    mean = np.bincount(codes, weights=r, minlength=n_groups) / np.maximum(count, 1)
    # Two passes (mean first, then squared deviations) to avoid cancellation in Σr² − N·mean².
    sq_dev = np.bincount(codes, weights=(r - mean[codes]) ** 2, minlength=n_groups)
    single = count <= 1
    std = np.sqrt(sq_dev / np.where(single, 1, count - 1))
    mean = np.where(single, 0.0, mean)
    std = np.where(single, 1.0, std)
    return (r - mean[codes]) / (std[codes] + eps)


def mode_term_groups(modes: ArrayLike, group_ids: GroupIds) -> np.ndarray:
    """Which groups get AMPO's mode-level term, one bool per group in order of first appearance.

    A group qualifies when none of its samples is invalid (mode outside 1..4) and each of the four modes has at least
    2 samples. Otherwise :func:`ampo_advantages` gives its samples the GRPO advantage alone, so the share of qualifying
    groups says how much of a batch AMPO actually treats differently from GRPO: with n = 16 and a format-error rate
    p, even an even mode mix qualifies at most (1 − p)^16 of the time (p = 0.1 gives 0.19).
    """
    mode_idx = _mode_index(_float_vector(modes, "modes"))
    codes, n_groups = _group_codes(group_ids, len(mode_idx))
    _, _, count, invalid_count = _mode_cells(mode_idx, codes, n_groups)
    return _eligible(count, invalid_count)


def informative_groups(
    rewards: ArrayLike,
    lengths: ArrayLike,
    modes: ArrayLike,
    group_ids: GroupIds,
    *,
    estimator: str,
    eps: float = 1e-6,
    tie_tolerance: float = 1e-8,
    atol: float = 1e-9,
) -> np.ndarray:
    """Which groups carry a policy gradient under ``estimator`` ("ampo" or "grpo"), one bool per group in order of
    first appearance.

    A group whose samples all get the same advantage ``A`` contributes ``A · Σ_i ∇ log π(y_i)`` with the same weight
    for every response: for ``A = 0`` (equal rewards, no mode term) nothing at all. So a group is informative when
    ``max_{i∈G} A_i − min_{i∈G} A_i > atol``, or, for a lone sample, when ``A ≠ 0``. A tie group that gets AMPO's
    length term is informative under AMPO (its modes differ in advantage) and not under GRPO.
    """
    if estimator not in ("ampo", "grpo"):
        raise ValueError(f"estimator must be 'ampo' or 'grpo', got {estimator!r}")
    advantages = (
        ampo_advantages(rewards, lengths, modes, group_ids, eps=eps, tie_tolerance=tie_tolerance)
        if estimator == "ampo"
        else grpo_advantages(rewards, group_ids, eps=eps)
    )
    return moving_groups(advantages, group_ids, atol=atol)


def moving_groups(advantages: ArrayLike, group_ids: GroupIds, *, atol: float = 1e-9) -> np.ndarray:
    """Which groups move the policy given their samples' advantages, one bool per group in order of first
    appearance: ``max_{i∈G} A_i − min_{i∈G} A_i > atol``, or, for a lone sample, ``|A| > atol`` (see
    :func:`informative_groups`)."""
    advantages = np.asarray(advantages, dtype=np.float64)
    codes, n_groups = _group_codes(group_ids, len(advantages))
    high = np.full(n_groups, -np.inf)
    low = np.full(n_groups, np.inf)
    np.maximum.at(high, codes, advantages)
    np.minimum.at(low, codes, advantages)
    single = np.bincount(codes, minlength=n_groups) == 1
    return np.where(single, np.abs(high) > atol, high - low > atol)


def _mode_cells(
    mode_idx: np.ndarray, codes: np.ndarray, n_groups: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(valid, cell, count, invalid_count)``: which samples have a mode 1..4, the flat (group, mode) cell of each
    of those, samples per cell as an (n_groups, 4) table, and invalid samples per group."""
    valid = mode_idx >= 0
    invalid_count = np.bincount(codes[~valid], minlength=n_groups)
    cell = codes[valid] * _NUM_MODES + mode_idx[valid]
    count = np.bincount(cell, minlength=n_groups * _NUM_MODES).reshape(n_groups, _NUM_MODES)
    return valid, cell, count, invalid_count


def _eligible(count: np.ndarray, invalid_count: np.ndarray) -> np.ndarray:
    return (invalid_count == 0) & (count >= _MIN_SAMPLES_PER_MODE).all(axis=1)


def _mode_term_table(
    r: np.ndarray,
    lens: np.ndarray,
    mode_idx: np.ndarray,
    codes: np.ndarray,
    n_groups: int,
    eps: float,
    tie_tolerance: float,
) -> np.ndarray:
    """A^M as a (n_groups, 4) table; rows of groups without a mode term are zero (see :func:`ampo_advantages`)."""
    valid, cell, count, invalid_count = _mode_cells(mode_idx, codes, n_groups)
    eligible = _eligible(count, invalid_count)
    table = np.zeros((n_groups, _NUM_MODES))
    if not eligible.any():
        return table

    n_cells = n_groups * _NUM_MODES
    r_sum = np.bincount(cell, weights=r[valid], minlength=n_cells).reshape(n_groups, _NUM_MODES)
    l_sum = np.bincount(cell, weights=lens[valid], minlength=n_cells).reshape(n_groups, _NUM_MODES)
    c = count[eligible]
    r_bar = r_sum[eligible] / c
    l_bar = l_sum[eligible] / c
    mu_r = r_bar.mean(axis=1, keepdims=True)
    mu_l = l_bar.mean(axis=1, keepdims=True)
    sigma_r = r_bar.std(axis=1, ddof=1, keepdims=True)
    sigma_l = l_bar.std(axis=1, ddof=1, keepdims=True)

    tie = np.abs(r_bar - mu_r).max(axis=1, keepdims=True) <= tie_tolerance
    reward_term = (r_bar - mu_r) / (sigma_r + eps)
    length_term = np.tanh(-(l_bar - mu_l) / (sigma_l + eps))
    table[eligible] = np.where(tie, length_term, reward_term)
    return table


def _mode_index(modes: np.ndarray) -> np.ndarray:
    """Map modes 1..4 to column indices 0..3 and everything else (−1, NaN, 2.5, 7, ...) to −1."""
    valid = np.isin(modes, MODES)
    return np.where(valid, modes - MODES[0], -1).astype(np.int64)


def _to_numpy(values: torch.Tensor) -> np.ndarray:
    # numpy has no bfloat16; every other torch dtype converts directly.
    if values.dtype == torch.bfloat16:
        values = values.float()
    return values.detach().cpu().numpy()


def _float_vector(values: ArrayLike, name: str, expected: int | None = None) -> np.ndarray:
    """``values`` as a 1-D float64 array, checked against the expected length."""
    if isinstance(values, torch.Tensor):
        values = _to_numpy(values)
    try:
        arr = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name} must hold numbers: {exc}") from exc
    if arr.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional, got shape {arr.shape}")
    _check_length(len(arr), name, expected)
    return arr


def _group_codes(group_ids: GroupIds, expected: int) -> tuple[np.ndarray, int]:
    """Dense int64 codes 0..G−1 for arbitrary hashable group ids, plus G."""
    if isinstance(group_ids, torch.Tensor):
        group_ids = _to_numpy(group_ids)
    if isinstance(group_ids, np.ndarray) and group_ids.dtype != object:
        if group_ids.ndim != 1:
            raise ValueError(f"group_ids must be one-dimensional, got shape {group_ids.shape}")
        _check_length(len(group_ids), "group_ids", expected)
        uniques, codes = np.unique(group_ids, return_inverse=True)
        return codes.reshape(-1).astype(np.int64), len(uniques)

    # Strings, uuid.UUID objects, tuples, mixed types: one dictionary pass, first appearance gets the next code.
    ids = list(group_ids)
    _check_length(len(ids), "group_ids", expected)
    lookup: dict[Any, int] = {}
    try:
        codes = np.fromiter((lookup.setdefault(g, len(lookup)) for g in ids), dtype=np.int64, count=len(ids))
    except TypeError as exc:
        raise ValueError(f"group_ids entries must be hashable: {exc}") from exc
    return codes, len(lookup)


def _check_length(actual: int, name: str, expected: int | None) -> None:
    if expected is not None and actual != expected:
        raise ValueError(f"{name} has {actual} entries but rewards has {expected}; expected one per sample")


def _check_finite(values: np.ndarray, name: str) -> None:
    if not np.isfinite(values).all():
        raise ValueError(f"{name} must be finite; found NaN or inf")


def _check_eps(eps: float) -> None:
    if not eps > 0:
        raise ValueError(f"eps must be > 0, got {eps}")
