"""Gradient checkpointing and mixed precision reach the model through MusicPPOConfig and leave the losses unchanged
(checkpointing: to float32 round-off; bf16 autocast: to bf16's ~3 significant digits)."""

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig

from musicrl_trl.testing import tiny_musicgen
from musicrl_trl.trainers import MusicPPOConfig, MusicPPOTrainer

PROMPTS = ["bright shimmering bells", "deep dark bass", "happy upbeat tune", "slow sad piano"]
LORA = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"])


def loudness(prompts, audio, sampling_rate, codes, **kwargs):
    return audio.pow(2).mean((1, 2)).sqrt()


def first_update(tmp_path, peft_config=None, **overrides):
    """Losses of one update from a fixed seed (same prompts, same samples), and the trainer."""
    model, processor = tiny_musicgen()
    settings = dict(
        output_dir=str(tmp_path / "run"),
        per_device_train_batch_size=4,
        total_episodes=4,
        response_length=12,
        learning_rate=1e-3,
        report_to=[],
        disable_tqdm=True,
        seed=0,
        use_cpu=True,
        plot_training_curves=False,
        guidance_scale=3.0,
    )
    settings.update(overrides)
    trainer = MusicPPOTrainer(
        MusicPPOConfig(**settings),
        processor,
        model,
        reward_model=loudness,
        train_dataset=Dataset.from_dict({"prompt": PROMPTS}),
        peft_config=peft_config,
    )
    trainer.train()
    (log,) = [entry for entry in trainer.state.log_history if "loss/value_avg" in entry]
    return log, trainer


@pytest.mark.parametrize("peft_config", [None, LORA], ids=["full", "lora"])
def test_gradient_checkpointing_gives_the_same_losses_and_update(tmp_path, peft_config):
    # Plain SGD: Adam's first step moves every parameter by +-lr whatever the size of its gradient, so the last-bit
    # differences between a recomputed and a stored forward would flip whole steps of near-zero gradients (such as
    # the KL term's at KL = 0) and hide whether the gradients agree.
    plain, plain_trainer = first_update(tmp_path, peft_config, optim="sgd")
    checkpointed, trainer = first_update(tmp_path, peft_config, gradient_checkpointing=True, optim="sgd")
    wrapper = trainer.accelerator.unwrap_model(trainer.model)
    layers = (
        wrapper.policy.get_base_model().decoder.model.decoder.layers
        if peft_config
        else (wrapper.policy.decoder.model.decoder.layers)
    )
    assert all(layer.gradient_checkpointing for layer in layers)
    assert all(layer.gradient_checkpointing for layer in wrapper.value_model.backbone.decoder.model.decoder.layers)
    assert checkpointed["objective/scores"] == plain["objective/scores"]  # rollouts unaffected (eval mode, KV cache)
    for name in ("loss/policy_avg", "loss/value_avg", "objective/kl"):
        assert checkpointed[name] == pytest.approx(plain[name], rel=1e-5, abs=1e-6), name
    after = dict(plain_trainer.accelerator.unwrap_model(plain_trainer.model).named_parameters())
    for name, param in wrapper.named_parameters():
        torch.testing.assert_close(param, after[name], rtol=1e-5, atol=1e-6, msg=name)


def test_bf16_autocast_gives_the_same_losses_within_bf16_precision(tmp_path):
    full, _ = first_update(tmp_path)
    mixed, trainer = first_update(tmp_path, bf16=True)
    assert trainer.accelerator.mixed_precision == "bf16" and trainer.accelerator.native_amp
    assert mixed["objective/scores"] == full["objective/scores"]  # the rollout samples in float32 either way
    # bf16 keeps 8 bits of mantissa (relative error ~4e-3 per op) and the rollout's log-probs are float32, so:
    # the value loss within 5 % (measured 0.7 %) and the policy loss (a mean of whitened advantages x ratio, 0 in
    # float32) within 0.02 absolute (measured 2e-3).
    assert mixed["loss/value_avg"] == pytest.approx(full["loss/value_avg"], rel=5e-2)
    assert mixed["loss/policy_avg"] == pytest.approx(full["loss/policy_avg"], abs=2e-2)
    # The "old" log-probs are recomputed in the training precision: the first ratio is 1 under bf16 too (against the
    # rollout's float32 log-probs it moved by up to 0.16 per step).
    assert full["policy/first_ratio_max_error"] < 1e-4 and mixed["policy/first_ratio_max_error"] < 1e-4
    assert mixed["val/ratio"] == pytest.approx(1.0, abs=1e-4)
    # The anchor runs under the same autocast as the policy, so before the first update the KL is still 0.
    assert mixed["objective/kl"] == pytest.approx(0.0, abs=1e-6)


def test_fp16_on_cpu_is_a_clear_error(tmp_path):
    model, processor = tiny_musicgen()
    with pytest.raises(ValueError, match="fp16 mixed precision needs a GPU"):
        MusicPPOTrainer(
            MusicPPOConfig(output_dir=str(tmp_path), fp16=True, use_cpu=True, report_to=[]),
            processor,
            model,
            reward_model=loudness,
            train_dataset=Dataset.from_dict({"prompt": PROMPTS}),
        )
