"""MusicTokenPreferenceModel: built from MusicGen, checked against MusicGen's own forward, saved, reloaded, trained."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from datasets import Dataset
from transformers import (
    AutoConfig,
    AutoModelForSequenceClassification,
    MusicgenForConditionalGeneration,
    MusicgenProcessor,
)

from musicrl_trl import codebooks
from musicrl_trl.reward_models.token_preference import (
    MusicTokenPreferenceConfig,
    MusicTokenPreferenceModel,
    register_token_preference,
)
from musicrl_trl.testing import save_tiny_musicgen, tiny_musicgen, tiny_musicgen_config
from musicrl_trl.trainers.reward_config import AudioRewardConfig
from musicrl_trl.trainers.reward_trainer import AudioRewardTrainer

PROMPTS = ["calm piano", "loud drums and a distorted bass line"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def musicgen():
    return tiny_musicgen(num_codebooks=4, seed=0)


def _reference_logits(model, musicgen, prompt, codes, pooling):
    """Slow reference: MusicGen's own forward over the delayed grid, then the head on its last hidden states."""
    grid = codebooks.codes_to_grid(codes, musicgen.config.decoder.pad_token_id, musicgen.config.decoder.audio_channels)
    output = musicgen(**prompt, decoder_input_ids=grid.reshape(-1, grid.shape[-1]), output_hidden_states=True)
    hidden = output.decoder_hidden_states[-1]  # [B, S, H]; column 0 holds no code
    pooled = hidden[:, -1] if pooling == "last" else hidden[:, 1:].mean(dim=1)
    return model.score(pooled)


