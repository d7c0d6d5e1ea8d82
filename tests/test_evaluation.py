"""musicrl_trl.evaluation: side-by-side statistics against known answers, drift and diversity, policy comparisons on
tiny offline models, the shipped `evaluate` modules, trainer.evaluate(), and bad input caught before sampling."""

import fnmatch
import itertools
import json
import os

import evaluate
import numpy as np
import pytest
import torch
from datasets import Dataset
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import MusicgenForConditionalGeneration, MusicgenProcessor

from musicrl_trl.evaluation import (
    LogMelEmbedding,
    RewardModelEmbedding,
    bootstrap_ci,
    clap_score,
    diversity,
    evaluate_policies,
    kl_per_clip,
    load_policy,
    load_prompts,
    paired_comparison,
    sample_policy,
    vendi_score,
    wilcoxon_signed_rank,
    write_results,
)
from musicrl_trl.evaluation import compare as evaluation_compare
from musicrl_trl.loading import ModelLoadingError
from musicrl_trl.metrics import CLAP_SCORE, WIN_RATE
from musicrl_trl.reward_models import LoudnessReward, TextAdherenceReward
from musicrl_trl.rollout import SamplingConfig, generate_rollout, teacher_forced_logprobs
from musicrl_trl.testing import save_tiny_clap, save_tiny_musicgen, tiny_musicgen
from musicrl_trl.trainers import MusicPPOConfig, MusicPPOTrainer

PROMPTS = ["bright shimmering bells", "deep dark bass", "happy upbeat tune", "slow sad piano"]
EVAL_PROMPTS = PROMPTS + ["calm ambient rain", "energetic rock riff", "funky slap bass", "epic fanfare"]
# The reward the tiny model learns in a few dozen updates: its clips start near -19 dBFS (see examples/ppo_musicrl.py).
TRAIN_REWARD = LoudnessReward(floor_db=-25.0, ceiling_db=-15.0)


# ------------------------------------------------------------------------------------------------- statistics
def exact_wilcoxon_p(differences):
    """Slow, obviously correct reference: the two-sided p-value of the signed-rank statistic by enumerating all 2^n
    sign assignments of the ranks (no zeros, no tied magnitudes)."""
    ranks = np.argsort(np.argsort(np.abs(differences))) + 1
    observed = ranks[np.asarray(differences) > 0].sum()
    expected = ranks.sum() / 2
    totals = [sum(r for r, s in zip(ranks, signs) if s) for signs in itertools.product([0, 1], repeat=len(ranks))]
    return np.mean([abs(t - expected) >= abs(observed - expected) for t in totals])


