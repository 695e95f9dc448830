"""Policy loss and log-prob/entropy helper against hand-computed values (docs/protocol.md, Policy loss)."""

from __future__ import annotations

import math

import pytest
import torch

from learner.loss import LossOutput, masked_mean, policy_loss, token_logprobs_and_entropy

NO_REGULARISERS = dict(kl_coef=0.0, entropy_coef=0.0)


def t(values: list) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


def ones(b: int, n: int) -> torch.Tensor:
    return torch.ones(b, n, dtype=torch.bool)


# --------------------------------------------------------------------------------------------------- masked_mean


def test_masked_mean_ignores_unselected_and_nan() -> None:
    x = t([[1.0, 3.0, float("nan")]])
    assert masked_mean(x, t([[1, 1, 0]])).item() == pytest.approx(2.0)


def test_masked_mean_empty_mask_is_zero() -> None:
    assert masked_mean(t([[1.0, 2.0]]), torch.zeros(1, 2, dtype=torch.bool)).item() == 0.0


# --------------------------------------------------------------------------------------------------- policy gradient


def test_ratio_one_gives_minus_mean_advantage() -> None:
    logp = t([[-1.0, -2.0, -0.5], [-0.3, -0.7, -1.1]])
    out = policy_loss(logp, logp.clone(), t([1.0, -2.0]), ones(2, 3), **NO_REGULARISERS)
    assert isinstance(out, LossOutput)
    # token mean of −A over 3 + 3 tokens: −(3·1 + 3·(−2)) / 6 = 0.5
    assert out.loss.item() == pytest.approx(0.5)
    assert out.metrics["pg_loss"] == pytest.approx(0.5)
    assert out.metrics["clip_fraction"] == 0.0
    assert out.metrics["approx_kl"] == 0.0
    assert out.metrics["is_weight_mean"] == 1.0 and out.metrics["is_weight_max"] == 1.0


def test_clipped_branch_and_clip_fraction() -> None:
    # tokens: (A, ratio) = (+1, 1.5) clipped → −1.2 ; (+1, 1.0) → −1 ; (−1, 0.5) clipped → +0.8 ; (+1, 0.5) → −0.5
    ratios = [1.5, 1.0, 0.5, 0.5]
    old = t([[-1.0, -1.0, -1.0, -1.0]])
    logp = old + torch.log(t([ratios]))
    out = policy_loss(logp, old, t([[1.0, 1.0, -1.0, 1.0]]), ones(1, 4), **NO_REGULARISERS)
    assert out.metrics["pg_loss"] == pytest.approx((-1.2 - 1.0 + 0.8 - 0.5) / 4)
    assert out.metrics["clip_fraction"] == pytest.approx(0.5)
    expected_k2 = sum(0.5 * math.log(r) ** 2 for r in ratios) / 4
    assert out.metrics["approx_kl"] == pytest.approx(expected_k2)


def test_asymmetric_clip_high() -> None:
    old = t([[0.0]])
    logp = torch.log(t([[1.5]]))
    out = policy_loss(logp, old, t([1.0]), ones(1, 1), clip_ratio_high=0.28, **NO_REGULARISERS)
    assert out.metrics["pg_loss"] == pytest.approx(-1.28)
    low = policy_loss(torch.log(t([[0.5]])), old, t([-1.0]), ones(1, 1), clip_ratio_high=0.28, **NO_REGULARISERS)
    assert low.metrics["pg_loss"] == pytest.approx(0.8)  # the low side still uses clip_ratio


def test_clipped_token_has_no_gradient() -> None:
    old = t([[0.0, 0.0]])
    logp = torch.log(t([[1.5, 1.1]])).requires_grad_()
    policy_loss(logp, old, t([1.0]), ones(1, 2), **NO_REGULARISERS).loss.backward()
    # d(−ratio)/dlogp = −ratio, token-mean over 2 tokens; the clipped token gets nothing
    torch.testing.assert_close(logp.grad, t([[0.0, -1.1 / 2]]))


# --------------------------------------------------------------------------------------------------- KL


def test_k3_kl_value() -> None:
    logp = t([[-1.0, -1.0]])
    ref = t([[-0.5, -1.5]])  # ref − logp = +0.5 and −0.5
    out = policy_loss(logp, logp.clone(), t([0.0]), ones(1, 2), ref_logprobs=ref, kl_coef=1.0, entropy_coef=0.0)
    k3 = ((math.exp(0.5) - 0.5 - 1) + (math.exp(-0.5) + 0.5 - 1)) / 2  # (0.148721 + 0.106531) / 2
    assert out.metrics["kl"] == pytest.approx(k3)
    assert out.loss.item() == pytest.approx(k3)


