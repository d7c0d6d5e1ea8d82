"""musicrl-trl: RL fine-tuning of audio language models (MusicGen) towards human preferences, on top of TRL.

Importing the package registers the reward-model heads (``music_reward``, ``music_token_reward``) with
transformers' Auto classes, so ``AutoModelForAudioClassification.from_pretrained`` loads saved reward models.
Everything else is imported on first use (as transformers and peft do): a console command that needs only SQLite
or a config does not pay for the trainers, TRL, peft and bitsandbytes.
"""

from ._console import quiet_third_party_logs

quiet_third_party_logs()  # before anything imports bitsandbytes or builds a MusicGen config

from .reward_models import MusicRewardConfig, MusicRewardModel  # noqa: E402
from .reward_models.token_preference import register_token_preference  # noqa: E402

register_token_preference()

__version__ = "0.1.0.dev0"

__all__ = [
    "AudioRewardConfig",
    "AudioRewardTrainer",
    "MusicDPOConfig",
    "MusicDPOTrainer",
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


# Public name -> submodule that defines it, imported by __getattr__ on first access.
_LAZY_IMPORTS = {
    "AudioRewardConfig": ".trainers",
    "AudioRewardTrainer": ".trainers",
    "MusicDPOConfig": ".trainers",
    "MusicDPOTrainer": ".trainers",
    "MusicPPOConfig": ".trainers",
    "MusicPPOTrainer": ".trainers",
    "MusicRollout": ".rollout",
    "MusicTokenPreferenceConfig": ".reward_models.token_preference",
    "MusicTokenPreferenceModel": ".reward_models.token_preference",
    "PreferenceReward": ".reward_models",
    "QualityReward": ".reward_models",
    "SamplingConfig": ".rollout",
    "TextAdherenceReward": ".reward_models",
    "generate_rollout": ".rollout",
}


def __getattr__(name: str):
    if name not in _LAZY_IMPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(_LAZY_IMPORTS[name], __name__), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