def test_win_rate_ties_and_wilcoxon_on_hand_made_scores():
    # Six prompts, A better on every one: win rate 1, p = 2 / 2^6.
    result = paired_comparison([5, 6, 7, 8, 9, 10], [4, 4, 4, 4, 4, 4])
    assert (result["wins"], result["ties"], result["losses"]) == (6, 0, 0)
    assert result["win_rate"] == 1.0
    assert result["wilcoxon_p"] == pytest.approx(2 / 64)

    # Differences 1, 2, 3, -4, 5, 6: W- = 4; 7 of the 64 sign patterns give W- <= 4, so p = 14 / 64.
    a = np.array([1.0, 2.0, 3.0, -4.0, 5.0, 6.0])
    result = paired_comparison(a, np.zeros(6))
    assert (result["wins"], result["ties"], result["losses"]) == (5, 0, 1)
    assert result["win_rate"] == pytest.approx(5 / 6)
    assert result["wilcoxon_p"] == pytest.approx(14 / 64) == pytest.approx(exact_wilcoxon_p(a))

    # Ties are left out of the win rate and of the test; per-clip scores are averaged per prompt first.
    scores_a = [[1.0, 3.0], [2.0, 2.0], [0.0, 0.0], [5.0, 5.0], [0.5, 0.5]]  # means 2, 2, 0, 5, 0.5
    scores_b = [[2.0, 2.0], [1.0, 1.0], [1.0, 1.0], [3.0, 3.0], [0.5, 0.5]]  # means 2, 1, 1, 3, 0.5
    result = paired_comparison(scores_a, scores_b)
    assert (result["wins"], result["ties"], result["losses"]) == (2, 2, 1)
    assert result["win_rate"] == pytest.approx(2 / 3)
    assert result["wilcoxon_p"] == pytest.approx(wilcoxon_signed_rank([1.0, -1.0, 2.0]))
    # A tolerance turns small differences into ties.
    loose = paired_comparison(scores_a, scores_b, tie_tolerance=1.0)
    assert (loose["wins"], loose["ties"], loose["losses"]) == (1, 4, 0)

    # All ties (a policy against itself with the same seeds): no preference, p = 1.
    same = paired_comparison([0.3, 0.4, 0.5], [0.3, 0.4, 0.5])
    assert (same["wins"], same["ties"], same["losses"], same["win_rate"], same["wilcoxon_p"]) == (0, 3, 0, 0.5, 1.0)

    with pytest.raises(ValueError, match="same prompts"):
        paired_comparison([1.0, 2.0], [1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="NaN"):
        paired_comparison([1.0, float("nan")], [1.0, 2.0])


@pytest.mark.parametrize("n", [5, 8, 11])
def test_wilcoxon_matches_exact_enumeration(n):
    rng = np.random.default_rng(n)
    differences = rng.normal(0.3, 1.0, n)
    assert wilcoxon_signed_rank(differences) == pytest.approx(exact_wilcoxon_p(differences))


def test_bootstrap_intervals_cover_the_true_mean_at_about_the_nominal_rate():
    rng = np.random.default_rng(0)
    repetitions, true_mean = 400, 2.0
    covered = 0
    for repetition in range(repetitions):
        sample = rng.normal(true_mean, 1.5, size=40)
        low, high = bootstrap_ci(sample, confidence=0.95, num_resamples=2000, seed=repetition)
        assert low < sample.mean() < high
        covered += low <= true_mean <= high
    # Nominal 95 %; 400 repetitions have a standard error of about 1.1 %, and the percentile bootstrap runs a little
    # narrow at n = 40.
    assert 0.90 <= covered / repetitions <= 0.985
    # 80 % intervals are narrower and cover less often.
    narrow = [bootstrap_ci(rng.normal(0, 1, 40), confidence=0.8, num_resamples=2000, seed=i) for i in range(300)]
    assert 0.74 <= np.mean([low <= 0 <= high for low, high in narrow]) <= 0.86
    assert bootstrap_ci([1.0, 2.0, 3.0], seed=1) == bootstrap_ci([1.0, 2.0, 3.0], seed=1)  # seeded


def test_vendi_score_and_pairwise_distances():
    assert vendi_score(torch.ones(4, 4)) == pytest.approx(1.0)
    assert vendi_score(torch.eye(4)) == pytest.approx(4.0)
    # Two identical items and one orthogonal: between 1 and 3 (exactly exp(H(2/3, 1/3)) = 1.89).
    similarity = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    assert vendi_score(similarity) == pytest.approx(float(np.exp(-(2 / 3 * np.log(2 / 3) + 1 / 3 * np.log(1 / 3)))))

    same = diversity(torch.ones(3, 5), "cosine")
    assert same == {"mean_pairwise_distance": pytest.approx(0.0, abs=1e-12), "vendi_score": pytest.approx(1.0)}
    orthogonal = diversity(torch.eye(3), "cosine")
    assert orthogonal["mean_pairwise_distance"] == pytest.approx(1.0)
    assert orthogonal["vendi_score"] == pytest.approx(3.0)
    # Euclidean: RMS difference per dimension (dB for log-mel statistics).
    points = torch.tensor([[0.0, 0.0], [3.0, 4.0]])
    assert diversity(points, "euclidean", bandwidth=1.0)["mean_pairwise_distance"] == pytest.approx(5 / np.sqrt(2))


def test_log_mel_embedding_separates_different_clips_and_not_identical_ones():
    embed = LogMelEmbedding()
    time = torch.arange(32_000) / 32_000
    tone = 0.3 * torch.sin(2 * torch.pi * 440 * time)
    clips = torch.stack([tone, tone, 0.3 * torch.sin(2 * torch.pi * 3000 * time), 0.05 * torch.randn(32_000)])[:, None]
    embeddings = embed(clips, 32_000)
    assert embeddings.shape == (4, 2 * embed.num_mel_bins)
    identical = diversity(embeddings[:2], embed.metric, embed.bandwidth)
    assert identical["mean_pairwise_distance"] == pytest.approx(0.0, abs=1e-6)
    assert identical["vendi_score"] == pytest.approx(1.0)
    spread = diversity(embeddings, embed.metric, embed.bandwidth)
    assert spread["mean_pairwise_distance"] > 5.0  # dB: a tone, another tone and noise differ a lot
    assert 2.0 < spread["vendi_score"] < 4.0  # two of the four clips are the same


# ------------------------------------------------------------------------------------------------- drift
@pytest.mark.parametrize("guidance_scale", [1.0, 3.0])
def test_kl_per_clip_is_zero_to_itself_and_agrees_with_sampled_log_ratios(guidance_scale):
    model, processor = tiny_musicgen()
    base, _ = tiny_musicgen()
    with torch.no_grad():  # a nearby base: the policy's lm heads moved a little
        for head in model.decoder.lm_heads:
            head.weight.add_(0.3 * torch.randn(head.weight.shape, generator=torch.Generator().manual_seed(1)))
    sampling = SamplingConfig(guidance_scale=guidance_scale, temperature=0.99)
    torch.manual_seed(0)
    rollout = generate_rollout(model, processor, ["deep dark bass"] * 48, num_steps=10, sampling=sampling)
    assert torch.equal(kl_per_clip(model, model, rollout), torch.zeros(48))
    kl = kl_per_clip(model, base, rollout)
    assert (kl > 0).all()
    # The exact per-code KL summed over a clip and the clip's log-ratio log p(x) - log q(x) are both unbiased
    # estimates of the sequence KL; over 48 clips their means agree within the sampling noise.
    base_logprobs = teacher_forced_logprobs(base, rollout.prompt_ids, rollout.prompt_mask, rollout.grid, sampling)
    log_ratio = (rollout.logprobs - base_logprobs).sum(dim=(1, 2))
    standard_error = (log_ratio - kl).std() / np.sqrt(48)
    assert abs(log_ratio.mean() - kl.mean()) < 4 * standard_error
    assert kl.mean() > 10 * standard_error  # not trivially close to zero


def test_kl_with_top_k_is_taken_before_the_cut_and_stays_finite():
    model, processor = tiny_musicgen()
    base, _ = tiny_musicgen()
    with torch.no_grad():  # the policy's lm heads moved: its top 5 codes differ from the base's
        for head in model.decoder.lm_heads:
            head.weight.add_(0.3 * torch.randn(head.weight.shape, generator=torch.Generator().manual_seed(1)))
    sampling = SamplingConfig(guidance_scale=2.0, temperature=0.99, top_k=5)
    torch.manual_seed(0)
    rollout = generate_rollout(model, processor, ["deep dark bass"] * 8, num_steps=10, sampling=sampling)
    kl = kl_per_clip(model, base, rollout)
    assert torch.isfinite(kl).all() and (kl > 0).all()
    # The same as without top-k: guidance and temperature are kept, only the cut is left out (as in the trainer).
    whole_codebook = kl_per_clip(model, base, rollout, sampling=SamplingConfig(guidance_scale=2.0, temperature=0.99))
    torch.testing.assert_close(kl, whole_codebook)


# ------------------------------------------------------------------------------------------------- policies
@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    return save_tiny_musicgen(tmp_path_factory.mktemp("base"), seed=0)


@pytest.fixture(scope="module")
def trained_dir(tmp_path_factory, base_dir):
    """The tiny base trained for 30 updates on loudness (constant lr 1e-2, a small KL weight), saved."""
    output_dir = tmp_path_factory.mktemp("trained")
    model = MusicgenForConditionalGeneration.from_pretrained(base_dir)  # trainable (load_policy freezes)
    processor = MusicgenProcessor.from_pretrained(base_dir)
    args = MusicPPOConfig(
        output_dir=str(output_dir),
        per_device_train_batch_size=8,
        total_episodes=8 * 30,
        response_length=12,
        learning_rate=1e-2,
        lr_scheduler_type="constant",
        kl_coef=1e-3,
        report_to=[],
        disable_tqdm=True,
        seed=0,
    )
    trainer = MusicPPOTrainer(
        args, processor, model, reward_model=TRAIN_REWARD, train_dataset=Dataset.from_dict({"prompt": PROMPTS * 4})
    )
    trainer.train()
    trainer.save_model(str(output_dir))
    return str(output_dir)


def test_policy_against_itself_ties_with_zero_kl(base_dir):
    results = evaluate_policies(
        base_dir,
        base_dir,
        PROMPTS,
        ["loudness", "brightness"],
        num_samples_per_prompt=2,
        response_length=10,
        num_resamples=500,
    )
    for name in ("loudness", "brightness"):
        reward = results["rewards"][name]
        assert (reward["wins"], reward["ties"], reward["losses"]) == (0, len(PROMPTS), 0)
        assert reward["win_rate"] == 0.5 and reward["wilcoxon_p"] == 1.0
        assert reward["mean_a"] == reward["mean_b"]
    assert results["kl_to_base"]["a"] == results["kl_to_base"]["b"] == 0.0
    assert results["diversity"]["a"] == results["diversity"]["b"]

    # With independent draws (other seeds for B) the same policy wins about half of the prompts, not significantly.
    model, processor = load_policy(base_dir)
    settings = dict(
        prompts=EVAL_PROMPTS * 2,
        rewards={"loudness": TRAIN_REWARD},
        num_samples_per_prompt=2,
        num_steps=10,
        sampling=SamplingConfig(temperature=0.99),
    )
    a = sample_policy(model, processor, seed=0, **settings)
    b = sample_policy(model, processor, seed=1000, **settings)
    result = paired_comparison(a.scores["loudness"], b.scores["loudness"])
    assert 0.2 <= result["win_rate"] <= 0.8
    assert result["wilcoxon_p"] > 0.05


def _strict_json(path):
    def refuse(constant):
        raise ValueError(f"{path} holds {constant}, which is not JSON")

    return json.loads(path.read_text(), parse_constant=refuse)


def test_top_k_evaluation_writes_a_finite_kl_as_strict_json(tmp_path, base_dir):
    other = save_tiny_musicgen(tmp_path / "other", seed=1)
    results = evaluate_policies(
        other,
        base_dir,
        PROMPTS[:2],
        ["loudness"],
        num_samples_per_prompt=2,
        response_length=10,
        sampling=SamplingConfig(temperature=0.99, top_k=5),
        num_resamples=200,
    )
    write_results(results, str(tmp_path / "eval"))
    written = _strict_json(tmp_path / "eval" / "results.json")
    assert written["sampling"]["top_k"] == 5 and "non_finite" not in written
    kl = written["kl_to_base"]
    assert 0 < kl["a"] < float("inf") and kl["b"] == 0.0
    assert all(np.isfinite(kl["ci95_a"]))
    assert "KL to base (nats per clip before the top-k cut)" in (tmp_path / "eval" / "results.md").read_text()

    # Anything non-finite that is left is written as null and listed, never as NaN / Infinity.
    results["diversity"]["a"]["vendi_score"] = float("nan")
    results["diversity"]["b"]["entropy_per_codebook"][1] = float("-inf")
    with pytest.warns(UserWarning, match="non-finite"):
        write_results(results, str(tmp_path / "eval-nan"))
    written = _strict_json(tmp_path / "eval-nan" / "results.json")
    assert written["diversity"]["a"]["vendi_score"] is None
    assert written["diversity"]["b"]["entropy_per_codebook"][1] is None
    assert written["non_finite"] == ["diversity.a.vendi_score", "diversity.b.entropy_per_codebook[1]"]


def test_policy_trained_on_a_signal_reward_beats_its_base(base_dir, trained_dir):
    results = evaluate_policies(
        trained_dir,
        base_dir,
        EVAL_PROMPTS,
        {"loudness": TRAIN_REWARD},
        num_samples_per_prompt=4,
        response_length=12,
        num_resamples=2000,
    )
    loudness = results["rewards"]["loudness"]
    assert loudness["mean_a"] > loudness["mean_b"]
    assert loudness["ci95_a"][0] > loudness["ci95_b"][1]  # the intervals do not overlap
    assert loudness["wins"] > loudness["losses"]
    assert loudness["wilcoxon_p"] < 0.05
    assert results["kl_to_base"]["a"] > 1.0 and results["kl_to_base"]["b"] == 0.0
    assert len(results["diversity"]["a"]["entropy_per_codebook"]) == 4
    # The tuned policy moved towards louder codes: its token distributions narrowed.
    entropy_a, entropy_b = (results["diversity"][side]["entropy_per_codebook"] for side in ("a", "b"))
    assert sum(entropy_a) < sum(entropy_b)
    assert results["num_prompts"] == len(EVAL_PROMPTS) and results["num_samples_per_prompt"] == 4


def test_lora_adapter_loads_on_its_base_and_its_kl_is_measured(tmp_path, base_dir):
    model, processor = load_policy(base_dir)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "fc1"], init_lora_weights=False)
    adapter = get_peft_model(model, lora)  # random A and B: the adapter changes the policy
    adapter.save_pretrained(tmp_path / "adapter")
    processor.save_pretrained(tmp_path / "adapter")
    loaded, loaded_processor = load_policy(str(tmp_path / "adapter"))
    assert isinstance(loaded, PeftModel)
    results = evaluate_policies(
        str(tmp_path / "adapter"),
        base_dir,
        PROMPTS,
        ["loudness"],
        num_samples_per_prompt=2,
        response_length=10,
        num_resamples=200,
    )
    assert results["kl_to_base"]["a"] > 0 and results["kl_to_base"]["b"] == 0.0
    assert results["rewards"]["loudness"]["ties"] < len(PROMPTS)


