"""Two policies side by side: sample N clips per prompt from each with fixed seeds, score them, and summarise
rewards, drift and diversity (what ``examples/evaluate_musicrl.py`` runs).

Shapes: P prompts, M clips per prompt, K codebooks, C channels, N samples.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .. import codebooks
from ..loading import ModelLoadingError, check_model_folder
from ..rollout import SamplingConfig, generate_rollout, resolve_num_steps, unwrap_musicgen
from .diversity import LogMelEmbedding, RewardModelEmbedding, diversity
from .drift import entropy_per_codebook, kl_per_clip
from .loading import check_compatible, load_policy, load_prompts, load_reward
from .statistics import bootstrap_ci, paired_comparison

__all__ = ["PolicySamples", "check_policy_source", "compare_policies", "evaluate_policies", "sample_policy"]


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
    allow_pickle_weights: bool = False,
) -> dict[str, Any]:
    """Side-by-side evaluation of policy A against policy B, with drift to ``base_model`` and diversity.

    Everything that can fail is loaded and checked before the first clip is sampled: prompts (non-empty), rewards
    (specs for :func:`~musicrl_trl.evaluation.loading.load_reward` or ``{name: callable}``), policies and base
    (paths, Hub ids, LoRA adapters or models; same codebooks and rates), the clip length. ``base_model`` defaults to
    policy B (the usual question: "is the tuned A better than its base B, and how far did it move?"). ``embedding``
    is ``"log_mel"`` or the name of a loaded model reward (``"adherence"``, ``"quality"``, ``"preference"``) whose
    audio encoder embeds clips;
    ``bandwidth_db`` is the log-mel kernel's scale (see :class:`LogMelEmbedding`).
    ``processors`` maps ``"a"``, ``"b"``, ``"base"`` to processors for policies given as model objects.
    ``keep_audio``: keep the clips of that many prompts per policy under ``results["_samples"]`` (not written to
    JSON). ``allow_pickle_weights``: load policies and reward models whose weights are only pickles
    (``pytorch_model.bin``, ``adapter_model.bin``), which are refused otherwise.

    Returns the dictionary written to ``results.json`` (see :func:`~musicrl_trl.evaluation.reports.write_results`).
    """
    processors = processors or {}
    if num_samples_per_prompt < 1:
        raise ValueError(f"num_samples_per_prompt must be >= 1, got {num_samples_per_prompt}.")
    for source, what in ((policy_a, "policy_a"), (policy_b, "policy_b"), (base_model, "base_model")):
        check_policy_source(source, what)
    prompt_list = load_prompts(prompts)
    if isinstance(rewards, dict):
        reward_funcs = dict(rewards)
    else:
        reward_funcs = {}
        for spec in rewards:
            name, reward = load_reward(spec, device, allow_pickle_weights)
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

    model_a, processor_a = load_policy(policy_a, processors.get("a"), device, allow_pickle_weights)
    model_b, processor_b = load_policy(policy_b, processors.get("b"), device, allow_pickle_weights)
    if base_model is None or base_model is policy_b or (isinstance(base_model, str) and base_model == policy_b):
        base, base_processor, base_name = model_b, processor_b, _describe(policy_b)
    else:
        base, base_processor = load_policy(base_model, processors.get("base"), device, allow_pickle_weights)
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


def check_policy_source(source: Any, what: str) -> None:
    """Raise ``ValueError`` (a :class:`~musicrl_trl.loading.ModelLoadingError` as its cause) naming ``what``, the
    problem and the fix when the policy path or Hub id ``source`` cannot be loaded: a missing path, a file, corrupt
    safetensors, a Hub id that is offline and not cached or unknown, a folder that holds no saved model (neither
    ``config.json`` nor a LoRA ``adapter_config.json``) or no processor
    (:func:`~musicrl_trl.loading.check_model_folder`). Fast: nothing is loaded. Models passed as objects and ``None``
    pass."""
    if not isinstance(source, (str, os.PathLike)):
        return
    hint = (
        f"Pass as {what} a MusicGen checkpoint: a folder or Hub id, a full model or a LoRA adapter saved by "
        "MusicPPOTrainer."
    )
    try:
        # The same check, by role, as the training script's and the app's (musicrl_trl.loading.check_model_folder);
        # an adapter is fine here: load_policy puts it on its base model.
        check_model_folder(source, "policy", what, hint, adapters=True)
    except ModelLoadingError as error:
        raise ValueError(str(error)) from error


def _describe(policy: Any) -> str:
    if isinstance(policy, (str, os.PathLike)):
        return os.fspath(policy)
    musicgen = unwrap_musicgen(policy)
    return getattr(musicgen.config, "_name_or_path", "") or type(policy).__name__
