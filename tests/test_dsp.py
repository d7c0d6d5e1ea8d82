"""musicrl_trl.dsp: resampling, mel filter banks and Kaldi fbank in pure torch.

Three kinds of checks: slow, obviously correct loops written from the formulas; signal properties that a broken
implementation would miss (a tone keeps its frequency and amplitude, aliases are removed, a tone lands in its mel bin);
and bit-for-bit equality with torchaudio, which only run where torchaudio is installed and loads.
"""

from __future__ import annotations

import math

import pytest
import torch

from musicrl_trl.dsp import Resample, kaldi_fbank, melscale_fbanks, resample

RATE_PAIRS = [(48_000, 16_000), (32_000, 48_000), (44_100, 32_000), (16_000, 22_050)]
DTYPES = [torch.float32, torch.float64]
# The settings ASTFeatureExtractor (and so musicrl_trl.reward_models.features.ast_features) passes to Kaldi's fbank.
AST_FBANK = {"sample_frequency": 16_000, "window_type": "hanning", "num_mel_bins": 128, "dither": 0.0}
# CLAP's filter banks: Slaney scale and norm for most checkpoints, HTK without norm for fusion ones; and 16 kHz ones.
MEL_SETTINGS = [
    (513, 50.0, 14_000.0, 64, 48_000, "slaney", "slaney"),
    (513, 50.0, 14_000.0, 64, 48_000, None, "htk"),
    (201, 0.0, 8_000.0, 40, 16_000, None, "slaney"),
    (201, 0.0, 8_000.0, 40, 16_000, "slaney", "htk"),
]


@pytest.fixture(scope="module")
def torchaudio():
    # Optional: torchaudio stopped at 2.11 and does not load beside newer torch, where these comparisons skip.
    try:
        import torchaudio
        import torchaudio.compliance.kaldi
    except (ImportError, OSError) as error:
        pytest.skip(f"torchaudio is not importable here ({error})")
    return torchaudio


def _sine(frequency: float, rate: int, num_samples: int, amplitude: float = 0.5) -> torch.Tensor:
    time = torch.arange(num_samples, dtype=torch.float64) / rate
    return amplitude * torch.sin(2 * math.pi * frequency * time)  # [N]


