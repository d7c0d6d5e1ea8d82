"""Waveform utilities: resampling, channels, peaks, windowing, file I/O and codec round trips.

Everything works on torch tensors on the tensor's own device (no NumPy detours), so that rewards computed on a GPU
during RL stay there. Shape letters used throughout:

- B: batch, C: audio channels, N: samples, W: windows per clip, L: samples per window
- K: codebooks, T: codec frames (codes per codebook)

Audio is ``[B, C, N]`` float in [-1, 1] with an explicit ``sampling_rate``; codes are ``[B, K, T]`` int64.

I/O goes through ``soundfile`` and resampling through :mod:`musicrl_trl.dsp` (pure torch): torchaudio stopped at 2.11,
which no longer ships its own loaders and fails to load beside newer torch.
"""

from __future__ import annotations

import functools
import os
from typing import Any, Literal

import soundfile as sf
import torch

from .dsp import Resample

__all__ = [
    "MIN_SAMPLING_RATE",
    "MAX_SAMPLING_RATE",
    "check_audio",
    "check_sampling_rate",
    "decode",
    "encode",
    "codec_sampling_rate",
    "first_last_windows",
    "frame_rate",
    "load_audio",
    "peak_normalize",
    "resample",
    "save_audio",
    "split_windows",
    "to_mono",
]

# Rates outside this range are almost always a bug upstream: 50 is MusicGen's codec *frame* rate, 10 or 30 a duration.
MIN_SAMPLING_RATE = 4_000
MAX_SAMPLING_RATE = 384_000


def check_sampling_rate(sampling_rate: Any, owner: str = "audio", audio_range: bool = True) -> int:
    """Return ``sampling_rate`` as an ``int`` or raise a ``ValueError`` that says what was passed and what to pass.

    ``owner`` names the caller (a reward, a model) in the message. With ``audio_range`` (default) the rate must also
    lie in [``MIN_SAMPLING_RATE``, ``MAX_SAMPLING_RATE``]; pure tensor helpers only need a positive integer.
    """
    if isinstance(sampling_rate, torch.Tensor) and sampling_rate.numel() == 1:
        sampling_rate = sampling_rate.item()
    if (
        isinstance(sampling_rate, bool)
        or not isinstance(sampling_rate, (int, float))
        or sampling_rate != int(sampling_rate)
    ):
        raise ValueError(
            f"{owner}: sampling_rate must be an integer number of samples per second, got {sampling_rate!r}. "
            "Pass the rate the audio was produced at, e.g. `model.config.sampling_rate` (32000 for MusicGen)."
        )
    sampling_rate = int(sampling_rate)
    if not audio_range and sampling_rate <= 0:
        raise ValueError(f"{owner}: sampling_rate must be positive, got {sampling_rate}.")
    if audio_range and not MIN_SAMPLING_RATE <= sampling_rate <= MAX_SAMPLING_RATE:
        raise ValueError(
            f"{owner}: received sampling_rate={sampling_rate} Hz, expected an audio rate between {MIN_SAMPLING_RATE} "
            f"and {MAX_SAMPLING_RATE} Hz. A value like 50 is a codec frame rate and 10 or 30 a duration: pass the "
            "audio sampling rate instead, e.g. `model.config.sampling_rate` (32000 for MusicGen)."
        )
    return sampling_rate


def check_audio(audio: Any, owner: str = "audio") -> torch.Tensor:
    """Validate a batch of waveforms ``[B, C, N]`` (finite floats, at least one sample) and return it.

    Raises ``ValueError`` naming ``owner`` and the fix for wrong ranks, empty clips, integer dtypes and NaN/inf.
    """
    if not isinstance(audio, torch.Tensor):
        raise ValueError(f"{owner}: audio must be a torch.Tensor of shape [B, C, N], got {type(audio).__name__}.")
    if audio.dim() != 3:
        hint = " Add the channel axis with `audio.unsqueeze(1)`." if audio.dim() == 2 else ""
        raise ValueError(
            f"{owner}: audio must have shape [B, C, N] (batch, channels, samples), got {tuple(audio.shape)}.{hint}"
        )
    if audio.shape[0] == 0 or audio.shape[1] == 0 or audio.shape[2] == 0:
        raise ValueError(
            f"{owner}: audio has an empty dimension, shape {tuple(audio.shape)}; every clip needs samples."
        )
    if not audio.is_floating_point():
        raise ValueError(
            f"{owner}: audio must be floating point in [-1, 1], got dtype {audio.dtype}. "
            "Convert PCM integers with `audio.float() / 32768` (16-bit)."
        )
    if not torch.isfinite(audio).all():
        bad = (~torch.isfinite(audio)).flatten(1).any(dim=1).nonzero().flatten().tolist()
        raise ValueError(
            f"{owner}: audio contains NaN or inf (batch rows {bad}). Drop those clips or sanitise them first, "
            "e.g. `torch.nan_to_num(audio, nan=0.0, posinf=1.0, neginf=-1.0)`."
        )
    return audio


