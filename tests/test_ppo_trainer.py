"""MusicPPOTrainer on the tiny offline MusicGen: on-policy consistency, what trains, learning, resume, bad input."""

import json

import numpy as np
import pytest
import torch
from datasets import Dataset
from peft import LoraConfig, PeftModel
from transformers import MusicgenForConditionalGeneration, TrainerCallback, pipeline

from musicrl_trl.rollout import generate_rollout
from musicrl_trl.testing import tiny_musicgen
from musicrl_trl.trainers import MusicPPOConfig, MusicPPOTrainer

PROMPTS = ["bright shimmering bells", "deep dark bass", "happy upbeat tune", "slow sad piano"]
LORA = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"])


def loudness(prompts, audio, sampling_rate, codes, **kwargs):
    return audio.pow(2).mean((1, 2)).sqrt()


class CodeDirection:
    """A simple reward the tiny model can learn fast: how far the sampled codes of codebook 0 lie along one
    direction of the codec's embedding space (the tiny model's logits are tied to that space)."""

    __name__ = "code_direction"

    def __init__(self, model):
        embed = model.audio_encoder.quantizer.layers[0].codebook.embed
        direction = torch.randn(embed.shape[-1], generator=torch.Generator().manual_seed(0))
        self.code_scores = embed @ direction / direction.norm()

    def __call__(self, prompts, audio, sampling_rate, codes, **kwargs):
        return self.code_scores.to(codes.device)[codes[:, 0]].mean(-1)


def make_config(tmp_path, **overrides):
    settings = dict(
        output_dir=str(tmp_path / "run"), per_device_train_batch_size=4, total_episodes=8, response_length=10,
        learning_rate=1e-3, report_to=[], disable_tqdm=True, seed=0,
    )
    settings.update(overrides)
    return MusicPPOConfig(**settings)


def dataset(n=8):
    return Dataset.from_dict({"prompt": (PROMPTS * n)[:n]})


@pytest.mark.parametrize("guidance_scale", [1.0, 3.0])
@pytest.mark.parametrize("use_lora", [False, True])
def test_first_update_is_on_policy_and_kl_starts_at_zero(tmp_path, guidance_scale, use_lora):
    model, processor = tiny_musicgen()
    args = make_config(tmp_path, guidance_scale=guidance_scale, total_episodes=8, top_k=250)
    trainer = MusicPPOTrainer(
        args, processor, model, reward_model=loudness, train_dataset=dataset(), peft_config=LORA if use_lora else None
    )
    assert (trainer.ref_model is None) == use_lora  # LoRA: the adapter-disabled policy is the anchor, no copy
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "objective/kl" in entry]
    assert len(logs) == 2
    for entry in logs:
        assert entry["policy/first_ratio_max_error"] < 1e-4
        assert abs(entry["val/ratio"] - 1) < 1e-4
    assert abs(logs[0]["objective/kl"]) < 1e-6  # before the first update the policy is the anchor
    assert logs[1]["objective/kl"] > 0
    for name in ("objective/scores", "objective/rlhf_reward", "policy/approxkl_avg", "loss/policy_avg",
                 "loss/value_avg", "policy/entropy_q0", "policy/entropy_q3", "rewards/loudness/mean"):
        assert name in logs[0]


def _snapshot(module):
    return {name: param.detach().clone() for name, param in module.named_parameters()}


def test_a_few_steps_change_every_trainable_parameter(tmp_path):
    model, processor = tiny_musicgen()
    args = make_config(tmp_path, learning_rate=1e-2, total_episodes=12)
    trainer = MusicPPOTrainer(args, processor, model, reward_model=loudness, train_dataset=dataset())
    wrapper = trainer.accelerator.unwrap_model(trainer.model)
    before = _snapshot(wrapper)
    trainable = {name for name, param in wrapper.named_parameters() if param.requires_grad}
    assert any(name.startswith("value_model.backbone.decoder") for name in trainable)
    assert not any("text_encoder" in name or "audio_encoder" in name for name in trainable)  # frozen by default
    trainer.train()
    after = _snapshot(wrapper)
    unchanged = [name for name in trainable if torch.equal(before[name], after[name])]
    assert not unchanged, f"trainable parameters that did not change: {unchanged[:5]}"
    frozen_changed = [n for n in before if n not in trainable and not torch.equal(before[n], after[n])]
    assert not frozen_changed
    ref = trainer.ref_model  # the frozen anchor keeps the starting weights
    assert torch.equal(ref.decoder.lm_heads[0].weight, before["policy.decoder.lm_heads.0.weight"])


