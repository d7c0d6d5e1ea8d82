"""Text adherence: CLAP cosine between the prompt and windows of the audio (MusicRL's MuLan score, open stand-in).

MusicRL scored a 30 s clip as the mean MuLan text-audio cosine over three 10 s windows. This reward does the same
with a CLAP model (default ``laion/larger_clap_music``): resample once to CLAP's rate (48 kHz), downmix, cut into
``window_s`` windows (:func:`musicrl_trl.audio.split_windows`: a clip shorter than a window is scored whole, a last
partial window is shifted to end at the clip's end), embed every window, average the cosines.

Audio features are CLAP's log-mel computed in torch on the model's device (see :mod:`.features`); windows shorter
than CLAP's 10 s input are repeat-padded as ``ClapFeatureExtractor`` does. No random crop and no random fusion flag:
the same input always gets the same score.

Shapes: B batch, C channels, N samples, W windows, L window samples, D embedding width.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from transformers import ClapModel, ClapProcessor

from ..audio import resample, split_windows, to_mono
from ..loading import load_pretrained
from .base import AudioReward
from .features import ClapFeatureSettings, clap_features

__all__ = ["TextAdherenceReward"]


class TextAdherenceReward(AudioReward):
    """Mean CLAP cosine similarity, in [-1, 1], between each prompt and the windows of its clip.

    Args:
        model: a ``ClapModel``, or a Hub id / local path to load one from (default ``"laion/larger_clap_music"``).
        processor: the model's ``ClapProcessor`` (tokenizer and feature settings); loaded from ``model`` when it is a
            path or id, required when ``model`` is an instance.
        window_s: window length in seconds (MusicRL: 10 s). At most CLAP's input length (10 s).
        hop_s: window hop (default ``window_s``: adjacent windows).
        max_windows_per_batch: windows embedded per CLAP forward, to bound memory on long batches.
        device: where to run CLAP (default: where its weights are). Scores return on the audio's device.
        allow_pickle_weights: load a CLAP saved only as ``pytorch_model.bin`` (a pickle, which can run code). Off by
            default: such a model raises :class:`~musicrl_trl.loading.ModelLoadingError`.

    >>> from musicrl_trl.testing import tiny_clap
    >>> model, processor = tiny_clap()
    >>> reward = TextAdherenceReward(model, processor)
    >>> reward(prompts=["calm piano"] * 2, audio=0.1 * torch.randn(2, 1, 20 * 32_000), sampling_rate=32_000).shape
    torch.Size([2])
    """

    requires_prompts = True

    def __init__(
        self,
        model: ClapModel | str | os.PathLike = "laion/larger_clap_music",
        processor: ClapProcessor | None = None,
        window_s: float = 10.0,
        hop_s: float | None = None,
        max_windows_per_batch: int = 32,
        device: torch.device | str | None = None,
        allow_pickle_weights: bool = False,
    ) -> None:
        super().__init__("text_adherence")
        if isinstance(model, (str, os.PathLike)):
            what = f"{self.__name__} reward (CLAP)"
            # A pickle-only CLAP is refused already when its processor is read (the same check, before any download).
            if processor is None:
                processor = load_pretrained(ClapProcessor.from_pretrained, model, what, None, allow_pickle_weights)
            model = load_pretrained(ClapModel.from_pretrained, model, what, None, allow_pickle_weights)
        elif processor is None:
            raise ValueError(
                f"{self.__name__}: pass the CLAP model's processor as well (`ClapProcessor.from_pretrained(...)`): "
                "its tokenizer embeds the prompts and its feature settings define the audio features."
            )
        if not isinstance(model, ClapModel):
            raise ValueError(
                f"{self.__name__}: model must be a transformers ClapModel or a path to one, "
                f"got {type(model).__name__}."
            )
        self.model = model.eval().requires_grad_(False)
        if device is not None:
            self.model.to(device)
        self.tokenizer = processor.tokenizer
        self.settings = ClapFeatureSettings.from_feature_extractor(processor.feature_extractor)
        if window_s <= 0 or window_s > self.settings.max_length_s + 1e-6:
            raise ValueError(
                f"{self.__name__}: window_s must be in (0, {self.settings.max_length_s}] s (CLAP's input length), "
                f"got {window_s}; longer windows would be truncated by the model."
            )
        self.window_s, self.hop_s = window_s, hop_s
        self.max_windows_per_batch = max_windows_per_batch

    @property
    def sampling_rate(self) -> int:
        """CLAP's native rate (48 kHz for LAION CLAP): audio is resampled to it once."""
        return self.settings.sampling_rate

    def text_embeddings(self, prompts: list[str]) -> torch.Tensor:
        """Normalised CLAP text embeddings ``[B, D]``."""
        device = self.model.device
        tokens = self.tokenizer(prompts, padding=True, truncation=True, return_tensors="pt").to(device)
        return self.model.get_text_features(
            input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"]
        ).pooler_output

    def audio_embeddings(self, windows: torch.Tensor) -> torch.Tensor:
        """Normalised CLAP audio embeddings ``[W', D]`` of mono windows ``[W', L]`` at CLAP's rate."""
        embeddings = []
        for chunk in windows.split(self.max_windows_per_batch):
            features = clap_features(chunk.to(self.model.device), self.settings).to(self.model.dtype)  # [W', 1, F, M]
            if self.model.config.audio_config.enable_fusion:
                # A fusion model reads 4 mel channels; for clips within its input length the extractor repeats the
                # mel 4 times with is_longer False, the deterministic path.
                features = features.expand(-1, 4, -1, -1)
            is_longer = torch.zeros(features.shape[0], 1, dtype=torch.bool, device=features.device)
            embeddings.append(
                self.model.get_audio_features(input_features=features, is_longer=is_longer).pooler_output
            )
        return torch.cat(embeddings)

    def score(
        self, prompts: list[str], audio: torch.Tensor, sampling_rate: int, codes: Any, **kwargs: Any
    ) -> torch.Tensor:
        audio = resample(to_mono(audio).float(), sampling_rate, self.sampling_rate)  # [B, 1, N']
        windows = split_windows(audio, self.sampling_rate, self.window_s, self.hop_s)  # [B, W, 1, L]
        batch, num_windows = windows.shape[:2]
        audio_embeddings = self.audio_embeddings(windows.flatten(0, 2)).view(batch, num_windows, -1)  # [B, W, D]
        text_embeddings = self.text_embeddings(prompts)  # [B, D]
        cosine = (audio_embeddings.float() * text_embeddings.float()[:, None, :]).sum(-1)  # [B, W]
        return cosine.mean(dim=1)