@functools.lru_cache(maxsize=32)
def _resampler(orig_freq: int, new_freq: int, device: torch.device, dtype: torch.dtype) -> Resample:
    # The functional `dsp.resample` rebuilds its windowed-sinc kernel on every call; the module keeps it as a buffer,
    # so one cached module per (rates, device, dtype) makes repeated reward calls cheap.
    return Resample(orig_freq, new_freq, dtype=dtype).to(device)


def resample(audio: torch.Tensor, orig_sampling_rate: int, new_sampling_rate: int) -> torch.Tensor:
    """Resample ``audio`` ``[..., N]`` from ``orig_sampling_rate`` to ``new_sampling_rate`` on its own device.

    Windowed-sinc (Hann) interpolation with :class:`musicrl_trl.dsp.Resample` (torchaudio's algorithm in pure
    torch); a no-op (the same tensor) when the rates are equal. The output has ``ceil(N * new / orig)`` samples.
    Differentiable.

    >>> resample(torch.zeros(2, 1, 32_000), 32_000, 16_000).shape
    torch.Size([2, 1, 16000])
    """
    orig_sampling_rate = check_sampling_rate(orig_sampling_rate, "resample")
    new_sampling_rate = check_sampling_rate(new_sampling_rate, "resample")
    if orig_sampling_rate == new_sampling_rate:
        return audio
    dtype = audio.dtype if audio.is_floating_point() else torch.float32
    if dtype in (torch.float16, torch.bfloat16):
        # The sinc kernel sums many small taps: half precision loses the stop band, so resample in float32.
        return resample(audio.float(), orig_sampling_rate, new_sampling_rate).to(dtype)
    return _resampler(orig_sampling_rate, new_sampling_rate, audio.device, dtype)(audio.to(dtype))


def to_mono(audio: torch.Tensor) -> torch.Tensor:
    """Average the channels of ``audio`` ``[B, C, N]`` into ``[B, 1, N]`` (a no-op for mono)."""
    if audio.dim() != 3:
        raise ValueError(f"to_mono expects audio of shape [B, C, N], got {tuple(audio.shape)}.")
    return audio if audio.shape[1] == 1 else audio.mean(dim=1, keepdim=True)


def peak_normalize(audio: torch.Tensor, peak: float = 0.95, eps: float = 1e-8) -> torch.Tensor:
    """Scale every clip of ``audio`` ``[B, C, N]`` so that its largest absolute sample is ``peak``.

    All channels of a clip share one gain (the stereo image is kept). Silent clips (peak below ``eps``) are returned
    unchanged rather than amplified noise.
    """
    if audio.dim() != 3:
        raise ValueError(f"peak_normalize expects audio of shape [B, C, N], got {tuple(audio.shape)}.")
    current = audio.abs().amax(dim=(1, 2), keepdim=True)  # [B, 1, 1]
    gain = torch.where(current > eps, peak / current.clamp_min(eps), torch.ones_like(current))
    return audio * gain