def test_lora_changes_only_adapters_and_value_model(tmp_path):
    model, processor = tiny_musicgen()
    args = make_config(tmp_path, learning_rate=1e-2, total_episodes=12, share_value_backbone=True)
    trainer = MusicPPOTrainer(
        args, processor, model, reward_model=loudness, train_dataset=dataset(), peft_config=LORA
    )
    wrapper = trainer.accelerator.unwrap_model(trainer.model)
    before = _snapshot(wrapper)
    trainer.train()
    after = _snapshot(wrapper)
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    lora_names = {name for name in before if "lora_" in name}
    value_names = {name for name in before if name.startswith("value_model.")}
    assert value_names == {"value_model.score.weight", "value_model.score.bias"}  # shared trunk: head only
    assert changed == lora_names | value_names


def test_learns_a_simple_reward_with_finite_kl(tmp_path):
    model, processor = tiny_musicgen()
    reward = CodeDirection(model)
    args = make_config(
        tmp_path, per_device_train_batch_size=8, total_episodes=8 * 12, response_length=12, learning_rate=3e-3,
        kl_coef=0.01,
    )
    trainer = MusicPPOTrainer(args, processor, model, reward_model=reward, train_dataset=dataset(16))
    trainer.train()
    scores = [entry["objective/scores"] for entry in trainer.state.log_history if "objective/scores" in entry]
    kls = [entry["objective/kl"] for entry in trainer.state.log_history if "objective/kl" in entry]
    assert len(scores) == 12
    first, last = sum(scores[:3]) / 3, sum(scores[-3:]) / 3
    assert last > first + 0.5 * abs(first) + 0.05, scores
    assert all(torch.isfinite(torch.tensor(kls))) and kls[-1] > 0


