"""Pure-torch audio DSP: windowed-sinc resampling, mel filter banks and Kaldi filter-bank features.

These reproduce torchaudio's algorithms operation for operation, so that results match torchaudio 2.11 bit for bit on
CPU (``tests/test_dsp.py`` checks it wherever torchaudio is installed). torchaudio stopped at 2.11, whose compiled
extension fails to load beside newer torch (and a torchaudio that fails to load breaks ``import transformers``), so the
library keeps the three functions it used and torchaudio is an optional extra:

- :func:`resample` and :class:`Resample`: ``torchaudio.functional.resample`` and ``torchaudio.transforms.Resample``
  (polyphase windowed sinc, Hann or Kaiser window), except that the output length is the exact
  ``ceil(N * new / orig)``, where torchaudio's float32 rounding sometimes drops the last sample of long outputs;
- :func:`melscale_fbanks`: ``torchaudio.functional.melscale_fbanks`` (HTK or Slaney mel scale, optional Slaney norm);
- :func:`kaldi_fbank`: ``torchaudio.compliance.kaldi.fbank`` (as ``ASTFeatureExtractor`` calls it), without VTLN
  warping, ``min_duration``, ``subtract_mean`` and the Blackman window.

Shapes: N samples, F feature frames, M mel bins, P phases (output samples per period of the reduced rates).
"""

from __future__ import annotations

import math

import torch

__all__ = ["Resample", "kaldi_fbank", "melscale_fbanks", "resample"]


# Resampling --------------------------------------------------------------------------------------------------------


def _reduced_rates(orig_freq: float, new_freq: float) -> tuple[int, int]:
    """Both rates divided by their gcd; they must be positive integers (floats like ``44100.0`` are accepted)."""
    if not (int(orig_freq) == orig_freq and int(new_freq) == new_freq) or orig_freq <= 0 or new_freq <= 0:
        raise ValueError(
            f"resample: rates must be positive integers, got orig_freq={orig_freq!r}, new_freq={new_freq!r}. "
            "For a fractional rate pass an integer pair with the same ratio, e.g. 8 and 1 for 44100 -> 5512.5 Hz."
        )
    gcd = math.gcd(int(orig_freq), int(new_freq))
    return int(orig_freq) // gcd, int(new_freq) // gcd


def _sinc_resample_kernel(
    orig_freq: int,
    new_freq: int,
    lowpass_filter_width: int,
    rolloff: float,
    resampling_method: str,
    beta: float | None,
    device: torch.device,
    dtype: torch.dtype | None,
) -> tuple[torch.Tensor, int]:
    """Polyphase kernel ``[P = new_freq, 1, 2 * width + orig_freq]`` and ``width`` for gcd-reduced rates.

    Output sample j is y[j] = base_freq / orig_freq * sum_i x[i] sinc(t) w(t) with t = base_freq * (i / orig_freq -
    j / new_freq) and base_freq = rolloff * min(orig_freq, new_freq): a low-pass sinc, windowed and cut after
    ``lowpass_filter_width`` zero crossings. Sample j + new_freq uses the same taps shifted by orig_freq input samples,
    hence one filter per phase and a convolution with stride orig_freq.
    ``dtype=None`` computes in float64 and returns float32, as torchaudio's transform does by default.
    """
    if resampling_method not in ("sinc_interp_hann", "sinc_interp_kaiser"):
        raise ValueError(
            "resample: resampling_method must be 'sinc_interp_hann' or 'sinc_interp_kaiser', "
            f"got {resampling_method!r}."
        )
    if lowpass_filter_width <= 0:
        raise ValueError(f"resample: lowpass_filter_width must be positive, got {lowpass_filter_width}.")
    # The cut-off sits just below the lower Nyquist: anti-aliasing when downsampling, and when upsampling it keeps the
    # zero padding at the edges from adding high-frequency artefacts.
    base_freq = min(orig_freq, new_freq) * rolloff
    width = math.ceil(lowpass_filter_width * orig_freq / base_freq)
    idx_dtype = dtype if dtype is not None else torch.float64
    idx = torch.arange(-width, width + orig_freq, dtype=idx_dtype, device=device)[None, None] / orig_freq
    # With dtype=None this arange is int64 and the division gives the default float dtype before adding idx: that is
    # torchaudio's arithmetic, kept so that the kernels are bit-identical.
    t = torch.arange(0, -new_freq, -1, dtype=dtype, device=device)[:, None, None] / new_freq + idx
    t = (t * base_freq).clamp(-lowpass_filter_width, lowpass_filter_width)
    if resampling_method == "sinc_interp_hann":
        window = torch.cos(t * math.pi / lowpass_filter_width / 2) ** 2
    else:
        # torchaudio rounds beta to a float32 scalar tensor; so does this.
        beta_tensor = torch.tensor(float(14.769656459379492 if beta is None else beta))
        window = torch.i0(beta_tensor * torch.sqrt(1 - (t / lowpass_filter_width) ** 2)) / torch.i0(beta_tensor)
    t = t * math.pi
    scale = base_freq / orig_freq
    kernels = torch.where(t == 0, torch.tensor(1.0).to(t), t.sin() / t)
    kernels = kernels * (window * scale)
    if dtype is None:
        kernels = kernels.to(torch.float32)
    return kernels, width