def split_windows(
    audio: torch.Tensor,
    sampling_rate: int,
    window_s: float,
    hop_s: float | None = None,
    last: Literal["shift", "drop"] = "shift",
) -> torch.Tensor:
    """Cut ``audio`` ``[B, C, N]`` into windows ``[B, W, C, L]`` of ``L = round(window_s * sampling_rate)`` samples.

    Windows start every ``hop_s`` seconds (default: ``window_s``, no overlap). What happens at the end:

    - a clip **shorter than one window** gives a single window holding the whole clip (``L = N``): windowed rewards
      then score the whole clip rather than pad it with silence that would bias the score;
    - a **last partial window** (samples left over after the last full window) is, with ``last="shift"`` (default),
      scored as one more full window aligned to the end of the clip (it overlaps the previous window), so every
      sample counts and all windows have the same length; with ``last="drop"`` the leftover samples are ignored.

    Example: a 25 s clip with 10 s windows gives windows starting at 0 s, 10 s and (shifted) 15 s; a 30 s clip gives
    exactly the three windows MusicRL scored with MuLan. The result is a view-free copy on ``audio``'s device.

    >>> split_windows(torch.zeros(2, 1, 25 * 100), 100, window_s=10.0).shape
    torch.Size([2, 3, 1, 1000])
    """
    if audio.dim() != 3:
        raise ValueError(f"split_windows expects audio of shape [B, C, N], got {tuple(audio.shape)}.")
    if last not in ("shift", "drop"):
        raise ValueError(f"split_windows: last must be 'shift' or 'drop', got {last!r}.")
    sampling_rate = check_sampling_rate(sampling_rate, "split_windows", audio_range=False)
    if window_s <= 0 or (hop_s is not None and hop_s <= 0):
        raise ValueError(
            f"split_windows: window_s and hop_s must be positive, got window_s={window_s}, hop_s={hop_s}."
        )
    num_samples = audio.shape[-1]
    window = max(1, round(window_s * sampling_rate))
    hop = window if hop_s is None else max(1, round(hop_s * sampling_rate))
    if num_samples <= window:
        return audio.unsqueeze(1).clone()
    starts = list(range(0, num_samples - window + 1, hop))
    if last == "shift" and starts[-1] + window < num_samples:
        starts.append(num_samples - window)
    return torch.stack([audio[..., start : start + window] for start in starts], dim=1)


def first_last_windows(audio: torch.Tensor, sampling_rate: int, window_s: float) -> torch.Tensor:
    """The first and the last ``window_s`` seconds of ``audio`` ``[B, C, N]`` as ``[B, 2, C, L]``.

    This is how MusicRL scored quality on clips longer than its 20 s MOS model input. Clips no longer than one window
    give one window (``[B, 1, C, N]``); clips shorter than two windows give two overlapping windows.
    """
    if audio.dim() != 3:
        raise ValueError(f"first_last_windows expects audio of shape [B, C, N], got {tuple(audio.shape)}.")
    window = max(1, round(window_s * check_sampling_rate(sampling_rate, "first_last_windows", audio_range=False)))
    if audio.shape[-1] <= window:
        return audio.unsqueeze(1).clone()
    return torch.stack([audio[..., :window], audio[..., -window:]], dim=1)


