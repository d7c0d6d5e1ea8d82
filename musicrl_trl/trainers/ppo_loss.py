"""The loss of one PPO micro-batch, as a pure function of its tensors and the loss settings.

Shape letters: b rollouts in the micro-batch, A decoder steps (one step draws the K codes of one column of the delayed
layout; its log-prob is the sum over the K codes). Every input is [b, A]; ``mask`` marks the steps of kept rollouts
(a rollout whose reward was not finite is dropped whole).

    ratio     = exp(logprobs - old_logprobs)
    pg_loss   = mean_mask max(-advantages * ratio, -advantages * clip(ratio, 1 - cliprange, 1 + cliprange))
    vf_loss   = 0.5 * mean_mask max((values - returns)^2, (clip(values, old_values +- cliprange_value) - returns)^2)
    kl_loss   = mean_mask kl                     (the exact KL per step to the anchor, differentiable)
    loss      = pg_loss + vf_coef * vf_loss  [+ kl_coef * kl_loss with kl_penalty="loss"]

With a value-free baseline (``values=None``) there is no value term and no ``vf_*`` statistic.

A micro-batch with no kept step has loss 0 and no gradient (its means are taken over at least one step), so that
every process still runs the same forward and backward under DDP. Statistics are detached.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["PPOLossConfig", "PPOMicroBatch", "ppo_loss"]


@dataclass(frozen=True)
class PPOLossConfig:
    """The loss settings of :class:`~musicrl_trl.MusicPPOConfig` (same names and meanings)."""

    cliprange: float = 0.2
    cliprange_value: float = 0.2
    vf_coef: float = 0.1
    kl_coef: float = 0.05
    kl_penalty: str = "loss"  # "loss": kl_coef * KL in the loss (MusicRL); "reward": in the rewards, not here

    @classmethod
    def from_args(cls, args) -> PPOLossConfig:
        return cls(args.cliprange, args.cliprange_value, args.vf_coef, args.kl_coef, args.kl_penalty)


@dataclass
class PPOMicroBatch:
    """The tensors of one micro-batch, each [b, A]."""

    logprobs: torch.Tensor  # log pi_theta(a_t | s_t) under the current weights (with gradient)
    old_logprobs: torch.Tensor  # the same under the weights that sampled / started the update (no gradient)
    advantages: torch.Tensor  # A_t, fixed for the update
    kl: torch.Tensor  # KL(pi_theta || pi_anchor) at every step (with gradient when it is in the loss)
    mask: torch.Tensor  # bool, steps of kept rollouts
    values: torch.Tensor | None = None  # V(s_t) under the current weights (with gradient); None: value-free baseline
    old_values: torch.Tensor | None = None  # V(s_t) at the start of the update (no gradient)
    returns: torch.Tensor | None = None  # value targets


def _mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    # Selected, not multiplied: a NaN at a dropped step (0 * NaN = NaN) neither reaches the loss nor its gradient.
    # Over at least one step: an all-dropped micro-batch gives 0 instead of 0 / 0 = NaN.
    return torch.where(mask, values, 0.0).sum() / mask.sum().clamp(min=1)


def ppo_loss(batch: PPOMicroBatch, config: PPOLossConfig) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The loss of ``batch`` (a scalar with gradient) and its statistics (detached scalars): ``pg_loss``,
    ``kl_loss``, ``approxkl`` (0.5 mean squared log-ratio), ``clipfrac`` (fraction of steps where the clipped term
    is the larger), ``ratio`` (mean ratio), ``ratio_max_error`` (max |ratio - 1| over kept steps), and with values
    ``vf_loss`` and ``vf_clipfrac``."""
    mask = batch.mask
    # Targets at dropped steps are zeroed first: NaN there would still poison the gradient through the product rule
    # (d(-advantage * ratio) / d ratio = NaN, times the zero that the mask sends back, is NaN).
    advantages = torch.where(mask, batch.advantages, 0.0)
    log_ratio = batch.logprobs - batch.old_logprobs
    ratio = torch.exp(log_ratio)
    pg_losses = -advantages * ratio
    pg_losses_clipped = -advantages * torch.clamp(ratio, 1 - config.cliprange, 1 + config.cliprange)
    pg_loss = _mean(torch.max(pg_losses, pg_losses_clipped), mask)

    kl_loss = _mean(batch.kl, mask)
    loss = pg_loss
    if config.kl_penalty == "loss":
        loss = loss + config.kl_coef * kl_loss
    stats = {}
    if batch.values is not None:
        returns = torch.where(mask, batch.returns, 0.0)
        values_clipped = torch.clamp(
            batch.values, batch.old_values - config.cliprange_value, batch.old_values + config.cliprange_value
        )
        vf_losses = torch.square(batch.values - returns)
        vf_losses_clipped = torch.square(values_clipped - returns)
        vf_loss = 0.5 * _mean(torch.max(vf_losses, vf_losses_clipped), mask)
        loss = loss + config.vf_coef * vf_loss
        stats["vf_loss"] = vf_loss.detach()
        stats["vf_clipfrac"] = _mean((vf_losses_clipped > vf_losses).to(vf_loss.dtype), mask).detach()

    with torch.no_grad():
        stats.update(
            pg_loss=pg_loss.detach(),
            kl_loss=kl_loss.detach(),
            approxkl=0.5 * _mean(log_ratio.detach() ** 2, mask),
            clipfrac=_mean((pg_losses_clipped > pg_losses).to(ratio.dtype), mask),
            ratio=_mean(ratio.detach(), mask),
            ratio_max_error=(ratio.detach()[mask] - 1).abs().max() if mask.any() else ratio.new_zeros(()),
        )
    return loss, stats