def test_diversity_from_a_reward_models_audio_encoder(tmp_path, base_dir):
    clap_dir = save_tiny_clap(tmp_path / "clap")
    results = evaluate_policies(
        base_dir,
        base_dir,
        PROMPTS[:2],
        [f"adherence={clap_dir}"],
        num_samples_per_prompt=3,
        response_length=10,
        embedding="adherence",
        num_resamples=200,
    )
    spread = results["diversity"]["a"]
    assert spread["embedding"] == "adherence" and spread["metric"] == "cosine"
    assert 0 <= spread["mean_pairwise_distance"] <= 2 and 1 <= spread["vendi_score"] <= 3
    embed = RewardModelEmbedding(TextAdherenceReward(clap_dir))
    assert torch.linalg.vector_norm(embed(0.1 * torch.randn(2, 1, 32_000), 32_000), dim=-1) == pytest.approx(1.0)


# ------------------------------------------------------------------------------------------------- bad input
@pytest.fixture
def no_sampling(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("sampled before the input was checked")

    monkeypatch.setattr(evaluation_compare, "generate_rollout", refuse)


def _edit_config(path, edit):
    config_path = os.path.join(path, "config.json")
    with open(config_path) as f:
        config = json.load(f)
    edit(config)
    with open(config_path, "w") as f:
        json.dump(config, f)


def test_bad_input_fails_before_any_sampling(tmp_path, base_dir, no_sampling):
    two_codebooks = save_tiny_musicgen(tmp_path / "k2", num_codebooks=2)
    with pytest.raises(ValueError, match="codebooks"):
        evaluate_policies(base_dir, two_codebooks, PROMPTS, ["loudness"], response_length=10)
    stereo = save_tiny_musicgen(tmp_path / "stereo", num_codebooks=8, audio_channels=2)
    with pytest.raises(ValueError, match="codebooks|audio channels"):
        evaluate_policies(stereo, base_dir, PROMPTS, ["loudness"], response_length=10)
    other_rate = save_tiny_musicgen(tmp_path / "rate")
    _edit_config(other_rate, lambda c: c["audio_encoder"].update(sampling_rate=16_000))
    with pytest.raises(ValueError, match="sampling rate"):
        evaluate_policies(base_dir, base_dir, PROMPTS, ["loudness"], base_model=other_rate, response_length=10)

    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    with pytest.raises(ValueError, match="no prompts"):
        evaluate_policies(base_dir, base_dir, str(empty), ["loudness"], response_length=10)
    with pytest.raises(ValueError, match="no prompts"):
        evaluate_policies(base_dir, base_dir, [], ["loudness"], response_length=10)
    with pytest.raises(ValueError, match="could not load the quality reward"):
        evaluate_policies(base_dir, base_dir, PROMPTS, [f"quality={tmp_path / 'missing'}"], response_length=10)
    with pytest.raises(ValueError, match="unknown reward"):
        evaluate_policies(base_dir, base_dir, PROMPTS, ["loudnes"], response_length=10)
    with pytest.raises(ValueError, match="needs a model"):
        evaluate_policies(base_dir, base_dir, PROMPTS, ["adherence"], response_length=10)
    with pytest.raises(ValueError, match="policy_a: the local path .*nowhere' does not exist") as error:
        evaluate_policies(str(tmp_path / "nowhere"), base_dir, PROMPTS, ["loudness"], response_length=10)
    assert isinstance(error.value.__cause__, ModelLoadingError)
    (tmp_path / "half-saved").mkdir()
    (tmp_path / "half-saved" / "generation_config.json").write_text("{}")
    with pytest.raises(ValueError, match="base_model: the folder .* holds neither config.json nor adapter_config"):
        evaluate_policies(base_dir, base_dir, PROMPTS, ["loudness"], base_model=str(tmp_path / "half-saved"))
    with pytest.raises(ValueError, match="too short"):
        evaluate_policies(base_dir, base_dir, PROMPTS, ["loudness"], response_length=2)


# ------------------------------------------------------------------------------------------------- evaluate modules
def test_evaluate_modules_load_offline_and_match_the_library(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_EVALUATE_OFFLINE", "1")
    rng = np.random.default_rng(0)
    scores_a, scores_b = rng.normal(0.2, 1, 12), rng.normal(0, 1, 12)
    win_rate = evaluate.load(WIN_RATE)
    assert win_rate.compute(scores_a=scores_a, scores_b=scores_b) == paired_comparison(scores_a, scores_b)
    clips_a, clips_b = rng.normal(0.5, 1, (6, 3)), rng.normal(0, 1, (6, 3))
    by_clip = win_rate.compute(scores_a=clips_a.tolist(), scores_b=clips_b.tolist())
    assert by_clip == paired_comparison(clips_a, clips_b)

    clap_dir = save_tiny_clap(tmp_path / "clap")
    prompts = ["calm piano", "loud rock guitar", "shimmering bells"]
    audio = 0.1 * torch.randn(3, 1, 32_000, generator=torch.Generator().manual_seed(0))
    expected = clap_score(prompts, audio, 32_000, TextAdherenceReward(clap_dir))
    module = evaluate.load(CLAP_SCORE)
    result = module.compute(
        prompts=prompts, audio=[clip[0].numpy() for clip in audio], sampling_rate=32_000, model_name_or_path=clap_dir
    )
    assert result["scores"] == pytest.approx(expected.tolist(), abs=1e-5)
    assert result["clap_score"] == pytest.approx(expected.mean().item(), abs=1e-5)


# ------------------------------------------------------------------------------------------------- trainer
def _trainer(tmp_path, name, **overrides):
    model, processor = tiny_musicgen()
    settings = dict(
        output_dir=str(tmp_path / name),
        per_device_train_batch_size=4,
        total_episodes=4 * 4,
        response_length=10,
        learning_rate=1e-2,
        lr_scheduler_type="constant",
        report_to=[],
        disable_tqdm=True,
        seed=0,
        plot_training_curves=False,
        eval_num_samples_per_prompt=3,
    )
    settings.update(overrides)
    return MusicPPOTrainer(
        MusicPPOConfig(**settings),
        processor,
        model,
        reward_model=TRAIN_REWARD,
        train_dataset=Dataset.from_dict({"prompt": PROMPTS * 2}),
        eval_dataset=Dataset.from_dict({"prompt": PROMPTS}),
    )


def test_trainer_evaluate_works_and_logs_drift_every_eval_steps(tmp_path):
    trainer = _trainer(tmp_path, "eval", eval_strategy="steps", eval_steps=2)
    metrics = trainer.evaluate()
    assert metrics["eval/kl"] == 0.0  # before training the policy is the anchor
    for key in (
        "eval/scores",
        "eval/rewards/loudness/mean",
        "eval/entropy_q0",
        "eval/entropy_q3",
        "eval/diversity/mean_pairwise_distance",
        "eval/diversity/vendi_score",
    ):
        assert np.isfinite(metrics[key])
    assert 1.0 <= metrics["eval/diversity/vendi_score"] <= 3.0
    assert trainer.evaluate() == metrics  # fixed seeds: the same clips every time
    trainer.train()
    evals = [entry for entry in trainer.state.log_history if "eval/kl" in entry]
    assert [entry["step"] for entry in evals] == [0, 0, 2, 4]
    assert evals[-1]["eval/kl"] > 0
    assert evals[-1]["eval/rewards/loudness/mean"] != metrics["eval/rewards/loudness/mean"]

    # Evaluating does not disturb training: the same run without evaluations logs the same updates.
    plain = _trainer(tmp_path, "plain")
    plain.train()

    def updates(t):
        return [entry["objective/scores"] for entry in t.state.log_history if "objective/scores" in entry]

    assert updates(plain) == pytest.approx(updates(trainer), rel=1e-5)


def test_trainer_eval_strategy_needs_an_eval_dataset(tmp_path):
    model, processor = tiny_musicgen()
    args = MusicPPOConfig(
        output_dir=str(tmp_path / "x"),
        total_episodes=4,
        per_device_train_batch_size=4,
        response_length=10,
        report_to=[],
        eval_strategy="steps",
        eval_steps=1,
    )
    with pytest.raises(ValueError, match="eval_dataset"):
        MusicPPOTrainer(
            args, processor, model, reward_model=TRAIN_REWARD, train_dataset=Dataset.from_dict({"prompt": PROMPTS})
        )
    # Without an eval_dataset, evaluate() takes one as an argument, and says so when none is given.
    args.eval_strategy = "no"
    trainer = MusicPPOTrainer(
        args, processor, model, reward_model=TRAIN_REWARD, train_dataset=Dataset.from_dict({"prompt": PROMPTS})
    )
    with pytest.raises(ValueError, match="needs prompts"):
        trainer.evaluate()
    metrics = trainer.evaluate(eval_dataset=Dataset.from_dict({"prompt": PROMPTS[:1]}), metric_key_prefix="test")
    assert metrics["test/kl"] == 0.0 and "test/diversity/vendi_score" in metrics
    with pytest.raises(ValueError, match="eval_num_samples_per_prompt"):
        MusicPPOConfig(output_dir=str(tmp_path / "y"), eval_num_samples_per_prompt=0, report_to=[])


def test_trainer_evaluate_with_lora_measures_drift_from_the_adapter_free_anchor(tmp_path):
    model, processor = tiny_musicgen()
    args = MusicPPOConfig(
        output_dir=str(tmp_path / "lora"), per_device_train_batch_size=4, total_episodes=8, response_length=10,
        learning_rate=1e-2, lr_scheduler_type="constant", report_to=[], disable_tqdm=True, seed=0,
        plot_training_curves=False, eval_num_samples_per_prompt=2, save_merged_lora=False,
    )  # fmt: skip
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"])
    trainer = MusicPPOTrainer(
        args, processor, model, reward_model=TRAIN_REWARD, train_dataset=Dataset.from_dict({"prompt": PROMPTS}),
        eval_dataset=Dataset.from_dict({"prompt": PROMPTS[:2]}), peft_config=lora,
    )  # fmt: skip
    assert trainer.ref_model is None
    assert trainer.evaluate()["eval/kl"] == 0.0  # LoRA's B starts at zero: the policy is the anchor
    trainer.train()
    assert trainer.evaluate(metric_key_prefix="final")["final/kl"] > 0


def test_evaluate_modules_are_package_data():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    with open(os.path.join(os.path.dirname(__file__), "..", "pyproject.toml"), "rb") as f:
        package_data = tomllib.load(f)["tool"]["setuptools"]["package-data"]["musicrl_trl.metrics"]
    for module in (WIN_RATE, CLAP_SCORE):
        script = os.path.join(os.path.basename(module), os.path.basename(module) + ".py")
        assert os.path.isfile(os.path.join(module, os.path.basename(script)))
        assert any(fnmatch.fnmatch(script, pattern) for pattern in package_data)


def test_prompts_from_text_files_and_datasets(tmp_path):
    text = tmp_path / "prompts.txt"
    text.write_text("calm piano\n  deep bass  \n\n")  # blank lines at the end are an editor's, not prompts
    assert load_prompts(str(text)) == ["calm piano", "deep bass"]
    dataset = Dataset.from_dict({"prompt": ["a", "b"], "text": ["x", "y"]})
    dataset.save_to_disk(str(tmp_path / "saved"))
    assert load_prompts(str(tmp_path / "saved")) == ["a", "b"]
    dataset.to_json(str(tmp_path / "prompts.jsonl"))
    assert load_prompts(str(tmp_path / "prompts.jsonl")) == ["a", "b"]
    assert load_prompts(str(tmp_path / "prompts.jsonl"), column="text") == ["x", "y"]
    assert load_prompts(dataset) == ["a", "b"]
    with pytest.raises(ValueError, match="no 'caption' column"):
        load_prompts(str(tmp_path / "saved"), column="caption")


def test_any_local_file_that_is_not_a_data_file_holds_one_prompt_a_line(tmp_path):
    for name in ("prompts", "prompts.TXT", "prompts.lst", "prompts.prompts.v2"):
        (tmp_path / name).write_text("calm piano\n  deep bass  \n")
        assert load_prompts(tmp_path / name) == ["calm piano", "deep bass"], name
    Dataset.from_dict({"prompt": ["a", "b"]}).to_json(str(tmp_path / "PROMPTS.JSONL"))
    assert load_prompts(str(tmp_path / "PROMPTS.JSONL")) == ["a", "b"]  # data files by extension, in any case
    (tmp_path / "blank").write_text("\n   \n")
    with pytest.raises(ValueError, match="no prompts in"):
        load_prompts(str(tmp_path / "blank"))
    (tmp_path / "latin1.lst").write_bytes("caf\xe9 jazz\n".encode("latin-1"))
    with pytest.raises(ValueError, match="is not UTF-8 text.*save it as UTF-8"):
        load_prompts(str(tmp_path / "latin1.lst"))


def test_unreadable_prompt_sources_are_value_errors_naming_the_fix(tmp_path, monkeypatch):
    import datasets
    from huggingface_hub import constants

    for missing in (tmp_path / "nope.txt", "nope.txt", "./prompts", tmp_path / "prompts.jsonl"):
        with pytest.raises(ValueError, match="there is no file or folder .* pass a text file with one prompt a line"):
            load_prompts(str(missing))
    (tmp_path / "broken.json").write_text("{not json\n")
    with pytest.raises(ValueError, match="could not read prompts from .*broken.json") as error:
        load_prompts(str(tmp_path / "broken.json"))
    assert error.value.__cause__ is not None  # the datasets error stays attached
    # A Hub id while offline (the tests run with HF_HUB_OFFLINE=1), then one the Hub does not know.
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ValueError, match="HF_HUB_OFFLINE=1 forbids downloading it: unset HF_HUB_OFFLINE"):
        load_prompts("some-org/prompts")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)

    def not_on_the_hub(*args, **kwargs):
        raise datasets.exceptions.DatasetNotFoundError("Dataset 'some-org/prompts' doesn't exist on the Hub")

    monkeypatch.setattr(datasets, "load_dataset", not_on_the_hub)
    with pytest.raises(ValueError, match="could not be read as a Hub dataset id: check the id and your connection"):
        load_prompts("some-org/prompts")
    with pytest.raises(ValueError, match="prompts must be"):
        load_prompts(42)
