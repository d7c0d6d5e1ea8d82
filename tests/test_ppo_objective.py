"""MusicRL's objective in MusicPPOTrainer: the exact KL as an analytic loss term, the anchor that binds, defaults
that learn, one forward per update, and the saved generation config."""

import copy
import statistics

import pytest
import torch
from datasets import Dataset
from transformers import GenerationConfig, MusicgenForConditionalGeneration

from musicrl_trl import codebooks
from musicrl_trl.rollout import SamplingConfig, decoder_logits, generate_rollout, unwrap_musicgen
from musicrl_trl.teacher_forcing import decoder_states
from musicrl_trl.testing import tiny_musicgen
from musicrl_trl.trainers import MusicPPOConfig, MusicPPOTrainer
from musicrl_trl.trainers.base import masked_mean
from musicrl_trl.trainers.value_model import MusicPolicyAndValue

PROMPTS = ["bright shimmering bells", "deep dark bass", "happy upbeat tune", "slow sad piano"]


def loudness(prompts, audio, sampling_rate, codes, **kwargs):
    return audio.pow(2).mean((1, 2)).sqrt()


def quietness(prompts, audio, sampling_rate, codes, **kwargs):
    """Minus the clip's mean absolute amplitude: a signal reward none of the defaults were chosen on."""
    return -audio.abs().mean((1, 2))


def make_config(tmp_path, **overrides):
    settings = dict(
        output_dir=str(tmp_path / "run"), per_device_train_batch_size=4, total_episodes=8, response_length=10,
        learning_rate=1e-3, report_to=[], disable_tqdm=True, seed=0, plot_training_curves=False,
    )
    settings.update(overrides)
    return MusicPPOConfig(**settings)


def dataset(n=8):
    return Dataset.from_dict({"prompt": (PROMPTS * n)[:n]})


def scores_and_kls(trainer):
    logs = [entry for entry in trainer.state.log_history if "objective/scores" in entry]
    return [entry["objective/scores"] for entry in logs], [entry["objective/kl"] for entry in logs]


# ---------------------------------------------------------------- the KL term's gradient
def reference_mean_step_kl(policy, anchor, rollout, sampling, step_mask):
    """Slow, obviously correct exact KL: per code, sum over the codebook of p * log(p / q) from explicit softmaxes in
    float64; per decoder step, the sum over the codes drawn at that step; then the mean over valid steps."""
    def probs(model):
        out = decoder_logits(model, rollout.prompt_ids, rollout.prompt_mask, rollout.grid, guided=sampling.guided)
        logits = codebooks.steps_to_codes(out.logits, 1).double()
        if sampling.guided:
            uncond = codebooks.steps_to_codes(out.uncond_logits, 1).double()
            logits = uncond + sampling.guidance_scale * (logits - uncond)
        return torch.softmax(logits / sampling.temperature, dim=-1)

    p, q = probs(policy), probs(anchor)
    batch, num_codebooks, frames, _ = p.shape
    delays = codebooks.codebook_delays(num_codebooks)
    kl_steps = torch.zeros(batch, rollout.num_steps, dtype=torch.float64)
    for b in range(batch):
        for k in range(num_codebooks):
            for t in range(frames):
                kl_code = (p[b, k, t] * (p[b, k, t].log() - q[b, k, t].log())).sum()
                kl_steps[b, t + delays[k]] = kl_steps[b, t + delays[k]] + kl_code  # code (k, t) is drawn at step t+d_k
    return (kl_steps * step_mask).sum() / step_mask.sum()


