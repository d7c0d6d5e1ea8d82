"""Value-free baselines (RLOO, group mean) and the KL target: advantages against slow loops, no value network,
prompt groups kept whole per process, shared text encodings, the KL controller and its resume, learning."""

import types

import pytest
import torch
from datasets import Dataset
from transformers import TrainerCallback

from musicrl_trl.rollout import generate_rollout
from musicrl_trl.testing import tiny_musicgen
from musicrl_trl.trainers import MusicPPOConfig, MusicPPOTrainer
from musicrl_trl.trainers.advantages import group_advantages

PROMPTS = ["bright shimmering bells", "deep dark bass", "happy upbeat tune", "slow sad piano"]


def loudness(prompts, audio, sampling_rate, codes, **kwargs):
    return audio.pow(2).mean((1, 2)).sqrt()


def config(tmp_path, **overrides):
    settings = dict(
        output_dir=str(tmp_path / "run"), per_device_train_batch_size=8, total_episodes=16, response_length=10,
        learning_rate=1e-2, report_to=[], disable_tqdm=True, seed=0, baseline="rloo", num_generations=4,
    )
    settings.update(overrides)
    return MusicPPOConfig(**settings)


# ---------------------------------------------------------------- advantages against slow loops
def slow_group_advantages(returns, mask, group_size, baseline, scale):
    advantages = []
    for i, value in enumerate(returns.tolist()):
        start = i - i % group_size
        members = [j for j in range(start, start + group_size) if mask[j]]
        if not mask[i] or len(members) < 2:
            advantages.append(0.0)
            continue
        group = [returns[j].item() for j in members]
        if baseline == "rloo":
            others = [returns[j].item() for j in members if j != i]
            advantages.append(value - sum(others) / len(others))
        else:
            mean = sum(group) / len(group)
            std = (sum((g - mean) ** 2 for g in group) / (len(group) - 1)) ** 0.5
            advantages.append((value - mean) / (std + 1e-6) if scale else value - mean)
    return torch.tensor(advantages, dtype=torch.float64)


@pytest.mark.parametrize(("baseline", "scale"), [("rloo", False), ("group_mean", False), ("group_mean", True)])
@pytest.mark.parametrize("seed", range(3))
def test_group_advantages_match_the_slow_loop(baseline, scale, seed):
    generator = torch.Generator().manual_seed(seed)
    returns = torch.randn(12, generator=generator, dtype=torch.float64)
    mask = torch.rand(12, generator=generator) > 0.25
    mask[8:11] = False  # a group of 4 with one kept clip: nothing to compare with
    returns[~mask] = float("nan")  # what a non-finite reward leaves behind never enters a baseline
    expected = slow_group_advantages(returns, mask, 4, baseline, scale)
    actual = group_advantages(returns, mask, 4, baseline, scale)
    torch.testing.assert_close(actual, expected, rtol=1e-9, atol=1e-12)
    assert actual[8:12].abs().sum() == 0
    with pytest.raises(ValueError, match="do not split into groups of 5"):
        group_advantages(returns, mask, 5, baseline)


# ---------------------------------------------------------------- no value network, groups, shared encodings
def test_value_free_baselines_build_save_and_push_no_value_network(tmp_path):
    model, processor = tiny_musicgen()
    args = config(tmp_path, save_strategy="steps", save_steps=1, total_episodes=8, vf_coef=0.5)
    trainer = MusicPPOTrainer(args, processor, model, reward_model=loudness, train_dataset=Dataset.from_dict(
        {"prompt": PROMPTS}))  # fmt: skip
    wrapper = trainer.accelerator.unwrap_model(trainer.model)
    assert wrapper.value_model is None and trainer.value_model is None
    assert not [name for name, _ in wrapper.named_parameters() if not name.startswith("policy.")]
    trainer.train()
    checkpoint = tmp_path / "run" / "checkpoint-1"
    assert checkpoint.is_dir() and not (checkpoint / "value_model.safetensors").exists()
    (log,) = [entry for entry in trainer.state.log_history if "objective/scores" in entry]
    assert "loss/value_avg" not in log and log["objective/kl_coef"] == 0.05
    assert "value_model.safetensors" not in trainer._hub_files("full")
    trainer._resume(str(checkpoint))  # a value-free checkpoint resumes without a value file


def test_value_free_baselines_need_groups(tmp_path):
    with pytest.raises(ValueError, match="num_generations to 2 or more"):
        config(tmp_path, num_generations=1)
    model, processor = tiny_musicgen()
    with pytest.raises(ValueError, match="not a multiple of num_generations=3"):
        MusicPPOTrainer(config(tmp_path, num_generations=3), processor, model, reward_model=loudness,
                        train_dataset=Dataset.from_dict({"prompt": PROMPTS}))  # fmt: skip


def test_each_process_samples_whole_groups_of_distinct_prompts():
    # The prompt arithmetic of two processes, read without launching them (the 2-rank runs are in test_distributed).
    prompts = [f"prompt {i}" for i in range(10)]
    args = types.SimpleNamespace(local_batch_size=8, num_generations=4, world_size=2, seed=0)
    ranks = [
        types.SimpleNamespace(
            args=args, train_dataset=Dataset.from_dict({"prompt": prompts}), train_dataset_len=len(prompts),
            accelerator=types.SimpleNamespace(process_index=rank),
        )
        for rank in range(2)
    ]
    seen = []
    for update in range(5):  # 5 updates x 2 processes x 2 prompts = two passes over the 10 prompts
        batches = [MusicPPOTrainer._prompt_batch(rank, update) for rank in ranks]
        assert [len(batch) for batch in batches] == [2, 2]
        seen += [prompt for batch in batches for prompt in batch]
    assert sorted(seen[:10]) == sorted(prompts) and sorted(seen[10:]) == sorted(prompts)


