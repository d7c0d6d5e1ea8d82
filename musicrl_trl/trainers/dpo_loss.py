"""The two computations of :class:`~musicrl_trl.MusicDPOTrainer`, each testable alone: the sequence log-prob of a
clip's codes under a MusicGen's sampling distribution, and the preference losses on those log-probs.

Shape letters: B pairs, B' = 2B clips (chosen first), K codebooks, T frames, S = T + D + 1 grid columns,
V codebook size, L prompt tokens.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import codebooks
from ..rollout import SamplingConfig, decoder_logits, sampling_log_dist

__all__ = ["dpo_loss", "sequence_logprobs"]


def sequence_logprobs(
    model: torch.nn.Module,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    codes: torch.Tensor,
    frame_mask: torch.Tensor,
    sampling: SamplingConfig,
    pad_token_id: int,
    audio_channels: int = 1,
    average: bool = False,
) -> torch.Tensor:
    """log pi(clip | prompt) [B']: the sum of the log-probs of every real code of each clip, by one teacher-forced
    forward over the delayed layout (:func:`musicrl_trl.codebooks.codes_to_grid`).

    ``codes`` [B', K, T] are right-padded (any value) where ``frame_mask`` [B', T] is 0; padded frames and the delay
    pattern's start/pad cells are never counted, exactly as the RL trainer counts a rollout's codes. The decoder is
    causal, so padding after a clip's end does not change the log-probs of its codes.

    How guidance enters. With ``sampling.guidance_scale`` s > 1 the batch is doubled with the null condition, as
    ``generate`` does, and the log-probs are those of ``log_softmax((u + s (c - u)) / temperature)`` (c, u the
    conditional and unconditional logits). That is the distribution the policy samples from, so the implicit reward
    ``beta * log(pi / pi_ref)`` and the preference it is fitted to are about the music users hear; gradients flow
    through both halves, which share the decoder's weights. Without guidance (s = 1) it is the plain conditional
    distribution at that temperature. ``top_k`` is ignored (see :class:`~musicrl_trl.MusicDPOConfig`): codes outside
    the top k would get ``-inf``. ``average=True`` divides by the number of codes (IPO).
    """
    sampling = SamplingConfig(sampling.guidance_scale, sampling.temperature, top_k=0)
    grid = codebooks.codes_to_grid(codes, pad_token_id, audio_channels)  # [B', K, S]
    output = decoder_logits(model, prompt_ids, prompt_mask, grid, guided=sampling.guided)
    log_dist = sampling_log_dist(output, sampling, audio_channels)  # [B', K, T, V]
    vocab = log_dist.shape[-1]
    # Padded frames may hold the pad token (= V): clamp for the gather, the mask removes them.
    logprobs = codebooks.gather_logprobs(log_dist, codes.clamp(0, vocab - 1))  # [B', K, T]
    mask = frame_mask[:, None, :].to(logprobs.dtype)
    total = (logprobs * mask).sum(dim=(1, 2))
    if average:
        total = total / (frame_mask.sum(-1).to(total.dtype) * codes.shape[1])  # K codes per real frame
    return total


def dpo_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair losses [B] and implicit rewards of the chosen and rejected clips [B], from sequence log-probs [B].

    With ``h = (chosen - rejected) - (ref_chosen - ref_rejected)`` (the log-ratio margin) and ``e`` the label
    smoothing, as TRL's ``DPOTrainer`` computes them:

    - ``sigmoid`` (DPO; cDPO with e > 0): ``-(1 - e) log sigmoid(beta h) - e log sigmoid(-beta h)``;
    - ``ipo``: ``(h - 1 / (2 beta))^2``;
    - ``hinge`` (SLiC): ``max(0, 1 - beta h)``;
    - ``robust`` (rDPO): ``(-(1 - e) log sigmoid(beta h) + e log sigmoid(-beta h)) / (1 - 2 e)``.

    Rewards are ``beta * (logps - ref_logps)``, detached.
    """
    margin = (chosen_logps - rejected_logps) - (ref_chosen_logps - ref_rejected_logps)
    if loss_type == "sigmoid":
        losses = -F.logsigmoid(beta * margin) * (1 - label_smoothing) - F.logsigmoid(-beta * margin) * label_smoothing
    elif loss_type == "ipo":
        losses = (margin - 1 / (2 * beta)) ** 2
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * margin)
    elif loss_type == "robust":
        losses = (
            -F.logsigmoid(beta * margin) * (1 - label_smoothing) + F.logsigmoid(-beta * margin) * label_smoothing
        ) / (1 - 2 * label_smoothing)
    else:
        raise ValueError(f"loss_type must be 'sigmoid', 'ipo', 'hinge' or 'robust', got {loss_type!r}.")
    chosen_rewards = beta * (chosen_logps - ref_chosen_logps).detach()
    rejected_rewards = beta * (rejected_logps - ref_rejected_logps).detach()
    return losses, chosen_rewards, rejected_rewards
