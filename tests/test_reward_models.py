"""MusicRewardConfig / MusicRewardModel: features, forward, backbones, Auto classes, pipeline, safetensors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from transformers import (
    ASTConfig,
    ASTFeatureExtractor,
    ASTForAudioClassification,
    AutoConfig,
    AutoFeatureExtractor,
    AutoModelForAudioClassification,
    ClapAudioModelWithProjection,
    ClapFeatureExtractor,
    pipeline,
)

from musicrl_trl.audio import resample
from musicrl_trl.reward_models import MusicRewardConfig, MusicRewardFeatureExtractor, MusicRewardModel
from musicrl_trl.reward_models.features import ClapFeatureSettings, ast_features, clap_features
from musicrl_trl.testing import save_tiny_clap, save_tiny_music_reward


def _noise(batch: int, samples: int, seed: int = 0, level: float = 0.1) -> torch.Tensor:
    return level * torch.randn(batch, samples, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def reward_dir(tmp_path_factory) -> str:
    return save_tiny_music_reward(tmp_path_factory.mktemp("tiny-music-reward"), seed=0)


@pytest.fixture(scope="module")
def clap_dir(tmp_path_factory) -> str:
    return save_tiny_clap(tmp_path_factory.mktemp("tiny-clap"), seed=0)


@pytest.fixture(scope="module")
def ast_dir(tmp_path_factory) -> str:
    """A tiny AST saved as an AudioSet-style classifier checkpoint (encoder + classification head)."""
    directory = tmp_path_factory.mktemp("tiny-ast")
    config = ASTConfig(
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        max_length=128,
        num_mel_bins=32,
        num_labels=3,
    )
    torch.manual_seed(0)
    ASTForAudioClassification(config).save_pretrained(directory)
    ASTFeatureExtractor(num_mel_bins=32, max_length=128).save_pretrained(directory)
    return str(directory)


# config --------------------------------------------------------------------------------------------------------------


def test_config_defaults_and_validation():
    config = MusicRewardConfig()
    assert (config.model_type, config.num_labels, config.problem_type) == ("music_reward", 1, "regression")
    assert config.id2label == {0: "score"} and config.backbone_type == "conv"
    with pytest.raises(ValueError, match="num_labels must be 1"):
        MusicRewardConfig(num_labels=2)
    with pytest.raises(ValueError, match="unsupported backbone"):
        MusicRewardConfig(backbone_config={"model_type": "wav2vec2"})
    with pytest.raises(ValueError, match="audio_config"):
        MusicRewardConfig(backbone_config=AutoConfig.for_model("clap"))


# torch features ------------------------------------------------------------------------------------------------------


def test_clap_features_match_clap_feature_extractor():
    extractor = ClapFeatureExtractor(frequency_min=50, frequency_max=14_000, truncation="rand_trunc")
    settings = ClapFeatureSettings.from_feature_extractor(extractor)
    # Exactly 10 s (no crop) and 3 s (repeat-padded): the inputs the extractor treats deterministically.
    for samples in (480_000, 144_000):
        audio = _noise(2, samples, seed=samples).double()
        expected = extractor(list(audio.numpy()), sampling_rate=48_000, return_tensors="pt")["input_features"]
        torch.testing.assert_close(clap_features(audio, settings).float(), expected.float(), atol=5e-3, rtol=0)
    fusion = ClapFeatureExtractor(frequency_min=50, frequency_max=14_000, truncation="fusion")
    audio = _noise(1, 480_000, seed=3).double()
    expected = fusion(list(audio.numpy()), sampling_rate=48_000, return_tensors="pt")["input_features"]  # 4 copies
    ours = clap_features(audio, ClapFeatureSettings.from_feature_extractor(fusion))
    torch.testing.assert_close(ours.expand(-1, 4, -1, -1).float(), expected.float(), atol=5e-3, rtol=0)


def test_ast_features_match_ast_feature_extractor():
    extractor = ASTFeatureExtractor(num_mel_bins=32, max_length=128)
    audio = _noise(2, 8_000, seed=4)  # 0.5 s: zero-padded to 128 frames
    expected = extractor(list(audio.numpy()), sampling_rate=16_000, return_tensors="pt")["input_values"]
    torch.testing.assert_close(ast_features(audio, 16_000, 32, 128), expected, atol=1e-4, rtol=0)


# forward -------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model(reward_dir) -> MusicRewardModel:
    return AutoModelForAudioClassification.from_pretrained(reward_dir).eval()


def test_forward_shapes_loss_and_gradients(reward_dir):
    model = MusicRewardModel.from_pretrained(reward_dir).train()
    audio = _noise(3, 8_000)
    labels = torch.tensor([1.0, 3.0, 5.0])
    output = model(audio, labels=labels)
    assert output.logits.shape == (3, 1)
    torch.testing.assert_close(output.loss, torch.nn.functional.mse_loss(output.logits[:, 0], labels))
    output.loss.backward()
    assert all(param.grad is not None and param.grad.abs().sum() > 0 for param in model.parameters())
    stereo = torch.stack([audio, audio], dim=1)  # [B, C=2, N]: downmixed to the same mono clip
    with torch.no_grad():
        torch.testing.assert_close(model(stereo).logits, model(audio).logits)
    loss, logits = model(audio, labels=labels, return_dict=False)
    assert logits.shape == (3, 1) and loss.dim() == 0


def test_forward_resamples_on_device(model):
    audio_32k = _noise(2, 16_000, seed=5)
    with torch.no_grad():
        at_32k = model(audio_32k, sampling_rate=32_000).logits
        at_16k = model(resample(audio_32k, 32_000, 16_000)).logits  # default rate: config.sampling_rate
    torch.testing.assert_close(at_32k, at_16k)


def test_attention_mask_matches_unpadded_clips(model):
    clips = [_noise(1, 8_000, seed=6)[0], _noise(1, 5_000, seed=7)[0]]
    padded = torch.zeros(2, 8_000)
    mask = torch.zeros(2, 8_000, dtype=torch.long)
    for i, clip in enumerate(clips):
        padded[i, : len(clip)] = clip
        mask[i, : len(clip)] = 1
    with torch.no_grad():
        batched = model(padded, attention_mask=mask).logits[:, 0]
        single = torch.cat([model(clip[None]).logits[:, 0] for clip in clips])
    torch.testing.assert_close(batched, single, atol=1e-5, rtol=1e-5)


def test_forward_rejects_bad_input(model):
    bad = _noise(2, 1_000)
    bad[0, 3] = float("inf")
    with pytest.raises(ValueError, match="NaN or inf"):
        model(bad)
    with pytest.raises(ValueError, match=r"\[B, N\] or \[B, C, N\]"):
        model(torch.zeros(1_000))
    with pytest.raises(ValueError, match="50 Hz"):
        model(_noise(1, 1_000), sampling_rate=50)
    with pytest.raises(ValueError, match="no text input"):
        model(_noise(1, 1_000), input_ids=torch.ones(1, 3, dtype=torch.long))


def test_text_conditioned_model(tmp_path):
    model = AutoModelForAudioClassification.from_pretrained(save_tiny_music_reward(tmp_path, text_conditioned=True))
    audio = _noise(2, 8_000)
    with pytest.raises(ValueError, match="tokenize_prompts"):
        model(audio)
    with torch.no_grad():
        calm = model(audio, **model.tokenize_prompts(["calm piano", "calm piano"])).logits
        metal = model(audio, **model.tokenize_prompts(["heavy metal with screaming guitars"] * 2)).logits
        mixed = model(audio, **model.tokenize_prompts(["calm piano", "heavy metal with screaming guitars"])).logits
    assert not torch.allclose(calm, metal)
    # Padding the shorter prompt in a batch does not change its score.
    torch.testing.assert_close(mixed, torch.stack([calm[0], metal[1]]))


# saving, Auto classes ------------------------------------------------------------------------------------------------


def test_save_writes_safetensors_and_feature_extractor_only(reward_dir):
    files = set(os.listdir(reward_dir))
    assert {"config.json", "model.safetensors", "preprocessor_config.json"} <= files
    assert not any(name.endswith((".bin", ".pt", ".pth")) for name in files)
    with open(os.path.join(reward_dir, "config.json")) as handle:
        assert json.load(handle)["model_type"] == "music_reward"
    assert isinstance(AutoFeatureExtractor.from_pretrained(reward_dir), MusicRewardFeatureExtractor)


def test_auto_round_trip_in_fresh_subprocess(reward_dir, model):
    audio = _noise(2, 8_000, seed=8)
    with torch.no_grad():
        expected = model(audio).logits[:, 0].tolist()
    script = textwrap.dedent(
        f"""
        import json, torch
        import musicrl_trl.reward_models  # registers music_reward with the Auto classes
        from transformers import AutoModelForAudioClassification
        model = AutoModelForAudioClassification.from_pretrained({reward_dir!r}).eval()
        audio = 0.1 * torch.randn(2, 8000, generator=torch.Generator().manual_seed(8))
        with torch.no_grad():
            print(json.dumps([type(model).__name__, model(audio).logits[:, 0].tolist()]))
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    name, scores = json.loads(result.stdout.strip().splitlines()[-1])
    assert name == "MusicRewardModel"
    np.testing.assert_allclose(scores, expected, rtol=1e-5, atol=1e-6)