def test_the_clips_of_a_prompt_share_one_text_encoding_and_sample_as_repeated_prompts():
    model, processor = tiny_musicgen()
    encoded = []
    hook = model.text_encoder.register_forward_hook(
        lambda module, args, kwargs, output: encoded.append(len(kwargs["input_ids"])), with_kwargs=True
    )
    torch.manual_seed(0)
    grouped = generate_rollout(model, processor, PROMPTS[:2], num_steps=8, num_generations=3)
    hook.remove()
    assert encoded == [2]  # two distinct prompts, six clips
    assert grouped.prompts == [PROMPTS[0]] * 3 + [PROMPTS[1]] * 3 and grouped.codes.shape[0] == 6
    torch.manual_seed(0)
    repeated = generate_rollout(model, processor, [PROMPTS[0]] * 3 + [PROMPTS[1]] * 3, num_steps=8)
    torch.testing.assert_close(grouped.logprobs, repeated.logprobs, rtol=1e-5, atol=1e-5)
    assert torch.equal(grouped.prompt_ids, repeated.prompt_ids)


# ---------------------------------------------------------------- the KL target
def test_kl_controller_follows_ziegler_et_al():
    args = types.SimpleNamespace(kl_target=10.0, kl_horizon=None, batch_size=16)
    trainer = types.SimpleNamespace(args=args, kl_coef=0.1)
    step = MusicPPOTrainer._adapted_kl_coef
    assert step(trainer, 10.0) == pytest.approx(0.1)  # on target: unchanged
    assert step(trainer, 11.0) == pytest.approx(0.1 * 1.1)  # proportional, horizon one batch
    assert step(trainer, 100.0) == pytest.approx(0.1 * 1.2)  # the error is clipped to +-0.2
    assert step(trainer, 0.0) == pytest.approx(0.1 * 0.8)
    args.kl_horizon = 64
    assert step(trainer, 100.0) == pytest.approx(0.1 * 1.05)
    with pytest.raises(ValueError, match="kl_target must be > 0"):
        MusicPPOConfig(output_dir="unused", kl_target=0.0)


class StopAt(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        control.should_training_stop = state.global_step >= self.step
        return control


def test_the_kl_coefficient_moves_is_saved_and_resumes(tmp_path):
    def run(name, resume=None, callbacks=None):
        model, processor = tiny_musicgen()
        args = config(tmp_path, output_dir=str(tmp_path / name), baseline="value", num_generations=1, kl_target=1.0,
                      kl_horizon=8, total_episodes=32, save_strategy="steps", save_steps=2)  # fmt: skip
        trainer = MusicPPOTrainer(args, processor, model, reward_model=loudness, callbacks=callbacks,
                                  train_dataset=Dataset.from_dict({"prompt": PROMPTS}))  # fmt: skip
        trainer.train(resume_from_checkpoint=resume)
        return [entry["objective/kl_coef"] for entry in trainer.state.log_history if "objective/kl_coef" in entry]

    full = run("full")
    assert full[0] == 0.05 and full[1] < full[0]  # the first update has KL 0 < target: the coefficient falls
    assert full[-1] > full[1]  # then the policy moves past the 1-nat budget and it rises
    run("resumed", callbacks=[StopAt(2)])
    resumed = run("resumed", resume=True)
    assert resumed == pytest.approx(full, rel=1e-6)


# ---------------------------------------------------------------- learning
class CodeDirection:
    """How far the sampled codes of codebook 0 lie along one direction of the codec's embedding space."""

    __name__ = "code_direction"

    def __init__(self, model):
        embed = model.audio_encoder.quantizer.layers[0].codebook.embed
        direction = torch.randn(embed.shape[-1], generator=torch.Generator().manual_seed(0))
        self.code_scores = embed @ direction / direction.norm()

    def __call__(self, prompts, audio, sampling_rate, codes, **kwargs):
        return self.code_scores.to(codes.device)[codes[:, 0]].mean(-1)


@pytest.mark.parametrize("baseline", ["rloo", "group_mean"])
def test_a_reward_improves_with_a_value_free_baseline(tmp_path, baseline):
    model, processor = tiny_musicgen()
    args = config(tmp_path, baseline=baseline, total_episodes=8 * 12, response_length=12, learning_rate=3e-3,
                  kl_coef=0.01)  # fmt: skip
    trainer = MusicPPOTrainer(args, processor, model, reward_model=CodeDirection(model),
                              train_dataset=Dataset.from_dict({"prompt": PROMPTS * 4}))  # fmt: skip
    trainer.train()
    scores = [entry["objective/scores"] for entry in trainer.state.log_history if "objective/scores" in entry]
    first, last = sum(scores[:3]) / 3, sum(scores[-3:]) / 3
    assert last > first + 0.5 * abs(first) + 0.05, scores


def test_training_plots_name_each_runs_baseline_and_kl_budget(tmp_path):
    import json

    from musicrl_trl.evaluation.reports import run_label

    for name, training in [("a", {"baseline": "rloo", "num_generations": 4, "kl_target": 10.0, "kl_coef": 0.05}),
                           ("b", {"baseline": "value", "num_generations": 1, "kl_target": None, "kl_coef": 0.05})]:
        (tmp_path / name).mkdir()
        (tmp_path / name / "run_config.json").write_text(json.dumps({"training": training}))  # fmt: skip
    assert run_label(str(tmp_path / "a")) == "a (rloo x4, KL target 10)"
    assert run_label(str(tmp_path / "b" / "log_history.json")) == "b (value, kl_coef 0.05)"
    (tmp_path / "c").mkdir()
    assert run_label(str(tmp_path / "c")) == "c"  # no run_config.json: the folder's name