def test_kl_is_clamped_at_ten() -> None:
    logp = t([[-6.0, -1.0]])
    ref = t([[-1.0, -1.0]])  # d = 5 → exp(5) − 6 ≈ 142.4, clamped to 10; d = 0 → 0
    out = policy_loss(logp, logp.clone(), t([0.0]), ones(1, 2), ref_logprobs=ref)
    assert out.metrics["kl"] == pytest.approx(5.0)
    assert out.loss.item() == pytest.approx(0.001 * 5.0)
    tighter = policy_loss(logp, logp.clone(), t([0.0]), ones(1, 2), ref_logprobs=ref, kl_clamp=2.0)
    assert tighter.metrics["kl"] == pytest.approx(1.0)


def test_kl_coefficient_default() -> None:
    logp = t([[-1.0]])
    out = policy_loss(logp, logp.clone(), t([0.0]), ones(1, 1), ref_logprobs=t([[-0.5]]))
    assert out.loss.item() == pytest.approx(0.001 * (math.exp(0.5) - 1.5))


# --------------------------------------------------------------------------------------------------- TIS


def test_truncated_importance_weight() -> None:
    old = t([[-1.0, -1.0]])
    behaviour = old - torch.log(t([[3.0, 0.5]]))  # exp(old − behaviour) = 3 (capped to 2) and 0.5
    out = policy_loss(old.clone(), old, t([1.0]), ones(1, 2), behaviour_logprobs=behaviour, **NO_REGULARISERS)
    assert out.metrics["pg_loss"] == pytest.approx(-(2.0 + 0.5) / 2)
    assert out.metrics["is_weight_mean"] == pytest.approx(1.25)
    assert out.metrics["is_weight_max"] == pytest.approx(2.0)

    higher_cap = policy_loss(old.clone(), old, t([1.0]), ones(1, 2), behaviour_logprobs=behaviour, tis_cap=5.0,
                             **NO_REGULARISERS)
    assert higher_cap.metrics["pg_loss"] == pytest.approx(-(3.0 + 0.5) / 2)


@pytest.mark.parametrize("kwargs", [dict(tis_cap=None), dict()])
def test_importance_weight_off(kwargs: dict) -> None:
    old = t([[-1.0, -1.0]])
    behaviour = old - torch.log(t([[3.0, 0.5]])) if kwargs else None
    out = policy_loss(old.clone(), old, t([1.0]), ones(1, 2), behaviour_logprobs=behaviour, **kwargs,
                      **NO_REGULARISERS)
    assert out.metrics["pg_loss"] == pytest.approx(-1.0)
    assert out.metrics["is_weight_max"] == 1.0


# ---------------------------------------------------------------------------------------------- mask, entropy, grads


def test_mask_excludes_padding_even_with_garbage() -> None:
    logp = t([[-1.0, 50.0], [-0.5, -0.2]])
    old = t([[-1.2, -300.0], [-0.5, -0.1]])  # the padded slot would overflow exp() if it were used
    ref = t([[-0.9, 400.0], [-0.4, -0.3]])
    behaviour = t([[-1.1, -900.0], [-0.6, -0.1]])
    entropy = t([[1.0, float("nan")], [2.0, 3.0]])
    mask = t([[1, 0], [1, 1]]).bool()
    adv = t([1.0, -1.0])
    kwargs = dict(kl_coef=0.1, entropy_coef=0.1)
    padded_logp = logp.clone().requires_grad_()
    padded = policy_loss(padded_logp, old, adv, mask, ref_logprobs=ref, entropy=entropy,
                         behaviour_logprobs=behaviour, **kwargs)
    padded.loss.backward()

    # The same three valid tokens, laid out without padding.
    flat = lambda x: x[mask].reshape(1, 3)  # noqa: E731
    dense = policy_loss(flat(logp), flat(old), t([[1.0, -1.0, -1.0]]), ones(1, 3), ref_logprobs=flat(ref),
                        entropy=flat(entropy), behaviour_logprobs=flat(behaviour), **kwargs)
    assert padded.loss.item() == pytest.approx(dense.loss.item())
    assert padded.metrics == pytest.approx(dense.metrics)
    assert torch.isfinite(padded_logp.grad).all() and padded_logp.grad[0, 1] == 0.0