def test_pipeline_audio_classification_returns_the_score(reward_dir, model):
    classifier = pipeline("audio-classification", model=reward_dir)
    clip = _noise(1, 16_000, seed=9)[0]
    with torch.no_grad():
        expected = model(clip[None]).logits[0, 0].item()
    (result,) = classifier(clip.numpy())
    assert result["label"] == "score"
    assert result["score"] == pytest.approx(expected, rel=1e-5)


def test_pipeline_audio_classification_resamples_other_rates(reward_dir, model):
    # transformers' pipeline resamples with torchaudio, an optional extra since it stopped loading beside newer torch.
    try:
        import torchaudio  # noqa: F401
    except (ImportError, OSError) as error:
        pytest.skip(f"the audio-classification pipeline resamples with torchaudio, not importable here ({error})")
    classifier = pipeline("audio-classification", model=reward_dir)
    clip = _noise(1, 16_000, seed=9)[0]
    # Audio at another rate: the pipeline resamples it to the extractor's 16 kHz before the model.
    clip_48k = resample(clip[None], 16_000, 48_000)[0]
    (result_48k,) = classifier({"raw": clip_48k.numpy(), "sampling_rate": 48_000})
    with torch.no_grad():
        expected_48k = model(clip_48k[None], sampling_rate=48_000).logits[0, 0].item()
    assert result_48k["score"] == pytest.approx(expected_48k, rel=1e-4, abs=1e-4)


