"""Licences of every model a run is built from, and what the policy card says about the run (no Hub server)."""

from __future__ import annotations

import pytest
import torch
from datasets import Dataset

from musicrl_trl import hub
from musicrl_trl.reward_models import LoudnessReward, QualityReward, RewardCombination
from musicrl_trl.testing import tiny_clap, tiny_music_reward, tiny_musicgen
from musicrl_trl.trainers import MusicPPOConfig, MusicPPOTrainer


def with_license(folder, license_id: str) -> str:
    (folder / "README.md").write_text(f"---\nlicense: {license_id}\n---\n# a model\n")
    return str(folder)


class ClapJudge:
    """A user's own reward that keeps its CLAP as `.clap`, not `.model`, and a MOS model beside it."""

    __name__ = "judge"

    def __init__(self, clap, mos=None):
        self.clap = clap
        self.extra = {"mos": mos} if mos is not None else {}

    def __call__(self, prompts=None, audio=None, sampling_rate=None, **kwargs):
        return torch.zeros(audio.shape[0])


# --------------------------------------------------------------------------------------------------------------------
# Licences of every reward model
# --------------------------------------------------------------------------------------------------------------------


def test_a_reward_keeping_its_model_under_another_name_carries_its_licence(tmp_path):
    clap, _ = tiny_clap(save_directory=tmp_path / "clap")
    with_license(tmp_path / "clap", "apache-2.0")
    source = hub.reward_license(ClapJudge(clap), "reward 'judge'")
    assert (source.name, source.license) == (str(tmp_path / "clap"), "apache-2.0")
    assert source.origin == f"README.md of {tmp_path / 'clap'}"


def test_every_model_a_reward_holds_counts_and_the_strictest_wins(tmp_path):
    clap, _ = tiny_clap(save_directory=tmp_path / "clap")
    mos = tiny_music_reward(save_directory=tmp_path / "mos")
    with_license(tmp_path / "clap", "apache-2.0")
    with_license(tmp_path / "mos", "cc-by-nc-4.0")
    judge = ClapJudge(clap, mos)
    sources = hub.reward_license_sources(judge, "reward 'judge'")
    assert [(source.name, source.license) for source in sources] == [
        (str(tmp_path / "clap"), "apache-2.0"),
        (str(tmp_path / "mos"), "cc-by-nc-4.0"),
    ]
    assert hub.reward_license(judge, "reward 'judge'").license == "cc-by-nc-4.0"


def test_weights_of_unrecorded_origin_are_unknown_not_signal_based():
    judge = ClapJudge(torch.nn.Linear(4, 1))  # weights, but nothing says where they came from
    (source,) = hub.reward_license_sources(judge, "reward 'judge'")
    assert source.name == "(Linear weights)" and source.license is None
    resolution = hub.resolve_license([hub.LicenseSource("base model", "org/base", "apache-2.0", "test"), source])
    assert resolution.license == "unknown" and "(Linear weights)" in resolution.explanation()
    # Rewards computed from the signal hold no weights: they stay out of the licence.
    for signal in (LoudnessReward(), lambda audio, **kwargs: audio.mean((1, 2))):
        (source,) = hub.reward_license_sources(signal, "reward 'loudness'")
        assert source.name is None and source.origin == "no model weights (computed from the signal)"


def test_ingredients_are_the_base_the_anchor_and_every_part_of_every_combination(tmp_path):
    base = with_license(tmp_path, "cc-by-nc-4.0")  # the base policy's folder
    (tmp_path / "anchor").mkdir()
    anchor = with_license(tmp_path / "anchor", "cc-by-nc-sa-4.0")
    clap, _ = tiny_clap(save_directory=tmp_path / "clap")
    with_license(tmp_path / "clap", "apache-2.0")
    mos = QualityReward(tiny_music_reward(save_directory=tmp_path / "mos"), window_s=0.1)
    inner = RewardCombination({"judge": ClapJudge(clap), "loudness": LoudnessReward()})
    rewards = {"mix": RewardCombination({"quality": mos, "inner": inner})}
    sources = hub.ingredient_licenses(base, anchor, rewards)
    assert [(source.role, source.license) for source in sources] == [
        ("base model", "cc-by-nc-4.0"),
        ("KL anchor", "cc-by-nc-sa-4.0"),
        ("reward 'quality'", None),  # a local MOS model without a card: unknown
        ("reward 'judge'", "apache-2.0"),
        ("reward 'loudness'", None),
    ]
    assert sources[2].name == str(tmp_path / "mos") and sources[4].name is None  # unknown vs signal-based
    assert hub.resolve_license(sources).license == "unknown"
    assert [source.role for source in hub.ingredient_licenses(base, base, {})] == ["base model"]


