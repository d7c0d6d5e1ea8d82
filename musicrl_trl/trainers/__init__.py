"""Trainers: MusicPPOTrainer (RL on MusicGen) and AudioRewardTrainer (reward models)."""

from .ppo_config import MusicPPOConfig
from .ppo_trainer import MusicPPOTrainer, MusicValueModel
from .reward_config import AudioRewardConfig
from .reward_trainer import AudioRewardTrainer

__all__ = ["AudioRewardConfig", "AudioRewardTrainer", "MusicPPOConfig", "MusicPPOTrainer", "MusicValueModel"]