def test_feature_extractor_checks_rate_and_pads():
    extractor = MusicRewardFeatureExtractor(sampling_rate=16_000)
    with pytest.raises(ValueError, match=r"expects 16000 Hz audio, received 44100 Hz.*resample"):
        extractor(np.zeros(10), sampling_rate=44_100)
    batch = extractor([np.ones(3), np.ones(5)], sampling_rate=16_000, return_tensors="pt")
    assert batch["input_values"].shape == (2, 5) and batch["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1] * 5]


# pretrained backbones ------------------------------------------------------------------------------------------------


def test_from_backbone_clap(clap_dir, tmp_path):
    model = MusicRewardModel.from_backbone(clap_dir, hidden_size=16).eval()
    config = model.config
    assert (
        config.backbone_type == "clap_audio_model" and config.sampling_rate == 48_000 and config.max_length_s == 10.0
    )
    tower = ClapAudioModelWithProjection.from_pretrained(clap_dir).eval()
    for name, value in tower.state_dict().items():
        assert torch.equal(model.backbone.state_dict()[name], value), name
    # A 4 s clip at 48 kHz: one window, repeat-padded like ClapFeatureExtractor does; the head reads CLAP's
    # normalised audio embedding.
    clip = _noise(1, 192_000, seed=10)
    settings = ClapFeatureSettings.from_feature_extractor(ClapFeatureExtractor.from_pretrained(clap_dir))
    with torch.no_grad():
        embedding = model.embed_audio(clip, sampling_rate=48_000)
        expected = torch.nn.functional.normalize(
            tower(input_features=clap_features(clip, settings)).audio_embeds, dim=-1
        )
        torch.testing.assert_close(embedding, expected)
        # 25 s at 32 kHz: resampled, cut into 10 s windows (0, 10, 15 s), embeddings averaged.
        long_clip = _noise(2, 25 * 32_000, seed=11)
        assert model(long_clip, sampling_rate=32_000).logits.shape == (2, 1)
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForAudioClassification.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(
            reloaded(clip, sampling_rate=48_000).logits, model(clip, sampling_rate=48_000).logits
        )


def test_from_backbone_ast(ast_dir):
    model = MusicRewardModel.from_backbone(ast_dir, hidden_size=16).eval()
    config = model.config
    assert config.backbone_type == "audio-spectrogram-transformer" and config.sampling_rate == 16_000
    assert config.max_length_s == pytest.approx(0.025 + 127 * 0.010)
    encoder = ASTForAudioClassification.from_pretrained(ast_dir).audio_spectrogram_transformer.eval()
    clip = _noise(1, 16_000, seed=12)  # 1 s, within the 1.295 s context: one window, zero-padded to 128 frames
    extractor = ASTFeatureExtractor.from_pretrained(ast_dir)
    with torch.no_grad():
        features = extractor(list(clip.numpy()), sampling_rate=16_000, return_tensors="pt")["input_values"]
        torch.testing.assert_close(model.embed_audio(clip), encoder(features).pooler_output, atol=1e-4, rtol=1e-4)
        assert model(_noise(3, 40_000, seed=13)).logits.shape == (3, 1)  # 2.5 s: two windows each


def test_from_backbone_rejects_other_models(reward_dir):
    with pytest.raises(ValueError, match="supported backbones are CLAP"):
        MusicRewardModel.from_backbone(reward_dir)
