"""Is the tuned policy better than the base, and at what cost? MusicRL's side-by-side statistics, drift and diversity.

MusicRL judged policies side by side: per prompt, which of two clips is better; win rate = wins / (wins + losses);
Wilcoxon signed-rank tests on the paired scores; and every reward shown against the KL to the starting model,
because over-optimisation (the user-preference reward over-optimised within 2k steps) is the known failure. This
package computes the same quantities for two policies under any reward callables:

- :func:`paired_comparison`: wins / ties / losses of A against B per prompt, the win rate and a Wilcoxon p-value;
- :func:`bootstrap_ci`: percentile bootstrap intervals of a mean (prompts are the resampled unit);
- :func:`kl_per_clip`: the exact KL(policy || base) in nats per clip, summed over every code of the clip and over the
  whole codebook, under the guidance and temperature the clips were drawn with, before any top-k cut (as the trainer
  computes it; after the cut it would be infinite);
- :class:`LogMelEmbedding` / :class:`RewardModelEmbedding`, :func:`diversity`, :func:`vendi_score`: the spread of the
  clips drawn for one prompt, as the mean pairwise distance of audio embeddings and a Vendi score (Friedman and
  Dieng, 2023: the exponential of the entropy of the similarity matrix's eigenvalues, an "effective number" of
  distinct clips between 1 and M);
- :func:`evaluate_policies`: all of the above for two policies (paths, Hub ids, full models or LoRA adapters) with
  fixed seeds, as ``examples/evaluate_musicrl.py`` runs it; :func:`write_results` writes ``results.json``,
  ``results.md`` and plots; :func:`plot_training_runs` draws reward against KL and against step for several runs.

The pieces live in rooms of their own (``statistics``, ``drift``, ``diversity``, ``loading``, ``compare``,
``reports``); everything is importable from here.

Shape letters as in :mod:`musicrl_trl.rollout`, plus P prompts, M clips per prompt, D embedding width.
"""

from .compare import PolicySamples, compare_policies, evaluate_policies, sample_policy
from .diversity import (
    LogMelEmbedding,
    RewardModelEmbedding,
    diversity,
    pairwise_distances,
    similarity_matrix,
    vendi_score,
)
from .drift import entropy_per_codebook, kl_per_clip
from .loading import REWARD_KINDS, check_compatible, clap_score, load_policy, load_prompts, load_reward
from .reports import plot_results, plot_training_runs, results_markdown, write_results
from .statistics import bootstrap_ci, paired_comparison, wilcoxon_signed_rank

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
    "plot_results",
    "plot_training_runs",
    "results_markdown",
    "sample_policy",
    "similarity_matrix",
    "vendi_score",
    "wilcoxon_signed_rank",
    "write_results",
]
