"""A pass-through feature extractor for :class:`MusicRewardModel`, so that ``pipeline("audio-classification")`` works.

``MusicRewardModel`` computes its own features in torch on its device; the pipeline still needs a feature extractor
to learn the input sampling rate (it resamples to it) and to batch raw audio. This one only converts, checks the
rate and right-pads: ``input_values`` ``[B, N]`` float32 plus ``attention_mask`` ``[B, N]``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from transformers import BatchFeature, SequenceFeatureExtractor

__all__ = ["MusicRewardFeatureExtractor"]


class MusicRewardFeatureExtractor(SequenceFeatureExtractor):
    """Raw mono audio in, padded ``input_values`` ``[B, N]`` and ``attention_mask`` out; no spectral features.

    >>> extractor = MusicRewardFeatureExtractor(sampling_rate=16_000)
    >>> batch = extractor([np.zeros(3), np.zeros(5)], sampling_rate=16_000, return_tensors="pt")
    >>> batch["input_values"].shape, batch["attention_mask"].tolist()
    (torch.Size([2, 5]), [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    """

    model_input_names = ["input_values", "attention_mask"]

    def __init__(self, feature_size: int = 1, sampling_rate: int = 16_000, padding_value: float = 0.0, **kwargs: Any):
        kwargs.setdefault("return_attention_mask", True)
        super().__init__(feature_size=feature_size, sampling_rate=sampling_rate, padding_value=padding_value, **kwargs)

    def __call__(
        self,
        raw_audio: np.ndarray | torch.Tensor | list[float] | list[np.ndarray] | list[torch.Tensor],
        sampling_rate: int | None = None,
        padding: bool | str = True,
        return_tensors: str | None = None,
        **kwargs: Any,
    ) -> BatchFeature:
        """Batch mono audio at ``self.sampling_rate``: one clip ``[N]``, a ``[B, N]`` array or a list of ``[N]``."""
        if sampling_rate is not None and sampling_rate != self.sampling_rate:
            raise ValueError(
                f"MusicRewardFeatureExtractor expects {self.sampling_rate} Hz audio, received {sampling_rate} Hz. "
                f"Resample first (`musicrl_trl.audio.resample(audio, {sampling_rate}, {self.sampling_rate})`), or "
                "call the model directly with `sampling_rate=` and it resamples on its device."
            )
        if isinstance(raw_audio, torch.Tensor):
            raw_audio = raw_audio.detach().cpu().numpy()
        if isinstance(raw_audio, np.ndarray):
            if raw_audio.ndim > 2:
                raise ValueError(
                    f"MusicRewardFeatureExtractor takes mono audio [N] or [B, N], got shape {raw_audio.shape}."
                )
            clips = [raw_audio] if raw_audio.ndim == 1 else list(raw_audio)
        elif isinstance(raw_audio, (list, tuple)) and raw_audio and not np.isscalar(raw_audio[0]):
            clips = list(raw_audio)
        else:
            clips = [raw_audio]
        clips = [
            np.asarray(clip.cpu() if isinstance(clip, torch.Tensor) else clip, dtype=np.float32) for clip in clips
        ]
        if any(clip.ndim != 1 for clip in clips):
            raise ValueError("MusicRewardFeatureExtractor takes mono clips of shape [N]; downmix stereo first.")
        return self.pad(
            BatchFeature({"input_values": clips}),
            padding=padding,
            return_attention_mask=self.return_attention_mask,
            return_tensors=return_tensors,
        )
