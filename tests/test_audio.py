"""musicrl_trl.audio: resampling, channels, peaks, windowing, file I/O and codec round trips."""

from __future__ import annotations

import math

import pytest
import soundfile as sf
import torch
from transformers import EncodecConfig, EncodecModel

from musicrl_trl import audio as audio_lib
from musicrl_trl import dsp
from musicrl_trl.audio import (
    check_audio,
    check_sampling_rate,
    decode,
    encode,
    first_last_windows,
    load_audio,
    peak_normalize,
    resample,
    save_audio,
    split_windows,
    to_mono,
)


def _sine(frequency: float, seconds: float, rate: int, channels: int = 1, batch: int = 1) -> torch.Tensor:
    time = torch.arange(round(seconds * rate)) / rate
    return (0.5 * torch.sin(2 * math.pi * frequency * time)).expand(batch, channels, -1).clone()


# resampling ----------------------------------------------------------------------------------------------------------


def test_resample_matches_functional_dsp_and_keeps_shape_prefix():
    audio = _sine(440.0, 0.5, 48_000, channels=2, batch=3)
    out = resample(audio, 48_000, 16_000)
    assert out.shape == (3, 2, 8_000)
    # The cached module and the functional form (kernel rebuilt per call, both in float32) do the same arithmetic.
    assert torch.equal(out, dsp.resample(audio, 48_000, 16_000))
    # A 440 Hz tone survives: its energy stays where it was (well below the new Nyquist).
    assert out.pow(2).mean().sqrt().item() == pytest.approx(0.5 / math.sqrt(2), rel=0.02)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_resample_equals_torchaudio_where_it_loads(dtype):
    try:  # optional: torchaudio stopped at 2.11 and does not load beside newer torch
        import torchaudio
    except (ImportError, OSError) as error:
        pytest.skip(f"torchaudio is not importable here ({error})")
    audio = _sine(440.0, 0.5, 44_100, channels=2, batch=3).to(dtype)
    expected = torchaudio.transforms.Resample(44_100, 32_000, dtype=dtype)(audio)
    assert torch.equal(resample(audio, 44_100, 32_000), expected)


def test_resample_same_rate_is_identity_and_kernels_are_cached():
    audio = torch.randn(1, 1, 1000)
    assert resample(audio, 32_000, 32_000) is audio
    audio_lib._resampler.cache_clear()
    resample(audio, 32_000, 24_000)
    resample(audio, 32_000, 24_000)
    info = audio_lib._resampler.cache_info()
    assert (info.misses, info.hits) == (1, 1)


def test_resample_half_precision_runs_in_float32():
    audio = _sine(440.0, 0.1, 32_000).to(torch.bfloat16)
    out = resample(audio, 32_000, 16_000)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), resample(audio.float(), 32_000, 16_000), atol=1e-2, rtol=0)


@pytest.mark.parametrize("bad_rate", [50, 10, 0, -16_000, 44_100.5, "32000", True])
def test_check_sampling_rate_rejects_implausible_rates(bad_rate):
    with pytest.raises(ValueError, match="sampling"):
        check_sampling_rate(bad_rate, "my_reward")


def test_check_sampling_rate_message_names_value_and_fix():
    with pytest.raises(ValueError, match=r"my_reward.*50 Hz.*frame rate.*model.config.sampling_rate"):
        check_sampling_rate(50, "my_reward")
    assert check_sampling_rate(44_100.0) == 44_100
    assert check_sampling_rate(torch.tensor(16_000)) == 16_000


def test_check_audio_errors():
    with pytest.raises(ValueError, match=r"\[B, C, N\].*unsqueeze"):
        check_audio(torch.zeros(2, 100), "r")
    with pytest.raises(ValueError, match="floating point"):
        check_audio(torch.zeros(2, 1, 100, dtype=torch.int16), "r")
    with pytest.raises(ValueError, match="empty"):
        check_audio(torch.zeros(2, 1, 0), "r")
    bad = torch.zeros(3, 1, 100)
    bad[1, 0, 5] = float("nan")
    with pytest.raises(ValueError, match=r"r: audio contains NaN or inf \(batch rows \[1\]\).*nan_to_num"):
        check_audio(bad, "r")


# channels, peaks -----------------------------------------------------------------------------------------------------


def test_to_mono_averages_channels():
    stereo = torch.stack([torch.ones(2, 10), -3 * torch.ones(2, 10)], dim=1)  # [B=2, C=2, N=10]
    assert torch.equal(to_mono(stereo), -torch.ones(2, 1, 10))
    mono = torch.randn(2, 1, 10)
    assert to_mono(mono) is mono


