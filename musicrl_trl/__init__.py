"""musicrl-trl: RL fine-tuning of audio language models (MusicGen) towards human preferences, on top of TRL.

Importing the package registers the reward-model heads (``music_reward``, ``music_token_reward``) with
transformers' Auto classes, so ``AutoModelForAudioClassification.from_pretrained`` loads saved reward models.
"""

from .reward_models import (
    MusicRewardConfig,
    MusicRewardModel,
    PreferenceReward,
    QualityReward,
    TextAdherenceReward,
)
from .reward_models.token_preference import (
    MusicTokenPreferenceConfig,
    MusicTokenPreferenceModel,
    register_token_preference,
)
from .rollout import MusicRollout, SamplingConfig, generate_rollout
from .trainers import AudioRewardConfig, AudioRewardTrainer, MusicPPOConfig, MusicPPOTrainer

register_token_preference()

__version__ = "0.1.0.dev0"

__all__ = [
    "AudioRewardConfig",
    "AudioRewardTrainer",
    "MusicPPOConfig",
    "MusicPPOTrainer",
    "MusicRewardConfig",
    "MusicRewardModel",
    "MusicRollout",
    "MusicTokenPreferenceConfig",
    "MusicTokenPreferenceModel",
    "PreferenceReward",
    "QualityReward",
    "SamplingConfig",
    "TextAdherenceReward",
    "generate_rollout",
]
