"""Side-by-side statistics: wins / ties / losses per prompt, the win rate, Wilcoxon signed-rank tests, bootstrap
intervals. Pure NumPy/SciPy on score arrays: P prompts, M clips per prompt."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

__all__ = ["bootstrap_ci", "paired_comparison", "wilcoxon_signed_rank"]


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
