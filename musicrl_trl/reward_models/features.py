"""Deterministic audio features in torch, on the audio's device, for the reward models.

transformers' feature extractors are NumPy-only (CPU, not differentiable) and ``ClapFeatureExtractor`` is random
(``truncation="fusion"`` marks a random clip ``is_longer``; ``"rand_trunc"`` takes a random crop), which a reward must
not be. These functions reproduce the extractors' deterministic paths in torch:

- :func:`clap_features`: ``ClapFeatureExtractor``'s log-mel (power STFT, Hann window, centred with reflect padding,
  mel filters, 10 * log10) with "repeatpad" for short clips. Matches the extractor to ~1e-4 dB on inputs it treats
  deterministically (clips of at most ``max_length_s``); longer inputs are truncated to their first ``max_length_s``
  seconds instead of a random crop (the rewards cut long clips into windows before calling this).
- :func:`ast_features`: ``ASTFeatureExtractor``'s Kaldi fbank (:func:`musicrl_trl.dsp.kaldi_fbank`, bit-identical to
  the ``torchaudio.compliance.kaldi.fbank`` that the extractor calls when torchaudio is installed), zero-padded or
  truncated to ``max_length`` frames, normalised.

Shapes: B batch, N samples, M mel bins, F feature frames.
"""

from __future__ import annotations

import functools
from dataclasses import asdict, dataclass
from typing import Any

import torch

from ..dsp import kaldi_fbank, melscale_fbanks

__all__ = [
    "ClapFeatureSettings",
    "clap_features",
    "ast_features",
    "log_mel_spectrogram",
    "repeat_pad",
]