@pytest.mark.parametrize("guidance_scale", [1.0, 3.0])
def test_kl_loss_gradient_is_the_exact_kl_gradient(tmp_path, guidance_scale):
    model, processor = tiny_musicgen()
    trainer = MusicPPOTrainer(make_config(tmp_path, guidance_scale=guidance_scale, temperature=0.9), processor, model,
                              reward_model=loudness, train_dataset=dataset())
    sampling = SamplingConfig(guidance_scale, 0.9, 0)
    torch.manual_seed(0)
    rollout = generate_rollout(model, processor, PROMPTS[:2], num_steps=8, sampling=sampling)
    anchor = copy.deepcopy(model).double().eval()
    policy = copy.deepcopy(model).double().eval()
    with torch.no_grad():  # move the policy away from the anchor so that the KL and its gradient are not 0
        for head in policy.decoder.lm_heads:
            head.weight.add_(0.05 * torch.randn_like(head.weight))
    step_mask = torch.ones(2, rollout.num_steps, dtype=torch.bool)
    step_mask[1, -3:] = False  # a partly masked sample: the mean runs over valid steps only

    def trainer_kl_term():
        """The loss-form KL term exactly as train() computes it: the training module's forward, with the anchor's
        decoder states, LM heads in chunks of 3 decoder steps (a size that does not divide the 8 + 3 steps)."""
        with torch.no_grad():
            ref_states = decoder_states(anchor, rollout.prompt_ids, rollout.prompt_mask, rollout.grid, sampling.guided)
        statistics, _ = MusicPolicyAndValue(policy, None)(
            rollout.prompt_ids, rollout.prompt_mask, rollout.grid, sampling, ref_states=ref_states,
            kl_estimator=trainer.args.kl_estimator, chunk_size=3,
        )
        return masked_mean(statistics.kl.sum(1), step_mask)

    params = [policy.decoder.lm_heads[1].weight, policy.decoder.model.decoder.layers[0].fc1.weight]
    loss = trainer_kl_term()
    assert loss.item() > 1e-3
    grads = torch.autograd.grad(loss, params)
    reference = reference_mean_step_kl(policy, anchor, rollout, sampling, step_mask)
    assert loss.item() == pytest.approx(reference.item(), rel=1e-9)
    reference_grads = torch.autograd.grad(reference, params)
    for grad, ref_grad in zip(grads, reference_grads):
        torch.testing.assert_close(grad, ref_grad, rtol=1e-7, atol=1e-12)

    # Finite differences of the reference KL along a random direction agree with the analytic gradient.
    directions = [torch.randn_like(p) for p in params]
    epsilon = 1e-5
    with torch.no_grad():
        def shifted(sign):
            for p, d in zip(params, directions):
                p.add_(sign * epsilon * d)
            value = reference_mean_step_kl(policy, anchor, rollout, sampling, step_mask).item()
            for p, d in zip(params, directions):
                p.sub_(sign * epsilon * d)
            return value

        finite_difference = (shifted(1) - shifted(-1)) / (2 * epsilon)
    analytic = sum((g * d).sum() for g, d in zip(grads, directions)).item()
    assert analytic == pytest.approx(finite_difference, rel=1e-5)


def test_reward_form_is_trl_shaping_and_loss_form_regresses_the_score(tmp_path):
    model, processor = tiny_musicgen()
    kl = torch.rand(3, 6)
    values = torch.randn(3, 6)
    scores = torch.tensor([1.0, -0.5, 2.0])
    keep = torch.tensor([True, True, False])
    for whiten in (False, True):
        shaping = MusicPPOTrainer(
            make_config(tmp_path, kl_penalty="reward", kl_coef=0.2, whiten_advantages=whiten, gamma=0.9, lam=0.8),
            processor, model, reward_model=loudness, train_dataset=dataset(),
        )
        advantages, returns = shaping._advantages_and_returns(kl, scores, values, keep)
        # TRL's PPOTrainer: per-step reward -kl_coef * KL, the score added at the last step, then GAE.
        rewards = -0.2 * kl
        rewards[:, -1] += scores
        expected, last_gae = torch.zeros_like(rewards), torch.zeros(3)
        for t in reversed(range(6)):
            next_value = values[:, t + 1] if t < 5 else torch.zeros(3)
            last_gae = rewards[:, t] + 0.9 * next_value - values[:, t] + 0.9 * 0.8 * last_gae
            expected[:, t] = last_gae
        torch.testing.assert_close(returns, expected + values)
        if whiten:
            kept = expected[keep]
            expected = (expected - kept.mean()) / (kept.var() + 1e-8).sqrt()  # masked_whiten over kept samples
        torch.testing.assert_close(advantages[keep], expected[keep])
        assert (advantages[~keep] == 0).all()

    paper = MusicPPOTrainer(make_config(tmp_path, whiten_advantages=False), processor, model, reward_model=loudness,
                            train_dataset=dataset())
    assert paper.args.kl_penalty == "loss"
    advantages, returns = paper._advantages_and_returns(kl, scores, values, keep)
    # MusicRL: the value target of every step is the (undiscounted, score-only) return R; advantage = R - V(s_t).
    torch.testing.assert_close(returns, scores[:, None].expand(-1, 6))
    torch.testing.assert_close(advantages[keep], (scores[:, None] - values)[keep])


