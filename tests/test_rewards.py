"""Reward callables: the calling contract, determinism, sample rates, windowing, bad input, combination, recipes."""

from __future__ import annotations

import glob
import math
import os

import pytest
import torch
from transformers import ClapModel, ClapProcessor

from musicrl_trl import dsp
from musicrl_trl.audio import resample
from musicrl_trl.reward_models import (
    BrightnessReward,
    LoudnessReward,
    PreferenceReward,
    QualityReward,
    RewardCombination,
    SilencePenalty,
    TextAdherenceReward,
    combine_rewards,
    load_recipe,
    rewards_from_recipe,
)
from musicrl_trl.reward_models.combination import REWARD_CLASSES, RunningMoments
from musicrl_trl.reward_models.signal import prompt_brightness_target
from musicrl_trl.testing import save_tiny_clap, save_tiny_music_reward, tiny_clap, tiny_music_reward

RECIPES = sorted(glob.glob(os.path.join(os.path.dirname(__file__), "..", "examples", "recipes", "*.yaml")))


def _tones(seconds: float, rate: int, batch: int = 2) -> torch.Tensor:
    """Band-limited test clips [B, 1, N]: a low tone with a quiet overtone, and a tone that starts after a third."""
    time = torch.arange(round(seconds * rate)) / rate
    clips = [
        0.3 * torch.sin(2 * math.pi * 220 * time) + 0.05 * torch.sin(2 * math.pi * 3000 * time),
        0.1 * torch.sin(2 * math.pi * 1000 * time) * (time > seconds / 3),
    ]
    return torch.stack(clips * (batch // 2) + clips[: batch % 2])[:, None]


@pytest.fixture(scope="module")
def clap_dir(tmp_path_factory) -> str:
    return save_tiny_clap(tmp_path_factory.mktemp("tiny-clap"))


@pytest.fixture(scope="module")
def reward_dir(tmp_path_factory) -> str:
    return save_tiny_music_reward(tmp_path_factory.mktemp("tiny-music-reward"))


@pytest.fixture(scope="module")
def adherence(clap_dir) -> TextAdherenceReward:
    return TextAdherenceReward(clap_dir)


@pytest.fixture(scope="module")
def token_preference():
    from musicrl_trl.reward_models.token_preference import MusicTokenPreferenceModel
    from musicrl_trl.testing import tiny_musicgen

    musicgen, processor = tiny_musicgen(num_codebooks=4)
    return PreferenceReward(MusicTokenPreferenceModel.from_musicgen(musicgen), tokenizer=processor.tokenizer)


@pytest.fixture(scope="module")
def all_rewards(adherence, reward_dir):
    return {
        "text_adherence": adherence,
        "quality": QualityReward(reward_dir, window_s=2.0),
        "preference": PreferenceReward(reward_dir),
        "loudness": LoudnessReward(),
        "loudness_target": LoudnessReward(target_db=-20.0),
        "brightness": BrightnessReward(),
        "brightness_prompt": BrightnessReward(target_from_prompt=True),
        "silence_penalty": SilencePenalty(),
        "combined": RewardCombination([LoudnessReward(), SilencePenalty()], weights=[1.0, 0.5], normalize="batch"),
    }


REWARD_NAMES = [
    "text_adherence",
    "quality",
    "preference",
    "loudness",
    "loudness_target",
    "brightness",
    "brightness_prompt",
    "silence_penalty",
    "combined",
]
PROMPTS = ["shimmering high bells", "deep bass drone"]


# the contract --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", REWARD_NAMES)
def test_reward_is_deterministic_and_accepts_16_32_48_khz(all_rewards, name):
    reward = all_rewards[name]
    assert isinstance(reward.__name__, str) and reward.__name__
    scores = {}
    for rate in (16_000, 32_000, 48_000):
        audio = resample(_tones(3.0, 48_000), 48_000, rate)
        first = reward(prompts=PROMPTS, audio=audio, sampling_rate=rate)
        second = reward(prompts=PROMPTS, audio=audio.clone(), sampling_rate=rate)
        assert first.shape == (2,) and first.dtype == torch.float32 and torch.isfinite(first).all()
        assert torch.equal(first, second), f"{name} is not deterministic at {rate} Hz"
        scores[rate] = first
    # The same (band-limited) music at three rates scores alike: every reward resamples to its own rate.
    torch.testing.assert_close(scores[16_000], scores[48_000], atol=1e-2, rtol=0)
    torch.testing.assert_close(scores[32_000], scores[48_000], atol=1e-2, rtol=0)


@pytest.mark.parametrize("name", REWARD_NAMES)
def test_reward_rejects_bad_input_with_its_name(all_rewards, name):
    reward = all_rewards[name]
    audio = _tones(1.0, 16_000)
    bad = audio.clone()
    bad[1, 0, 10] = float("nan")
    with pytest.raises(ValueError, match=rf"{reward.__name__}: audio contains NaN or inf.*nan_to_num"):
        reward(prompts=PROMPTS, audio=bad, sampling_rate=16_000)
    with pytest.raises(ValueError, match=rf"{reward.__name__}: audio must have shape \[B, C, N\].*unsqueeze"):
        reward(prompts=PROMPTS, audio=audio[:, 0], sampling_rate=16_000)
    with pytest.raises(ValueError, match=rf"{reward.__name__}: received sampling_rate=50 Hz"):
        reward(prompts=PROMPTS, audio=audio, sampling_rate=50)
    with pytest.raises(ValueError, match=rf"{reward.__name__}: got 0 prompts for a batch of 2 clips"):
        reward(prompts=[], audio=audio, sampling_rate=16_000)
    with pytest.raises(ValueError, match=rf"{reward.__name__}: got 3 prompts for a batch of 2"):
        reward(prompts=PROMPTS + ["one more"], audio=audio, sampling_rate=16_000)
    with pytest.raises(ValueError, match=rf"{reward.__name__}: pass `sampling_rate=`"):
        reward(prompts=PROMPTS, audio=audio)


def test_prompt_reading_rewards_require_prompts(all_rewards):
    for name in ("text_adherence", "brightness_prompt"):
        with pytest.raises(ValueError, match="pass `prompts=`"):
            all_rewards[name](audio=_tones(1.0, 16_000), sampling_rate=16_000)
    assert all_rewards["loudness"](audio=_tones(1.0, 16_000), sampling_rate=16_000).shape == (2,)


def test_scores_return_on_the_audio_device_and_accept_codes(all_rewards):
    codes = torch.randint(0, 2048, (2, 4, 50))
    scores = all_rewards["brightness"](prompts=PROMPTS, audio=_tones(1.0, 32_000), sampling_rate=32_000, codes=codes)
    assert scores.device == torch.device("cpu")
    with pytest.raises(ValueError, match=r"codes must be an integer tensor of shape \[B, K, T\]"):
        all_rewards["brightness"](audio=_tones(1.0, 32_000), sampling_rate=32_000, codes=codes.float())


# text adherence ------------------------------------------------------------------------------------------------------


def _hand_adherence(clap_dir: str, prompt: str, clip: torch.Tensor, rate: int, windows_s: list[tuple[float, float]]):
    """CLAP cosine per window the slow, obvious way: functional resample, slicing, ClapFeatureExtractor, mean."""
    model = ClapModel.from_pretrained(clap_dir).eval()
    processor = ClapProcessor.from_pretrained(clap_dir)
    mono_48k = dsp.resample(clip.mean(0), rate, 48_000)
    with torch.no_grad():
        text = model.get_text_features(**processor.tokenizer([prompt], return_tensors="pt")).pooler_output[0]
        cosines = []
        for start, end in windows_s:
            window = mono_48k[round(start * 48_000) : round(end * 48_000)]
            # rand_trunc only crops clips longer than 10 s: on these windows the extractor is deterministic.
            features = processor.feature_extractor(window.double().numpy(), sampling_rate=48_000, return_tensors="pt")
            audio = model.get_audio_features(input_features=features["input_features"].float()).pooler_output[0]
            cosines.append(torch.dot(audio, text))
    return torch.stack(cosines).mean()


def test_text_adherence_equals_per_window_hand_computation(adherence, clap_dir):
    rate = 32_000
    audio = 0.1 * torch.randn(2, 2, 25 * rate, generator=torch.Generator().manual_seed(0))  # stereo, 25 s
    audio[1] *= torch.linspace(0, 3, 25 * rate)  # a crescendo: windows differ
    prompts = ["calm piano melody", "heavy metal with distorted guitars"]
    scores = adherence(prompts=prompts, audio=audio, sampling_rate=rate)
    # 25 s with 10 s windows: 0-10, 10-20 and the last window shifted to end with the clip, 15-25.
    windows = [(0.0, 10.0), (10.0, 20.0), (15.0, 25.0)]
    for i, prompt in enumerate(prompts):
        expected = _hand_adherence(clap_dir, prompt, audio[i], rate, windows)
        assert scores[i].item() == pytest.approx(expected.item(), abs=1e-4)


def test_text_adherence_scores_a_short_clip_whole(adherence, clap_dir):
    rate = 16_000
    audio = 0.2 * torch.randn(1, 1, 4 * rate, generator=torch.Generator().manual_seed(1))  # 4 s < one window
    score = adherence(prompts=["lofi hip hop beat"], audio=audio, sampling_rate=rate)
    expected = _hand_adherence(clap_dir, "lofi hip hop beat", audio[0], rate, [(0.0, 4.0)])
    assert score.item() == pytest.approx(expected.item(), abs=1e-4)


def test_text_adherence_configuration_errors(clap_dir):
    model, processor = tiny_clap()
    with pytest.raises(ValueError, match="processor"):
        TextAdherenceReward(model)
    with pytest.raises(ValueError, match=r"window_s must be in \(0, 10.0\]"):
        TextAdherenceReward(model, processor, window_s=20.0)
    five_second = TextAdherenceReward(clap_dir, window_s=5.0, hop_s=2.5)
    assert five_second(prompts=["x"], audio=_tones(12.0, 16_000, batch=1), sampling_rate=16_000).shape == (1,)


# quality, preference -------------------------------------------------------------------------------------------------


def test_quality_scores_first_and_last_windows_rescaled(reward_dir):
    model = tiny_music_reward(save_directory=None)
    reward = QualityReward(reward_dir, window_s=2.0)
    rate = 16_000
    audio = 0.1 * torch.randn(2, 1, 5 * rate, generator=torch.Generator().manual_seed(2))
    audio[:, :, 3 * rate :] *= 4  # the last window is louder than the first
    with torch.no_grad():
        first = model(audio[:, 0, : 2 * rate]).logits[:, 0]
        last = model(audio[:, 0, 3 * rate :]).logits[:, 0]
    expected = ((first + last) / 2 - 1.0) / 4.0
    torch.testing.assert_close(reward(audio=audio, sampling_rate=rate), expected)
    clamped = QualityReward(model, window_s=2.0, mos_range=(0.0, 1.0), clamp=True)(audio=audio, sampling_rate=rate)
    assert ((clamped >= 0) & (clamped <= 1)).all()
    every_window = QualityReward(model, window_s=2.0, windows="all")(audio=audio, sampling_rate=rate)
    assert not torch.allclose(every_window, expected)  # windows 0-2, 2-4, 3-5 instead of 0-2, 3-5
    with pytest.raises(ValueError, match="MusicRewardModel"):
        QualityReward(torch.nn.Linear(1, 1))


def test_quality_with_text_conditioned_model(tmp_path):
    reward = QualityReward(save_tiny_music_reward(tmp_path, text_conditioned=True), window_s=1.0)
    audio = _tones(2.5, 16_000)
    calm = reward(prompts=["calm piano", "calm piano"], audio=audio, sampling_rate=16_000)
    metal = reward(prompts=["screaming metal", "screaming metal"], audio=audio, sampling_rate=16_000)
    assert not torch.allclose(calm, metal)
    with pytest.raises(ValueError, match="pass `prompts=`"):
        reward(audio=audio, sampling_rate=16_000)


def test_preference_audio_space_is_the_models_logit(reward_dir):
    model = tiny_music_reward()
    audio = _tones(1.0, 16_000)
    with torch.no_grad():
        expected = model(audio[:, 0]).logits[:, 0]
    torch.testing.assert_close(PreferenceReward(model)(audio=audio, sampling_rate=16_000), expected)
    windowed = PreferenceReward(reward_dir, window_s=0.5)(audio=audio, sampling_rate=16_000)
    with torch.no_grad():
        halves = torch.stack([model(audio[:, 0, :8_000]).logits[:, 0], model(audio[:, 0, 8_000:]).logits[:, 0]])
    torch.testing.assert_close(windowed, halves.mean(0))
    with pytest.raises(ValueError, match="scores_codes"):
        PreferenceReward(torch.nn.Linear(1, 1))


def test_preference_token_space_scores_codes(token_preference):
    reward = token_preference
    assert reward.scores_codes and reward.requires_codes and reward.requires_prompts
    codes = torch.randint(0, 2048, (2, 4, 25), generator=torch.Generator().manual_seed(3))
    audio = torch.zeros(2, 1, 16_000)  # ignored by a token-space model
    scores = reward(prompts=PROMPTS, audio=audio, sampling_rate=32_000, codes=codes)
    tokens = reward.tokenizer(PROMPTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        expected = reward.model(**tokens, codes=codes).logits[:, 0]
    torch.testing.assert_close(scores, expected)
    assert torch.equal(scores, reward(prompts=PROMPTS, audio=audio, sampling_rate=32_000, codes=codes))
    with pytest.raises(ValueError, match="pass `codes=`"):
        reward(prompts=PROMPTS, audio=audio, sampling_rate=32_000)


def test_preference_token_space_loads_by_path(token_preference, tmp_path):
    token_preference.model.save_pretrained(tmp_path / "rm")
    token_preference.tokenizer.save_pretrained(tmp_path / "rm")
    reward = PreferenceReward(tmp_path / "rm")  # tokenizer found beside the model
    assert reward.scores_codes
    codes = torch.randint(0, 2048, (2, 4, 25), generator=torch.Generator().manual_seed(4))
    audio = torch.zeros(2, 1, 16_000)
    torch.testing.assert_close(
        reward(prompts=PROMPTS, audio=audio, sampling_rate=32_000, codes=codes),
        token_preference(prompts=PROMPTS, audio=audio, sampling_rate=32_000, codes=codes),
    )


# signal rewards ------------------------------------------------------------------------------------------------------


def test_loudness_in_db():
    reward = LoudnessReward()
    quiet = torch.full((1, 1, 1000), 0.01)  # -40 dBFS
    scores = reward(audio=torch.cat([quiet, 10 * quiet]), sampling_rate=16_000)
    torch.testing.assert_close(scores, torch.tensor([1 / 3, 2 / 3]))
    targeted = LoudnessReward(target_db=-40.0)(audio=torch.cat([quiet, 10 * quiet]), sampling_rate=16_000)
    assert targeted[0].item() == pytest.approx(1.0) and targeted[1] < 0.01


def test_brightness_follows_the_spectrum_and_the_prompt():
    rate = 32_000
    time = torch.arange(rate) / rate
    low, high = torch.sin(2 * math.pi * 150 * time), torch.sin(2 * math.pi * 6000 * time)
    # A smooth path from a low tone to a high one: brightness rises monotonically, with no jumps.
    mixes = torch.stack([(1 - a) * low + a * high for a in torch.linspace(0, 1, 11)])[:, None]
    brightness = BrightnessReward()(audio=mixes, sampling_rate=rate)
    steps = brightness.diff()
    assert (steps > 0).all() and steps.max() < 0.2
    assert brightness[0] < 0.35 and brightness[-1] > 0.8
    reward = BrightnessReward(target_from_prompt=True)
    pair = torch.stack([low, high])[:, None]
    bright = reward(prompts=["bright shimmering bells"] * 2, audio=pair, sampling_rate=rate)
    dark = reward(prompts=["dark, deep sub-bass"] * 2, audio=pair, sampling_rate=rate)
    neutral = reward(prompts=["a song"] * 2, audio=pair, sampling_rate=rate)
    assert bright[1] > bright[0] and dark[0] > dark[1]
    torch.testing.assert_close(bright + dark, torch.ones(2))
    torch.testing.assert_close(neutral, torch.full((2,), 0.5))
    leaning = BrightnessReward(target_from_prompt=True, neutral="bright")(
        prompts=["a song"] * 2, audio=pair, sampling_rate=rate
    )
    torch.testing.assert_close(leaning, bright)
    silence = BrightnessReward()(audio=torch.zeros(1, 1, rate), sampling_rate=rate)
    assert silence.item() == pytest.approx(0.5, abs=1e-3)


def test_prompt_brightness_words():
    assert prompt_brightness_target("High-pitched sparkling synth") == 1
    assert prompt_brightness_target("deep house with a warm bassline and bright hats, dark mood") == -1
    assert prompt_brightness_target("bright and dark") == 0
    assert prompt_brightness_target("lofi hip hop") == 0


def test_silence_penalty():
    reward = SilencePenalty()
    rate = 16_000
    silent, loud = torch.zeros(1, 1, rate), 0.1 * torch.ones(1, 1, rate)
    scores = reward(
        audio=torch.cat([silent, loud, torch.cat([silent[..., :4_000], loud[..., 4_000:]], -1)]), sampling_rate=rate
    )
    torch.testing.assert_close(scores, torch.tensor([-1.0, 0.0, -0.25]), atol=1e-3, rtol=0)
    assert reward(audio=torch.zeros(1, 1, 10), sampling_rate=rate).item() == pytest.approx(-1.0, abs=1e-3)


# combination ---------------------------------------------------------------------------------------------------------


def test_combine_rewards_modes_match_formulas():
    scores = {"a": torch.tensor([0.0, 1.0, 2.0]), "b": torch.tensor([10.0, 10.0, 40.0])}
    torch.testing.assert_close(combine_rewards(scores, [1.0, 0.1]), torch.tensor([1.0, 2.0, 6.0]))
    torch.testing.assert_close(combine_rewards(scores), scores["a"] + scores["b"])

    def standardise(x):
        return (x - x.mean()) / (x.std(unbiased=False) + 1e-6)

    batch = combine_rewards(scores, {"a": 2.0, "b": 1.0}, normalize="batch")
    torch.testing.assert_close(batch, 2 * standardise(scores["a"]) + standardise(scores["b"]))
    stats: dict[str, RunningMoments] = {}
    combine_rewards(scores, normalize="running", running_stats=stats)
    later = {"a": torch.tensor([3.0]), "b": torch.tensor([20.0])}
    running = combine_rewards(later, normalize="running", running_stats=stats)
    history_a, history_b = torch.tensor([0.0, 1.0, 2.0, 3.0]), torch.tensor([10.0, 10.0, 40.0, 20.0])
    expected = (3.0 - history_a.mean()) / (history_a.std(unbiased=False) + 1e-6) + (20.0 - history_b.mean()) / (
        history_b.std(unbiased=False) + 1e-6
    )
    torch.testing.assert_close(running, expected.view(1))
    assert stats["a"].count == 4


def test_combine_rewards_errors():
    scores = {"a": torch.zeros(2), "b": torch.zeros(2)}
    with pytest.raises(ValueError, match="one weight per reward"):
        combine_rewards(scores, {"a": 1.0})
    with pytest.raises(ValueError, match="2 rewards"):
        combine_rewards(scores, [1.0])
    with pytest.raises(ValueError, match="running_stats"):
        combine_rewards(scores, normalize="running")
    with pytest.raises(ValueError, match="one score per clip"):
        combine_rewards({"a": torch.zeros(2), "b": torch.zeros(3)})
    with pytest.raises(ValueError, match="normalize"):
        combine_rewards(scores, normalize="z")


def test_reward_combination_logs_each_reward_and_accepts_plain_functions():
    def clip_count(prompts, audio, sampling_rate, codes=None, **kwargs):
        return [float(audio.shape[0])] * audio.shape[0]  # a list of floats is a valid reward result

    combination = RewardCombination([LoudnessReward(), clip_count, LoudnessReward(target_db=-20.0)], [1.0, 0.5, 2.0])
    assert list(combination.rewards) == ["loudness", "clip_count", "loudness_1"]
    audio = 0.1 * torch.ones(2, 1, 1000)  # -20 dBFS
    scores = combination(prompts=["a", "b"], audio=audio, sampling_rate=16_000)
    torch.testing.assert_close(scores, torch.full((2,), 2 / 3 + 1.0 + 2.0))
    torch.testing.assert_close(combination.last_scores["clip_count"], torch.full((2,), 2.0))


# recipes -------------------------------------------------------------------------------------------------------------


def test_recipes_exist_and_load():
    names = {os.path.basename(path) for path in RECIPES}
    assert {"musicrl_r.yaml", "musicrl_u.yaml", "musicrl_ru.yaml"} <= names
    for path in RECIPES:
        recipe = load_recipe(path)
        assert all(entry["class"] in REWARD_CLASSES for entry in recipe["reward_models"])
        weights = recipe["reward_weights"]
        assert weights is None or len(weights) == len(recipe["reward_models"])
    by_name = {os.path.basename(path): load_recipe(path) for path in RECIPES}
    r, u, ru = by_name["musicrl_r.yaml"], by_name["musicrl_u.yaml"], by_name["musicrl_ru.yaml"]
    assert [entry["class"] for entry in r["reward_models"]] == ["TextAdherenceReward", "QualityReward"]
    assert [entry["class"] for entry in u["reward_models"]] == ["PreferenceReward"]
    assert ru["ref_model"] is not None and ru["ref_model"] == ru["model_name_or_path"]  # R checkpoint as KL anchor


def test_rewards_from_recipe_with_local_models(clap_dir, reward_dir):
    recipe_path = next(p for p in RECIPES if os.path.basename(p) == "musicrl_r.yaml")
    combination = rewards_from_recipe(
        recipe_path, text_adherence={"model": clap_dir}, quality={"model": reward_dir, "window_s": 1.0}
    )
    assert list(combination.rewards) == ["text_adherence", "quality"]
    scores = combination(prompts=PROMPTS, audio=_tones(2.0, 32_000), sampling_rate=32_000)
    assert scores.shape == (2,) and set(combination.last_scores) == {"text_adherence", "quality"}


def test_load_recipe_rejects_bad_files(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("reward_models:\n  - class: NotAReward\n")
    with pytest.raises(ValueError, match="NotAReward"):
        load_recipe(path)
    path.write_text("reward_models: []\n")
    with pytest.raises(ValueError, match="non-empty"):
        load_recipe(path)
    path.write_text("reward_models:\n  - class: LoudnessReward\nrewards_weights: [1]\n")
    with pytest.raises(ValueError, match="unknown keys"):
        load_recipe(path)