def test_peak_normalize_shares_gain_across_channels_and_leaves_silence():
    audio = torch.zeros(2, 2, 100)
    audio[0, 0, 3] = 0.5
    audio[0, 1, 7] = -0.25
    out = peak_normalize(audio, peak=0.9)
    assert out[0].abs().max().item() == pytest.approx(0.9)
    assert out[0, 1, 7].item() == pytest.approx(-0.45)  # same gain as channel 0
    assert torch.equal(out[1], audio[1])


# windows -------------------------------------------------------------------------------------------------------------


def test_split_windows_exact_cover():
    rate = 100
    audio = torch.arange(30 * rate, dtype=torch.float32).view(1, 1, -1).repeat(2, 1, 1)
    windows = split_windows(audio, rate, window_s=10.0)
    assert windows.shape == (2, 3, 1, 1000)
    for w, start in enumerate([0, 1000, 2000]):
        assert torch.equal(windows[:, w], audio[..., start : start + 1000])


def test_split_windows_last_partial_window_shift_and_drop():
    rate = 100
    audio = torch.arange(25 * rate, dtype=torch.float32).view(1, 1, -1)
    shifted = split_windows(audio, rate, window_s=10.0)
    assert [int(shifted[0, w, 0, 0]) for w in range(shifted.shape[1])] == [0, 1000, 1500]
    assert torch.equal(shifted[0, -1, 0], audio[0, 0, -1000:])
    dropped = split_windows(audio, rate, window_s=10.0, last="drop")
    assert [int(dropped[0, w, 0, 0]) for w in range(dropped.shape[1])] == [0, 1000]


def test_split_windows_short_clip_is_one_whole_window_and_hop_overlaps():
    short = torch.randn(2, 2, 350)
    windows = split_windows(short, 100, window_s=10.0)
    assert windows.shape == (2, 1, 2, 350)
    assert torch.equal(windows[:, 0], short)
    overlapping = split_windows(torch.randn(1, 1, 2000), 100, window_s=10.0, hop_s=5.0)
    assert overlapping.shape == (1, 3, 1, 1000)
    with pytest.raises(ValueError, match="positive"):
        split_windows(short, 100, window_s=0.0)
    with pytest.raises(ValueError, match="last"):
        split_windows(short, 100, window_s=1.0, last="pad")


def test_first_last_windows():
    audio = torch.arange(50, dtype=torch.float32).view(1, 1, -1)
    windows = first_last_windows(audio, 4_000, window_s=20 / 4_000)  # 20-sample windows
    assert windows.shape == (1, 2, 1, 20)
    assert torch.equal(windows[0, 0, 0], audio[0, 0, :20]) and torch.equal(windows[0, 1, 0], audio[0, 0, -20:])
    assert first_last_windows(audio, 4_000, window_s=1.0).shape == (1, 1, 1, 50)


# file I/O ------------------------------------------------------------------------------------------------------------


def test_save_load_round_trip(tmp_path):
    audio = torch.rand(2, 1600) * 2 - 1  # [C, N]
    path = save_audio(tmp_path / "clip.wav", audio, 16_000, subtype="FLOAT")
    loaded, rate = load_audio(path)
    assert rate == 16_000 and loaded.dtype == torch.float32
    assert torch.equal(loaded, audio)
    mono, _ = load_audio(path, mono=True)
    torch.testing.assert_close(mono, audio.mean(0, keepdim=True))
    upsampled, rate = load_audio(path, sampling_rate=32_000)
    assert rate == 32_000 and upsampled.shape == (2, 3200)
    pcm_path = save_audio(tmp_path / "clip.flac", audio[None], 16_000)  # [1, C, N] accepted, 16-bit PCM
    pcm, _ = load_audio(pcm_path)
    torch.testing.assert_close(pcm, audio, atol=1 / 2**15, rtol=0)


def test_load_audio_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.wav"):
        load_audio(tmp_path / "missing.wav")
    garbage = tmp_path / "not_audio.wav"
    garbage.write_bytes(b"this is not a RIFF file" * 10)
    with pytest.raises(ValueError, match=r"could not decode .*not_audio\.wav"):
        load_audio(garbage)
    with pytest.raises(ValueError, match="batch of 2"):
        save_audio(tmp_path / "x.wav", torch.zeros(2, 1, 10), 16_000)
    assert sf.info(save_audio(tmp_path / "ok.wav", torch.zeros(1, 10), 16_000)).samplerate == 16_000


# codecs --------------------------------------------------------------------------------------------------------------