def test_kl_penalty_is_validated(tmp_path):
    with pytest.raises(ValueError, match="kl_penalty must be 'loss'"):
        make_config(tmp_path, kl_penalty="penalty")
    with pytest.raises(ValueError, match="kl_coef must be >= 0"):
        make_config(tmp_path, kl_coef=-0.1)


# ---------------------------------------------------------------- the anchor binds, the defaults learn
def test_strong_kl_coef_holds_the_policy_near_the_anchor(tmp_path):
    final_kl = {}
    for kl_coef in (0.0, 1.0):
        model, processor = tiny_musicgen()
        args = make_config(tmp_path, per_device_train_batch_size=8, total_episodes=8 * 15, response_length=12,
                           learning_rate=1e-2, kl_coef=kl_coef)
        trainer = MusicPPOTrainer(args, processor, model, reward_model=loudness, train_dataset=dataset(16))
        trainer.train()
        final_kl[kl_coef] = statistics.mean(scores_and_kls(trainer)[1][-3:])
    assert final_kl[0.0] > 10  # the unanchored policy drifts far at this learning rate
    assert final_kl[1.0] <= 0.25 * final_kl[0.0], final_kl


def test_defaults_learn_a_reward_they_were_not_chosen_on(tmp_path):
    """Only the learning rate and kl_coef are set (and the run's size): the schedule, KL form, estimator, baseline
    and sampling are the defaults. Quietness was not used to choose any of them."""
    model, processor = tiny_musicgen()
    args = make_config(tmp_path, per_device_train_batch_size=8, total_episodes=8 * 80, response_length=12,
                       learning_rate=1e-2, kl_coef=0.05)
    trainer = MusicPPOTrainer(args, processor, model, reward_model=quietness, train_dataset=dataset(16))
    trainer.train()
    scores, kls = scores_and_kls(trainer)
    quarter = len(scores) // 4
    first, last = scores[:quarter], scores[-quarter:]
    # Welch's t of the last quarter's mean reward against the first's: a gain far beyond update-to-update noise.
    t = (statistics.mean(last) - statistics.mean(first)) / (
        (statistics.variance(first) + statistics.variance(last)) / quarter
    ) ** 0.5
    assert t > 3, (t, first, last)
    assert kls[-1] < 200  # the anchor still holds


@pytest.mark.parametrize(("kl_penalty", "kl_estimator"), [("loss", "full"), ("reward", "k3")])
def test_top_k_sampling_keeps_the_kl_finite_when_the_policy_leaves_the_anchors_top_k(
    tmp_path, kl_penalty, kl_estimator
):
    """With top-k, the cut distributions of a moved policy and its anchor have different supports, which makes their
    exact KL infinite; the KL is taken before the cut, so the loss and its gradient stay finite."""
    model, processor = tiny_musicgen()
    args = make_config(tmp_path, per_device_train_batch_size=8, total_episodes=8 * 6, response_length=10,
                       learning_rate=3e-2, top_k=20, kl_penalty=kl_penalty, kl_estimator=kl_estimator)
    trainer = MusicPPOTrainer(args, processor, model, reward_model=loudness, train_dataset=dataset())
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "objective/kl" in entry]
    assert logs[0]["objective/kl"] == pytest.approx(0, abs=1e-5)
    for entry in logs:
        floats = [value for value in entry.values() if isinstance(value, float)]
        assert all(value == value and abs(value) != float("inf") for value in floats)
        assert entry["policy/first_ratio_max_error"] < 1e-4  # ratios still use the top-k distribution
    assert logs[-1]["objective/kl"] > 1  # the policy did move, far enough for its top 20 codes to change
    for param in trainer.accelerator.unwrap_model(trainer.model).parameters():
        assert torch.isfinite(param).all()