def _noise(*shape: int, dtype: torch.dtype = torch.float32, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


# resampling: slow loop and signal properties ------------------------------------------------------------------------


def _slow_resample(signal: list[float], orig_freq: int, new_freq: int, lowpass_filter_width: int = 6) -> list[float]:
    """y[j] = sum_i x[i] h(i / orig - j / new), one output sample at a time: a Hann-windowed sinc low-pass at 0.99 of
    the lower Nyquist frequency, cut after ``lowpass_filter_width`` zero crossings."""
    cutoff = 0.99 * min(
        orig_freq, new_freq
    )  # twice the cut-off frequency in Hz: the sinc's zeros are 1 / cutoff apart
    output = []
    for j in range(math.ceil(len(signal) * new_freq / orig_freq)):
        total = 0.0
        for i, sample in enumerate(signal):
            t = cutoff * (i / orig_freq - j / new_freq)  # distance in zero crossings
            if abs(t) < lowpass_filter_width:
                sinc = 1.0 if t == 0 else math.sin(math.pi * t) / (math.pi * t)
                window = math.cos(math.pi * t / (2 * lowpass_filter_width)) ** 2
                total += sample * cutoff / orig_freq * sinc * window
        output.append(total)
    return output


@pytest.mark.parametrize(("orig_freq", "new_freq"), RATE_PAIRS)
def test_resample_matches_slow_sinc_loop(orig_freq, new_freq):
    signal = _noise(150, dtype=torch.float64, seed=orig_freq + new_freq)
    expected = torch.tensor(_slow_resample(signal.tolist(), orig_freq, new_freq), dtype=torch.float64)
    torch.testing.assert_close(resample(signal, orig_freq, new_freq), expected, atol=1e-12, rtol=0)
    torch.testing.assert_close(
        Resample(orig_freq, new_freq, dtype=torch.float64)(signal), expected, atol=1e-12, rtol=0
    )


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("orig_freq", "new_freq"), RATE_PAIRS)
def test_resample_keeps_a_tone_frequency_and_amplitude(orig_freq, new_freq, dtype):
    tone = _sine(1_000.0, orig_freq, orig_freq // 4).to(dtype)  # 0.25 s
    out = resample(tone, orig_freq, new_freq)
    assert out.dtype == dtype
    expected = _sine(1_000.0, new_freq, out.shape[-1]).to(dtype)
    # Away from the edges (where the filter sees the zero padding) the tone is reproduced sample by sample.
    torch.testing.assert_close(out[64:-64], expected[64:-64], atol=1e-3, rtol=0)
    assert out[64:-64].pow(2).mean().sqrt().item() == pytest.approx(0.5 / math.sqrt(2), rel=2e-3)
    peak_bin = torch.fft.rfft(out.double()).abs().argmax().item()
    assert peak_bin == round(1_000.0 * out.shape[-1] / new_freq)


def test_resample_removes_what_the_new_rate_cannot_hold():
    # A 10 kHz tone at 48 kHz would alias to 6 kHz at 16 kHz: the low-pass keeps it at least 40 dB down (this
    # 6-crossing Hann-windowed sinc gives about 45 dB there); plain decimation would pass all of its 0.5 amplitude.
    out = resample(_sine(10_000.0, 48_000, 12_000), 48_000, 16_000)
    assert out[64:-64].abs().max().item() < 0.01 * 0.5


@pytest.mark.parametrize(("orig_freq", "new_freq"), RATE_PAIRS)
def test_resample_down_then_up_recovers_a_band_limited_signal(orig_freq, new_freq):
    num_samples = orig_freq // 4
    signal = sum(_sine(frequency, orig_freq, num_samples, 0.2) for frequency in (300.0, 1_200.0, 3_000.0))
    back = resample(resample(signal, orig_freq, new_freq), new_freq, orig_freq)[:num_samples]
    torch.testing.assert_close(back[200:-200], signal[200:-200], atol=2e-3, rtol=0)


@pytest.mark.parametrize(("orig_freq", "new_freq"), RATE_PAIRS + [(48_000, 44_100)])
@pytest.mark.parametrize("num_samples", [1, 7, 1_000, 12_345, 142_683])
def test_resample_length_is_the_exact_ceiling(orig_freq, new_freq, num_samples):
    out = resample(torch.zeros(num_samples), orig_freq, new_freq)
    assert out.shape == (math.ceil(num_samples * new_freq / orig_freq),)  # Python's float ceil is exact at this size
    assert out.shape[-1] == -(-num_samples * new_freq // orig_freq)


def test_resample_keeps_the_batch_shape_and_treats_rows_alike():
    audio = _noise(2, 3, 4, 1_000)
    out = resample(audio, 48_000, 16_000)
    assert out.shape == (2, 3, 4, 334)
    torch.testing.assert_close(out[1, 2, 3], resample(audio[1, 2, 3], 48_000, 16_000), atol=1e-6, rtol=0)
    assert Resample(48_000, 16_000)(audio).shape == (2, 3, 4, 334)


def test_resample_same_rate_is_identity():
    audio = _noise(2, 100)
    assert resample(audio, 16_000, 16_000) is audio
    assert Resample(16_000, 16_000)(audio) is audio
    assert "kernel" not in Resample(16_000, 16_000).state_dict()


def test_resample_module_kernel_dtype_and_device_handling():
    default = Resample(48_000, 16_000)
    assert default.kernel.dtype == torch.float32  # computed in float64, stored as float32
    assert default.kernel.shape == (1, 1, 2 * default.width + 3)  # 48 kHz -> 16 kHz reduces to 3 -> 1: one phase
    exact = Resample(48_000, 16_000, dtype=torch.float64)
    torch.testing.assert_close(default.kernel, exact.kernel.float(), atol=1e-7, rtol=0)
    moved = Resample(48_000, 16_000).to(torch.device("cpu"), torch.float64)
    assert moved.kernel.dtype == torch.float64 and list(moved.state_dict()) == ["kernel"]
    audio = _noise(1, 2_000, dtype=torch.float64)
    torch.testing.assert_close(moved(audio), exact(audio), atol=1e-7, rtol=0)
    # The functional form builds the kernel in the waveform's dtype: float64 in, the float64 module's result out.
    assert torch.equal(resample(audio, 48_000, 16_000), exact(audio))


def test_resample_refuses_bad_arguments():
    with pytest.raises(ValueError, match="rates must be positive integers"):
        resample(torch.zeros(10), 44_100, 5_512.5)
    with pytest.raises(ValueError, match="rates must be positive integers"):
        Resample(0, 16_000)
    with pytest.raises(ValueError, match="resampling_method"):
        resample(torch.zeros(10), 48_000, 16_000, resampling_method="linear")
    with pytest.raises(TypeError, match="floating point"):
        resample(torch.zeros(10, dtype=torch.int16), 48_000, 16_000)


# mel filter banks ---------------------------------------------------------------------------------------------------


def _hz_to_mel(frequency: float, mel_scale: str) -> float:
    if mel_scale == "htk":
        return 2595.0 * math.log10(1.0 + frequency / 700.0)
    # Slaney (librosa's default): 3 mels per 200 Hz below 1 kHz, then 27 mels per factor 6.4.
    return 3 * frequency / 200 if frequency < 1_000 else 15.0 + 27.0 * math.log(frequency / 1_000) / math.log(6.4)


def _mel_to_hz(mel: float, mel_scale: str) -> float:
    if mel_scale == "htk":
        return 700.0 * (10.0 ** (mel / 2595.0) - 1.0)
    return 200 * mel / 3 if mel < 15.0 else 1_000 * 6.4 ** ((mel - 15.0) / 27.0)


def _slow_mel_filters(n_freqs, f_min, f_max, n_mels, sample_rate, norm, mel_scale) -> torch.Tensor:
    """Filter m is the triangle over mel points m, m + 1, m + 2 (evenly spaced in mel), one (bin, filter) at a time."""
    low, high = _hz_to_mel(f_min, mel_scale), _hz_to_mel(f_max, mel_scale)
    points = [_mel_to_hz(low + k * (high - low) / (n_mels + 1), mel_scale) for k in range(n_mels + 2)]
    filters = torch.zeros(n_freqs, n_mels, dtype=torch.float64)
    for k in range(n_freqs):
        frequency = k * (sample_rate // 2) / (n_freqs - 1)
        for m in range(n_mels):
            left, centre, right = points[m : m + 3]
            weight = max(0.0, min((frequency - left) / (centre - left), (right - frequency) / (right - centre)))
            filters[k, m] = weight * (2.0 / (right - left) if norm == "slaney" else 1.0)
    return filters


@pytest.mark.parametrize(("n_freqs", "f_min", "f_max", "n_mels", "sample_rate", "norm", "mel_scale"), MEL_SETTINGS)
def test_melscale_fbanks_match_slow_triangles(n_freqs, f_min, f_max, n_mels, sample_rate, norm, mel_scale):
    filters = melscale_fbanks(n_freqs, f_min, f_max, n_mels, sample_rate, norm=norm, mel_scale=mel_scale)
    assert filters.shape == (n_freqs, n_mels) and filters.dtype == torch.float32
    expected = _slow_mel_filters(n_freqs, f_min, f_max, n_mels, sample_rate, norm, mel_scale)
    # float32 slopes between points kHz apart lose ~1e-7 relative: ~1e-5 on weights that go up to 1.
    scale = expected.max().item()
    torch.testing.assert_close(filters.double(), expected, atol=2e-5 * scale, rtol=0)


@pytest.mark.parametrize("mel_scale", ["htk", "slaney"])
def test_melscale_fbanks_are_ordered_triangles_that_sum_to_one(mel_scale):
    filters = melscale_fbanks(1025, 0.0, 16_000.0, 40, 32_000, norm=None, mel_scale=mel_scale)  # [F, M]
    assert (filters >= 0).all() and filters.max() <= 1.0
    peaks = filters.argmax(dim=0)
    assert (peaks[1:] > peaks[:-1]).all()  # centres rise with the filter index
    for m in range(filters.shape[1]):
        support = filters[:, m].nonzero().flatten()
        column = filters[support[0] : support[-1] + 1, m]
        assert (column > 0).all()  # one contiguous bump...
        rising, falling = column[: peaks[m] - support[0] + 1], column[peaks[m] - support[0] :]
        assert (rising.diff() >= 0).all() and (falling.diff() <= 0).all()  # ...rising then falling
    # Neighbouring triangles overlap so that between the first and the last centre every bin's weights sum to one.
    inner = filters[peaks[0] : peaks[-1] + 1].sum(dim=1)
    torch.testing.assert_close(inner, torch.ones_like(inner), atol=1e-5, rtol=0)
    # Slaney's norm divides each triangle by half its width in Hz.
    normed = melscale_fbanks(1025, 0.0, 16_000.0, 40, 32_000, norm="slaney", mel_scale=mel_scale)
    low, high = _hz_to_mel(0.0, mel_scale), _hz_to_mel(16_000.0, mel_scale)
    points = torch.tensor([_mel_to_hz(low + k * (high - low) / 41, mel_scale) for k in range(42)], dtype=torch.float64)
    ratio = normed.double().sum(dim=0) / filters.double().sum(dim=0)
    torch.testing.assert_close(ratio, 2.0 / (points[2:] - points[:-2]), rtol=1e-4, atol=0)


def test_melscale_fbanks_refuse_unknown_options():
    with pytest.raises(ValueError, match="norm"):
        melscale_fbanks(201, 0.0, 8_000.0, 40, 16_000, norm="area")
    with pytest.raises(ValueError, match="mel_scale"):
        melscale_fbanks(201, 0.0, 8_000.0, 40, 16_000, mel_scale="bark")


# Kaldi fbank --------------------------------------------------------------------------------------------------------


def _kaldi_mel(frequency: float) -> float:
    return 1127.0 * math.log(1.0 + frequency / 700.0)


def _slow_ast_fbank(signal: torch.Tensor, rate: int, num_mel_bins: int) -> torch.Tensor:
    """Kaldi fbank with ASTFeatureExtractor's settings, frame by frame in float64 with an explicit DFT:
    25 ms frames every 10 ms, DC removed, preemphasis 0.97, symmetric Hann window, zero padding to 512, power
    spectrum, triangles evenly spaced on Kaldi's mel scale from 20 Hz to Nyquist, natural log."""
    frame, shift = int(rate * 0.025), int(rate * 0.010)
    fft_size = 1 << (frame - 1).bit_length()
    n = torch.arange(frame, dtype=torch.float64)
    window = 0.5 - 0.5 * torch.cos(2 * math.pi * n / (frame - 1))
    k = torch.arange(fft_size // 2 + 1, dtype=torch.float64)
    angles = 2 * math.pi * k[:, None] * torch.arange(fft_size, dtype=torch.float64)[None] / fft_size
    low, high = _kaldi_mel(20.0), _kaldi_mel(rate / 2)
    delta = (high - low) / (num_mel_bins + 1)
    weights = torch.zeros(num_mel_bins, fft_size // 2 + 1, dtype=torch.float64)  # the Nyquist bin keeps weight 0
    for m in range(num_mel_bins):
        left, centre, right = low + m * delta, low + (m + 1) * delta, low + (m + 2) * delta
        for b in range(fft_size // 2):
            mel = _kaldi_mel(b * rate / fft_size)
            weights[m, b] = max(0.0, min((mel - left) / (centre - left), (right - mel) / (right - centre)))
    rows = []
    for start in range(0, signal.shape[0] - frame + 1, shift):
        x = signal[start : start + frame].double()
        x = x - x.mean()
        x = x - 0.97 * torch.cat([x[:1], x[:-1]])  # x[j] - 0.97 x[j - 1], with x[-1] = x[0]
        x = torch.cat([x * window, torch.zeros(fft_size - frame, dtype=torch.float64)])
        power = (angles.cos() @ x) ** 2 + (angles.sin() @ x) ** 2
        rows.append((weights @ power).clamp_min(torch.finfo(torch.float32).eps).log())
    return torch.stack(rows)


def test_kaldi_fbank_matches_slow_frame_loop():
    signal = _noise(4_000, dtype=torch.float64, seed=5)
    expected = _slow_ast_fbank(signal, 16_000, 32)
    ours = kaldi_fbank(signal[None], **{**AST_FBANK, "num_mel_bins": 32})
    assert ours.shape == expected.shape == (1 + (4_000 - 400) // 160, 32)
    # Kaldi's mel filters are float32 whatever the waveform's dtype (torchaudio's too): ~1e-5 relative, so in the log.
    torch.testing.assert_close(ours, expected, atol=5e-5, rtol=0)
    ours_float = kaldi_fbank(signal[None].float(), **{**AST_FBANK, "num_mel_bins": 32})
    torch.testing.assert_close(ours_float.double(), expected, atol=5e-5, rtol=0)


@pytest.mark.parametrize("frequency", [300.0, 1_000.0, 3_000.0, 6_000.0])
def test_kaldi_fbank_puts_a_tone_in_its_mel_bin(frequency):
    num_mel_bins = 40
    fbank = kaldi_fbank(_sine(frequency, 16_000, 16_000).float(), **{**AST_FBANK, "num_mel_bins": num_mel_bins})
    low, high = _kaldi_mel(20.0), _kaldi_mel(8_000.0)
    centres = [low + (m + 1) * (high - low) / (num_mel_bins + 1) for m in range(num_mel_bins)]
    nearest = min(range(num_mel_bins), key=lambda m: abs(centres[m] - _kaldi_mel(frequency)))
    assert (fbank.argmax(dim=1) == nearest).all()


def test_kaldi_fbank_frame_counts_and_columns():
    signal = _noise(1, 16_000)
    assert kaldi_fbank(signal, **AST_FBANK).shape == (98, 128)  # 1 + (16000 - 400) // 160
    assert kaldi_fbank(signal[0], snip_edges=False).shape == (100, 23)  # (16000 + 80) // 160, Kaldi's 23 bins
    with_energy = kaldi_fbank(signal, use_energy=True)
    assert with_energy.shape == (98, 24)
    torch.testing.assert_close(with_energy[:, 1:], kaldi_fbank(signal))  # energy first...
    torch.testing.assert_close(kaldi_fbank(signal, use_energy=True, htk_compat=True)[:, -1], with_energy[:, 0])
    linear = kaldi_fbank(signal, use_log_fbank=False)
    torch.testing.assert_close(linear.clamp_min(torch.finfo(torch.float32).eps).log(), kaldi_fbank(signal))


def test_kaldi_fbank_dither_draws_from_torch_rng():
    signal = _noise(1, 4_000)
    torch.manual_seed(0)
    first = kaldi_fbank(signal, dither=1.0)
    torch.manual_seed(0)
    assert torch.equal(kaldi_fbank(signal, dither=1.0), first)
    assert not torch.equal(kaldi_fbank(signal, dither=1.0), first)
    assert not torch.equal(kaldi_fbank(signal), first)


def test_kaldi_fbank_refuses_what_it_does_not_reproduce():
    with pytest.raises(ValueError, match="one channel"):
        kaldi_fbank(_noise(2, 4_000))
    with pytest.raises(ValueError, match="window_type"):
        kaldi_fbank(_noise(1, 4_000), window_type="blackman")
    with pytest.raises(ValueError, match="between 2 and the clip's 300"):
        kaldi_fbank(_noise(1, 300))
    with pytest.raises(ValueError, match="low_freq"):
        kaldi_fbank(_noise(1, 4_000), low_freq=9_000.0)


# equality with torchaudio (only where it loads) ---------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("orig_freq", "new_freq"), RATE_PAIRS)
def test_resample_equals_torchaudio(torchaudio, orig_freq, new_freq, dtype):
    for shape in [(1_001,), (2, 5_000), (3, 2, 4_321)]:
        audio = _noise(*shape, dtype=dtype, seed=len(shape))
        expected = torchaudio.functional.resample(audio, orig_freq, new_freq)
        assert torch.equal(resample(audio, orig_freq, new_freq), expected)
        for kernel_dtype in [None, dtype]:
            theirs = torchaudio.transforms.Resample(orig_freq, new_freq, dtype=kernel_dtype)
            ours = Resample(orig_freq, new_freq, dtype=kernel_dtype)
            assert torch.equal(ours.kernel, theirs.kernel) and ours.width == theirs.width
            assert torch.equal(ours(audio.to(ours.kernel.dtype)), theirs(audio.to(theirs.kernel.dtype)))
    for beta in [None, 8.0]:
        expected = torchaudio.functional.resample(
            audio, orig_freq, new_freq, resampling_method="sinc_interp_kaiser", beta=beta
        )
        assert torch.equal(
            resample(audio, orig_freq, new_freq, resampling_method="sinc_interp_kaiser", beta=beta), expected
        )


def test_resample_length_where_torchaudio_drops_a_sample(torchaudio):
    # torchaudio computes ceil(N * new / orig) through a float32 tensor: 142683 * 147 / 160 = 131090.0062... rounds to
    # 131090.0 there, one sample short. The samples both produce are identical.
    audio = _noise(142_683)
    expected = torchaudio.functional.resample(audio, 48_000, 44_100)
    out = resample(audio, 48_000, 44_100)
    assert (out.shape[-1], expected.shape[-1]) == (131_091, 131_090)
    assert torch.equal(out[:-1], expected)


@pytest.mark.parametrize(("n_freqs", "f_min", "f_max", "n_mels", "sample_rate", "norm", "mel_scale"), MEL_SETTINGS)
def test_melscale_fbanks_equal_torchaudio(torchaudio, n_freqs, f_min, f_max, n_mels, sample_rate, norm, mel_scale):
    args = (n_freqs, f_min, f_max, n_mels, sample_rate)
    expected = torchaudio.functional.melscale_fbanks(*args, norm=norm, mel_scale=mel_scale)
    assert torch.equal(melscale_fbanks(*args, norm=norm, mel_scale=mel_scale), expected)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "settings",
    [
        AST_FBANK,
        {**AST_FBANK, "num_mel_bins": 32, "htk_compat": True, "use_energy": False},
        {},  # Kaldi's defaults: povey window, 23 bins
        {"window_type": "hamming", "snip_edges": False, "use_energy": True, "low_freq": 100.0, "high_freq": -400.0},
        {"window_type": "rectangular", "preemphasis_coefficient": 0.0, "remove_dc_offset": False, "use_power": False},
        {"use_energy": True, "htk_compat": True, "raw_energy": False, "energy_floor": 0.0, "use_log_fbank": False},
        {"sample_frequency": 24_000, "round_to_power_of_two": False, "frame_length": 20.0, "frame_shift": 5.0},
    ],
)
def test_kaldi_fbank_equals_torchaudio(torchaudio, settings, dtype):
    audio = _noise(1, 16_123, dtype=dtype, seed=7)
    expected = torchaudio.compliance.kaldi.fbank(audio, **settings)
    assert torch.equal(kaldi_fbank(audio, **settings), expected)


def test_kaldi_fbank_dither_equals_torchaudio(torchaudio):
    audio = _noise(1, 8_000)
    torch.manual_seed(3)
    expected = torchaudio.compliance.kaldi.fbank(audio, dither=0.5)
    torch.manual_seed(3)
    assert torch.equal(kaldi_fbank(audio, dither=0.5), expected)
