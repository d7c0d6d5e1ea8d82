"""Cheap rewards computed from the signal itself: loudness, brightness, silence.

They need no model weights, run in milliseconds, and vary smoothly with the audio, which makes them the rewards of
the offline demo and of learning tests: an RL loop on the tiny MusicGen can visibly move them. They are not
measures of musical quality; use them as auxiliary terms or sanity checks next to the learned rewards.

Ranges: ``LoudnessReward`` and ``BrightnessReward`` in [0, 1]; ``SilencePenalty`` in [-1, 0].
Shapes: B batch, C channels, N samples, Fq frequency bins, F frames.
"""

from __future__ import annotations

import math
import re
from typing import Any, Literal

import torch

from ..audio import resample
from .base import AudioReward

__all__ = [
    "BRIGHT_WORDS",
    "DARK_WORDS",
    "BrightnessReward",
    "LoudnessReward",
    "SilencePenalty",
    "prompt_brightness_target",
]

_EPS = 1e-12


def _mean_square_db(audio: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
    # Power in dB relative to full scale (a full-scale square wave is 0 dB, a full-scale sine about -3 dB).
    return 10.0 * torch.log10(audio.float().square().mean(dim=dims) + _EPS)


class LoudnessReward(AudioReward):
    """Loudness (RMS level in dBFS over the whole clip, all channels) mapped to [0, 1].

    - ``target_db=None``: ``(level - floor_db) / (ceiling_db - floor_db)`` clipped to [0, 1]; louder is better, linear
      in dB between -60 dBFS (0) and 0 dBFS (1) by default.
    - ``target_db`` set: ``exp(-0.5 * ((level - target_db) / width_db) ** 2)``; 1 at the target loudness, smooth.

    Rate-independent, so audio at any rate is scored as is.

    >>> reward = LoudnessReward()
    >>> reward(audio=0.1 * torch.ones(2, 1, 16_000), sampling_rate=16_000)  # -20 dBFS
    tensor([0.6667, 0.6667])
    """

    def __init__(
        self, target_db: float | None = None, floor_db: float = -60.0, ceiling_db: float = 0.0, width_db: float = 6.0
    ) -> None:
        super().__init__("loudness")
        if ceiling_db <= floor_db or width_db <= 0:
            raise ValueError(f"{self.__name__}: need floor_db < ceiling_db and width_db > 0.")
        self.target_db, self.floor_db, self.ceiling_db, self.width_db = target_db, floor_db, ceiling_db, width_db

    def score(self, prompts: Any, audio: torch.Tensor, sampling_rate: int, codes: Any, **kwargs: Any) -> torch.Tensor:
        level = _mean_square_db(audio, dims=(1, 2))  # [B]
        if self.target_db is None:
            return ((level - self.floor_db) / (self.ceiling_db - self.floor_db)).clamp(0.0, 1.0)
        return torch.exp(-0.5 * ((level - self.target_db) / self.width_db).square())


#: Prompt words that ask for bright, high-register sound (matched as whole words or hyphen parts, lower case).
BRIGHT_WORDS = frozenset(
    "bright brighter brightness brilliant high higher shimmering shimmer shimmery sparkling sparkly glittering "
    "glistening airy crisp treble tinkling glassy chimes bells glockenspiel celesta piccolo whistling".split()
)
#: Prompt words that ask for dark, low-register sound.
DARK_WORDS = frozenset(
    "dark darker darkness bass bassy low lower deep deeper sub rumbling rumble booming boomy muddy murky muffled "
    "gloomy warm".split()
)


def prompt_brightness_target(prompt: str) -> int:
    """+1 if ``prompt`` asks for brightness, -1 for darkness, 0 for neither (or as many words of both).

    Words are matched whole (``"high-pitched"`` matches ``"high"`` through its hyphen parts); negation is not parsed.

    >>> prompt_brightness_target("shimmering high bells"), prompt_brightness_target("deep bass drone")
    (1, -1)
    """
    tokens = re.findall(r"[a-z0-9]+(?:-[a-z0-9]+)*", prompt.lower())
    words = [part for token in tokens for part in {token, *token.split("-")}]
    bright = sum(word in BRIGHT_WORDS for word in words)
    dark = sum(word in DARK_WORDS for word in words)
    return (bright > dark) - (dark > bright)


class BrightnessReward(AudioReward):
    """Spectral brightness in [0, 1]: the log-frequency position of the clip's spectral centroid.

    The power spectrum (2048-point STFT at 32 kHz, half-overlapping frames, averaged over frames and channels) gives
    a centroid ``c`` in Hz; the score is ``log(c / f_min) / log(f_max / f_min)`` clipped to [0, 1] (50 Hz -> 0,
    16 kHz -> 1). Silence has no centroid: a tiny prior at the geometric middle frequency (weight of a -90 dBFS
    signal) pulls near-silent clips to 0.5 smoothly instead of dividing by zero. Audio is resampled once to 32 kHz
    (MusicGen's rate: no-op there).

    With ``target_from_prompt=True`` the direction comes from the prompt (:data:`BRIGHT_WORDS`,
    :data:`DARK_WORDS`): bright prompts score ``b``, dark prompts ``1 - b``, and prompts with neither follow
    ``neutral``: ``"none"`` (constant 0.5: no preference, no learning signal), ``"bright"`` or ``"dark"``.
    The score is smooth in the audio, so policy-gradient RL can climb it (the offline PPO demo's reward).

    >>> reward = BrightnessReward(target_from_prompt=True)
    >>> t = torch.arange(32_000) / 32_000
    >>> audio = torch.stack([torch.sin(2 * math.pi * 200 * t), torch.sin(2 * math.pi * 4000 * t)])[:, None]
    >>> reward(prompts=["bright shimmering bells", "bright shimmering bells"], audio=audio, sampling_rate=32_000)
    tensor([0.2402, 0.7597])
    """

    sampling_rate = 32_000

    def __init__(
        self,
        target_from_prompt: bool = False,
        neutral: Literal["none", "bright", "dark"] = "none",
        f_min: float = 50.0,
        f_max: float = 16_000.0,
        n_fft: int = 2048,
    ) -> None:
        super().__init__("brightness")
        if neutral not in ("none", "bright", "dark"):
            raise ValueError(f"{self.__name__}: neutral must be 'none', 'bright' or 'dark', got {neutral!r}.")
        if not 0 < f_min < f_max <= self.sampling_rate / 2:
            raise ValueError(f"{self.__name__}: need 0 < f_min < f_max <= {self.sampling_rate // 2} Hz.")
        self.target_from_prompt, self.neutral = target_from_prompt, neutral
        self.f_min, self.f_max, self.n_fft = f_min, f_max, n_fft
        self.requires_prompts = target_from_prompt

    def brightness(self, audio: torch.Tensor, sampling_rate: int) -> torch.Tensor:
        """Brightness ``[B]`` in [0, 1] of ``audio`` ``[B, C, N]``, ignoring prompts."""
        audio = resample(audio.float(), sampling_rate, self.sampling_rate)
        batch, channels, num_samples = audio.shape
        n_fft = min(self.n_fft, 2 ** int(math.log2(max(num_samples, 16))))  # short clips: largest power of 2 that fits
        window = torch.hann_window(n_fft, device=audio.device)
        spectrum = torch.stft(
            audio.reshape(batch * channels, num_samples),
            n_fft,
            n_fft // 2,  # Welch-style half overlap: enough for an average spectrum, half the frames of 75 %
            window=window,
            center=True,
            pad_mode="constant",
            return_complex=True,
        )  # [B * C, Fq, F]
        power = torch.view_as_real(spectrum).square().sum(-1) / window.square().sum()
        power = power.view(batch, channels, *power.shape[1:]).mean(dim=(1, 3))  # [B, Fq]
        frequencies = torch.linspace(0, self.sampling_rate / 2, power.shape[-1], device=audio.device)
        prior_weight = n_fft / 2 * 10 ** (-90 / 10)  # one-sided power of a -90 dBFS signal
        prior_frequency = math.sqrt(self.f_min * self.f_max)
        centroid = (power @ frequencies + prior_weight * prior_frequency) / (power.sum(-1) + prior_weight)
        position = torch.log(centroid.clamp_min(_EPS) / self.f_min) / math.log(self.f_max / self.f_min)
        return position.clamp(0.0, 1.0)

    def score(
        self, prompts: list[str] | None, audio: torch.Tensor, sampling_rate: int, codes: Any, **kwargs: Any
    ) -> torch.Tensor:
        brightness = self.brightness(audio, sampling_rate)
        if not self.target_from_prompt:
            return brightness
        neutral_direction = {"none": 0, "bright": 1, "dark": -1}[self.neutral]
        directions = [prompt_brightness_target(prompt) or neutral_direction for prompt in prompts]
        direction = torch.tensor(directions, dtype=brightness.dtype, device=brightness.device)
        # +1 -> b, -1 -> 1 - b, 0 -> 0.5: one formula, 0.5 + d * (b - 0.5).
        return 0.5 + direction * (brightness - 0.5)


class SilencePenalty(AudioReward):
    """Minus the (soft) fraction of silent frames, in [-1, 0]: -1 for a silent clip, 0 when no frame is silent.

    Each ``frame_s`` frame (non-overlapping, channels averaged in power) with level ``l`` dBFS counts as
    ``sigmoid((threshold_db - l) / softness_db)`` silent: a soft threshold, so the penalty changes smoothly as a
    frame fades in. Clips shorter than one frame count as one frame. Rate-independent (frames are in seconds).

    >>> penalty = SilencePenalty()
    >>> audio = torch.cat([torch.zeros(1, 1, 8_000), 0.1 * torch.ones(1, 1, 8_000)], dim=-1)
    >>> penalty(audio=audio, sampling_rate=16_000)  # half silent
    tensor([-0.5000])
    """

    def __init__(self, threshold_db: float = -50.0, frame_s: float = 0.05, softness_db: float = 3.0) -> None:
        super().__init__("silence_penalty")
        if frame_s <= 0 or softness_db <= 0:
            raise ValueError(f"{self.__name__}: frame_s and softness_db must be positive.")
        self.threshold_db, self.frame_s, self.softness_db = threshold_db, frame_s, softness_db

    def score(self, prompts: Any, audio: torch.Tensor, sampling_rate: int, codes: Any, **kwargs: Any) -> torch.Tensor:
        frame = max(1, round(self.frame_s * sampling_rate))
        num_frames = max(1, audio.shape[-1] // frame)
        if audio.shape[-1] < frame:
            frames = audio.unsqueeze(2)  # [B, C, 1, N]
        else:
            frames = audio[..., : num_frames * frame].unflatten(-1, (num_frames, frame))  # [B, C, F, frame]
        level = _mean_square_db(frames, dims=(1, 3))  # [B, F]
        silent = torch.sigmoid((self.threshold_db - level) / self.softness_db)
        return -silent.mean(dim=-1)