@dataclass(frozen=True)
class ClapFeatureSettings:
    """The settings of a ``ClapFeatureExtractor`` that its deterministic log-mel depends on.

    Defaults are those of ``laion/larger_clap_music`` (48 kHz, 64 mel bins between 50 Hz and 14 kHz, 10 ms hop,
    10 s input). ``fusion`` mirrors the extractor's ``truncation == "fusion"``: fusion checkpoints were trained on
    HTK mel filters without normalisation and take 4 stacked mel channels; the others on Slaney filters and 1 channel.
    """

    sampling_rate: int = 48_000
    num_mel_bins: int = 64
    n_fft: int = 1024
    hop_length: int = 480
    f_min: float = 50.0
    f_max: float = 14_000.0
    max_length_s: float = 10.0
    fusion: bool = False
    top_db: float | None = None

    @classmethod
    def from_feature_extractor(cls, feature_extractor: Any) -> ClapFeatureSettings:
        """The settings of a ``ClapFeatureExtractor`` (``ClapProcessor.from_pretrained(id).feature_extractor``)."""
        return cls(
            sampling_rate=int(feature_extractor.sampling_rate),
            num_mel_bins=int(feature_extractor.feature_size),
            n_fft=int(feature_extractor.fft_window_size),
            hop_length=int(feature_extractor.hop_length),
            f_min=float(feature_extractor.frequency_min),
            f_max=float(feature_extractor.frequency_max),
            max_length_s=float(feature_extractor.max_length_s),
            fusion=feature_extractor.truncation == "fusion",
            top_db=feature_extractor.top_db,
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def max_samples(self) -> int:
        return round(self.max_length_s * self.sampling_rate)


@functools.lru_cache(maxsize=16)
def _mel_filters(
    n_freqs: int,
    f_min: float,
    f_max: float,
    n_mels: int,
    sampling_rate: int,
    mel_scale: str,
    norm: str | None,
    device: torch.device,
) -> torch.Tensor:
    # Cached per device: the filter bank is rebuilt otherwise on every reward call.
    filters = melscale_fbanks(n_freqs, f_min, f_max, n_mels, sampling_rate, norm=norm, mel_scale=mel_scale)
    return filters.to(device)  # [n_freqs, M]


@functools.lru_cache(maxsize=16)
def _hann_window(n_fft: int, device: torch.device) -> torch.Tensor:
    return torch.hann_window(n_fft, periodic=True, device=device)


def log_mel_spectrogram(
    audio: torch.Tensor,
    sampling_rate: int,
    n_fft: int,
    hop_length: int,
    num_mel_bins: int,
    f_min: float = 0.0,
    f_max: float | None = None,
    mel_scale: str = "slaney",
    norm: str | None = "slaney",
    top_db: float | None = None,
) -> torch.Tensor:
    """Log-mel power spectrogram in dB of ``audio`` ``[B, N]`` -> ``[B, F, M]`` with ``F = 1 + N // hop_length``.

    Centred frames (reflect padding, as ``torch.stft(center=True)`` and transformers' ``spectrogram`` do), a periodic
    Hann window of ``n_fft`` samples, power 2, mel filters from :func:`musicrl_trl.dsp.melscale_fbanks`, then
    ``10 * log10(max(mel, 1e-10))`` and an optional ``top_db`` floor per clip. Computed in float32 (float64 stays).
    """
    if audio.dim() != 2:
        raise ValueError(f"log_mel_spectrogram expects audio of shape [B, N], got {tuple(audio.shape)}.")
    dtype = audio.dtype if audio.dtype == torch.float64 else torch.float32
    audio = audio.to(dtype)
    if audio.shape[-1] <= n_fft // 2:
        # Reflect padding needs more samples than half a window; very short clips are zero-padded to one window.
        audio = torch.nn.functional.pad(audio, (0, n_fft // 2 + 1 - audio.shape[-1]))
    window = _hann_window(n_fft, audio.device).to(dtype)
    spectrum = torch.stft(
        audio, n_fft, hop_length, window=window, center=True, pad_mode="reflect", return_complex=True
    )  # [B, n_fft // 2 + 1, F]
    power = spectrum.real.square() + spectrum.imag.square()
    filters = _mel_filters(
        n_fft // 2 + 1,
        float(f_min),
        float(f_max if f_max is not None else sampling_rate / 2),
        num_mel_bins,
        int(sampling_rate),
        mel_scale,
        norm,
        audio.device,
    ).to(dtype)
    mel = power.transpose(1, 2) @ filters  # [B, F, M]
    log_mel = 10.0 * torch.log10(mel.clamp_min(1e-10))
    if top_db is not None:
        log_mel = torch.maximum(log_mel, log_mel.amax(dim=(1, 2), keepdim=True) - top_db)
    return log_mel


def repeat_pad(audio: torch.Tensor, num_samples: int) -> torch.Tensor:
    """CLAP's "repeatpad" of ``audio`` ``[B, N]`` to ``[B, num_samples]``.

    A clip shorter than ``num_samples`` is tiled ``num_samples // N`` whole times, then zero-padded; a longer clip is
    cut to its first ``num_samples`` samples (CLAP's extractor would crop at random).
    """
    length = audio.shape[-1]
    if length >= num_samples:
        return audio[..., :num_samples]
    audio = audio.repeat(1, num_samples // length)
    return torch.nn.functional.pad(audio, (0, num_samples - audio.shape[-1]))


def clap_features(audio: torch.Tensor, settings: ClapFeatureSettings) -> torch.Tensor:
    """``ClapFeatureExtractor`` input features for ``audio`` ``[B, N]`` already at ``settings.sampling_rate``.

    Returns ``input_features`` ``[B, 1, F, M]``; F is 1001 for the default 10 s at 48 kHz with a 480-sample hop.
    A fusion model (``audio_config.enable_fusion``) takes 4 channels: ``expand(-1, 4, -1, -1)`` gives what the
    extractor feeds it for clips up to 10 s (the same mel four times); pass ``is_longer`` all False with it.
    """
    audio = repeat_pad(audio, settings.max_samples)
    mel = log_mel_spectrogram(
        audio,
        settings.sampling_rate,
        settings.n_fft,
        settings.hop_length,
        settings.num_mel_bins,
        settings.f_min,
        settings.f_max,
        mel_scale="htk" if settings.fusion else "slaney",
        norm=None if settings.fusion else "slaney",
        top_db=settings.top_db,
    )
    return mel.unsqueeze(1)


def ast_features(
    audio: torch.Tensor,
    sampling_rate: int = 16_000,
    num_mel_bins: int = 128,
    max_length: int = 1024,
    mean: float = -4.2677393,
    std: float = 4.5689974,
    do_normalize: bool = True,
) -> torch.Tensor:
    """``ASTFeatureExtractor`` input values for ``audio`` ``[B, N]`` at ``sampling_rate`` -> ``[B, max_length, M]``.

    Kaldi fbank (25 ms Hann frames every 10 ms, no dither: deterministic), zero-padded or truncated to ``max_length``
    frames, then ``(x - mean) / (2 * std)`` as the extractor does. Kaldi's fbank reads one channel at a time, so this
    loops over the batch.
    """
    if audio.dim() != 2:
        raise ValueError(f"ast_features expects audio of shape [B, N], got {tuple(audio.shape)}.")
    frames = []
    for clip in audio.float():
        if clip.shape[-1] < 400:
            # Kaldi needs one full 25 ms frame; shorter clips are padded with silence to one frame.
            clip = torch.nn.functional.pad(clip, (0, 400 - clip.shape[-1]))
        fbank = kaldi_fbank(
            clip, sample_frequency=sampling_rate, window_type="hanning", num_mel_bins=num_mel_bins, dither=0.0
        )  # [F, M]
        fbank = fbank[:max_length]
        fbank = torch.nn.functional.pad(fbank, (0, 0, 0, max_length - fbank.shape[0]))
        frames.append(fbank)
    features = torch.stack(frames)
    return (features - mean) / (2 * std) if do_normalize else features
