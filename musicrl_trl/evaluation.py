"""Is the tuned policy better than the base, and at what cost? MusicRL's side-by-side statistics, drift and diversity.

MusicRL judged policies side by side: per prompt, which of two clips is better; win rate = wins / (wins + losses);
Wilcoxon signed-rank tests on the paired scores; and every reward shown against the KL to the starting model,
because over-optimisation (the user-preference reward over-optimised within 2k steps) is the known failure. This
module computes the same quantities for two policies under any reward callables:

- :func:`paired_comparison`: wins / ties / losses of A against B per prompt, the win rate and a Wilcoxon p-value;
- :func:`bootstrap_ci`: percentile bootstrap intervals of a mean (prompts are the resampled unit);
- :func:`kl_per_clip`: the exact KL(policy || base) in nats per clip, summed over every code of the clip and over the
  whole codebook, under the sampling transform (guidance, temperature, top-k) the clips were drawn with;
- :class:`LogMelEmbedding` / :class:`RewardModelEmbedding`, :func:`diversity`, :func:`vendi_score`: the spread of the
  clips drawn for one prompt, as the mean pairwise distance of audio embeddings and a Vendi score (Friedman and
  Dieng, 2023: the exponential of the entropy of the similarity matrix's eigenvalues, an "effective number" of
  distinct clips between 1 and M);
- :func:`evaluate_policies`: all of the above for two policies (paths, Hub ids, full models or LoRA adapters) with
  fixed seeds, as ``examples/evaluate_musicrl.py`` runs it; :func:`write_results` writes ``results.json``,
  ``results.md`` and plots; :func:`plot_training_runs` draws reward against KL and against step for several runs.

Shape letters as in :mod:`musicrl_trl.rollout`, plus P prompts, M clips per prompt, D embedding width.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from . import codebooks
from .audio import resample, split_windows, to_mono
from .reward_models.features import log_mel_spectrogram
from .rollout import (
    MusicRollout,
    SamplingConfig,
    decoder_logits,
    generate_rollout,
    resolve_num_steps,
    sampling_log_dist,
    tokenize_prompts,
    unwrap_musicgen,
)

__all__ = [
    "REWARD_KINDS",
    "LogMelEmbedding",
    "PolicySamples",
    "RewardModelEmbedding",
    "bootstrap_ci",
    "check_compatible",
    "clap_score",
    "compare_policies",
    "diversity",
    "entropy_per_codebook",
    "evaluate_policies",
    "kl_per_clip",
    "load_policy",
    "load_prompts",
    "load_reward",
    "pairwise_distances",
    "paired_comparison",
    "plot_training_runs",
    "results_markdown",
    "sample_policy",
    "similarity_matrix",
    "vendi_score",
    "wilcoxon_signed_rank",
    "write_results",
]

#: Reward names accepted by :func:`load_reward`: signal rewards alone, model rewards as ``NAME=PATH_OR_ID``.
REWARD_KINDS = ("loudness", "brightness", "silence", "adherence", "quality", "preference")
SIGNAL_REWARDS = ("loudness", "brightness", "silence")


# ---------------------------------------------------------------------------------------------------------- statistics
def _as_prompt_means(scores: Any, name: str) -> np.ndarray:
    """Scores [P] or [P, M] -> per-prompt means [P] (float64)."""
    array = np.asarray(scores.detach().cpu() if isinstance(scores, torch.Tensor) else scores, dtype=np.float64)
    if array.ndim == 2:
        array = array.mean(axis=1)
    if array.ndim != 1 or array.size == 0:
        raise ValueError(f"{name} must hold one score per prompt ([P]) or per clip ([P, M]), got shape {array.shape}.")
    if not np.isfinite(array).all():
        raise ValueError(f"{name} holds NaN or infinite scores; fix the reward or drop those prompts.")
    return array


def wilcoxon_signed_rank(differences: Any) -> float:
    """Two-sided Wilcoxon signed-rank p-value of paired differences (zeros, i.e. ties, are dropped first).

    scipy's exact null distribution is used for up to 50 non-zero differences without tied magnitudes, the normal
    approximation otherwise. No non-zero difference at all (a policy against itself) gives p = 1.

    >>> round(wilcoxon_signed_rank([1, 2, 3, 4, 5, 6]), 5)  # every prompt won: 2 / 2**6
    0.03125
    """
    from scipy.stats import wilcoxon

    differences = np.asarray(differences, dtype=np.float64)
    differences = differences[differences != 0]
    if differences.size == 0:
        return 1.0
    return float(wilcoxon(differences, zero_method="wilcox", alternative="two-sided").pvalue)


def paired_comparison(scores_a: Any, scores_b: Any, tie_tolerance: float = 0.0) -> dict[str, Any]:
    """Side-by-side result of policy A against policy B on the same prompts.

    Args:
        scores_a, scores_b: per-prompt scores [P], or per-clip scores [P, M] (averaged over the M clips of a prompt).
        tie_tolerance: prompts whose mean scores differ by at most this much count as ties.

    Returns ``wins``, ``ties``, ``losses`` (of A), ``win_rate = wins / (wins + losses)`` (MusicRL's definition: ties
    left out; 0.5 when every prompt is a tie) and ``wilcoxon_p`` (two-sided signed-rank test of the per-prompt
    differences, ties dropped).

    >>> result = paired_comparison([3.0, 2.0, 1.0, 5.0], [1.0, 2.0, 2.0, 4.0])
    >>> result["wins"], result["ties"], result["losses"], result["win_rate"]
    (2, 1, 1, 0.6666666666666666)
    """
    means_a = _as_prompt_means(scores_a, "scores_a")
    means_b = _as_prompt_means(scores_b, "scores_b")
    if means_a.shape != means_b.shape:
        raise ValueError(
            f"scores_a covers {means_a.size} prompts and scores_b {means_b.size}: a side-by-side comparison needs "
            "the scores of both policies on the same prompts, in the same order."
        )
    if tie_tolerance < 0:
        raise ValueError(f"tie_tolerance must be >= 0, got {tie_tolerance}.")
    differences = means_a - means_b
    differences[np.abs(differences) <= tie_tolerance] = 0.0
    wins, losses = int((differences > 0).sum()), int((differences < 0).sum())
    ties = differences.size - wins - losses
    return {
        "wins": wins,
        "ties": ties,
        "losses": losses,
        "win_rate": wins / (wins + losses) if wins + losses else 0.5,
        "wilcoxon_p": wilcoxon_signed_rank(differences),
    }


def bootstrap_ci(
    values: Any, confidence: float = 0.95, num_resamples: int = 10_000, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``values`` [P].

    Resamples the P values with replacement ``num_resamples`` times (seeded: the same input gives the same
    interval). Pass one value per prompt (its mean over clips): the clips of one prompt are not independent, so the
    prompt is the unit to resample. A single value gives the degenerate interval [v, v].

    >>> bootstrap_ci([1.0, 1.0, 1.0])
    (1.0, 1.0)
    """
    values = np.asarray(values, dtype=np.float64).reshape(-1)
    if values.size == 0:
        raise ValueError("bootstrap_ci needs at least one value.")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must lie in (0, 1), got {confidence}.")
    rng = np.random.default_rng(seed)
    means = np.empty(num_resamples)
    # Chunks bound the index matrix to ~8 MB whatever P and num_resamples are.
    chunk = max(1, 1_000_000 // values.size)
    for start in range(0, num_resamples, chunk):
        count = min(chunk, num_resamples - start)
        means[start : start + count] = values[rng.integers(0, values.size, (count, values.size))].mean(axis=1)
    alpha = (1 - confidence) / 2
    low, high = np.quantile(means, [alpha, 1 - alpha])
    return float(low), float(high)


# --------------------------------------------------------------------------------------------------------------- drift
@torch.no_grad()
def kl_per_clip(
    policy: torch.nn.Module,
    base: torch.nn.Module,
    rollout: MusicRollout,
    base_processor: Any = None,
    sampling: SamplingConfig | None = None,
) -> torch.Tensor:
    """Exact KL(policy || base) in nats per clip, [B], for clips ``rollout`` sampled from ``policy``.

    At every code of every clip, the KL between the two models' sampling distributions over the whole codebook
    (:func:`musicrl_trl.codebooks.full_kl`, the quantity MusicRL's KL term penalises), summed over the K x T codes:
    a one-sample estimate over clips of the sequence-level KL, exact within each clip. Both distributions go through
    the same sampling transform (``sampling``, default the rollout's). ``base_processor`` re-tokenises the prompts
    for a base with another text tokenizer (default: the rollout's prompt ids are used as they are).

    With top-k the KL is infinite as soon as the policy can draw a code outside the base's top k (the two supports
    differ); MusicRL sampled from the whole codebook (``top_k=0``), where it is always finite.
    """
    sampling = sampling or rollout.sampling
    audio_channels = rollout.audio_channels
    policy_output = decoder_logits(policy, rollout.prompt_ids, rollout.prompt_mask, rollout.grid, sampling.guided)
    log_dist = sampling_log_dist(policy_output, sampling, audio_channels)
    del policy_output
    prompt_ids, prompt_mask = rollout.prompt_ids, rollout.prompt_mask
    if base_processor is not None:
        prompt_ids, prompt_mask = tokenize_prompts(base_processor, rollout.prompts, unwrap_musicgen(base).device)
    base_device = unwrap_musicgen(base).device
    base_output = decoder_logits(
        base, prompt_ids.to(base_device), prompt_mask.to(base_device), rollout.grid.to(base_device), sampling.guided
    )
    base_log_dist = sampling_log_dist(base_output, sampling, audio_channels).to(log_dist.device)
    del base_output
    return codebooks.full_kl(log_dist, base_log_dist).sum(dim=(1, 2))


def entropy_per_codebook(rollout: MusicRollout) -> torch.Tensor:
    """Mean entropy [B, K] (nats) of the sampling distribution of each codebook's codes, per clip. A collapsing
    policy shows it first in the entropy of the fine codebooks."""
    return rollout.entropies


# ----------------------------------------------------------------------------------------------------------- diversity
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
        from .reward_models import TextAdherenceReward
        from .reward_models.modeling_music_reward import MusicRewardModel

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


def clap_score(prompts: list[str], audio: torch.Tensor, sampling_rate: int, reward: Any) -> torch.Tensor:
    """CLAP score [B] of clips against their prompts: the text-adherence reward (mean CLAP cosine over windows).

    ``reward`` is a :class:`~musicrl_trl.reward_models.TextAdherenceReward`, or a CLAP path / Hub id to build one.
    """
    from .reward_models import TextAdherenceReward

    if not isinstance(reward, TextAdherenceReward):
        reward = TextAdherenceReward(reward)
    return reward(prompts=list(prompts), audio=audio, sampling_rate=sampling_rate)


# ------------------------------------------------------------------------------------------------------------- loading
def load_reward(spec: str, device: torch.device | str | None = None) -> tuple[str, Callable]:
    """A reward from a command-line spec: ``loudness``, ``brightness``, ``silence`` (signal rewards, no weights),
    or ``adherence=PATH_OR_ID``, ``quality=PATH_OR_ID``, ``preference=PATH_OR_ID``. Returns ``(name, reward)``.

    Raises ``ValueError`` naming the spec when it is unknown or its model cannot be loaded.
    """
    from .reward_models import (
        BrightnessReward,
        LoudnessReward,
        PreferenceReward,
        QualityReward,
        SilencePenalty,
        TextAdherenceReward,
    )

    kind, _, location = spec.partition("=")
    kind = kind.strip()
    if kind not in REWARD_KINDS:
        raise ValueError(
            f"unknown reward {spec!r}: use one of {', '.join(SIGNAL_REWARDS)} or "
            "adherence=PATH_OR_ID, quality=PATH_OR_ID, preference=PATH_OR_ID."
        )
    if kind in SIGNAL_REWARDS:
        if location:
            raise ValueError(f"reward {spec!r}: {kind} is computed from the signal and takes no model; pass {kind!r}.")
        return kind, {"loudness": LoudnessReward, "brightness": BrightnessReward, "silence": SilencePenalty}[kind]()
    if not location:
        raise ValueError(f"reward {spec!r} needs a model: pass {kind}=PATH_OR_HUB_ID.")
    builder = {"adherence": TextAdherenceReward, "quality": QualityReward, "preference": PreferenceReward}[kind]
    try:
        return kind, builder(location, device=device)
    except Exception as error:  # any failure to load is reported the same way, with the cause attached
        raise ValueError(
            f"could not load the {kind} reward from {location!r} ({type(error).__name__}: {error}). Check the path "
            "or Hub id (and your network / HF_HUB_OFFLINE); an adherence reward needs a CLAP checkpoint, quality and "
            "preference rewards a MusicRewardModel (or a token-space preference model)."
        ) from error


def load_prompts(source: Any, split: str = "train", column: str = "prompt") -> list[str]:
    """Prompts from a text file (one prompt a line; blank lines skipped), a dataset saved with ``save_to_disk``, a
    data file (.json/.jsonl/.csv/.parquet), a Hub dataset id, a ``datasets.Dataset``, or a list of strings.
    Raises ``ValueError`` when no prompt is left or the ``column`` is missing."""
    if isinstance(source, (list, tuple)):
        prompts = [str(prompt) for prompt in source if str(prompt).strip()]
        origin = "the prompt list"
    elif hasattr(source, "column_names"):  # a datasets.Dataset already loaded
        if column not in source.column_names:
            raise ValueError(f"the dataset has no {column!r} column (columns: {source.column_names}).")
        prompts = [str(prompt).strip() for prompt in source[column] if str(prompt).strip()]
        origin = "the dataset"
    elif os.path.isfile(source) and source.endswith(".txt"):
        with open(source, encoding="utf-8") as f:
            prompts = [line.strip() for line in f if line.strip()]
        origin = source
    else:
        import datasets

        if os.path.isdir(source) and os.path.isfile(os.path.join(source, "state.json")):
            dataset = datasets.load_from_disk(source)
        elif os.path.isfile(source):
            extension = os.path.splitext(source)[1].lstrip(".").replace("jsonl", "json")
            dataset = datasets.load_dataset(extension, data_files=source, split="train")
        else:
            dataset = datasets.load_dataset(source, split=split)
        if isinstance(dataset, datasets.DatasetDict):
            if split not in dataset:
                raise ValueError(f"{source!r} has no split {split!r} (splits: {list(dataset)}).")
            dataset = dataset[split]
        if column not in dataset.column_names:
            raise ValueError(
                f"{source!r} has no {column!r} column (columns: {dataset.column_names}); name the text column with "
                "--prompt_column."
            )
        prompts = [str(prompt).strip() for prompt in dataset[column] if str(prompt).strip()]
        origin = source
    if not prompts:
        raise ValueError(f"no prompts in {origin}: give at least one non-empty prompt.")
    return prompts


def load_policy(source: Any, processor: Any = None, device: torch.device | str | None = None) -> tuple[Any, Any]:
    """A MusicGen policy and its processor from a path or Hub id, or a model passed as it is.

    A directory or repo with ``adapter_config.json`` is a LoRA adapter: its base model
    (``base_model_name_or_path``) is loaded and wrapped with ``PeftModel.from_pretrained``; the processor is read
    from the adapter when it was saved there (``MusicPPOTrainer.save_model`` does), else from the base.
    """
    from transformers import MusicgenForConditionalGeneration, MusicgenProcessor

    if not isinstance(source, (str, os.PathLike)):
        if processor is None:
            raise ValueError("pass the processor of a policy given as a model object.")
        unwrap_musicgen(source)  # type check
        model = source
    else:
        from transformers.utils import find_adapter_config_file

        source = os.fspath(source)
        try:
            adapter_config = find_adapter_config_file(source)
            if adapter_config is not None:
                from peft import PeftConfig, PeftModel

                base_id = PeftConfig.from_pretrained(source).base_model_name_or_path
                base = MusicgenForConditionalGeneration.from_pretrained(base_id)
                model = PeftModel.from_pretrained(base, source)
                if processor is None:
                    try:
                        processor = MusicgenProcessor.from_pretrained(source)
                    except (OSError, ValueError):
                        processor = MusicgenProcessor.from_pretrained(base_id)
            else:
                model = MusicgenForConditionalGeneration.from_pretrained(source)
                processor = processor or MusicgenProcessor.from_pretrained(source)
        except Exception as error:
            raise ValueError(
                f"could not load the policy {source!r} ({type(error).__name__}: {error}): pass a MusicGen checkpoint "
                "or a LoRA adapter saved by MusicPPOTrainer (a directory or Hub id)."
            ) from error
    model.eval().requires_grad_(False)
    if device is not None:
        model.to(device)
    return model, processor


def _audio_spec(model: Any) -> dict[str, Any]:
    musicgen = unwrap_musicgen(model)
    return {
        "codebooks": musicgen.decoder.num_codebooks,
        "audio channels": musicgen.decoder.config.audio_channels,
        "codebook size": musicgen.decoder.config.vocab_size,
        "sampling rate": musicgen.config.audio_encoder.sampling_rate,
        "frame rate": musicgen.config.audio_encoder.frame_rate,
    }


def check_compatible(models: dict[str, Any]) -> None:
    """Raise ``ValueError`` unless every model samples the same kind of codes: same number of codebooks, audio
    channels, codebook size, sampling rate and frame rate (clips and KLs are compared code by code)."""
    specs = {name: _audio_spec(model) for name, model in models.items()}
    (first_name, first), *others = specs.items()
    for name, spec in others:
        for key, value in spec.items():
            if value != first[key]:
                raise ValueError(
                    f"{name} and {first_name} differ in {key} ({value} vs {first[key]}): a side-by-side evaluation "
                    "and the KL to the base need policies of the same MusicGen family (same codec and codebooks); "
                    "compare checkpoints fine-tuned from the same base."
                )


# ------------------------------------------------------------------------------------------------------ sampling
@dataclass
class PolicySamples:
    """What one policy produced on the evaluation prompts: per-clip scores, drift and diversity."""

    scores: dict[str, torch.Tensor]  # name -> [P, M] reward of every clip
    kl: torch.Tensor | None  # [P, M] exact KL(policy || base) in nats per clip, None without a base
    entropies: torch.Tensor  # [P, M, K] mean sampling entropy of each codebook
    diversity: list[dict[str, float]] = field(default_factory=list)  # one entry per prompt
    audio: list[torch.Tensor] = field(default_factory=list)  # [M, C, N] per prompt, when kept
    sampling_rate: int = 0


@torch.no_grad()
def sample_policy(
    policy: Any,
    processor: Any,
    prompts: list[str],
    rewards: dict[str, Callable],
    num_samples_per_prompt: int,
    num_steps: int,
    sampling: SamplingConfig,
    seed: int = 0,
    base: Any = None,
    base_processor: Any = None,
    embedding: Any = None,
    batch_size: int | None = None,
    keep_audio: int = 0,
    progress: Callable[[int], None] | None = None,
) -> PolicySamples:
    """Sample ``num_samples_per_prompt`` clips per prompt and score them.

    Prompt ``i`` is sampled with the torch RNG seeded to ``seed + i`` (chunks of ``batch_size`` clips continue that
    stream), so two policies evaluated with the same seed draw with the same random numbers (common random numbers:
    the paired comparison then measures the policies, not the dice), and a policy against itself ties everywhere.
    The clips of the first ``keep_audio`` prompts are kept in ``PolicySamples.audio`` (the rest are scored and
    dropped, so memory does not grow with the prompt set). ``base=None`` skips the KL.
    """
    embedding = embedding or LogMelEmbedding()
    batch_size = batch_size or num_samples_per_prompt
    scores = {name: [] for name in rewards}
    kls, entropies, spread, kept = [], [], [], []
    sampling_rate = unwrap_musicgen(policy).config.audio_encoder.sampling_rate
    for index, prompt in enumerate(prompts):
        torch.manual_seed(seed + index)
        rollouts = []
        for start in range(0, num_samples_per_prompt, batch_size):
            count = min(batch_size, num_samples_per_prompt - start)
            rollout = generate_rollout(policy, processor, [prompt] * count, num_steps=num_steps, sampling=sampling)
            prompt_scores = {}
            for name, reward in rewards.items():
                values = reward(
                    prompts=rollout.prompts,
                    audio=rollout.audio,
                    sampling_rate=rollout.sampling_rate,
                    codes=rollout.codes,
                )
                prompt_scores[name] = torch.as_tensor(values, dtype=torch.float32).reshape(-1).cpu()
            kl = kl_per_clip(policy, base, rollout, base_processor).cpu() if base is not None else None
            rollouts.append((rollout.audio, prompt_scores, kl, entropy_per_codebook(rollout).cpu()))
        audio = torch.cat([r[0] for r in rollouts])
        for name in rewards:
            scores[name].append(torch.cat([r[1][name] for r in rollouts]))
        if base is not None:
            kls.append(torch.cat([r[2] for r in rollouts]))
        entropies.append(torch.cat([r[3] for r in rollouts]))
        spread.append(diversity(embedding(audio, sampling_rate).cpu(), embedding.metric, embedding.bandwidth))
        if index < keep_audio:
            kept.append(audio.cpu())
        if progress is not None:
            progress(index + 1)
    return PolicySamples(
        scores={name: torch.stack(values) for name, values in scores.items()},
        kl=torch.stack(kls) if base is not None else None,
        entropies=torch.stack(entropies),
        diversity=spread,
        audio=kept,
        sampling_rate=sampling_rate,
    )


def _mean_ci(per_clip: torch.Tensor, num_resamples: int, seed: int) -> tuple[float, list[float]]:
    """Mean and bootstrap interval of [P, M] values: prompts resampled (clips when there is a single prompt)."""
    values = per_clip.double()
    unit = values.mean(dim=1) if values.shape[0] > 1 else values.reshape(-1)
    low, high = bootstrap_ci(unit.numpy(), num_resamples=num_resamples, seed=seed)
    return float(values.mean()), [low, high]


def _summarise_diversity(samples: PolicySamples, embedding: Any) -> dict[str, Any]:
    per_prompt = samples.diversity
    return {
        "embedding": embedding.name,
        "metric": embedding.metric,
        "mean_pairwise_distance": float(np.mean([d["mean_pairwise_distance"] for d in per_prompt])),
        "vendi_score": float(np.mean([d["vendi_score"] for d in per_prompt])),
        "entropy_per_codebook": [float(v) for v in samples.entropies.double().mean(dim=(0, 1))],
    }


def compare_policies(
    samples_a: PolicySamples,
    samples_b: PolicySamples,
    tie_tolerance: float = 0.0,
    num_resamples: int = 10_000,
    seed: int = 0,
    embedding: Any = None,
) -> dict[str, Any]:
    """The ``rewards``, ``kl_to_base`` and ``diversity`` sections of the results from two policies' samples."""
    embedding = embedding or LogMelEmbedding()
    rewards = {}
    for name in samples_a.scores:
        scores_a, scores_b = samples_a.scores[name], samples_b.scores[name]
        mean_a, ci_a = _mean_ci(scores_a, num_resamples, seed)
        mean_b, ci_b = _mean_ci(scores_b, num_resamples, seed)
        rewards[name] = {"mean_a": mean_a, "mean_b": mean_b, "ci95_a": ci_a, "ci95_b": ci_b}
        rewards[name].update(paired_comparison(scores_a, scores_b, tie_tolerance))
    kl = {}
    if samples_a.kl is not None:
        kl["a"], kl["ci95_a"] = _mean_ci(samples_a.kl, num_resamples, seed)
        kl["b"], kl["ci95_b"] = _mean_ci(samples_b.kl, num_resamples, seed)
    return {
        "rewards": rewards,
        "kl_to_base": kl,
        "diversity": {
            "a": _summarise_diversity(samples_a, embedding),
            "b": _summarise_diversity(samples_b, embedding),
        },
    }


def evaluate_policies(
    policy_a: Any,
    policy_b: Any,
    prompts: str | Sequence[str],
    rewards: Sequence[str] | dict[str, Callable],
    base_model: Any = None,
    num_samples_per_prompt: int = 4,
    response_length: int | None = None,
    audio_duration_s: float | None = None,
    sampling: SamplingConfig | None = None,
    seed: int = 0,
    embedding: str = "log_mel",
    bandwidth_db: float = 3.0,
    tie_tolerance: float = 0.0,
    num_resamples: int = 10_000,
    batch_size: int | None = None,
    device: torch.device | str | None = None,
    processors: dict[str, Any] | None = None,
    keep_audio: int = 0,
    progress: Callable[[str, int, int], None] | None = None,
) -> dict[str, Any]:
    """Side-by-side evaluation of policy A against policy B, with drift to ``base_model`` and diversity.

    Everything that can fail is loaded and checked before the first clip is sampled: prompts (non-empty), rewards
    (specs for :func:`load_reward` or ``{name: callable}``), policies and base (paths, Hub ids, LoRA adapters or
    models; same codebooks and rates), the clip length. ``base_model`` defaults to policy B (the usual question:
    "is the tuned A better than its base B, and how far did it move?"). ``embedding`` is ``"log_mel"`` or the name
    of a loaded model reward (``"adherence"``, ``"quality"``, ``"preference"``) whose audio encoder embeds clips;
    ``bandwidth_db`` is the log-mel kernel's scale (see :class:`LogMelEmbedding`).
    ``processors`` maps ``"a"``, ``"b"``, ``"base"`` to processors for policies given as model objects.
    ``keep_audio``: keep the clips of that many prompts per policy under ``results["_samples"]`` (not written to
    JSON).

    Returns the dictionary written to ``results.json`` (see :func:`write_results`).
    """
    processors = processors or {}
    if num_samples_per_prompt < 1:
        raise ValueError(f"num_samples_per_prompt must be >= 1, got {num_samples_per_prompt}.")
    prompt_list = load_prompts(prompts)
    if isinstance(rewards, dict):
        reward_funcs = dict(rewards)
    else:
        reward_funcs = {}
        for spec in rewards:
            name, reward = load_reward(spec, device)
            if name in reward_funcs:
                raise ValueError(f"reward {name!r} is given twice; evaluate each reward once.")
            reward_funcs[name] = reward
    if not reward_funcs:
        raise ValueError("give at least one reward (e.g. --reward loudness).")
    for name, reward in reward_funcs.items():
        if not callable(reward):
            raise ValueError(f"reward {name!r} is not callable.")
    if embedding == "log_mel":
        embedder = LogMelEmbedding(bandwidth_db=bandwidth_db)
    elif embedding in reward_funcs:
        embedder = RewardModelEmbedding(reward_funcs[embedding], embedding)
    else:
        raise ValueError(
            f"embedding {embedding!r}: use 'log_mel' or the name of a loaded model reward ({list(reward_funcs)})."
        )

    model_a, processor_a = load_policy(policy_a, processors.get("a"), device)
    model_b, processor_b = load_policy(policy_b, processors.get("b"), device)
    if base_model is None or base_model is policy_b or (isinstance(base_model, str) and base_model == policy_b):
        base, base_processor, base_name = model_b, processor_b, _describe(policy_b)
    else:
        base, base_processor = load_policy(base_model, processors.get("base"), device)
        base_name = _describe(base_model)
    check_compatible({"policy_a": model_a, "policy_b": model_b, "base_model": base})
    num_steps = resolve_num_steps(model_a, response_length, audio_duration_s)
    resolve_num_steps(model_b, num_steps)
    sampling = sampling or SamplingConfig(temperature=0.99)

    def reporter(label):
        return (lambda done: progress(label, done, len(prompt_list))) if progress else None

    common = dict(
        prompts=prompt_list,
        rewards=reward_funcs,
        num_samples_per_prompt=num_samples_per_prompt,
        num_steps=num_steps,
        sampling=sampling,
        seed=seed,
        base=base,
        base_processor=base_processor,
        embedding=embedder,
        batch_size=batch_size,
        keep_audio=keep_audio,
    )
    samples_a = sample_policy(model_a, processor_a, progress=reporter("policy_a"), **common)
    samples_b = sample_policy(model_b, processor_b, progress=reporter("policy_b"), **common)
    frame_rate = unwrap_musicgen(model_a).config.audio_encoder.frame_rate
    frames = num_steps - codebooks.max_delay(
        unwrap_musicgen(model_a).decoder.num_codebooks, unwrap_musicgen(model_a).decoder.config.audio_channels
    )
    results = {
        "policy_a": _describe(policy_a),
        "policy_b": _describe(policy_b),
        "base_model": base_name,
        "num_prompts": len(prompt_list),
        "num_samples_per_prompt": num_samples_per_prompt,
        "response_length": num_steps,
        "audio_duration_s": frames / frame_rate,
        "seed": seed,
        "sampling": {
            "guidance_scale": sampling.guidance_scale,
            "temperature": sampling.temperature,
            "top_k": sampling.top_k,
        },
    }
    results.update(compare_policies(samples_a, samples_b, tie_tolerance, num_resamples, seed, embedder))
    results["per_prompt"] = [
        {
            "prompt": prompt,
            **{
                name: {"a": float(samples_a.scores[name][i].mean()), "b": float(samples_b.scores[name][i].mean())}
                for name in reward_funcs
            },
        }
        for i, prompt in enumerate(prompt_list)
    ]
    if keep_audio:
        results["_samples"] = {"a": samples_a, "b": samples_b}
    return results


def _describe(policy: Any) -> str:
    if isinstance(policy, (str, os.PathLike)):
        return os.fspath(policy)
    musicgen = unwrap_musicgen(policy)
    return getattr(musicgen.config, "_name_or_path", "") or type(policy).__name__


# ------------------------------------------------------------------------------------------------------------- reports
def results_markdown(results: dict[str, Any]) -> str:
    """The Markdown table of ``results.md``: one row per reward, then drift and diversity."""

    def interval(ci):
        return f"[{ci[0]:.4g}, {ci[1]:.4g}]"

    lines = [
        f"# {results['policy_a']} (A) vs {results['policy_b']} (B)",
        "",
        f"{results['num_prompts']} prompts x {results['num_samples_per_prompt']} clips of "
        f"{results['audio_duration_s']:.2f} s per policy, seed {results['seed']}; KL to {results['base_model']}.",
        "",
        "| reward | mean A [95% CI] | mean B [95% CI] | A wins / ties / losses | win rate A | Wilcoxon p |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in results["rewards"].items():
        lines.append(
            f"| {name} | {r['mean_a']:.4g} {interval(r['ci95_a'])} | {r['mean_b']:.4g} {interval(r['ci95_b'])} | "
            f"{r['wins']} / {r['ties']} / {r['losses']} | {r['win_rate']:.2f} | {r['wilcoxon_p']:.3g} |"
        )
    lines += ["", "| drift and diversity | A | B |", "|---|---|---|"]
    kl = results["kl_to_base"]
    if kl:
        lines.append(
            f"| KL to base (nats per clip) | {kl['a']:.4g} {interval(kl['ci95_a'])} | "
            f"{kl['b']:.4g} {interval(kl['ci95_b'])} |"
        )
    div_a, div_b = results["diversity"]["a"], results["diversity"]["b"]
    lines.append(
        f"| mean pairwise distance ({div_a['embedding']}) | {div_a['mean_pairwise_distance']:.4g} | "
        f"{div_b['mean_pairwise_distance']:.4g} |"
    )
    lines.append(f"| Vendi score ({div_a['embedding']}) | {div_a['vendi_score']:.3f} | {div_b['vendi_score']:.3f} |")
    entropy_a = ", ".join(f"{v:.2f}" for v in div_a["entropy_per_codebook"])
    entropy_b = ", ".join(f"{v:.2f}" for v in div_b["entropy_per_codebook"])
    lines.append(f"| token entropy per codebook (nats) | {entropy_a} | {entropy_b} |")
    return "\n".join(lines) + "\n"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_results(results: dict[str, Any], output_dir: str) -> list[str]:
    """``rewards.png`` (mean reward of A and B with 95 % intervals, and per-prompt A against B) and, with a base,
    ``reward_vs_kl.png`` (each policy as a point: reward against KL to the base, the paper's trade-off)."""
    plt = _pyplot()
    names = list(results["rewards"])
    paths = []
    figure, axes = plt.subplots(2, len(names), figsize=(4 * len(names), 7), squeeze=False)
    for column, name in enumerate(names):
        r = results["rewards"][name]
        means = axes[0, column]
        for x, side, color in ((0, "a", "tab:orange"), (1, "b", "tab:blue")):
            mean, (low, high) = r[f"mean_{side}"], r[f"ci95_{side}"]
            # Points, not bars: the axis is zoomed to the intervals, where bar lengths would mislead.
            means.errorbar(x, mean, yerr=[[mean - low], [high - mean]], fmt="o", color=color, markersize=8, capsize=6)
        means.set(
            xlim=(-0.5, 1.5),
            xticks=[0, 1],
            xticklabels=["A", "B"],
            title=f"{name}: win rate A {r['win_rate']:.2f}, p={r['wilcoxon_p']:.2g}",
        )
        low = min(r["ci95_a"][0], r["ci95_b"][0])
        high = max(r["ci95_a"][1], r["ci95_b"][1])
        margin = 0.5 * (high - low) + 1e-6
        means.set_ylim(low - margin, high + margin)
        scatter = axes[1, column]
        a = [row[name]["a"] for row in results["per_prompt"]]
        b = [row[name]["b"] for row in results["per_prompt"]]
        scatter.scatter(b, a, s=14)
        limits = [min(a + b), max(a + b)]
        scatter.plot(limits, limits, color="gray", linewidth=1)
        scatter.set(xlabel=f"B ({name}, mean per prompt)", ylabel="A", title="per prompt (above the line: A wins)")
    figure.suptitle(f"A = {results['policy_a']}   B = {results['policy_b']}", fontsize=9)
    figure.tight_layout()
    paths.append(os.path.join(output_dir, "rewards.png"))
    figure.savefig(paths[-1], dpi=100)
    plt.close(figure)
    if results["kl_to_base"]:
        figure, axes = plt.subplots(1, len(names), figsize=(4 * len(names), 3.5), squeeze=False)
        kl = results["kl_to_base"]
        for column, name in enumerate(names):
            ax, r = axes[0, column], results["rewards"][name]
            for side, label, color in (("a", "A", "tab:orange"), ("b", "B", "tab:blue")):
                ax.errorbar(
                    kl[side],
                    r[f"mean_{side}"],
                    xerr=[[kl[side] - kl[f"ci95_{side}"][0]], [kl[f"ci95_{side}"][1] - kl[side]]],
                    yerr=[[r[f"mean_{side}"] - r[f"ci95_{side}"][0]], [r[f"ci95_{side}"][1] - r[f"mean_{side}"]]],
                    fmt="o",
                    color=color,
                    label=label,
                    capsize=4,
                )
            ax.set(xlabel="KL to base (nats per clip)", ylabel=name, title=f"{name} vs KL")
            ax.legend()
        figure.tight_layout()
        paths.append(os.path.join(output_dir, "reward_vs_kl.png"))
        figure.savefig(paths[-1], dpi=100)
        plt.close(figure)
    return paths


def write_results(results: dict[str, Any], output_dir: str) -> dict[str, str]:
    """Write ``results.json``, ``results.md`` and the plots of :func:`plot_results` to ``output_dir``; returns
    their paths by kind."""
    os.makedirs(output_dir, exist_ok=True)
    serialisable = {key: value for key, value in results.items() if not key.startswith("_")}
    paths = {"json": os.path.join(output_dir, "results.json"), "markdown": os.path.join(output_dir, "results.md")}
    with open(paths["json"], "w") as f:
        json.dump(serialisable, f, indent=2)
    with open(paths["markdown"], "w") as f:
        f.write(results_markdown(results))
    for path in plot_results(results, output_dir):
        paths[os.path.splitext(os.path.basename(path))[0]] = path
    return paths


# ---------------------------------------------------------------------------------------------------- training runs
def _load_log_history(run: str) -> list[dict[str, Any]]:
    """A run's log history from its directory (``log_history.json``, or a checkpoint's ``trainer_state.json``) or
    from one of those files."""
    candidates = (
        [run]
        if os.path.isfile(run)
        else [os.path.join(run, "log_history.json"), os.path.join(run, "trainer_state.json")]
    )
    for path in candidates:
        if os.path.isfile(path):
            with open(path) as f:
                data = json.load(f)
            history = data["log_history"] if isinstance(data, dict) else data
            if not isinstance(history, list):
                raise ValueError(f"{path} holds no list of log entries.")
            return history
    raise ValueError(
        f"run {run!r} has no log_history.json or trainer_state.json: pass the output_dir of a MusicPPOTrainer run "
        "(written at the end of training with plot_training_curves=True) or the JSON file itself."
    )


def plot_training_runs(
    runs: Sequence[str],
    output_path: str,
    labels: Sequence[str] | None = None,
    reward_keys: Sequence[str] | None = None,
    kl_key: str = "objective/kl",
) -> str:
    """The paper's training plots for several runs on one figure: each reward against the KL to the anchor (left
    column) and against the update step (right column), one line per run.

    ``reward_keys`` default: every ``rewards/<name>/mean`` the runs logged, after ``objective/scores`` (the weighted
    combination) when there are several (one row each).
    Evaluation entries (``eval/*``, logged every ``eval_steps``) are drawn as markers when present.
    """
    if not runs:
        raise ValueError("give at least one run directory.")
    histories = [_load_log_history(run) for run in runs]
    labels = list(labels) if labels else [os.path.basename(os.path.normpath(run)) for run in runs]
    if len(labels) != len(runs):
        raise ValueError(f"{len(labels)} labels for {len(runs)} runs.")
    if reward_keys is None:
        found = []
        for history in histories:
            for entry in history:
                for key in entry:
                    if key.startswith("rewards/") and key.endswith("/mean") and key not in found:
                        found.append(key)
        # One reward: objective/scores is that reward again. Several: the combination first, then each.
        reward_keys = found if len(found) == 1 else ["objective/scores", *found]
    reward_keys = [key for key in reward_keys if any(key in entry for history in histories for entry in history)]
    if not reward_keys:
        raise ValueError(f"none of the runs logged a reward ({', '.join(runs)}); nothing to plot.")
    plt = _pyplot()
    figure, axes = plt.subplots(len(reward_keys), 2, figsize=(11, 3.6 * len(reward_keys)), squeeze=False)
    for history, label, color in zip(histories, labels, plt.rcParams["axes.prop_cycle"].by_key()["color"] * 10):
        for row, key in enumerate(reward_keys):
            entries = [e for e in history if key in e and kl_key in e]
            steps = [e["step"] for e in history if key in e]
            values = [e[key] for e in history if key in e]
            axes[row, 0].plot(
                [e[kl_key] for e in entries],
                [e[key] for e in entries],
                marker="o",
                markersize=2,
                color=color,
                label=label,
            )
            axes[row, 1].plot(steps, values, color=color, label=label)
            eval_key = "eval/scores" if key == "objective/scores" else f"eval/{key}"  # MusicPPOTrainer.evaluate
            evals = [e for e in history if eval_key in e]
            if evals:
                axes[row, 1].plot(
                    [e["step"] for e in evals],
                    [e[eval_key] for e in evals],
                    "s--",
                    color=color,
                    markersize=4,
                    label=f"{label} (eval)",
                )
                with_kl = [e for e in evals if "eval/kl" in e]
                axes[row, 0].plot(
                    [e["eval/kl"] for e in with_kl],
                    [e[eval_key] for e in with_kl],
                    "s--",
                    color=color,
                    markersize=4,
                    label=f"{label} (eval)",
                )
    for row, key in enumerate(reward_keys):
        axes[row, 0].set(xlabel="KL to the anchor (nats per clip)", ylabel=key, title=f"{key} vs KL")
        axes[row, 1].set(xlabel="update", ylabel=key, title=f"{key} vs step")
        axes[row, 0].legend(fontsize=8)
        axes[row, 1].legend(fontsize=8)
    figure.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(output_path)), exist_ok=True)
    figure.savefig(output_path, dpi=100)
    plt.close(figure)
    return output_path