class StopAt(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= self.step:
            control.should_training_stop = True
        return control


def test_resume_continues_exactly_where_the_interrupted_run_stopped(tmp_path):
    def run(output_dir, callbacks=None, resume=None):
        model, processor = tiny_musicgen()
        args = make_config(
            tmp_path, output_dir=str(output_dir), total_episodes=16, save_strategy="steps", save_steps=2,
            learning_rate=5e-3,
        )
        trainer = MusicPPOTrainer(
            args, processor, model, reward_model=loudness, train_dataset=dataset(6), callbacks=callbacks
        )
        trainer.train(resume_from_checkpoint=resume)
        return trainer

    full = run(tmp_path / "full")
    interrupted = run(tmp_path / "resumed", callbacks=[StopAt(2)])
    assert interrupted.state.global_step == 2
    resumed = run(tmp_path / "resumed", resume=True)
    assert resumed.state.global_step == full.state.global_step == 4

    def metric_logs(trainer):
        return [entry for entry in trainer.state.log_history if "objective/scores" in entry]

    full_logs, resumed_logs = metric_logs(full), metric_logs(resumed)
    assert [entry["step"] for entry in resumed_logs] == [1, 2, 3, 4]
    assert [entry["episode"] for entry in resumed_logs] == [entry["episode"] for entry in full_logs]
    for ours, theirs in zip(resumed_logs, full_logs):  # same prompts, same samples, same updates
        assert ours["objective/scores"] == pytest.approx(theirs["objective/scores"], rel=1e-4)
        assert ours["loss/value_avg"] == pytest.approx(theirs["loss/value_avg"], rel=1e-3, abs=1e-6)
    history = json.loads((tmp_path / "resumed" / "log_history.json").read_text())
    assert [entry["step"] for entry in history if "objective/scores" in entry] == [1, 2, 3, 4]
    assert (tmp_path / "resumed" / "training_curves.png").stat().st_size > 1000


def test_saved_policy_loads_with_from_pretrained_and_pipeline(tmp_path):
    model, processor = tiny_musicgen()
    trainer = MusicPPOTrainer(
        make_config(tmp_path), processor, model, reward_model=loudness, train_dataset=dataset(), peft_config=LORA
    )
    trainer.train()
    out = tmp_path / "lora"
    trainer.save_model(str(out))
    assert (out / "adapter_model.safetensors").exists()
    base, _ = tiny_musicgen()
    adapted = PeftModel.from_pretrained(base, str(out))
    merged = MusicgenForConditionalGeneration.from_pretrained(out / "merged")
    policy = trainer.accelerator.unwrap_model(trainer.model).policy
    ids = processor(text=["a test"], return_tensors="pt")
    decoder_ids = torch.full((4, 3), 2048)
    with torch.no_grad():
        expected = policy(**ids, decoder_input_ids=decoder_ids).logits
        torch.testing.assert_close(adapted(**ids, decoder_input_ids=decoder_ids).logits, expected)
        torch.testing.assert_close(merged(**ids, decoder_input_ids=decoder_ids).logits, expected, atol=1e-5, rtol=0)
    music = pipeline("text-to-audio", model=str(out / "merged"))("a test", forward_params={"max_new_tokens": 8})
    assert music["sampling_rate"] == 32000

    full_model, _ = tiny_musicgen()
    trainer = MusicPPOTrainer(
        make_config(tmp_path), processor, full_model, reward_model=loudness, train_dataset=dataset()
    )
    trainer.train()
    trainer.save_model(str(tmp_path / "full"))
    reloaded = MusicgenForConditionalGeneration.from_pretrained(tmp_path / "full")
    rollout = generate_rollout(reloaded, processor, ["a test"], num_steps=8)
    assert rollout.codes.shape == (1, 4, 5)
    assert not list((tmp_path / "full").glob("pytorch_model*.bin"))


def test_bad_input_gives_clear_errors(tmp_path):
    model, processor = tiny_musicgen()

    def wrong_shape(prompts, audio, sampling_rate, codes, **kwargs):
        return torch.zeros(len(prompts), 2)

    def sometimes_nan(prompts, audio, sampling_rate, codes, **kwargs):
        scores = loudness(prompts, audio, sampling_rate, codes)
        scores[0] = float("nan")
        return scores

    with pytest.raises(ValueError, match="reward 'wrong_shape' returned shape"):
        MusicPPOTrainer(make_config(tmp_path), processor, model, reward_model=wrong_shape,
                        train_dataset=dataset()).train()
    with pytest.raises(ValueError, match="reward 'sometimes_nan' returned non-finite"):
        MusicPPOTrainer(make_config(tmp_path), processor, model, reward_model=sometimes_nan,
                        train_dataset=dataset()).train()
    trainer = MusicPPOTrainer(make_config(tmp_path, drop_nonfinite_rewards=True), processor, model,
                              reward_model=[loudness, sometimes_nan], train_dataset=dataset())
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "objective/dropped_samples" in entry]
    assert [entry["objective/dropped_samples"] for entry in logs] == [1, 1]
    assert all(torch.isfinite(torch.tensor(entry["loss/policy_avg"])) for entry in logs)
    with pytest.raises(ValueError, match="empty"):
        MusicPPOTrainer(make_config(tmp_path), processor, model, reward_model=loudness,
                        train_dataset=Dataset.from_dict({"prompt": []}))
    with pytest.raises(ValueError, match="no 'prompt' column"):
        MusicPPOTrainer(make_config(tmp_path), processor, model, reward_model=loudness,
                        train_dataset=Dataset.from_dict({"text": PROMPTS}))
    with pytest.raises(ValueError, match="too short"):
        MusicPPOTrainer(make_config(tmp_path, response_length=4), processor, model, reward_model=loudness,
                        train_dataset=dataset())
    with pytest.raises(ValueError, match="reward_weights has 2 entries"):
        MusicPPOTrainer(make_config(tmp_path, reward_weights=[1.0, 2.0]), processor, model, reward_model=loudness,
                        train_dataset=dataset())
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        MusicPPOTrainer(make_config(tmp_path), processor, model, reward_model=loudness,
                        train_dataset=Dataset.from_dict({"prompt": ["fine", " "] * 2})).train()


def _metrics(trainer):
    return [
        {k: v for k, v in entry.items() if not k.startswith("timing/") and k != "eps"}
        for entry in trainer.state.log_history
        if "objective/scores" in entry
    ]