def test_all_masked_gives_zero() -> None:
    logp = t([[-1.0, -2.0]]).requires_grad_()
    out = policy_loss(logp, t([[-1.5, -2.5]]), t([1.0]), torch.zeros(1, 2), ref_logprobs=t([[0.0, 0.0]]),
                      entropy=t([[1.0, 1.0]]))
    assert out.loss.item() == 0.0 and all(v == 0.0 for v in out.metrics.values())
    out.loss.backward()
    assert logp.grad.abs().sum().item() == 0.0


def test_entropy_bonus_lowers_loss() -> None:
    logp = t([[-1.0, -1.0]])
    entropy = t([[2.0, 4.0]]).requires_grad_()
    out = policy_loss(logp, logp.clone(), t([0.0]), ones(1, 2), entropy=entropy, entropy_coef=0.1, kl_coef=0.0)
    assert out.metrics["entropy"] == pytest.approx(3.0)
    assert out.loss.item() == pytest.approx(-0.3)
    out.loss.backward()
    # minimising the loss raises entropy: ∂loss/∂H = −coef / n_tokens
    torch.testing.assert_close(entropy.grad, t([[-0.05, -0.05]]))


def test_gradient_flows_to_logprobs_only() -> None:
    logp = t([[-1.0, -1.0], [-2.0, -2.0]]).requires_grad_()
    old = logp.detach().clone().requires_grad_()
    ref = t([[-1.0, -1.0], [-2.0, -2.0]]).requires_grad_()
    behaviour = old.detach().clone().requires_grad_()
    adv = t([1.0, -2.0]).requires_grad_()
    out = policy_loss(logp, old, adv, ones(2, 2), ref_logprobs=ref, behaviour_logprobs=behaviour, entropy_coef=0.0)
    out.loss.backward()
    for other in (old, ref, behaviour, adv):
        assert other.grad is None
    # ratio = 1, ref = logp (the k3 gradient vanishes there): ∂pg/∂logp_t = −A_t / 4
    torch.testing.assert_close(logp.grad, t([[-0.25, -0.25], [0.5, 0.5]]))


def test_loss_metric_matches_combination() -> None:
    gen = torch.Generator().manual_seed(0)
    logp = -torch.rand(3, 5, generator=gen, dtype=torch.float64)
    old = logp + 0.3 * torch.randn(3, 5, generator=gen, dtype=torch.float64)
    ref = logp + 0.3 * torch.randn(3, 5, generator=gen, dtype=torch.float64)
    entropy = torch.rand(3, 5, generator=gen, dtype=torch.float64)
    out = policy_loss(logp, old, torch.randn(3, generator=gen, dtype=torch.float64), ones(3, 5), ref_logprobs=ref,
                      entropy=entropy)
    m = out.metrics
    assert m["loss"] == pytest.approx(m["pg_loss"] - 0.001 * m["entropy"] + 0.001 * m["kl"])
    assert m["loss"] == pytest.approx(out.loss.item())


@pytest.mark.parametrize(
    ("name", "kwargs"),
    [
        ("old_logprobs", dict(old_logprobs=torch.zeros(2, 4))),
        ("mask", dict(mask=torch.ones(2, 4))),
        ("ref_logprobs", dict(ref_logprobs=torch.zeros(3, 3))),
        ("advantages", dict(advantages=torch.zeros(3))),
        ("logprobs", dict(logprobs=torch.zeros(6))),
    ],
)
def test_shape_errors_name_argument(name: str, kwargs: dict) -> None:
    args = dict(logprobs=torch.zeros(2, 3), old_logprobs=torch.zeros(2, 3), advantages=torch.zeros(2),
                mask=torch.ones(2, 3)) | kwargs
    with pytest.raises(ValueError, match=name):
        policy_loss(**args)


# --------------------------------------------------------------------------------------------------- log-probs/entropy