# --------------------------------------------------------------------------------------------------------------------
# The policy card
# --------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def policy_card(tmp_path_factory):
    """Render the card of an untrained tiny run with the given config fields and number of updates."""
    model, processor = tiny_musicgen()
    out = tmp_path_factory.mktemp("card")
    trainers = {}

    def render(global_step: int, **config) -> str:
        key = tuple(sorted(config.items()))
        if key not in trainers:
            args = MusicPPOConfig(
                output_dir=str(out / str(len(trainers))),
                per_device_train_batch_size=2,
                total_episodes=4,
                response_length=10,
                report_to=[],
                disable_tqdm=True,
                plot_training_curves=False,
                **config,
            )
            prompts = Dataset.from_dict({"prompt": ["calm piano", "loud drums"]})
            reward = LoudnessReward()
            trainers[key] = MusicPPOTrainer(args, processor, model, reward_model=reward, train_dataset=prompts)
        trainer = trainers[key]
        trainer.state.global_step = global_step
        resolution = hub.resolve_license([hub.LicenseSource("base model", "org/base", "apache-2.0", "test")])
        return hub.render_policy_card(trainer, "full", resolution, "me/policy", trainer.args.output_dir)

    return render


@pytest.mark.parametrize(
    ("kl_penalty", "kl_estimator", "form"),
    [
        ("loss", "full", "an analytic loss term (MusicRL's objective)"),
        ("reward", "k3", "a per-step reward penalty (TRL's shaping)"),
        ("reward", "k1", "a per-step reward penalty (TRL's shaping)"),
    ],
)
def test_the_card_states_the_kl_coefficient_estimator_and_form(policy_card, kl_penalty, kl_estimator, form):
    card = policy_card(2, kl_coef=0.07, kl_penalty=kl_penalty, kl_estimator=kl_estimator)
    (line,) = [line for line in card.splitlines() if line.startswith("- KL regularisation:")]
    assert f"coefficient 0.07, `{kl_estimator}` estimator" in line and f"applied as {form}" in line
    assert ("the exact KL summed over the whole codebook" in line) == (kl_estimator == "full")


def test_the_card_counts_updates_and_rollouts_in_singular_and_plural(policy_card):
    (line,) = [line for line in policy_card(1).splitlines() if line.startswith("- Steps:")]
    assert line.startswith("- Steps: 1 update (2 rollouts of ")
    (line,) = [line for line in policy_card(3).splitlines() if line.startswith("- Steps:")]
    assert line.startswith("- Steps: 3 updates (6 rollouts of ")
    assert "1 updates" not in policy_card(1)


@pytest.mark.parametrize(
    ("config", "baseline_words", "kl_words"),
    [
        ({}, "a learned value network", "coefficient 0.05,"),
        ({"baseline": "rloo", "num_generations": 2}, "the other clip of the same prompt (RLOO; no value network)",
         "coefficient 0.05,"),
        ({"baseline": "group_mean", "num_generations": 2, "scale_group_rewards": True, "kl_target": 20.0},
         "divided by their standard deviation (GRPO", "a KL budget of 20 nats per clip"),
    ],
)
def test_the_card_names_the_baseline_and_the_kl_target(policy_card, config, baseline_words, kl_words):
    card = policy_card(2, **config)
    (baseline,) = [line for line in card.splitlines() if line.startswith("- Baseline:")]
    (kl,) = [line for line in card.splitlines() if line.startswith("- KL regularisation:")]
    assert baseline_words in baseline and kl_words in kl
