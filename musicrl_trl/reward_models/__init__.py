"""Reward models and reward callables for MusicRL-style RL on MusicGen.

Importing this package registers :class:`MusicRewardConfig` / :class:`MusicRewardModel` (model_type
``music_reward``) with ``AutoConfig``, ``AutoModelForAudioClassification`` and ``AutoFeatureExtractor``, so that
``AutoModelForAudioClassification.from_pretrained(path)`` and ``pipeline("audio-classification", model=path)`` load
saved reward heads. ``import musicrl_trl`` imports it.

Reward callables follow one contract::

    reward(prompts=list[str], audio=Tensor[B, C, N], sampling_rate=int, codes=LongTensor[B, K, T]) -> Tensor[B]
"""

from transformers import AutoConfig, AutoFeatureExtractor, AutoModelForAudioClassification

from .base import AudioReward
from .combination import RewardCombination, combine_rewards, load_recipe, rewards_from_recipe
from .configuration_music_reward import MusicRewardConfig
from .feature_extraction_music_reward import MusicRewardFeatureExtractor
from .modeling_music_reward import MusicRewardModel
from .preference import PreferenceReward
from .quality import QualityReward
from .signal import BrightnessReward, LoudnessReward, SilencePenalty
from .text_adherence import TextAdherenceReward

# exist_ok: re-importing (e.g. importlib.reload in a notebook) must not fail on the second registration.
AutoConfig.register(MusicRewardConfig.model_type, MusicRewardConfig, exist_ok=True)
AutoModelForAudioClassification.register(MusicRewardConfig, MusicRewardModel, exist_ok=True)
AutoFeatureExtractor.register(MusicRewardConfig, MusicRewardFeatureExtractor, exist_ok=True)

__all__ = [
    "AudioReward",
    "BrightnessReward",
    "LoudnessReward",
    "MusicRewardConfig",
    "MusicRewardFeatureExtractor",
    "MusicRewardModel",
    "PreferenceReward",
    "QualityReward",
    "RewardCombination",
    "SilencePenalty",
    "TextAdherenceReward",
    "combine_rewards",
    "load_recipe",
    "rewards_from_recipe",
]
