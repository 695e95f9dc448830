"""Clipped policy-gradient loss with a k3 KL penalty and an entropy bonus, in pure torch (docs/protocol.md,
Policy loss).

Token tensors have shape (B, T); ``mask`` marks the valid response tokens (bool or 0/1). Everything is aggregated as
a token-mean over all valid tokens of the micro-batch, so longer responses weigh more and nothing is normalised per
sequence. Scaling for gradient accumulation is the caller's job.

Values at masked-out positions are never used, not even inside ``exp``: padding may hold arbitrary log-probs, and an
overflow there would otherwise turn the whole loss (or its gradient) into NaN.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["LossOutput", "masked_mean", "policy_loss", "token_logprobs_and_entropy"]


@dataclass(frozen=True)
class LossOutput:
    """Result of :func:`policy_loss`.

    ``loss`` is the differentiable scalar. ``metrics`` holds detached Python floats with the keys ``loss``,
    ``pg_loss``, ``kl``, ``entropy``, ``clip_fraction``, ``approx_kl``, ``is_weight_mean`` and ``is_weight_max``.
    """

    loss: torch.Tensor
    metrics: dict[str, float]


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``Σ_{mask} x / |mask|``, and 0 when the mask selects nothing.

    ``mask`` is bool or 0/1 and must broadcast against ``x``. Unselected entries are excluded with ``where`` rather
    than multiplied by 0, so NaN or inf there cannot leak into the result.
    """
    keep = mask.bool()
    total = torch.where(keep, x, torch.zeros((), dtype=x.dtype, device=x.device)).sum()
    count = keep.expand_as(x).sum().clamp_min(1)
    return total / count


def policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    ref_logprobs: torch.Tensor | None = None,
    entropy: torch.Tensor | None = None,
    behaviour_logprobs: torch.Tensor | None = None,
    clip_ratio: float = 0.2,
    clip_ratio_high: float | None = None,
    kl_coef: float = 0.001,
    entropy_coef: float = 0.001,
    kl_clamp: float = 10.0,
    tis_cap: float | None = 2.0,
) -> LossOutput:
    """PPO-clip policy loss of one micro-batch.

    With ``M`` the mask and ``masked_mean`` the token-mean over ``M``::

        ratio   = exp(logp − old)
        w       = min(exp(old − behaviour), tis_cap)                 (truncated importance weight, detached)
        pg      = masked_mean( max(−A·ratio, −A·clip(ratio, 1 − ε_lo, 1 + ε_hi)) · w )
        d       = ref − logp
        kl      = masked_mean( clamp(exp(d) − d − 1, −kl_clamp, kl_clamp) )     (k3 estimator of KL(π‖π_ref))
        loss    = pg − entropy_coef · masked_mean(entropy) + kl_coef · kl

    Args:
        logprobs: (B, T) log-probs of the sampled tokens under the current policy; the only input that should carry
            gradient besides ``entropy``.
        old_logprobs: (B, T) log-probs under the policy that the advantages refer to (recomputed by the learner).
        advantages: (B,) per-sample advantages, broadcast to every token, or (B, T) per-token advantages.
        mask: (B, T) valid response tokens.
        ref_logprobs: (B, T) reference-policy log-probs; ``None`` drops the KL term (kl = 0).
        entropy: (B, T) per-token policy entropy; ``None`` drops the entropy bonus (entropy = 0).
        behaviour_logprobs: (B, T) log-probs of the policy that actually sampled the tokens (the rollout engine).
            With ``tis_cap`` set, ``w`` corrects for the mismatch between the sampler and ``old_logprobs``.
        clip_ratio: ε_lo, and ε_hi as well unless ``clip_ratio_high`` is given.
        clip_ratio_high: ε_hi for an asymmetric clip range; ``None`` means ε_hi = ε_lo.
        kl_coef, entropy_coef: weights of the KL penalty and the entropy bonus.
        kl_clamp: bound on the per-token k3 value.
        tis_cap: cap of the importance weight. ``None`` switches the correction off (w = 1), as does
            ``behaviour_logprobs=None``.

    Metrics: ``clip_fraction`` is the share of valid tokens where the clipped branch is strictly larger (so it is
    the one in effect); ``approx_kl`` is ``masked_mean(0.5·(logp − old)²)`` (the k2 estimator of the policy shift);
    ``is_weight_mean`` / ``is_weight_max`` are taken over valid tokens (0 when there are none).

    Raises ValueError on inconsistent shapes or ``clip_ratio``/``tis_cap``/``kl_clamp`` outside their domain.
    """
    _check_options(clip_ratio, clip_ratio_high, kl_clamp, tis_cap)
    shape = logprobs.shape
    if logprobs.dim() != 2:
        raise ValueError(f"logprobs must have shape (B, T), got {tuple(shape)}")
    for name, tensor in (
        ("old_logprobs", old_logprobs),
        ("mask", mask),
        ("ref_logprobs", ref_logprobs),
        ("entropy", entropy),
        ("behaviour_logprobs", behaviour_logprobs),
    ):
        if tensor is not None and tensor.shape != shape:
            raise ValueError(f"{name} has shape {tuple(tensor.shape)}, expected {tuple(shape)} like logprobs")
    adv = _token_advantages(advantages, shape).to(logprobs.dtype)

    keep = mask.bool()
    zero = torch.zeros((), dtype=logprobs.dtype, device=logprobs.device)
    log_ratio = torch.where(keep, logprobs - old_logprobs.detach(), zero)
    ratio = torch.exp(log_ratio)
    low, high = 1.0 - clip_ratio, 1.0 + (clip_ratio if clip_ratio_high is None else clip_ratio_high)
    unclipped = -adv * ratio
    clipped = -adv * ratio.clamp(low, high)
    weight = _is_weight(old_logprobs, behaviour_logprobs, keep, tis_cap)
    pg = masked_mean(torch.maximum(unclipped, clipped) * weight, keep)

    if ref_logprobs is None:
        kl = zero
    else:
        d = torch.where(keep, ref_logprobs.detach() - logprobs, zero)
        kl = masked_mean((torch.exp(d) - d - 1).clamp(-kl_clamp, kl_clamp), keep)
    ent = zero if entropy is None else masked_mean(entropy, keep)
    loss = pg - entropy_coef * ent + kl_coef * kl

    with torch.no_grad():
        clip_fraction = masked_mean((clipped > unclipped).to(logprobs.dtype), keep)
        approx_kl = masked_mean(0.5 * log_ratio.square(), keep)
        # Weights are positive, so zeroing the padding leaves the maximum over valid tokens (or 0 if there are none).
        weight_max = torch.where(keep, weight, zero).amax() if weight.numel() else zero
        parts = (loss, pg, kl, ent, clip_fraction, approx_kl, masked_mean(weight, keep), weight_max)
        values = torch.stack([t.float() for t in parts]).tolist()  # a single device sync for all metrics
    names = ("loss", "pg_loss", "kl", "entropy", "clip_fraction", "approx_kl", "is_weight_mean", "is_weight_max")
    return LossOutput(loss=loss, metrics=dict(zip(names, values)))