# ---------------------------------------------------------------- no redundant pass
def count_policy_forwards(trainer):
    counter = {"calls": 0}
    wrapper = trainer.accelerator.unwrap_model(trainer.model)
    assert isinstance(wrapper, MusicPolicyAndValue)

    def hook(module, args, output):
        counter["calls"] += 1

    wrapper.register_forward_hook(hook)
    return counter


@pytest.mark.parametrize("kl_penalty", ["loss", "reward"])
def test_paper_setting_runs_one_policy_forward_per_update(tmp_path, kl_penalty):
    model, processor = tiny_musicgen()
    args = make_config(tmp_path, total_episodes=8, kl_penalty=kl_penalty)
    trainer = MusicPPOTrainer(args, processor, model, reward_model=loudness, train_dataset=dataset())
    counter = count_policy_forwards(trainer)
    trainer.train()
    assert counter["calls"] == 2  # two updates, one policy/value forward (with gradients) each


@pytest.mark.parametrize("kl_penalty", ["loss", "reward"])
def test_full_ppo_keeps_old_values_and_stays_on_policy_at_first_pass(tmp_path, kl_penalty):
    model, processor = tiny_musicgen()
    args = make_config(tmp_path, per_device_train_batch_size=2, num_mini_batches=2, total_episodes=8,
                       num_ppo_epochs=3, lam=0.95, kl_penalty=kl_penalty, learning_rate=3e-3)
    trainer = MusicPPOTrainer(args, processor, model, reward_model=loudness, train_dataset=dataset())
    counter = count_policy_forwards(trainer)
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "objective/kl" in entry]
    # Per update: one no-grad forward for the old values and KL, then 3 epochs x 2 mini-batches x 1 micro-batch.
    assert counter["calls"] == len(logs) * (1 + 3 * 2)
    for entry in logs:
        assert entry["policy/first_ratio_max_error"] < 1e-4
        assert all(value == value for value in entry.values() if isinstance(value, float))  # no NaN anywhere
    assert logs[0]["objective/kl"] < 1e-6
    assert logs[-1]["policy/clipfrac_avg"] >= 0


def test_one_epoch_of_several_mini_batches_fixes_values_before_the_update(tmp_path):
    model, processor = tiny_musicgen()
    args = make_config(tmp_path, per_device_train_batch_size=4, num_mini_batches=2, total_episodes=8)
    trainer = MusicPPOTrainer(args, processor, model, reward_model=loudness, train_dataset=dataset())
    assert not trainer._single_pass()
    counter = count_policy_forwards(trainer)
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "objective/kl" in entry]
    assert counter["calls"] == len(logs) * (1 + 2)
    assert all(entry["policy/first_ratio_max_error"] < 1e-4 for entry in logs)


# ---------------------------------------------------------------- the saved model samples as it was trained
@pytest.mark.parametrize("use_lora", [False, True])
def test_saved_generation_config_matches_training_sampling(tmp_path, use_lora):
    from peft import LoraConfig

    model, processor = tiny_musicgen()
    assert model.generation_config.guidance_scale == 3.0 and model.generation_config.top_k == 250  # as shipped
    args = make_config(tmp_path, total_episodes=4, guidance_scale=1.5, temperature=0.8, top_k=0, response_length=14)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]) if use_lora else None
    trainer = MusicPPOTrainer(args, processor, model, reward_model=loudness, train_dataset=dataset(),
                              peft_config=lora)
    policy = unwrap_musicgen(trainer.accelerator.unwrap_model(trainer.model).policy)
    assert policy.generation_config.guidance_scale == 1.5  # the in-memory policy samples as it is trained too
    trainer.train()
    trainer.save_model()
    folders = [args.output_dir] + ([f"{args.output_dir}/merged"] if use_lora else [])
    for folder in folders:
        config = GenerationConfig.from_pretrained(folder)
        assert config.do_sample is True
        assert config.guidance_scale == 1.5
        assert config.temperature == 0.8
        assert config.top_k in (0, None)
        assert config.max_new_tokens == 14
    reloaded = MusicgenForConditionalGeneration.from_pretrained(folders[-1])
    assert reloaded.generation_config.guidance_scale == 1.5 and reloaded.generation_config.max_new_tokens == 14
