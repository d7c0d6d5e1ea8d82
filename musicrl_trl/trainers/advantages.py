"""Advantages: GAE against a learned value (MusicRL's baseline), or the value-free baselines of RLOO and GRPO.

Shape letters: B rollouts of one process (G consecutive rollouts per prompt, a group), A decoder steps.

- ``gae``: Generalised Advantage Estimation over decoder steps against V(s_t); with gamma = lam = 1 (MusicRL) the
  advantage is the Monte-Carlo return minus the baseline.
- ``group_advantages``: one advantage per rollout from the returns of its group, the other clips of the same prompt.
  ``"rloo"`` (Ahmadian et al. 2024, "Back to Basics"): minus the mean of the *other* kept clips of the group, an
  unbiased baseline; ``"group_mean"`` (GRPO, Shao et al. 2024): minus the group's mean, optionally divided by its
  standard deviation (``scale``). Dropped rollouts (non-finite rewards) neither get an advantage nor enter their
  group's baseline; a rollout without another kept clip in its group gets advantage 0 (nothing to compare with).
"""

from __future__ import annotations

import torch

__all__ = ["BASELINES", "gae", "group_advantages"]

BASELINES = ("value", "rloo", "group_mean")


def gae(rewards: torch.Tensor, values: torch.Tensor, gamma: float, lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Advantages and value targets [B, A] from per-step rewards and values [B, A] (nothing after the last step)."""
    last_gae, advantages_reversed = 0.0, []
    steps = rewards.shape[1]
    for t in reversed(range(steps)):
        next_values = values[:, t + 1] if t < steps - 1 else 0.0
        delta = rewards[:, t] + gamma * next_values - values[:, t]
        last_gae = delta + gamma * lam * last_gae
        advantages_reversed.append(last_gae)
    advantages = torch.stack(advantages_reversed[::-1], dim=1)
    return advantages, advantages + values


def group_advantages(
    returns: torch.Tensor, mask: torch.Tensor, group_size: int, baseline: str, scale: bool = False, eps: float = 1e-6
) -> torch.Tensor:
    """Advantages [B] of rollouts with sequence returns [B] and kept ``mask`` [B] (bool), in consecutive groups of
    ``group_size``: ``baseline`` "rloo" or "group_mean" (``scale``: divided by the group's std, GRPO)."""
    if baseline not in ("rloo", "group_mean"):
        raise ValueError(f"baseline must be 'rloo' or 'group_mean' here, got {baseline!r}.")
    if returns.shape[0] % group_size:
        raise ValueError(f"{returns.shape[0]} rollouts do not split into groups of {group_size}.")
    kept = mask.to(returns.dtype).view(-1, group_size)  # [B/G, G]
    grouped = torch.where(mask, returns, 0.0).view(-1, group_size)
    count = kept.sum(1, keepdim=True)
    total = grouped.sum(1, keepdim=True)
    if baseline == "rloo":
        others = (count - kept).clamp(min=1)
        advantages = grouped - (total - grouped) / others
        advantages = advantages * (count - kept > 0)  # no other kept clip: nothing to compare with
    else:
        mean = total / count.clamp(min=1)
        advantages = grouped - mean
        if scale:
            variance = ((grouped - mean) ** 2 * kept).sum(1, keepdim=True) / (count - 1).clamp(min=1)
            advantages = advantages / (variance.sqrt() + eps)
        advantages = advantages * (count > 1)
    return (advantages * kept).view(-1)
