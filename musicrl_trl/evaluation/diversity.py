"""Diversity of the clips drawn for one prompt: audio embeddings (log-mel statistics, or a reward model's audio
encoder), mean pairwise distance, and the Vendi score (Friedman and Dieng, 2023).

Shapes: B clips, C channels, N samples, M clips of one prompt, D embedding width.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ..audio import resample, split_windows, to_mono
from ..reward_models import TextAdherenceReward
from ..reward_models.features import log_mel_spectrogram
from ..reward_models.modeling_music_reward import MusicRewardModel

__all__ = [
    "LogMelEmbedding",
    "RewardModelEmbedding",
    "diversity",
    "pairwise_distances",
    "similarity_matrix",
    "vendi_score",
]


class LogMelEmbedding:
    """A model-free clip embedding: the mean and standard deviation over time of each band of a log-mel spectrogram
    in dB (``2 * num_mel_bins`` numbers: the average spectrum and how much each band moves).

    Distances between such embeddings are root-mean-square differences in dB (``metric = "euclidean"``); the
    similarity for the Vendi score is the Gaussian kernel ``exp(-d^2 / (2 * bandwidth_db^2))``: clips about
    ``bandwidth_db`` apart per feature count as 0.6 alike. A fixed scale, so that scores compare across policies
    and runs evaluated with the same settings; it is not calibrated against listeners.

    >>> embed = LogMelEmbedding()
    >>> embed(0.1 * torch.randn(2, 1, 16_000), sampling_rate=16_000).shape
    torch.Size([2, 128])
    """

    metric = "euclidean"
    name = "log_mel"

    def __init__(
        self,
        sampling_rate: int = 16_000,
        num_mel_bins: int = 64,
        n_fft: int = 1024,
        hop_length: int = 320,
        bandwidth_db: float = 3.0,
    ) -> None:
        if bandwidth_db <= 0:
            raise ValueError(f"bandwidth_db must be > 0, got {bandwidth_db}.")
        self.sampling_rate, self.num_mel_bins = sampling_rate, num_mel_bins
        self.n_fft, self.hop_length, self.bandwidth = n_fft, hop_length, bandwidth_db

    @torch.no_grad()
    def __call__(self, audio: torch.Tensor, sampling_rate: int) -> torch.Tensor:
        audio = resample(to_mono(audio).float(), sampling_rate, self.sampling_rate)[:, 0]  # [B, N']
        log_mel = log_mel_spectrogram(
            audio, self.sampling_rate, self.n_fft, self.hop_length, self.num_mel_bins, f_min=20.0, top_db=80.0
        )  # [B, F, M]
        return torch.cat([log_mel.mean(dim=1), log_mel.std(dim=1, unbiased=False)], dim=-1)


class RewardModelEmbedding:
    """Clip embeddings from a reward model's audio encoder, compared by cosine.

    - :class:`~musicrl_trl.reward_models.TextAdherenceReward`: CLAP audio embeddings of the reward's windows,
      averaged over a clip's windows and renormalised;
    - :class:`~musicrl_trl.reward_models.QualityReward` / audio-space
      :class:`~musicrl_trl.reward_models.PreferenceReward`: ``MusicRewardModel.embed_audio``.
    """

    metric = "cosine"
    bandwidth = None

    def __init__(self, reward: Any, name: str | None = None) -> None:
        self.reward = reward
        self.name = name or getattr(reward, "__name__", type(reward).__name__)
        if isinstance(reward, TextAdherenceReward):
            self.kind = "clap"
        elif isinstance(getattr(reward, "model", None), MusicRewardModel):
            self.kind = "music_reward"
        else:
            raise ValueError(
                f"{self.name}: cannot embed audio with {type(reward).__name__}; use an adherence reward (CLAP), a "
                "quality or an audio-space preference reward (MusicRewardModel), or the log-mel embedding."
            )

    @torch.no_grad()
    def __call__(self, audio: torch.Tensor, sampling_rate: int) -> torch.Tensor:
        reward = self.reward
        if self.kind == "clap":
            rate = reward.sampling_rate
            audio = resample(to_mono(audio).float(), sampling_rate, rate)
            windows = split_windows(audio, rate, reward.window_s, reward.hop_s)  # [B, W, 1, L]
            batch, num_windows = windows.shape[:2]
            embeddings = reward.audio_embeddings(windows.flatten(0, 2)).view(batch, num_windows, -1).mean(dim=1)
        else:
            model = reward.model
            embeddings = model.embed_audio(to_mono(audio).float()[:, 0].to(model.device), sampling_rate=sampling_rate)
        return torch.nn.functional.normalize(embeddings.float(), dim=-1).to(audio.device)


def pairwise_distances(embeddings: torch.Tensor, metric: str) -> torch.Tensor:
    """[M, M] distances between embeddings [M, D]: ``"cosine"`` (1 - cosine similarity) or ``"euclidean"`` (root
    mean square difference per dimension, e.g. dB for log-mel statistics)."""
    embeddings = embeddings.double()
    if metric == "cosine":
        unit = torch.nn.functional.normalize(embeddings, dim=-1)
        return (1 - unit @ unit.T).clamp_min(0)
    if metric == "euclidean":
        return torch.cdist(embeddings, embeddings) / math.sqrt(embeddings.shape[-1])
    raise ValueError(f"metric must be 'cosine' or 'euclidean', got {metric!r}.")


def similarity_matrix(embeddings: torch.Tensor, metric: str, bandwidth: float | None = None) -> torch.Tensor:
    """[M, M] positive semi-definite similarities with ones on the diagonal, as the Vendi score needs: the cosine
    Gram matrix, or the Gaussian kernel of the euclidean distance with ``bandwidth``."""
    if metric == "cosine":
        unit = torch.nn.functional.normalize(embeddings.double(), dim=-1)
        return unit @ unit.T
    if metric == "euclidean":
        if not bandwidth or bandwidth <= 0:
            raise ValueError("the euclidean similarity needs a bandwidth > 0.")
        distances = pairwise_distances(embeddings, metric)
        return torch.exp(-distances.square() / (2 * bandwidth**2))
    raise ValueError(f"metric must be 'cosine' or 'euclidean', got {metric!r}.")


def vendi_score(similarity: torch.Tensor) -> float:
    """Vendi score of M items from their similarity matrix [M, M] (diagonal 1): ``exp(-sum_i l_i log l_i)`` with
    ``l_i`` the eigenvalues of ``similarity / M``. 1 when all items are identical, M when all are orthogonal.

    >>> vendi_score(torch.ones(3, 3)), round(vendi_score(torch.eye(3)), 6)
    (1.0, 3.0)
    """
    size = similarity.shape[0]
    eigenvalues = torch.linalg.eigvalsh(similarity.double() / size).clamp_min(0)
    eigenvalues = eigenvalues[eigenvalues > 1e-12]
    return float(torch.exp(-(eigenvalues * eigenvalues.log()).sum()).clamp(1.0, size))


def diversity(embeddings: torch.Tensor, metric: str, bandwidth: float | None = None) -> dict[str, float]:
    """Spread of the M clips of one prompt: ``mean_pairwise_distance`` (over the M (M - 1) / 2 pairs; 0 for a single
    clip) and ``vendi_score`` (1 to M)."""
    size = embeddings.shape[0]
    distances = pairwise_distances(embeddings, metric)
    upper = torch.triu_indices(size, size, offset=1)
    mean_distance = float(distances[upper[0], upper[1]].mean()) if size > 1 else 0.0
    return {
        "mean_pairwise_distance": mean_distance,
        "vendi_score": vendi_score(similarity_matrix(embeddings, metric, bandwidth)),
    }