def test_one_seed_gives_one_run_with_ppo_epochs_and_mini_batches(tmp_path):
    # Before, the mini-batch order came from NumPy's unseeded global generator: two runs with one seed differed.
    def run(name, numpy_seed):
        np.random.seed(numpy_seed)  # whatever the global generators hold, the run must not depend on it
        torch.manual_seed(numpy_seed)
        model, processor = tiny_musicgen()
        args = make_config(
            tmp_path, output_dir=str(tmp_path / name), per_device_train_batch_size=2, gradient_accumulation_steps=2,
            num_mini_batches=2, num_ppo_epochs=2, lam=0.95, total_episodes=16,
        )
        trainer = MusicPPOTrainer(args, processor, model, reward_model=loudness, train_dataset=dataset())
        trainer.train()
        return _metrics(trainer), _snapshot(trainer.accelerator.unwrap_model(trainer.model))

    (metrics_a, weights_a), (metrics_b, weights_b) = run("a", 1), run("b", 2)
    assert len(metrics_a) == 2 and metrics_a == metrics_b
    assert all(torch.equal(weights_a[name], weights_b[name]) for name in weights_a)


def test_mini_batch_order_is_a_seeded_permutation_per_update_and_epoch(tmp_path):
    model, processor = tiny_musicgen()
    args = make_config(tmp_path, per_device_train_batch_size=2, num_mini_batches=4)
    trainer = MusicPPOTrainer(args, processor, model, reward_model=loudness, train_dataset=dataset())
    orders = {(u, e): trainer._mini_batch_order(u, e) for u in range(3) for e in range(3)}
    for order in orders.values():
        assert sorted(order.tolist()) == list(range(8))
    assert len({tuple(order.tolist()) for order in orders.values()}) > 5  # not one fixed order
    assert torch.equal(trainer._mini_batch_order(1, 2), orders[(1, 2)])  # a resumed run draws the same


def test_batch_arithmetic_and_its_refusals(tmp_path):
    model, processor = tiny_musicgen()
    args = make_config(tmp_path, per_device_train_batch_size=2, gradient_accumulation_steps=3, num_mini_batches=2,
                       total_episodes=25)
    MusicPPOTrainer(args, processor, model, reward_model=loudness, train_dataset=dataset())
    # micro-batch 2, mini-batch (one optimizer step) 2 x 3, update 2 mini-batches: 12 rollouts, ceil(25 / 12) updates
    assert (args.micro_batch_size, args.local_mini_batch_size, args.mini_batch_size) == (2, 6, 6)
    assert (args.local_batch_size, args.batch_size, args.num_total_batches, args.world_size) == (12, 12, 3, 1)
    for bad in (dict(per_device_train_batch_size=0), dict(num_mini_batches=0), dict(num_ppo_epochs=0)):
        with pytest.raises(ValueError, match=f"{next(iter(bad))}=0.*must be an integer >= 1"):
            MusicPPOTrainer(make_config(tmp_path, **bad), processor, model, reward_model=loudness,
                            train_dataset=dataset())
    with pytest.raises(ValueError, match="total_episodes must be >= 1"):
        MusicPPOTrainer(make_config(tmp_path, total_episodes=-5), processor, model, reward_model=loudness,
                        train_dataset=dataset())


@pytest.mark.parametrize(
    "field, value, hint",
    [("sft_model_path", "my/sft", "model_name_or_path"), ("stop_token", "eos", "no stop token"),
     ("whiten_rewards", True, "whiten_advantages"), ("num_sample_generations", 0, "eval_strategy"),
     ("local_rollout_forward_batch_size", 8, "per_device_train_batch_size")],
)
def test_trl_text_fields_are_refused_with_what_to_use_instead(tmp_path, field, value, hint):
    with pytest.raises(ValueError, match=rf"{field}=.*does not use this field.*{hint}"):
        make_config(tmp_path, **{field: value})


def test_trainer_stands_on_transformers_trainer_without_trl_experimental():
    import pathlib
    import re
    import subprocess
    import sys

    from transformers import Trainer

    import musicrl_trl

    assert issubclass(MusicPPOTrainer, Trainer)
    # No import of TRL's experimental API (the removed PPOTrainer) nor of torchaudio anywhere in the package (TRL may
    # use its experimental modules internally; transformers <= 5.24 imports torchaudio when it is installed).
    package = pathlib.Path(musicrl_trl.__file__).parent
    sources = {path: path.read_text() for path in package.rglob("*.py")}
    for module in (r"trl\.experimental", "torchaudio"):
        pattern = re.compile(rf"^\s*(from|import) {module}", re.M)
        assert not [str(path) for path, text in sources.items() if pattern.search(text)], module
    # Importing the package does not print TRL's experimental-API warning.
    code = "import musicrl_trl.trainers.ppo_trainer"
    result = subprocess.run([sys.executable, "-W", "always", "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "Experimental" not in result.stderr