def _tiny_transformers_codec(**overrides) -> EncodecModel:
    config = EncodecConfig(
        sampling_rate=32_000,
        audio_channels=1,
        target_bandwidths=[2.2, 4.4],
        codebook_size=2048,
        hidden_size=16,
        num_filters=4,
        num_residual_layers=1,
        upsampling_ratios=[8, 5, 4, 4],
        chunk_length_s=None,
        overlap=None,
        normalize=False,
        **overrides,
    )
    torch.manual_seed(0)
    codec = EncodecModel(config).eval()
    with torch.no_grad():  # fresh EnCodec codebooks are all zero (every code decodes alike): randomise them
        for layer in codec.quantizer.layers:
            layer.codebook.embed.normal_()
    return codec


def test_encode_decode_transformers_codec():
    codec = _tiny_transformers_codec()
    audio = 0.1 * torch.randn(2, 1, 6_400, generator=torch.Generator().manual_seed(1))  # 0.2 s
    codes = encode(codec, audio, 32_000)
    assert codes.shape == (2, 4, 10) and codes.dtype == torch.long  # K = 2200 bps / (50 Hz * 11 bits) = 4
    assert torch.equal(codes, codec.encode(audio).audio_codes[0])
    assert encode(codec, audio, 32_000, bandwidth=4.4).shape == (2, 8, 10)
    decoded = decode(codec, codes)
    assert decoded.shape == (2, 1, 6_400)
    with torch.no_grad():
        torch.testing.assert_close(decoded, codec(audio).audio_values)  # forward = encode + decode
    # The codes determine the audio: different codes decode differently, the same codes identically.
    assert torch.equal(decode(codec, codes), decoded)
    other_codes = torch.randint(0, 2048, codes.shape, generator=torch.Generator().manual_seed(3))
    assert not torch.allclose(decode(codec, other_codes), decoded)


def test_encode_decode_errors():
    codec = _tiny_transformers_codec()
    with pytest.raises(
        ValueError, match=r"expects 32000 Hz audio, received 16000 Hz.*resample\(audio, 16000, 32000\)"
    ):
        encode(codec, torch.zeros(1, 1, 1_600), 16_000)
    with pytest.raises(ValueError, match="1-channel.*to_mono"):
        encode(codec, torch.zeros(1, 2, 3_200), 32_000)
    with pytest.raises(ValueError, match=r"\[0, 2048\).*delay pattern"):
        decode(codec, torch.full((1, 4, 5), 2048))
    with pytest.raises(ValueError, match=r"\[B, K, T\]"):
        decode(codec, torch.zeros(4, 5, dtype=torch.long))
    with pytest.raises(TypeError, match="Unsupported codec"):
        encode(torch.nn.Linear(1, 1), torch.zeros(1, 1, 10), 32_000)
    chunked = _tiny_transformers_codec()
    chunked.config.chunk_length_s = 1.0
    with pytest.raises(ValueError, match="chunks the audio"):
        encode(chunked, torch.zeros(1, 1, 3_200), 32_000)


def test_encode_decode_meta_encodec_extra():
    encodec = pytest.importorskip("encodec", reason="optional extra musicrl-trl[encodec] not installed")
    import warnings

    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # encodec uses the deprecated torch weight_norm
        # The architecture of encodec_model_24khz without its downloaded weights (random init, no network).
        codec = encodec.EncodecModel._get_model([1.5, 3.0], sample_rate=24_000, channels=1, causal=True).eval()
    with torch.no_grad():  # encodec k-means-initialises codebooks during training only: give them random vectors
        for layer in codec.quantizer.vq.layers:
            layer._codebook.embed.normal_()
            layer._codebook.inited.fill_(1.0)
    assert audio_lib.codec_sampling_rate(codec) == 24_000 and audio_lib.frame_rate(codec) == 75
    audio = 0.1 * torch.randn(2, 1, 4_800, generator=torch.Generator().manual_seed(2))  # 0.2 s
    codec.set_target_bandwidth(1.5)
    codes = encode(codec, audio, 24_000)
    assert codes.shape == (2, 2, 15)
    assert encode(codec, audio, 24_000, bandwidth=3.0).shape == (2, 4, 15)
    assert codec.bandwidth == 1.5  # a per-call bandwidth does not stick
    decoded = decode(codec, codes)
    assert decoded.shape == (2, 1, 4_800)
    with torch.no_grad():
        torch.testing.assert_close(decoded, codec(audio))  # forward = encode + decode
    with pytest.raises(ValueError, match="expects 24000 Hz audio, received 32000 Hz"):
        encode(codec, torch.zeros(1, 1, 3_200), 32_000)
    codec.segment = 1.0  # the 48 kHz model's chunked layout: codes alone would not describe the audio
    with pytest.raises(ValueError, match="codec.segment = None"):
        decode(codec, codes)
