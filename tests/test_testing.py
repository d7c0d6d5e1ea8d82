"""The tiny offline MusicGen: seeded, saved and reloaded with from_pretrained, usable through pipeline()."""

import pytest
import torch
from transformers import MusicgenForConditionalGeneration, MusicgenProcessor, pipeline

from musicrl_trl.testing import save_tiny_musicgen, tiny_musicgen


@pytest.mark.parametrize("num_codebooks,audio_channels", [(4, 1), (2, 1), (8, 2)])
def test_tiny_musicgen_reloads_and_runs_text_to_audio_pipeline(tmp_path, num_codebooks, audio_channels):
    save_tiny_musicgen(tmp_path, num_codebooks=num_codebooks, audio_channels=audio_channels, seed=0)
    assert (tmp_path / "model.safetensors").exists() and not list(tmp_path.glob("*.bin"))
    model = MusicgenForConditionalGeneration.from_pretrained(tmp_path)
    processor = MusicgenProcessor.from_pretrained(tmp_path)
    assert model.decoder.num_codebooks == num_codebooks
    assert model.config.audio_encoder.num_quantizers == num_codebooks // audio_channels
    assert processor.feature_extractor.sampling_rate == model.config.sampling_rate == 32000

    synthesiser = pipeline("text-to-audio", model=str(tmp_path))
    torch.manual_seed(0)
    music = synthesiser("a bright melody", forward_params={"max_new_tokens": 20})
    assert music["sampling_rate"] == 32000
    frames = 20 - (num_codebooks // audio_channels - 1)
    assert music["audio"].shape[-1] == frames * 640
    assert abs(music["audio"]).max() > 1e-3  # audible, not the all-zero codebook of a fresh EnCodec


def test_tiny_musicgen_is_seeded_and_audio_depends_on_codes():
    model_a, _ = tiny_musicgen(seed=0)
    model_b, _ = tiny_musicgen(seed=0)
    model_c, _ = tiny_musicgen(seed=1)
    state_a, state_b, state_c = model_a.state_dict(), model_b.state_dict(), model_c.state_dict()
    assert all(torch.equal(state_a[k], state_b[k]) for k in state_a)
    assert any(not torch.equal(state_a[k], state_c[k]) for k in state_a)
    codes = torch.randint(0, 2048, (1, 2, 4, 25), generator=torch.Generator().manual_seed(0))
    audio = model_a.audio_encoder.decode(codes, [None]).audio_values
    assert (audio[0] - audio[1]).abs().mean() > 0.01
    assert 0.02 < audio.pow(2).mean().sqrt() < 0.5
