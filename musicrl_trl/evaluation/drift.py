"""Drift from a base model: the exact KL per clip under the sampling transform (before any top-k cut), and
per-codebook token entropy.

Shape letters as in :mod:`musicrl_trl.rollout`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from ..rollout import MusicRollout, SamplingConfig, tokenize_prompts, unwrap_musicgen
from ..teacher_forcing import DEFAULT_CHUNK_SIZE, decoder_states, step_statistics

__all__ = ["entropy_per_codebook", "kl_per_clip"]


@torch.no_grad()
def kl_per_clip(
    policy: torch.nn.Module,
    base: torch.nn.Module,
    rollout: MusicRollout,
    base_processor: Any = None,
    sampling: SamplingConfig | None = None,
    chunk_size: int | None = DEFAULT_CHUNK_SIZE,
) -> torch.Tensor:
    """Exact KL(policy || base) in nats per clip, [B], for clips ``rollout`` sampled from ``policy``.

    At every code of every clip, the KL between the two models' sampling distributions over the whole codebook
    (:func:`musicrl_trl.codebooks.full_kl`, the quantity MusicRL's KL term penalises), summed over the K x T codes:
    a one-sample estimate over clips of the sequence-level KL, exact within each clip. Both distributions go through
    the same guidance and temperature (``sampling``, default the rollout's), but not its top-k cut: that is what
    ``MusicPPOTrainer`` penalises and logs (``objective/kl``, ``eval/kl``), so the numbers compare. After the cut the
    KL is infinite as soon as the policy's top k codes differ from the base's (a code the policy may draw has
    probability 0 under the base). With ``top_k=0`` (MusicRL sampled from the whole codebook) nothing changes.
    ``base_processor`` re-tokenises the prompts for a base with another text tokenizer (default: the rollout's prompt
    ids are used as they are). The two models' distributions are compared ``chunk_size`` decoder steps at a time
    (:mod:`musicrl_trl.teacher_forcing`; ``None``: the whole clip at once), so a 30 s clip needs no
    [B, K, T, V] tensor.
    """
    sampling = dataclasses.replace(sampling or rollout.sampling, top_k=0)
    policy_states = decoder_states(policy, rollout.prompt_ids, rollout.prompt_mask, rollout.grid, sampling.guided)
    prompt_ids, prompt_mask = rollout.prompt_ids, rollout.prompt_mask
    if base_processor is not None:
        prompt_ids, prompt_mask = tokenize_prompts(base_processor, rollout.prompts, unwrap_musicgen(base).device)
    base_device = unwrap_musicgen(base).device
    base_states = decoder_states(
        base, prompt_ids.to(base_device), prompt_mask.to(base_device), rollout.grid.to(base_device), sampling.guided
    )
    statistics = step_statistics(
        policy_states, rollout.grid, sampling, ref_states=base_states, chunk_size=chunk_size,
        audio_channels=rollout.audio_channels,
    )
    return statistics.kl.sum(dim=(1, 2))


def entropy_per_codebook(rollout: MusicRollout) -> torch.Tensor:
    """Mean entropy [B, K] (nats) of the sampling distribution of each codebook's codes, per clip. A collapsing
    policy shows it first in the entropy of the fine codebooks."""
    return rollout.entropies