def load_audio(
    path: str | os.PathLike, sampling_rate: int | None = None, mono: bool = False
) -> tuple[torch.Tensor, int]:
    """Read an audio file into ``([C, N] float32 tensor in [-1, 1], sampling_rate)`` through soundfile.

    ``sampling_rate`` resamples to that rate (the returned rate is then ``sampling_rate``); ``mono`` averages the
    channels. Raises ``FileNotFoundError`` for a missing file and ``ValueError`` naming the file for anything
    libsndfile cannot decode. Add the batch axis with ``audio[None]`` for ``[1, C, N]``.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"load_audio: no such audio file: {path!r}")
    try:
        data, file_rate = sf.read(path, dtype="float32", always_2d=True)  # [N, C]
    except (sf.SoundFileError, RuntimeError, TypeError) as error:
        raise ValueError(
            f"load_audio: could not decode {path!r} as audio ({error}). soundfile/libsndfile reads WAV, FLAC, "
            "OGG/Vorbis, Opus and (libsndfile >= 1.1) MP3; convert other formats first, "
            "e.g. `ffmpeg -i in.m4a out.wav`."
        ) from error
    if data.shape[0] == 0:
        raise ValueError(f"load_audio: {path!r} contains no samples.")
    audio = torch.from_numpy(data.T.copy())  # [C, N]
    if mono:
        audio = audio.mean(dim=0, keepdim=True)
    if sampling_rate is not None and sampling_rate != file_rate:
        audio = resample(audio, file_rate, sampling_rate)
        file_rate = sampling_rate
    return audio, int(file_rate)


def save_audio(path: str | os.PathLike, audio: torch.Tensor, sampling_rate: int, subtype: str | None = None) -> str:
    """Write ``audio`` ``[C, N]`` (or ``[1, C, N]``) to ``path``; the extension sets the format (``.wav``, ``.flac``).

    ``subtype`` is soundfile's (default: its format default, 16-bit PCM for WAV/FLAC), which clips samples outside
    [-1, 1]; use ``subtype="FLOAT"`` for a lossless float WAV. Returns the path written.
    """
    sampling_rate = check_sampling_rate(sampling_rate, "save_audio")
    if audio.dim() == 3:
        if audio.shape[0] != 1:
            raise ValueError(f"save_audio writes one clip: got a batch of {audio.shape[0]}; save `audio[i]` per clip.")
        audio = audio[0]
    if audio.dim() != 2:
        raise ValueError(f"save_audio expects audio of shape [C, N] or [1, C, N], got {tuple(audio.shape)}.")
    path = os.fspath(path)
    sf.write(path, audio.detach().to("cpu", torch.float32).T.numpy(), sampling_rate, subtype=subtype)
    return path


# --------------------------------------------------------------------------------------------------------------------
# Codecs. Two EnCodec implementations are in use: transformers' ``EncodecModel`` (MusicGen's ``audio_encoder``) and
# Meta's ``encodec`` package (optional extra ``musicrl-trl[encodec]``). Both quantise with a residual VQ whose codes
# are ``[B, K, T]``; they differ in call signatures and in how they report their rate and chunking. Only unchunked,
# unnormalised codecs are supported: with chunking or loudness normalisation the codes alone do not determine the
# audio (every chunk carries a scale), so `codes [B, K, T]` would be an incomplete description.
# --------------------------------------------------------------------------------------------------------------------


def _meta_encodec_class() -> type | None:
    try:
        from encodec import EncodecModel as MetaEncodecModel
    except ImportError:  # the optional extra is not installed: only transformers' codec can be passed
        return None
    return MetaEncodecModel


def _codec_kind(codec: Any) -> str:
    from transformers import EncodecModel

    if isinstance(codec, EncodecModel):
        return "transformers"
    meta_class = _meta_encodec_class()
    if meta_class is not None and isinstance(codec, meta_class):
        return "meta"
    raise TypeError(
        f"Unsupported codec {type(codec).__name__}: pass a transformers `EncodecModel` (e.g. MusicGen's "
        "`model.audio_encoder`) or an `encodec.EncodecModel` from Meta's package (`pip install musicrl-trl[encodec]`)."
    )


def codec_sampling_rate(codec: Any) -> int:
    """The audio rate a codec encodes and decodes (32000 for MusicGen's, 24000 or 48000 for Meta's)."""
    if _codec_kind(codec) == "transformers":
        return int(codec.config.sampling_rate)
    return int(codec.sample_rate)


def _check_unchunked(codec: Any, kind: str) -> None:
    if kind == "transformers":
        chunked, normalized = codec.config.chunk_length_s is not None, bool(codec.config.normalize)
        fix = "build it with `EncodecConfig(chunk_length_s=None, normalize=False, ...)`"
    else:
        chunked, normalized = codec.segment is not None, bool(codec.normalize)
        fix = "set `codec.segment = None` and `codec.normalize = False` (only sensible for the 24 kHz model)"
    if chunked or normalized:
        raise ValueError(
            f"encode/decode need a codec whose codes alone describe the audio, but this {type(codec).__name__} "
            f"{'chunks the audio' if chunked else 'normalises loudness'} and keeps a scale per chunk. Use the codec's "
            f"own encode/decode for it, or {fix}."
        )


@torch.no_grad()
def encode(codec: Any, audio: torch.Tensor, sampling_rate: int, bandwidth: float | None = None) -> torch.Tensor:
    """Encode ``audio`` ``[B, C, N]`` into codes ``[B, K, T]`` with ``codec``.

    ``codec`` is transformers' ``EncodecModel`` or Meta's ``encodec.EncodecModel``. ``sampling_rate`` must equal the
    codec's rate (a ``ValueError`` names both and how to resample); ``C`` must equal the codec's channel count.
    ``bandwidth`` picks one of the codec's target bandwidths (default: the smallest for transformers' codec, the
    currently set one for Meta's) and with it K.

    >>> from transformers import EncodecConfig, EncodecModel
    >>> codec = EncodecModel(EncodecConfig(target_bandwidths=[1.5], hidden_size=16, num_filters=4)).eval()
    >>> encode(codec, torch.zeros(2, 1, 24_000), 24_000).shape
    torch.Size([2, 2, 75])
    """
    kind = _codec_kind(codec)
    _check_unchunked(codec, kind)
    audio = check_audio(audio, f"encode({type(codec).__name__})")
    expected_rate = codec_sampling_rate(codec)
    sampling_rate = check_sampling_rate(sampling_rate, "encode")
    if sampling_rate != expected_rate:
        raise ValueError(
            f"encode: the codec expects {expected_rate} Hz audio, received {sampling_rate} Hz. Resample first: "
            f"`musicrl_trl.audio.resample(audio, {sampling_rate}, {expected_rate})`."
        )
    channels = codec.config.audio_channels if kind == "transformers" else codec.channels
    if audio.shape[1] != channels:
        raise ValueError(
            f"encode: the codec takes {channels}-channel audio, received {audio.shape[1]} channels. "
            + (
                "Downmix with `musicrl_trl.audio.to_mono(audio)`."
                if channels == 1
                else "Pass audio with that many channels."
            )
        )
    parameter = next(codec.parameters())
    audio = audio.to(device=parameter.device, dtype=parameter.dtype)
    if kind == "transformers":
        output = codec.encode(audio, bandwidth=bandwidth, return_dict=True)
        return output.audio_codes[0]  # [1, B, K, T] (one chunk) -> [B, K, T]
    previous_bandwidth = codec.bandwidth
    if bandwidth is not None:
        codec.set_target_bandwidth(bandwidth)
    try:
        frames = codec.encode(audio)  # one (codes [B, K, T], scale None) pair for an unchunked codec
    finally:
        codec.bandwidth = previous_bandwidth
    return frames[0][0]


@torch.no_grad()
def decode(codec: Any, codes: torch.Tensor) -> torch.Tensor:
    """Decode codes ``[B, K, T]`` into audio ``[B, C, N]`` at ``codec_sampling_rate(codec)``.

    Inverse of :func:`encode` for the same codec: ``N = T * hop`` samples (320 per frame at 24 kHz, 640 for MusicGen).
    """
    kind = _codec_kind(codec)
    _check_unchunked(codec, kind)
    if not isinstance(codes, torch.Tensor) or codes.dim() != 3:
        shape = tuple(codes.shape) if isinstance(codes, torch.Tensor) else type(codes).__name__
        raise ValueError(f"decode expects codes of shape [B, K, T], got {shape}.")
    if codes.is_floating_point():
        raise ValueError(f"decode expects integer codes, got dtype {codes.dtype}; use `codes.long()`.")
    codebook_size = codec.config.codebook_size if kind == "transformers" else codec.quantizer.bins
    if codes.numel() and (codes.min() < 0 or codes.max() >= codebook_size):
        raise ValueError(
            f"decode: codes must lie in [0, {codebook_size}), got range [{int(codes.min())}, {int(codes.max())}]. "
            "MusicGen's pad/start token (2048) marks delay-pattern positions: undo the delay pattern first."
        )
    codes = codes.to(next(codec.parameters()).device).long()
    if kind == "transformers":
        return codec.decode(codes[None], [None], return_dict=True).audio_values
    return codec.decode([(codes, None)])


def frame_rate(codec: Any) -> float:
    """Codec frames per second (50 for MusicGen's codec, 75 for Meta's 24 kHz model)."""
    kind = _codec_kind(codec)
    if kind == "transformers":
        return codec.config.frame_rate
    return codec.frame_rate
