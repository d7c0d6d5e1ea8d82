"""Trainers: MusicPPOTrainer (RL on MusicGen), MusicDPOTrainer (preference optimisation from votes) and
AudioRewardTrainer (reward models)."""

from .dpo_config import MusicDPOConfig
from .dpo_trainer import MusicDPOTrainer
from .ppo_config import MusicPPOConfig
from .ppo_trainer import MusicPPOTrainer, MusicValueModel
from .reward_config import AudioRewardConfig
from .reward_trainer import AudioRewardTrainer

__all__ = [
    "AudioRewardConfig",
    "AudioRewardTrainer",
    "MusicDPOConfig",
    "MusicDPOTrainer",
    "MusicPPOConfig",
    "MusicPPOTrainer",
    "MusicValueModel",
]