def reference_logprobs_entropy(logits: torch.Tensor, targets: torch.Tensor, temperature: float):
    log_p = torch.log_softmax(logits.double() / temperature, dim=-1)
    logprobs = log_p.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    entropy = -(log_p.exp() * log_p).sum(-1)
    return logprobs, entropy


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("chunk_size", [1, 4, 1024])
def test_logprobs_entropy_match_manual_softmax(temperature: float, chunk_size: int) -> None:
    gen = torch.Generator().manual_seed(1)
    logits = 3 * torch.randn(2, 5, 11, generator=gen)
    targets = torch.randint(0, 11, (2, 5), generator=gen)
    logprobs, entropy = token_logprobs_and_entropy(logits, targets, temperature, chunk_size=chunk_size)
    want_lp, want_h = reference_logprobs_entropy(logits, targets, temperature)
    assert logprobs.shape == entropy.shape == (2, 5) and logprobs.dtype == torch.float32
    torch.testing.assert_close(logprobs.double(), want_lp, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(entropy.double(), want_h, atol=1e-5, rtol=1e-5)


def test_logprobs_entropy_hand_values() -> None:
    # logits [0, log 3] → p = [0.25, 0.75]; H = −(0.25 ln 0.25 + 0.75 ln 0.75)
    logits = torch.tensor([[[0.0, math.log(3.0)]]])
    logprobs, entropy = token_logprobs_and_entropy(logits, torch.tensor([[1]]))
    assert logprobs.item() == pytest.approx(math.log(0.75), abs=1e-6)
    assert entropy.item() == pytest.approx(-(0.25 * math.log(0.25) + 0.75 * math.log(0.75)), abs=1e-6)


@pytest.mark.parametrize("chunk_size", [1, 3, 64])
def test_logprobs_entropy_gradient_matches_autograd(chunk_size: int) -> None:
    gen = torch.Generator().manual_seed(2)
    logits = torch.randn(3, 4, 7, generator=gen, dtype=torch.float64)
    targets = torch.randint(0, 7, (3, 4), generator=gen)
    g_lp, g_h = torch.randn(2, 3, 4, generator=gen, dtype=torch.float64)

    mine = logits.clone().requires_grad_()
    lp, h = token_logprobs_and_entropy(mine, targets, 0.8, chunk_size=chunk_size)
    ((lp * g_lp).sum() + (h * g_h).sum()).backward()

    ref = logits.clone().requires_grad_()
    want_lp, want_h = reference_logprobs_entropy(ref, targets, 0.8)
    ((want_lp * g_lp).sum() + (want_h * g_h).sum()).backward()
    torch.testing.assert_close(mine.grad, ref.grad)


def test_logprobs_entropy_gradcheck() -> None:
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 3, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 5, (2, 3), generator=gen)
    assert torch.autograd.gradcheck(lambda x: token_logprobs_and_entropy(x, targets, 1.3, chunk_size=2), (logits,))


def test_bfloat16_logits_compute_in_float32() -> None:
    gen = torch.Generator().manual_seed(4)
    logits = torch.randn(2, 3, 9, generator=gen).to(torch.bfloat16).requires_grad_()
    targets = torch.randint(0, 9, (2, 3), generator=gen)
    logprobs, entropy = token_logprobs_and_entropy(logits, targets)
    want_lp, want_h = reference_logprobs_entropy(logits.detach().float(), targets, 1.0)
    assert logprobs.dtype == torch.float32
    torch.testing.assert_close(logprobs.double(), want_lp, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(entropy.double(), want_h, atol=1e-5, rtol=1e-5)
    logprobs.sum().backward()
    assert logits.grad.dtype == torch.bfloat16


def test_minus_infinity_logits_stay_finite() -> None:
    logits = torch.tensor([[[0.0, float("-inf"), math.log(3.0)]]], requires_grad=True)
    logprobs, entropy = token_logprobs_and_entropy(logits, torch.tensor([[2]]))
    assert logprobs.item() == pytest.approx(math.log(0.75), abs=1e-6)
    assert entropy.item() == pytest.approx(-(0.25 * math.log(0.25) + 0.75 * math.log(0.75)), abs=1e-6)
    (logprobs + entropy).sum().backward()
    assert torch.isfinite(logits.grad).all() and logits.grad[0, 0, 1] == 0.0


def test_logprobs_feed_policy_loss_gradient() -> None:
    # End to end: the loss gradient reaches the logits through the chunked function.
    gen = torch.Generator().manual_seed(5)
    logits = torch.randn(2, 3, 6, generator=gen, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 6, (2, 3), generator=gen)
    logprobs, entropy = token_logprobs_and_entropy(logits, targets)
    out = policy_loss(logprobs, logprobs.detach(), t([1.0, -1.0]), ones(2, 3), entropy=entropy)
    out.loss.backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0


def test_logprobs_entropy_argument_errors() -> None:
    with pytest.raises(ValueError, match="target_ids"):
        token_logprobs_and_entropy(torch.zeros(2, 3, 4), torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="temperature"):
        token_logprobs_and_entropy(torch.zeros(2, 3, 4), torch.zeros(2, 3, dtype=torch.long), 0.0)