def token_logprobs_and_entropy(
    logits: torch.Tensor,
    target_ids: torch.Tensor,
    temperature: float = 1.0,
    *,
    chunk_size: int = 1024,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-prob of each target token and the entropy of each next-token distribution.

    With ``z = logits / temperature`` and ``p = softmax(z)`` over the vocabulary::

        logprob = z[target] − logsumexp(z)
        entropy = −Σ_v p_v · log p_v

    ``logits`` has shape (..., V) and ``target_ids`` shape (...); both outputs have shape (...) and dtype float32
    (float64 for float64 logits).

    Memory: a naive version keeps several (..., V) float32 tensors alive for backward (the upcast logits, the
    log-softmax, the softmax), which for a 150k vocabulary is many GB per micro-batch. Here the forward and backward
    passes walk over ``chunk_size`` rows at a time and keep only per-row statistics (logsumexp and entropy); the
    backward pass recomputes the softmax of each chunk. Beyond the gradient of ``logits`` itself, the extra memory is
    a few (chunk_size, V) tensors. Gradients flow to ``logits`` (not twice-differentiable). Pass logits whose leading
    dimensions flatten without a copy (e.g. shift ``target_ids`` rather than slicing ``logits[:, :-1]``), otherwise
    each pass makes one transient copy of the logits.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if logits.shape[:-1] != target_ids.shape:
        raise ValueError(
            f"target_ids has shape {tuple(target_ids.shape)}, expected {tuple(logits.shape[:-1])} to match logits"
        )
    logprobs, entropy = _ChunkedLogprobEntropy.apply(logits, target_ids, float(temperature), int(chunk_size))
    return logprobs, entropy


class _ChunkedLogprobEntropy(torch.autograd.Function):
    """Chunked log-prob/entropy with a recomputing backward (see :func:`token_logprobs_and_entropy`).

    Gradient w.r.t. ``z`` for one row, with ``g_lp``/``g_H`` the incoming gradients and ``p log p`` taken as 0
    where ``p = 0``::

        ∂logprob/∂z_v = 1[v = target] − p_v
        ∂entropy/∂z_v = −p_v · (log p_v + H)
        ∂/∂logits     = ∂/∂z / temperature
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx,
        logits: torch.Tensor,
        target_ids: torch.Tensor,
        temperature: float,
        chunk_size: int,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        flat = logits.reshape(-1, logits.shape[-1])
        targets = target_ids.reshape(-1, 1).long()
        compute_dtype = torch.promote_types(logits.dtype, torch.float32)
        rows = flat.shape[0]
        logprobs = torch.empty(rows, dtype=compute_dtype, device=logits.device)
        lse = torch.empty_like(logprobs)
        entropy = torch.empty_like(logprobs)
        for start in range(0, rows, chunk_size):
            stop = min(start + chunk_size, rows)
            z = flat[start:stop].to(compute_dtype) / temperature
            row_lse = torch.logsumexp(z, dim=-1)
            log_p = z.sub_(row_lse.unsqueeze(-1))  # z is a fresh tensor, so the in-place update is safe
            logprobs[start:stop] = log_p.gather(1, targets[start:stop]).squeeze(1)
            entropy[start:stop] = -_p_log_p(log_p.exp(), log_p).sum(-1)
            lse[start:stop] = row_lse
        ctx.save_for_backward(logits, targets, lse, entropy)
        ctx.temperature = temperature
        ctx.chunk_size = chunk_size
        shape = target_ids.shape
        return logprobs.reshape(shape), entropy.reshape(shape)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx, grad_logprobs: torch.Tensor, grad_entropy: torch.Tensor
    ) -> tuple[torch.Tensor, None, None, None]:
        logits, targets, lse, entropy = ctx.saved_tensors
        temperature, chunk_size = ctx.temperature, ctx.chunk_size
        flat = logits.reshape(-1, logits.shape[-1])
        g_lp = grad_logprobs.reshape(-1, 1).to(lse.dtype)
        g_h = grad_entropy.reshape(-1, 1).to(lse.dtype)
        grad = torch.empty_like(flat)
        for start in range(0, flat.shape[0], chunk_size):
            stop = min(start + chunk_size, flat.shape[0])
            log_p = flat[start:stop].to(lse.dtype) / temperature
            log_p.sub_(lse[start:stop].unsqueeze(-1))
            p = log_p.exp()
            h = entropy[start:stop].unsqueeze(-1)
            chunk = -(g_lp[start:stop] * p) - g_h[start:stop] * (_p_log_p(p, log_p) + h * p)
            chunk.scatter_add_(1, targets[start:stop], g_lp[start:stop])
            grad[start:stop] = chunk / temperature
        return grad.reshape(logits.shape), None, None, None


def _p_log_p(p: torch.Tensor, log_p: torch.Tensor) -> torch.Tensor:
    """``p · log p`` with the limit 0 where ``p = 0`` (−inf logits), where the plain product would be NaN."""
    return torch.where(p > 0, p * log_p, torch.zeros((), dtype=p.dtype, device=p.device))


def _token_advantages(advantages: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """(B,) advantages broadcast to (B, T); (B, T) passed through. Always detached."""
    adv = advantages.detach()
    if adv.shape == shape:
        return adv
    if adv.dim() == 1 and adv.shape[0] == shape[0]:
        return adv.unsqueeze(-1).expand(shape)
    raise ValueError(f"advantages has shape {tuple(adv.shape)}, expected ({shape[0]},) or {tuple(shape)}")


def _is_weight(
    old_logprobs: torch.Tensor,
    behaviour_logprobs: torch.Tensor | None,
    keep: torch.Tensor,
    tis_cap: float | None,
) -> torch.Tensor:
    """Truncated importance weight ``min(exp(old − behaviour), tis_cap)``, detached; 1 when switched off."""
    if behaviour_logprobs is None or tis_cap is None:
        return torch.ones_like(old_logprobs)
    zero = torch.zeros((), dtype=old_logprobs.dtype, device=old_logprobs.device)
    log_w = torch.where(keep, old_logprobs.detach() - behaviour_logprobs.detach(), zero)
    return torch.exp(log_w).clamp(max=tis_cap)


def _check_options(clip_ratio: float, clip_ratio_high: float | None, kl_clamp: float, tis_cap: float | None) -> None:
    if not 0 <= clip_ratio < 1:
        raise ValueError(f"clip_ratio must lie in [0, 1), got {clip_ratio}")
    if clip_ratio_high is not None and clip_ratio_high < 0:
        raise ValueError(f"clip_ratio_high must be >= 0, got {clip_ratio_high}")
    if kl_clamp <= 0:
        raise ValueError(f"kl_clamp must be > 0, got {kl_clamp}")
    if tis_cap is not None and tis_cap <= 0:
        raise ValueError(f"tis_cap must be > 0, got {tis_cap}")
