"""Combining several rewards into one, and the MusicRL recipes (R, U, RU) as data.

The combined reward is linear, as in MusicRL-R (text adherence + quality)::

    r = sum_i  w_i * normalise_i(r_i)

with ``normalise`` one of

- ``"none"``: the raw scores (MusicRL-R combined adherence and quality rescaled to comparable ranges);
- ``"batch"``: ``(r_i - mean_batch) / (std_batch + eps)``: every reward contributes with unit spread per batch,
  whatever its scale (a batch of one clip gives 0: use "running" or "none" for batch size 1);
- ``"running"``: ``(r_i - mean) / (std + eps)`` with a running mean/std per reward over all batches seen so far
  (updated with the batch first), which keeps the scale stable across batches without centring each batch.
  Under several processes each one keeps its own statistics unless the caller gathers scores first.

Recipes are YAML files (``examples/recipes/musicrl_{r,u,ru}.yaml``)::

    name: musicrl_r                      # free text, for model cards (as is `description`)
    model_name_or_path: facebook/musicgen-small   # policy initialisation
    ref_model: null                      # KL anchor; null = the initial policy (MusicRL-RU: the MusicRL-R checkpoint)
    reward_models:                       # list, in the order of reward_weights
      - class: TextAdherenceReward       # one of REWARD_CLASSES
        name: text_adherence             # optional, defaults to the reward's own name
        kwargs: {model: laion/larger_clap_music, window_s: 10.0}
    reward_weights: [1.0, 1.0]           # list (same order) or mapping name -> weight
    reward_normalization: none           # none | batch | running
    training: {...}                      # MusicPPOConfig fields (temperature, kl_estimator, audio_duration_s, ...)
    make_commands:                       # optional: model name -> the command that makes it (shown when missing)
      ast-music-mos: python examples/train_reward_model.py --mode regression ... --output_dir ast-music-mos
    paper: {steps: 20000, ...}           # informational: what MusicRL reported

:func:`load_recipe` reads and checks one; :func:`check_recipe_models` checks, before anything is loaded, that every
model it names can be loaded (one error listing every missing one, with its ``make_commands`` entry);
:func:`rewards_from_recipe` builds its :class:`RewardCombination`.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
import yaml

from ..loading import ModelLoadingError, resolve_pretrained
from .base import AudioReward
from .preference import PreferenceReward
from .quality import QualityReward
from .signal import BrightnessReward, LoudnessReward, SilencePenalty
from .text_adherence import TextAdherenceReward

__all__ = [
    "REWARD_CLASSES",
    "RewardCombination",
    "RunningMoments",
    "check_recipe_models",
    "combine_rewards",
    "load_recipe",
    "rewards_from_recipe",
]

Normalization = Literal["none", "batch", "running"]

#: The reward classes a recipe may name.
REWARD_CLASSES: dict[str, type[AudioReward]] = {
    "TextAdherenceReward": TextAdherenceReward,
    "QualityReward": QualityReward,
    "PreferenceReward": PreferenceReward,
    "LoudnessReward": LoudnessReward,
    "BrightnessReward": BrightnessReward,
    "SilencePenalty": SilencePenalty,
}


@dataclass
class RunningMoments:
    """Running mean and variance of a stream of scores (Chan et al.'s parallel update, in float64)."""

    count: int = 0
    mean: float = 0.0
    m2: float = 0.0

    def update(self, values: torch.Tensor) -> None:
        values = values.detach().double().flatten()
        n = values.numel()
        if n == 0:
            return
        batch_mean = values.mean().item()
        batch_m2 = ((values - batch_mean) ** 2).sum().item()
        total = self.count + n
        delta = batch_mean - self.mean
        self.mean += delta * n / total
        self.m2 += batch_m2 + delta**2 * self.count * n / total
        self.count = total

    @property
    def std(self) -> float:
        return math.sqrt(self.m2 / self.count) if self.count > 0 else 0.0


def _weights_by_name(names: Sequence[str], weights: Mapping[str, float] | Sequence[float] | None) -> dict[str, float]:
    if weights is None:
        return dict.fromkeys(names, 1.0)
    if isinstance(weights, Mapping):
        if set(weights) != set(names):
            raise ValueError(
                f"reward weights are given for {sorted(weights)} but the rewards are {sorted(names)}; give one weight "
                "per reward."
            )
        return {name: float(weights[name]) for name in names}
    weights = list(weights)
    if len(weights) != len(names):
        raise ValueError(
            f"got {len(weights)} reward weights for {len(names)} rewards {list(names)}; give one per reward."
        )
    return {name: float(weight) for name, weight in zip(names, weights)}


def combine_rewards(
    scores: Mapping[str, torch.Tensor],
    weights: Mapping[str, float] | Sequence[float] | None = None,
    normalize: Normalization = "none",
    running_stats: dict[str, RunningMoments] | None = None,
    eps: float = 1e-6,
) -> torch.Tensor:
    """Weighted sum ``[B]`` of per-reward scores ``{name: Tensor[B]}`` after optional normalisation (module doc).

    ``weights``: a mapping by name, a sequence in the order of ``scores``, or ``None`` (all 1). ``running_stats`` is
    the per-name state for ``normalize="running"`` (missing names are added and every one is updated in place).

    >>> scores = {"adherence": torch.tensor([0.2, 0.4]), "quality": torch.tensor([0.5, 0.7])}
    >>> combine_rewards(scores, {"adherence": 1.0, "quality": 0.5})
    tensor([0.4500, 0.7500])
    """
    if not scores:
        raise ValueError("combine_rewards needs at least one reward's scores.")
    if normalize not in ("none", "batch", "running"):
        raise ValueError(f"normalize must be 'none', 'batch' or 'running', got {normalize!r}.")
    if normalize == "running" and running_stats is None:
        raise ValueError("normalize='running' needs a `running_stats` dict that persists across calls.")
    names = list(scores)
    weight_of = _weights_by_name(names, weights)
    shapes = {name: tuple(torch.as_tensor(value).shape) for name, value in scores.items()}
    if len(set(shapes.values())) != 1 or len(next(iter(shapes.values()))) != 1:
        raise ValueError(f"every reward must give one score per clip (shape [B]); got shapes {shapes}.")
    total = None
    for name in names:
        values = torch.as_tensor(scores[name]).float()
        if normalize == "batch":
            values = (values - values.mean()) / (values.std(unbiased=False) + eps)
        elif normalize == "running":
            stats = running_stats.setdefault(name, RunningMoments())
            stats.update(values)
            values = (values - stats.mean) / (stats.std + eps)
        term = weight_of[name] * values
        total = term if total is None else total + term.to(total.device)
    return total


class RewardCombination(AudioReward):
    """A list of rewards with weights and normalisation, itself a reward callable (``__name__ = "combined"``).

    Each call runs every reward on the same inputs, keeps their raw scores in :attr:`last_scores` (for logging
    ``objective/rewards/{name}``) and returns :func:`combine_rewards` of them. Names come from the rewards'
    ``__name__`` (made unique with a suffix) or from the keys of a mapping.

    >>> combination = RewardCombination([LoudnessReward(), SilencePenalty()], weights=[1.0, 0.5])
    >>> combination(audio=0.1 * torch.ones(1, 1, 16_000), sampling_rate=16_000)  # 1 * 2/3 + 0.5 * (-0.00005)
    tensor([0.6666])
    >>> sorted(combination.last_scores)
    ['loudness', 'silence_penalty']
    """

    def __init__(
        self,
        rewards: Sequence[Callable[..., Any]] | Mapping[str, Callable[..., Any]],
        weights: Mapping[str, float] | Sequence[float] | None = None,
        normalize: Normalization = "none",
    ) -> None:
        super().__init__("combined")
        if isinstance(rewards, Mapping):
            named = dict(rewards)
        else:
            named = {}
            for reward in rewards:
                base = getattr(reward, "__name__", type(reward).__name__)
                name, suffix = base, 1
                while name in named:
                    name, suffix = f"{base}_{suffix}", suffix + 1
                named[name] = reward
        if not named:
            raise ValueError("RewardCombination needs at least one reward.")
        if normalize not in ("none", "batch", "running"):
            raise ValueError(f"normalize must be 'none', 'batch' or 'running', got {normalize!r}.")
        self.rewards = named
        self.weights = _weights_by_name(list(named), weights)
        self.normalize = normalize
        self.running_stats: dict[str, RunningMoments] = {}
        self.last_scores: dict[str, torch.Tensor] = {}

    def score(
        self,
        prompts: list[str] | None,
        audio: torch.Tensor,
        sampling_rate: int,
        codes: torch.Tensor | None,
        **kwargs: Any,
    ) -> torch.Tensor:
        scores = {}
        for name, reward in self.rewards.items():
            values = reward(prompts=prompts, audio=audio, sampling_rate=sampling_rate, codes=codes, **kwargs)
            scores[name] = torch.as_tensor(values, dtype=torch.float32, device=audio.device)
        self.last_scores = scores
        return combine_rewards(scores, self.weights, self.normalize, self.running_stats)


_RECIPE_KEYS = {
    "name",
    "description",
    "model_name_or_path",
    "ref_model",
    "reward_models",
    "reward_weights",
    "reward_normalization",
    "training",
    "make_commands",
    "paper",
}

#: Reward keyword arguments that name something to load with ``from_pretrained``.
MODEL_KWARGS = ("model", "processor", "tokenizer")


def load_recipe(path: str | os.PathLike) -> dict[str, Any]:
    """Read and check a recipe YAML (schema in the module docstring); returns it as a dict with defaults filled."""
    with open(path, encoding="utf-8") as handle:
        recipe = yaml.safe_load(handle)
    where = os.fspath(path)
    if not isinstance(recipe, dict):
        raise ValueError(f"recipe {where!r}: expected a mapping at the top level.")
    unknown = set(recipe) - _RECIPE_KEYS
    if unknown:
        raise ValueError(f"recipe {where!r}: unknown keys {sorted(unknown)}; allowed: {sorted(_RECIPE_KEYS)}.")
    entries = recipe.get("reward_models")
    if not isinstance(entries, list) or not entries:
        raise ValueError(f"recipe {where!r}: reward_models must be a non-empty list of {{class, kwargs}} entries.")
    for entry in entries:
        if not isinstance(entry, dict) or entry.get("class") not in REWARD_CLASSES:
            raise ValueError(
                f"recipe {where!r}: every reward_models entry needs `class:` one of {sorted(REWARD_CLASSES)}, "
                f"got {entry!r}."
            )
    recipe.setdefault("reward_weights", None)
    recipe.setdefault("reward_normalization", "none")
    recipe.setdefault("ref_model", None)
    recipe.setdefault("training", {})
    recipe.setdefault("paper", {})
    recipe.setdefault("make_commands", {})
    if not isinstance(recipe["make_commands"], dict):
        raise ValueError(f"recipe {where!r}: make_commands must be a mapping model name -> command.")
    if recipe["reward_weights"] is not None and not isinstance(recipe["reward_weights"], (list, dict)):
        raise ValueError(f"recipe {where!r}: reward_weights must be a list or a mapping name -> weight.")
    return recipe


def rewards_from_recipe(
    recipe: Mapping[str, Any] | str | os.PathLike, **overrides: dict[str, Any]
) -> RewardCombination:
    """Instantiate a recipe's rewards (loading their models) as one :class:`RewardCombination`.

    ``overrides`` maps a reward name to keyword arguments that replace the recipe's (e.g. a local model path or a
    ``device``): ``rewards_from_recipe("musicrl_r.yaml", quality={"model": "./my-mos-model"})``.
    """
    if not isinstance(recipe, Mapping):
        recipe = load_recipe(recipe)
    rewards: dict[str, AudioReward] = {}
    for entry in recipe["reward_models"]:
        reward_class = REWARD_CLASSES[entry["class"]]
        kwargs = dict(entry.get("kwargs") or {})
        name = entry.get("name")
        kwargs.update(overrides.get(name, {}) if name else {})
        reward = reward_class(**kwargs)
        if name:
            reward.__name__ = name
        if reward.__name__ in rewards:
            raise ValueError(f"recipe: two rewards are named {reward.__name__!r}; give them distinct `name:` entries.")
        rewards[reward.__name__] = reward
    return RewardCombination(rewards, recipe.get("reward_weights"), recipe.get("reward_normalization", "none"))


def _reward_kwargs(recipe: Mapping[str, Any], overrides: Mapping[str, dict[str, Any]]) -> list[tuple[str, dict]]:
    """(name, kwargs with ``overrides`` applied) for every reward entry of ``recipe``."""
    named = []
    for entry in recipe["reward_models"]:
        name = entry.get("name") or entry["class"]
        kwargs = dict(entry.get("kwargs") or {})
        kwargs.update(overrides.get(entry.get("name"), {}) if entry.get("name") else {})
        named.append((name, kwargs))
    return named


def _is_audio_space_reward_model(source: str) -> bool:
    """Whether a resolved local folder holds a MusicRewardModel (which needs no text tokenizer)."""
    config = os.path.join(source, "config.json")
    if not os.path.isfile(config):
        return False
    with open(config, encoding="utf-8") as handle:
        return json.load(handle).get("model_type") == "music_reward"


def check_recipe_models(
    recipe: Mapping[str, Any] | str | os.PathLike,
    models: Mapping[str, str | None] | None = None,
    **overrides: dict[str, Any],
) -> None:
    """Check that every model the run needs can be loaded now, before any is: one error lists every problem.

    Args:
        recipe: a recipe (or its path).
        models: other models of the run by role, e.g. ``{"policy": "facebook/musicgen-small", "KL anchor": None}``
            (``None`` entries are skipped).
        overrides: per reward name, keyword arguments that replace the recipe's (as in :func:`rewards_from_recipe`).

    Each problem comes from :func:`musicrl_trl.loading.resolve_pretrained` (missing local path, corrupt weights,
    offline and not cached, unreachable Hub, unknown id) followed by the recipe's ``make_commands`` entry for that
    model, if any. Raises :class:`~musicrl_trl.loading.ModelLoadingError`.
    """
    if not isinstance(recipe, Mapping):
        recipe = load_recipe(recipe)
    make_commands = recipe.get("make_commands") or {}

    def hint(source: str, original: str | None) -> str | None:
        if make_commands.get(source):
            return f"The recipe makes it with: `{make_commands[source]}`."
        if make_commands.get(original):
            return f"The recipe makes its own model for this ({original!r}) with: `{make_commands[original]}`."
        return None

    # (role, source, the recipe's own source for that role: its make_commands entry still applies when overridden)
    to_check = [(role, source, source) for role, source in (models or {}).items() if source is not None]
    recipe_kwargs = dict(_reward_kwargs(recipe, {}))
    for name, kwargs in _reward_kwargs(recipe, overrides):
        for key in MODEL_KWARGS:
            source = kwargs.get(key)
            if isinstance(source, (str, os.PathLike)):
                original = recipe_kwargs[name].get(key)
                to_check.append((f"{name} reward ({key})", os.fspath(source), original))
    problems, resolved = [], {}
    for role, source, original in to_check:
        if role.endswith("(tokenizer)"):
            model = resolved.get(role.replace("(tokenizer)", "(model)"))
            if model is not None and _is_audio_space_reward_model(model):
                continue  # an audio-space preference model reads no tokens: PreferenceReward ignores the tokenizer
        try:
            resolved[role] = resolve_pretrained(source, role, hint(source, original))
        except ModelLoadingError as error:
            problems.append(str(error))
    if len(problems) == 1:
        raise ModelLoadingError(problems[0])  # one line: the model, the problem, the fix
    if problems:
        recipe_name = recipe.get("name", "the recipe")
        raise ModelLoadingError(
            f"{len(problems)} model(s) of {recipe_name} cannot be loaded (nothing was loaded yet):\n- "
            + "\n- ".join(problems)
        )
