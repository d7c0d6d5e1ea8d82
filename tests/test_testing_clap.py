"""musicrl_trl.testing.tiny_clap and tiny_music_reward: offline, seeded, reloadable with from_pretrained."""

from __future__ import annotations

import os

import pytest
import torch
from transformers import AutoModelForAudioClassification, ClapModel, ClapProcessor

from musicrl_trl.testing import TINY_CLAP_SAMPLING_RATE, save_tiny_clap, tiny_clap, tiny_music_reward


@pytest.fixture(scope="module")
def clap_dir(tmp_path_factory) -> str:
    return save_tiny_clap(tmp_path_factory.mktemp("tiny-clap"), seed=0)


def test_tiny_clap_saves_safetensors_and_reloads_with_from_pretrained(clap_dir):
    files = set(os.listdir(clap_dir))
    assert "model.safetensors" in files and not any(name.endswith(".bin") for name in files)
    model = ClapModel.from_pretrained(clap_dir)
    processor = ClapProcessor.from_pretrained(clap_dir)
    built, built_processor = tiny_clap(seed=0)
    for (name, reloaded), original in zip(model.state_dict().items(), built.state_dict().values()):
        assert torch.equal(reloaded, original), name
    assert processor.tokenizer.get_vocab() == built_processor.tokenizer.get_vocab()
    assert processor.feature_extractor.sampling_rate == TINY_CLAP_SAMPLING_RATE == 48_000
    assert processor.feature_extractor.truncation == "rand_trunc"  # the non-fusion layout of larger_clap_music


def test_tiny_clap_is_seeded():
    model_a, _ = tiny_clap(seed=0)
    model_b, _ = tiny_clap(seed=1)
    weight = "text_projection.linear1.weight"
    assert not torch.equal(model_a.state_dict()[weight], model_b.state_dict()[weight])
    assert not model_a.training


def test_tiny_clap_tokenizer_knows_music_words(clap_dir):
    tokenizer = ClapProcessor.from_pretrained(clap_dir).tokenizer
    ids = tokenizer(["calm piano melody with deep bass"])["input_ids"][0]
    assert ids[0] == tokenizer.bos_token_id == 0 and ids[-1] == tokenizer.eos_token_id == 2
    assert tokenizer.pad_token_id == 1  # RoBERTa's layout, which ClapTextConfig assumes
    assert len(ids) <= 10  # whole words are single tokens, not bytes
    assert tokenizer.decode(ids, skip_special_tokens=True) == "calm piano melody with deep bass"


def test_tiny_clap_text_and_audio_features(clap_dir):
    model, processor = tiny_clap(save_directory=clap_dir)
    text = processor.tokenizer(["calm piano", "dark ambient drone with deep bass"], padding=True, return_tensors="pt")
    generator = torch.Generator().manual_seed(0)
    clips = [
        0.1 * torch.randn(48_000, generator=generator).numpy(),
        0.3 * torch.randn(96_000, generator=generator).numpy(),
    ]
    audio = processor.feature_extractor(clips, sampling_rate=48_000, return_tensors="pt")
    with torch.no_grad():
        text_embeddings = model.get_text_features(**text).pooler_output
        audio_embeddings = model.get_audio_features(**audio).pooler_output
    assert text_embeddings.shape == audio_embeddings.shape == (2, model.config.projection_dim)
    torch.testing.assert_close(text_embeddings.norm(dim=-1), torch.ones(2))
    torch.testing.assert_close(audio_embeddings.norm(dim=-1), torch.ones(2))
    # The tiny towers respond to their inputs: different prompts and clips embed differently.
    assert (text_embeddings[0] - text_embeddings[1]).abs().max() > 1e-3
    assert (audio_embeddings[0] - audio_embeddings[1]).abs().max() > 1e-3


def test_tiny_music_reward_reloads_and_spreads_scores(tmp_path):
    model = tiny_music_reward(save_directory=tmp_path)
    reloaded = AutoModelForAudioClassification.from_pretrained(tmp_path)
    assert type(reloaded) is type(model)
    generator = torch.Generator().manual_seed(0)
    audio = torch.stack([level * torch.randn(16_000, generator=generator) for level in (0.01, 0.1, 0.5)])
    with torch.no_grad():
        scores = model(audio).logits[:, 0]
        torch.testing.assert_close(reloaded(audio).logits[:, 0], scores)
    assert scores.std() > 0.05  # calibrated to spread like MOS ratings around 3
    assert 1.0 < scores.mean() < 5.0