def _apply_sinc_resample_kernel(
    waveform: torch.Tensor, orig_freq: int, new_freq: int, kernel: torch.Tensor, width: int
) -> torch.Tensor:
    """Resample ``waveform`` ``[..., N]`` with a kernel from :func:`_sinc_resample_kernel` (gcd-reduced rates)."""
    if not waveform.is_floating_point():
        raise TypeError(f"resample: expected a floating point waveform, got dtype {waveform.dtype}.")
    shape = waveform.shape
    waveform = waveform.reshape(-1, shape[-1])  # [B, N]
    num_wavs, length = waveform.shape
    waveform = torch.nn.functional.pad(waveform, (width, width + orig_freq))
    resampled = torch.nn.functional.conv1d(waveform[:, None], kernel, stride=orig_freq)  # [B, P, N // orig + 1]
    resampled = resampled.transpose(1, 2).reshape(num_wavs, -1)  # interleave the phases
    # Exact integer ceil(N * new / orig). torchaudio rounds that quotient through a float32 tensor, which for outputs
    # beyond about a million samples can land on the integer below and drop the last sample; the values agree.
    target_length = -(-new_freq * length // orig_freq)
    return resampled[..., :target_length].reshape(shape[:-1] + (target_length,))


def resample(
    waveform: torch.Tensor,
    orig_freq: int,
    new_freq: int,
    lowpass_filter_width: int = 6,
    rolloff: float = 0.99,
    resampling_method: str = "sinc_interp_hann",
    beta: float | None = None,
) -> torch.Tensor:
    """Band-limited resampling of ``waveform`` ``[..., N]`` -> ``[..., ceil(N * new_freq / orig_freq)]``.

    ``torchaudio.functional.resample``: the kernel is built on every call in the waveform's dtype and device (use
    :class:`Resample` to build it once). ``rolloff`` is the cut-off as a fraction of the lower Nyquist frequency;
    ``beta`` shapes the Kaiser window. Returns ``waveform`` itself when the rates are equal. Differentiable.

    >>> resample(torch.zeros(2, 48_000), 48_000, 16_000).shape
    torch.Size([2, 16000])
    """
    orig, new = _reduced_rates(orig_freq, new_freq)
    if orig == new:
        return waveform
    if not waveform.is_floating_point():
        raise TypeError(f"resample: expected a floating point waveform, got dtype {waveform.dtype}.")
    kernel, width = _sinc_resample_kernel(
        orig, new, lowpass_filter_width, rolloff, resampling_method, beta, waveform.device, waveform.dtype
    )
    return _apply_sinc_resample_kernel(waveform, orig, new, kernel, width)


class Resample(torch.nn.Module):
    """:func:`resample` with the kernel computed once and kept as a buffer (``torchaudio.transforms.Resample``).

    ``dtype=None`` computes the kernel in float64 and stores it as float32; pass ``torch.float64`` to keep float64.
    Move it with ``.to(device)`` (or ``.to(dtype)``); the waveform must then have the kernel's dtype and device.

    >>> Resample(32_000, 48_000)(torch.zeros(1, 2, 32_000)).shape
    torch.Size([1, 2, 48000])
    """

    def __init__(
        self,
        orig_freq: int = 16_000,
        new_freq: int = 16_000,
        resampling_method: str = "sinc_interp_hann",
        lowpass_filter_width: int = 6,
        rolloff: float = 0.99,
        beta: float | None = None,
        *,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.orig_freq, self.new_freq = orig_freq, new_freq
        self._orig, self._new = _reduced_rates(orig_freq, new_freq)
        self.width = 0
        if self._orig != self._new:
            # Only a resampling transform holds a kernel, as in torchaudio (same state_dict keys).
            kernel, self.width = _sinc_resample_kernel(
                self._orig,
                self._new,
                lowpass_filter_width,
                rolloff,
                resampling_method,
                beta,
                torch.device("cpu"),
                dtype,
            )
            self.register_buffer("kernel", kernel)

    def forward(self, waveform: torch.Tensor) -> torch.Tensor:
        """``waveform`` ``[..., N]`` -> ``[..., ceil(N * new_freq / orig_freq)]``."""
        if self._orig == self._new:
            return waveform
        return _apply_sinc_resample_kernel(waveform, self._orig, self._new, self.kernel, self.width)


# Mel filter banks ----------------------------------------------------------------------------------------------------


def _hz_to_mel(freq: float, mel_scale: str) -> float:
    if mel_scale == "htk":
        return 2595.0 * math.log10(1.0 + (freq / 700.0))
    # Slaney: linear below 1 kHz (200/3 Hz per mel), logarithmic above.
    f_sp = 200.0 / 3
    if freq >= 1000.0:
        return 1000.0 / f_sp + math.log(freq / 1000.0) / (math.log(6.4) / 27.0)
    return freq / f_sp


def _mel_to_hz(mels: torch.Tensor, mel_scale: str) -> torch.Tensor:
    if mel_scale == "htk":
        return 700.0 * (10.0 ** (mels / 2595.0) - 1.0)
    f_sp = 200.0 / 3
    min_log_mel = 1000.0 / f_sp
    logstep = math.log(6.4) / 27.0
    freqs = f_sp * mels
    log_t = mels >= min_log_mel
    # Masked assignment rather than torch.where: exp over the selected elements only, as torchaudio evaluates it
    # (vectorised and scalar exp may differ in the last bit).
    freqs[log_t] = 1000.0 * torch.exp(logstep * (mels[log_t] - min_log_mel))
    return freqs


def melscale_fbanks(
    n_freqs: int,
    f_min: float,
    f_max: float,
    n_mels: int,
    sample_rate: int,
    norm: str | None = None,
    mel_scale: str = "htk",
) -> torch.Tensor:
    """Triangular mel filters ``[n_freqs, M = n_mels]`` over ``n_freqs`` STFT bins from 0 to ``sample_rate // 2`` Hz.

    ``torchaudio.functional.melscale_fbanks``: filter m rises linearly from mel point m to m + 1 and falls to m + 2,
    the ``n_mels + 2`` points spaced evenly in mel between ``f_min`` and ``f_max``. ``mel_scale`` is ``"htk"`` or
    ``"slaney"``; ``norm="slaney"`` divides each triangle by half its width in Hz (constant energy per filter).
    Apply as ``power_spectrum [..., n_freqs] @ filters``. float32 on CPU.
    """
    if norm not in (None, "slaney"):
        raise ValueError(f"melscale_fbanks: norm must be None or 'slaney', got {norm!r}.")
    if mel_scale not in ("htk", "slaney"):
        raise ValueError(f"melscale_fbanks: mel_scale must be 'htk' or 'slaney', got {mel_scale!r}.")
    all_freqs = torch.linspace(0, sample_rate // 2, n_freqs)
    m_pts = torch.linspace(_hz_to_mel(f_min, mel_scale), _hz_to_mel(f_max, mel_scale), n_mels + 2)
    f_pts = _mel_to_hz(m_pts, mel_scale)  # [M + 2]
    f_diff = f_pts[1:] - f_pts[:-1]  # [M + 1]
    slopes = f_pts.unsqueeze(0) - all_freqs.unsqueeze(1)  # [n_freqs, M + 2]
    down_slopes = (-1.0 * slopes[:, :-2]) / f_diff[:-1]  # [n_freqs, M]
    up_slopes = slopes[:, 2:] / f_diff[1:]
    filters = torch.max(torch.zeros(1), torch.min(down_slopes, up_slopes))
    if norm == "slaney":
        filters = filters * (2.0 / (f_pts[2 : n_mels + 2] - f_pts[:n_mels])).unsqueeze(0)
    return filters


# Kaldi filter banks --------------------------------------------------------------------------------------------------


def _kaldi_mel_banks(
    num_bins: int, padded_window_size: int, sample_freq: float, low_freq: float, high_freq: float
) -> torch.Tensor:
    """Kaldi's mel filters ``[M, padded_window_size // 2]`` (no VTLN), float32 on CPU like torchaudio's."""
    nyquist = 0.5 * sample_freq
    if high_freq <= 0.0:
        high_freq += nyquist
    if num_bins <= 3:
        raise ValueError(f"kaldi_fbank: num_mel_bins must be at least 4, got {num_bins}.")
    if not (0.0 <= low_freq < nyquist and 0.0 < high_freq <= nyquist and low_freq < high_freq):
        raise ValueError(
            f"kaldi_fbank: need 0 <= low_freq < high_freq <= Nyquist ({nyquist} Hz), got low_freq={low_freq}, "
            f"high_freq={high_freq} (a high_freq <= 0 counts back from Nyquist)."
        )

    # Kaldi's mel scale: 1127 ln(1 + f / 700).
    mel_low_freq = 1127.0 * math.log(1.0 + low_freq / 700.0)
    mel_high_freq = 1127.0 * math.log(1.0 + high_freq / 700.0)
    # num_bins + 1 steps: the outer triangles reach the band edges.
    mel_freq_delta = (mel_high_freq - mel_low_freq) / (num_bins + 1)
    bin_index = torch.arange(num_bins).unsqueeze(1)  # [M, 1]
    left_mel = mel_low_freq + bin_index * mel_freq_delta
    center_mel = mel_low_freq + (bin_index + 1.0) * mel_freq_delta
    right_mel = mel_low_freq + (bin_index + 2.0) * mel_freq_delta
    fft_freqs = sample_freq / padded_window_size * torch.arange(padded_window_size / 2)  # float32, as in torchaudio
    fft_mel = (1127.0 * (1.0 + fft_freqs / 700.0).log()).unsqueeze(0)  # [1, padded // 2]
    up_slope = (fft_mel - left_mel) / (center_mel - left_mel)
    down_slope = (right_mel - fft_mel) / (right_mel - center_mel)
    return torch.max(torch.zeros(1), torch.min(up_slope, down_slope))


def _kaldi_window(window_type: str, window_size: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    if window_type == "hanning":
        return torch.hann_window(window_size, periodic=False, device=device, dtype=dtype)
    if window_type == "povey":  # a Hann window raised to 0.85: it also goes to zero at the edges
        return torch.hann_window(window_size, periodic=False, device=device, dtype=dtype).pow(0.85)
    if window_type == "hamming":
        return torch.hamming_window(window_size, periodic=False, alpha=0.54, beta=0.46, device=device, dtype=dtype)
    if window_type == "rectangular":
        return torch.ones(window_size, device=device, dtype=dtype)
    raise ValueError(
        f"kaldi_fbank: window_type must be 'povey', 'hanning', 'hamming' or 'rectangular', got {window_type!r}."
    )


def _kaldi_frames(waveform: torch.Tensor, window_size: int, window_shift: int, snip_edges: bool) -> torch.Tensor:
    """Frames ``[F, window_size]`` of ``waveform`` ``[N]``, a strided view as in Kaldi."""
    num_samples = waveform.shape[0]
    if snip_edges:
        # Only frames that fit entirely.
        num_frames = 1 + (num_samples - window_size) // window_shift
    else:
        # One frame per shift, centred, the signal mirrored at both ends as Kaldi does ([2, 1, 0, 0, 1, 2], unlike
        # torch's "reflect" padding [2, 1, 0, 1, 2]).
        num_frames = (num_samples + window_shift // 2) // window_shift
        reversed_waveform = torch.flip(waveform, [0])
        pad = window_size // 2 - window_shift // 2
        if pad > 0:
            waveform = torch.cat((reversed_waveform[-pad:], waveform, reversed_waveform), dim=0)
        else:
            waveform = torch.cat((waveform[-pad:], reversed_waveform), dim=0)
    return waveform.as_strided((num_frames, window_size), (window_shift * waveform.stride(0), waveform.stride(0)))


def kaldi_fbank(
    waveform: torch.Tensor,
    *,
    sample_frequency: float = 16_000.0,
    frame_length: float = 25.0,
    frame_shift: float = 10.0,
    num_mel_bins: int = 23,
    low_freq: float = 20.0,
    high_freq: float = 0.0,
    window_type: str = "povey",
    dither: float = 0.0,
    preemphasis_coefficient: float = 0.97,
    remove_dc_offset: bool = True,
    round_to_power_of_two: bool = True,
    snip_edges: bool = True,
    use_power: bool = True,
    use_log_fbank: bool = True,
    use_energy: bool = False,
    raw_energy: bool = True,
    energy_floor: float = 1.0,
    htk_compat: bool = False,
) -> torch.Tensor:
    """Kaldi ``compute-fbank-feats`` of ``waveform`` ``[1, N]`` (or ``[N]``) -> ``[F, M (+ 1 with use_energy)]``.

    ``torchaudio.compliance.kaldi.fbank`` with its defaults; ``ASTFeatureExtractor`` passes ``window_type="hanning"``,
    its ``sample_frequency`` and ``num_mel_bins``. Per frame of ``frame_length`` ms every ``frame_shift`` ms: dither
    (Gaussian noise from torch's global RNG, times ``dither``), DC removal, preemphasis, window, zero padding to a
    power of two, power spectrum, Kaldi mel filters between ``low_freq`` and ``high_freq`` (<= 0: from Nyquist), log
    (floored at float32 eps). ``use_energy`` adds the log frame energy as the first column (last with
    ``htk_compat``), floored at ``energy_floor`` and measured before preemphasis and window with ``raw_energy``.
    ``F = 1 + (N - window) // shift`` with ``snip_edges``, else ``(N + shift // 2) // shift``.
    """
    if waveform.dim() == 2:
        if waveform.shape[0] != 1:
            raise ValueError(
                f"kaldi_fbank reads one channel: got shape {tuple(waveform.shape)}; pass `waveform[c:c+1]`."
            )
        waveform = waveform[0]
    if waveform.dim() != 1:
        raise ValueError(f"kaldi_fbank expects a waveform of shape [1, N] or [N], got {tuple(waveform.shape)}.")
    device, dtype = waveform.device, waveform.dtype
    eps = torch.finfo(torch.float32).eps  # Kaldi's floor, float32 epsilon whatever the dtype
    window_shift = int(sample_frequency * frame_shift * 0.001)
    window_size = int(sample_frequency * frame_length * 0.001)
    if not 2 <= window_size <= waveform.shape[0]:
        raise ValueError(
            f"kaldi_fbank: a frame holds {window_size} samples, which must be between 2 and the clip's "
            f"{waveform.shape[0]}; pad short clips to one frame."
        )
    if window_shift <= 0 or sample_frequency <= 0:
        raise ValueError(
            f"kaldi_fbank: frame_shift and sample_frequency must give a positive shift, got {window_shift}."
        )
    padded_window_size = 1 << (window_size - 1).bit_length() if round_to_power_of_two else window_size
    if padded_window_size % 2:
        raise ValueError(
            f"kaldi_fbank: the padded frame ({padded_window_size}) must be even; use round_to_power_of_two."
        )
    if not 0.0 <= preemphasis_coefficient <= 1.0:
        raise ValueError(f"kaldi_fbank: preemphasis_coefficient must lie in [0, 1], got {preemphasis_coefficient}.")

    frames = _kaldi_frames(waveform, window_size, window_shift, snip_edges)  # [F, window_size]
    if dither != 0.0:
        frames = frames + torch.randn(frames.shape, device=device, dtype=dtype) * dither
    if remove_dc_offset:
        frames = frames - torch.mean(frames, dim=1).unsqueeze(1)

    def log_energy(frames: torch.Tensor) -> torch.Tensor:  # [F]
        energy = frames.pow(2).sum(1).clamp_min(eps).log()
        return energy if energy_floor == 0.0 else energy.clamp_min(math.log(energy_floor))

    if use_energy and raw_energy:
        energy = log_energy(frames)
    if preemphasis_coefficient != 0.0:
        # x[j] -= coefficient * x[j - 1] within each frame, x[-1] taken as x[0].
        previous = torch.cat((frames[:, :1], frames[:, :-1]), dim=1)
        frames = frames - preemphasis_coefficient * previous
    frames = frames * _kaldi_window(window_type, window_size, device, dtype).unsqueeze(0)
    if padded_window_size != window_size:
        frames = torch.nn.functional.pad(frames, (0, padded_window_size - window_size))  # [F, padded]
    if use_energy and not raw_energy:
        energy = log_energy(frames)

    spectrum = torch.fft.rfft(frames).abs()  # [F, padded // 2 + 1]
    if use_power:
        spectrum = spectrum.pow(2.0)
    filters = _kaldi_mel_banks(num_mel_bins, padded_window_size, sample_frequency, low_freq, high_freq)
    # Kaldi's filters leave out the Nyquist bin: a zero column.
    filters = torch.nn.functional.pad(filters.to(device=device, dtype=dtype), (0, 1))  # [M, padded // 2 + 1]
    features = torch.mm(spectrum, filters.T)  # [F, M]
    if use_log_fbank:
        features = features.clamp_min(eps).log()
    if use_energy:
        columns = (features, energy.unsqueeze(1)) if htk_compat else (energy.unsqueeze(1), features)
        features = torch.cat(columns, dim=1)
    return features
