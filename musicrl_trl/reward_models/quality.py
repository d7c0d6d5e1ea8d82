"""Quality: a reference-free MOS estimator, scored on the first and last windows, rescaled to [0, 1].

MusicRL's quality reward was a MOS (1-5) regressor on 20 s clips; in RL it scored the first and the last 20 s of
each generation, averaged the two, and rescaled [1, 5] to [0, 1] before combining with text adherence. This reward
does the same with a :class:`MusicRewardModel` trained as a MOS regressor (``AudioRewardTrainer`` on a ratings
dataset with columns ``audio``, ``mos``).

Shapes: B batch, C channels, N samples, W windows.
"""

from __future__ import annotations

import os
from typing import Any, Literal

import torch
from transformers import AutoModelForAudioClassification

from ..audio import first_last_windows, resample, split_windows, to_mono
from ..loading import load_pretrained
from .base import AudioReward
from .modeling_music_reward import MusicRewardModel

__all__ = ["QualityReward"]


def _load_music_reward_model(
    model: MusicRewardModel | str | os.PathLike, owner: str, allow_pickle_weights: bool = False
) -> MusicRewardModel:
    if isinstance(model, (str, os.PathLike)):
        load = AutoModelForAudioClassification.from_pretrained
        model = load_pretrained(load, model, f"{owner} reward", allow_pickle_weights=allow_pickle_weights)
    if not isinstance(model, MusicRewardModel):
        raise ValueError(
            f"{owner}: expected a MusicRewardModel (or a path to one), got {type(model).__name__}. Train one with "
            "AudioRewardTrainer or start from `MusicRewardModel.from_backbone(...)`."
        )
    return model.eval().requires_grad_(False)


class QualityReward(AudioReward):
    """Predicted MOS of the first and last ``window_s`` seconds, averaged, mapped from ``mos_range`` to [0, 1].

    Args:
        model: a :class:`MusicRewardModel` regressing MOS, or a path / Hub id to load one.
        window_s: window length (MusicRL: 20 s). A clip shorter than a window is scored whole.
        windows: ``"first_last"`` (MusicRL: the first and last window; for clips shorter than two windows these
            overlap) or ``"all"`` (adjacent windows covering the clip, last one shifted to the end).
        mos_range: the model's rating scale; ``(mos - low) / (high - low)`` is returned.
        clamp: clip the rescaled score to [0, 1]. Off by default: a clipped reward is flat outside the range and
            gives RL no direction there.
        allow_pickle_weights: load a model saved only as ``pytorch_model.bin`` (a pickle, which can run code). Off
            by default: such a model raises :class:`~musicrl_trl.loading.ModelLoadingError`.

    >>> from musicrl_trl.testing import tiny_music_reward
    >>> reward = QualityReward(tiny_music_reward())
    >>> reward(audio=0.1 * torch.randn(2, 1, 32_000), sampling_rate=32_000).shape
    torch.Size([2])
    """

    def __init__(
        self,
        model: MusicRewardModel | str | os.PathLike,
        window_s: float = 20.0,
        windows: Literal["first_last", "all"] = "first_last",
        mos_range: tuple[float, float] = (1.0, 5.0),
        clamp: bool = False,
        device: torch.device | str | None = None,
        allow_pickle_weights: bool = False,
    ) -> None:
        super().__init__("quality")
        self.model = _load_music_reward_model(model, self.__name__, allow_pickle_weights)
        if device is not None:
            self.model.to(device)
        if windows not in ("first_last", "all"):
            raise ValueError(f"{self.__name__}: windows must be 'first_last' or 'all', got {windows!r}.")
        if window_s <= 0 or mos_range[1] <= mos_range[0]:
            raise ValueError(f"{self.__name__}: need window_s > 0 and mos_range[0] < mos_range[1].")
        self.window_s, self.windows, self.mos_range, self.clamp = window_s, windows, tuple(mos_range), clamp
        self.requires_prompts = bool(self.model.config.text_vocab_size)

    @property
    def sampling_rate(self) -> int:
        """The model's input rate: audio is resampled to it once, before windowing."""
        return self.model.config.sampling_rate

    def score(
        self, prompts: list[str] | None, audio: torch.Tensor, sampling_rate: int, codes: Any, **kwargs: Any
    ) -> torch.Tensor:
        audio = resample(to_mono(audio).float().to(self.model.device), sampling_rate, self.sampling_rate)
        if self.windows == "first_last":
            windows = first_last_windows(audio, self.sampling_rate, self.window_s)  # [B, W, 1, L]
        else:
            windows = split_windows(audio, self.sampling_rate, self.window_s)
        batch, num_windows = windows.shape[:2]
        text = {}
        if self.requires_prompts:
            repeated = [prompt for prompt in prompts for _ in range(num_windows)]
            text = self.model.tokenize_prompts(repeated, self.model.device)
        logits = self.model(input_values=windows.flatten(0, 2), sampling_rate=self.sampling_rate, **text).logits
        mos = logits.view(batch, num_windows).float().mean(dim=1)  # [B]
        low, high = self.mos_range
        scaled = (mos - low) / (high - low)
        return scaled.clamp(0.0, 1.0) if self.clamp else scaled