@pytest.mark.parametrize("pooling", ["mean", "last"])
def test_from_musicgen_matches_musicgen_forward(musicgen, pooling):
    generator, processor = musicgen
    model = MusicTokenPreferenceModel.from_musicgen(generator, pooling=pooling).eval()
    prompt = processor.tokenizer(PROMPTS, padding=True, return_tensors="pt")
    codes = torch.randint(0, 2048, (2, 4, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(**prompt, codes=codes).logits
        reference = _reference_logits(model, generator, prompt, codes, pooling)
    assert logits.shape == (2, 1)
    torch.testing.assert_close(logits, reference, atol=1e-6, rtol=1e-5)
    # The generator is left as it was: its weights were copied, not moved.
    assert model.decoder.decoder.layers[0].self_attn.q_proj.weight.data_ptr() != (
        generator.decoder.model.decoder.layers[0].self_attn.q_proj.weight.data_ptr()
    )


def test_projection_and_stereo_layouts_match_musicgen():
    # A text encoder narrower than the decoder (as T5-base 768 -> 1024 in musicgen-small) needs enc_to_dec_proj;
    # stereo MusicGen interleaves left/right codebooks that share a delay.
    config = tiny_musicgen_config(num_codebooks=8, audio_channels=2)
    config.text_encoder.d_model = 16
    torch.manual_seed(0)
    generator = MusicgenForConditionalGeneration(config).eval()
    _, processor = tiny_musicgen()
    model = MusicTokenPreferenceModel.from_musicgen(generator).eval()
    assert model.enc_to_dec_proj is not None
    torch.testing.assert_close(model.enc_to_dec_proj.weight, generator.enc_to_dec_proj.weight)
    prompt = processor.tokenizer(PROMPTS, padding=True, return_tensors="pt")
    codes = torch.randint(0, 2048, (2, 8, 6))
    with torch.no_grad():
        torch.testing.assert_close(
            model(**prompt, codes=codes).logits, _reference_logits(model, generator, prompt, codes, "mean")
        )


@pytest.mark.parametrize("pooling", ["mean", "last"])
def test_padded_frames_do_not_change_scores(musicgen, pooling):
    generator, processor = musicgen
    model = MusicTokenPreferenceModel.from_musicgen(generator, pooling=pooling).eval()
    lengths = [5, 9, 7]
    clips = [torch.randint(0, 2048, (1, 4, length)) for length in lengths]
    prompt = processor.tokenizer(["a", "bb", "ccc"], padding=True, return_tensors="pt")
    batch = torch.full((3, 4, max(lengths)), 7)  # padded frames hold arbitrary codes: the mask must hide them
    mask = torch.zeros(3, max(lengths), dtype=torch.long)
    for row, clip in enumerate(clips):
        batch[row, :, : lengths[row]] = clip[0]
        mask[row, : lengths[row]] = 1
    with torch.no_grad():
        batched = model(**prompt, codes=batch, codes_attention_mask=mask).logits
        one_by_one = torch.cat(
            [
                model(
                    prompt["input_ids"][row : row + 1, : int(prompt["attention_mask"][row].sum())], codes=clip
                ).logits
                for row, clip in enumerate(clips)
            ]
        )
    torch.testing.assert_close(batched, one_by_one, atol=1e-5, rtol=1e-5)


def test_prompt_matters_and_no_prompt_is_the_null_condition(musicgen):
    generator, processor = musicgen
    model = MusicTokenPreferenceModel.from_musicgen(generator).eval()
    with torch.no_grad():
        model.score.weight.normal_()  # a fresh head's 0.02-std weights make every score nearly 0
    codes = torch.randint(0, 2048, (1, 4, 10)).expand(2, -1, -1)
    prompt = processor.tokenizer(PROMPTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        conditional = model(**prompt, codes=codes).logits
        unconditional = model(codes=codes).logits
    assert torch.isfinite(unconditional).all()
    assert not torch.allclose(conditional[0], conditional[1])  # same codes, different prompts
    assert torch.allclose(unconditional[0], unconditional[1])


def test_labels_give_mse_and_bad_inputs_say_what_to_pass(musicgen):
    model = MusicTokenPreferenceModel.from_musicgen(musicgen[0])
    codes = torch.randint(0, 2048, (2, 4, 5))
    output = model(codes=codes, labels=torch.tensor([1.0, 3.0]))
    torch.testing.assert_close(output.loss, ((output.logits.squeeze(-1) - torch.tensor([1.0, 3.0])) ** 2).mean())
    with pytest.raises(ValueError, match="pass `codes`"):
        model(input_ids=torch.ones(1, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="codes have 2 codebooks but the model reads 4"):
        model(codes=codes[:, :2])
    with pytest.raises(ValueError, match="num_labels must be 1"):
        MusicTokenPreferenceConfig(num_labels=2)
    with pytest.raises(TypeError, match="MusicgenForConditionalGeneration or a checkpoint"):
        MusicTokenPreferenceModel.from_musicgen(model)


def test_save_and_reload_round_trip_safetensors_only(musicgen, tmp_path):
    generator, processor = musicgen
    model = MusicTokenPreferenceModel.from_musicgen(generator, pooling="last").eval()
    with torch.no_grad():
        model.score.weight.normal_()
    model.save_pretrained(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["config.json", "model.safetensors"]

    prompt = processor.tokenizer(PROMPTS, padding=True, return_tensors="pt")
    codes = torch.randint(0, 2048, (2, 4, 8))
    with torch.no_grad():
        expected = model(**prompt, codes=codes).logits
        reloaded = MusicTokenPreferenceModel.from_pretrained(tmp_path).eval()
        torch.testing.assert_close(reloaded(**prompt, codes=codes).logits, expected)
        assert reloaded.config.pooling == "last" and reloaded.scores_codes

        register_token_preference()
        register_token_preference()  # idempotent
        assert isinstance(AutoConfig.from_pretrained(tmp_path), MusicTokenPreferenceConfig)
        auto = AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
        assert isinstance(auto, MusicTokenPreferenceModel)
        torch.testing.assert_close(auto(**prompt, codes=codes).logits, expected)


def _code_pairs(num_pairs: int, seed: int) -> Dataset:
    """Separable token-space preferences: chosen codes come from [0, 1024), rejected ones from [1024, 2048)."""
    rng = np.random.default_rng(seed)
    rows: dict[str, list] = {"prompt": [], "chosen_codes": [], "rejected_codes": []}
    for _ in range(num_pairs):
        frames = int(rng.integers(6, 14))
        rows["prompt"].append(str(rng.choice(["calm piano", "fast techno", "a sad violin"])))
        rows["chosen_codes"].append(rng.integers(0, 1024, (4, frames)).tolist())
        rows["rejected_codes"].append(rng.integers(1024, 2048, (4, frames + int(rng.integers(-3, 4)))).tolist())
    return Dataset.from_dict(rows)


def test_trainer_learns_separable_token_preferences(musicgen, tmp_path):
    generator, processor = musicgen
    torch.manual_seed(0)  # the scalar head's init
    model = MusicTokenPreferenceModel.from_musicgen(generator)
    initial = {name: param.detach().clone() for name, param in model.named_parameters()}
    args = AudioRewardConfig(
        output_dir=str(tmp_path),
        per_device_train_batch_size=16,
        num_train_epochs=3,  # reached 100 % held-out accuracy for 8 of 8 head seeds
        learning_rate=3e-3,
        logging_steps=4,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
    )
    trainer = AudioRewardTrainer(
        model=model,
        args=args,
        train_dataset=_code_pairs(128, 0),
        eval_dataset=_code_pairs(64, 1),
        processing_class=processor,
    )
    assert trainer.input_kind == "codes" and trainer.mode == "pairwise"
    before = trainer.evaluate()["eval_accuracy"]
    trainer.train()
    after = trainer.evaluate()["eval_accuracy"]
    assert after > 0.9 and after > before, (before, after)
    changed = [name for name, param in model.named_parameters() if not torch.equal(param, initial[name])]
    assert any(name.startswith("decoder.") for name in changed) and "score.weight" in changed
    assert any(name.startswith("text_encoder.") for name in changed)  # the prompt reaches the loss

    trainer.save_model(str(tmp_path / "model"))
    assert "model.safetensors" in os.listdir(tmp_path / "model")


def test_trainer_builds_the_token_model_from_a_musicgen_checkpoint(tmp_path):
    path = save_tiny_musicgen(tmp_path / "musicgen")
    args = AudioRewardConfig(output_dir=str(tmp_path / "out"), max_steps=1, report_to="none", disable_tqdm=True)
    trainer = AudioRewardTrainer(model=path, args=args, train_dataset=_code_pairs(4, 0))
    assert isinstance(trainer.model, MusicTokenPreferenceModel)
    assert isinstance(trainer.processing_class, MusicgenProcessor)
    assert trainer.model.config.base_model_name_or_path == path
    batch = trainer.data_collator([trainer.train_dataset[0], trainer.train_dataset[1]])
    assert batch["codes"].shape[:2] == (4, 4) and batch["prompt_input_ids"].shape[0] == 4
    assert batch["codes"][batch["codes_attention_mask"][:, None, :].expand_as(batch["codes"]) == 0].eq(2048).all()
    trainer.train()
