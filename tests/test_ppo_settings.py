"""MusicPPOTrainer under the settings a TRL user changes: gradient clipping, dropped rewards, KL estimators, batch
arithmetic, mixed precision, step intervals given as ratios, logging intervals, evaluation."""

import math

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


def nan_for_bells(prompts, audio, sampling_rate, codes, **kwargs):
    """Loudness, but NaN for every clip of the first prompt (a reward model that fails on some inputs)."""
    scores = loudness(prompts, audio, sampling_rate, codes)
    return torch.where(torch.tensor([p == PROMPTS[0] for p in prompts]), float("nan"), scores)


def config(tmp_path, **overrides):
    settings = dict(
        output_dir=str(tmp_path / "run"), per_device_train_batch_size=4, total_episodes=4, response_length=10,
        learning_rate=1e-2, report_to=[], disable_tqdm=True, seed=0,
    )
    settings.update(overrides)
    return MusicPPOConfig(**settings)


def prompts(n=8):
    return Dataset.from_dict({"prompt": (PROMPTS * n)[:n]})


def trainable_weights(trainer):
    wrapper = trainer.accelerator.unwrap_model(trainer.model)
    return {name: param.detach().clone() for name, param in wrapper.named_parameters() if param.requires_grad}


def distance(before, after):
    return math.sqrt(sum((after[name] - before[name]).double().pow(2).sum().item() for name in before))


def metric_logs(trainer):
    return [entry for entry in trainer.state.log_history if "objective/scores" in entry]


def test_max_grad_norm_bounds_an_sgd_step_and_is_logged(tmp_path):
    # With SGD a step moves the weights by lr x the (clipped) gradient norm: at most lr x max_grad_norm = 1e-5.
    moved = {}
    for max_grad_norm in (1e-3, None):
        model, processor = tiny_musicgen()
        trainer = MusicPPOTrainer(
            config(tmp_path, optim="sgd", max_grad_norm=max_grad_norm), processor, model, reward_model=loudness,
            train_dataset=prompts(),
        )
        before = trainable_weights(trainer)
        trainer.train()
        moved[max_grad_norm] = distance(before, trainable_weights(trainer))
        (log,) = metric_logs(trainer)
        assert log["grad_norm"] > 1e-3  # measured before clipping, clipped or not
    assert moved[1e-3] <= 1e-2 * 1e-3 * 1.01  # float32 weights: each update rounds to the weight's last bit
    assert moved[None] > 10 * moved[1e-3]


def test_a_mini_batch_of_dropped_rewards_skips_its_step_and_keeps_weights_finite(tmp_path):
    model, processor = tiny_musicgen()
    args = config(tmp_path, per_device_train_batch_size=1, num_mini_batches=4, total_episodes=8,
                  drop_nonfinite_rewards=True, max_grad_norm=None)  # fmt: skip
    # Four prompts, four rollouts per update: each update holds the bells' prompt once.
    trainer = MusicPPOTrainer(args, processor, model, reward_model=nan_for_bells, train_dataset=prompts(4))
    trainer.train()
    wrapper = trainer.accelerator.unwrap_model(trainer.model)
    assert all(torch.isfinite(param).all() for param in wrapper.parameters())
    logs = metric_logs(trainer)
    assert [log["objective/dropped_samples"] for log in logs] == [1, 1]
    assert [log["objective/skipped_steps"] for log in logs] == [1, 1]  # the bells' mini-batch, in each update
    assert all(math.isfinite(log["loss/policy_avg"]) and math.isfinite(log["grad_norm"]) for log in logs)


@pytest.mark.parametrize("estimator", ["k1", "k3"])
def test_one_sample_kl_estimators_are_refused_as_a_loss_term(tmp_path, estimator):
    with pytest.raises(ValueError, match=rf"kl_estimator='{estimator}' cannot be a loss term.*kl_estimator='full'"):
        config(tmp_path, kl_estimator=estimator)
    assert config(tmp_path, kl_estimator=estimator, kl_penalty="reward").kl_estimator == estimator


def test_one_optimizer_step_per_mini_batch_of_accumulated_micro_batches(tmp_path):
    model, processor = tiny_musicgen()
    args = config(tmp_path, per_device_train_batch_size=2, gradient_accumulation_steps=2, num_mini_batches=2,
                  num_ppo_epochs=2, total_episodes=16, lam=0.95)  # fmt: skip
    trainer = MusicPPOTrainer(args, processor, model, reward_model=loudness, train_dataset=prompts())
    assert (args.local_mini_batch_size, args.local_batch_size, args.batch_size, args.num_total_batches) == (4, 8, 8, 2)
    steps, forwards = [], []
    step = trainer.optimizer.step
    trainer.optimizer.step = lambda *a, **k: (steps.append(trainer.state.global_step), step(*a, **k))[1]
    trainer.model.register_forward_hook(lambda module, inputs, output: forwards.append(inputs[2].shape[0]))
    trainer.train()
    assert steps == [0] * 4 + [1] * 4  # num_ppo_epochs x num_mini_batches steps in each update
    rollout_forwards = [size for size in forwards if size == 2]  # micro-batches (no-grad passes see all 8)
    assert len(rollout_forwards) == 2 * 2 * 2 * 2  # updates x epochs x mini-batches x micro-batches


def test_bf16_first_ratio_is_one_in_the_single_pass(tmp_path):
    model, processor = tiny_musicgen()
    args = config(tmp_path, bf16=True, use_cpu=True, total_episodes=8)
    trainer = MusicPPOTrainer(args, processor, model, reward_model=loudness, train_dataset=prompts())
    trainer.train()
    for log in metric_logs(trainer):
        assert log["policy/first_ratio_max_error"] < 1e-4
        assert log["policy/clipfrac_avg"] == 0  # the clip never fires in MusicRL's single pass


def test_bf16_evaluation_kl_is_zero_before_training(tmp_path):
    model, processor = tiny_musicgen()
    args = config(tmp_path, bf16=True, use_cpu=True, eval_num_samples_per_prompt=2)
    for peft_config in (None, LORA):
        trainer = MusicPPOTrainer(args, processor, model, reward_model=loudness, train_dataset=prompts(),
                                  eval_dataset=prompts(2), peft_config=peft_config)  # fmt: skip
        assert abs(trainer.evaluate()["eval/kl"]) < 1e-5
        model, processor = tiny_musicgen()


def test_ratio_steps_and_logging_steps(tmp_path):
    model, processor = tiny_musicgen()
    args = config(tmp_path, total_episodes=16, save_strategy="steps", save_steps=0.5, logging_steps=2)
    trainer = MusicPPOTrainer(args, processor, model, reward_model=loudness, train_dataset=prompts())
    trainer.train()
    assert sorted(p.name for p in (tmp_path / "run").glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    logs = metric_logs(trainer)
    assert [log["step"] for log in logs] == [2, 4]  # every 2nd update, with the mean of the two
    assert all(log["episode"] == 4 * log["step"] for log in logs)


def test_audio_duration_and_response_length_together_are_an_error(tmp_path):
    with pytest.raises(ValueError, match="audio_duration_s=0.5 and response_length=10 both set"):
        config(tmp_path, audio_duration_s=0.5)
