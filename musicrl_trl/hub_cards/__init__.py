"""Jinja templates of the model cards that ``push_to_hub`` writes (package data, rendered by ``musicrl_trl.hub``):
``policy_card.md.jinja`` for policies trained with ``MusicPPOTrainer`` and ``reward_card.md.jinja`` for reward models
trained with ``AudioRewardTrainer``."""
