"""User preference: the scalar score of a Bradley-Terry reward model (MusicRL-U's reward).

Two kinds of preference model are accepted:

- audio space: a :class:`MusicRewardModel` trained on pairwise preferences; it scores the decoded waveform;
- token space: a model that scores MusicGen's codes directly given the prompt (MusicRL's choice: text + audio tokens,
  initialised from the generator), e.g. ``MusicTokenPreferenceModel``. Such a model declares the class attribute
  ``scores_codes = True`` and has ``forward(input_ids, attention_mask, codes)`` returning logits ``[B, 1]``; it needs
  the prompts tokenised with the generator's text tokenizer (``processor.tokenizer`` of MusicGen).

Bradley-Terry scores are logits: unbounded, only their differences mean something. Normalise them ("batch" or
"running" in :func:`~musicrl_trl.reward_models.combine_rewards`) before mixing them with bounded rewards.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from transformers import (
    AutoModelForAudioClassification,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedConfig,
)

from ..audio import resample, split_windows, to_mono
from ..loading import load_pretrained, resolve_pretrained
from .base import AudioReward
from .configuration_music_reward import MusicRewardConfig
from .modeling_music_reward import MusicRewardModel

__all__ = ["PreferenceReward"]


class PreferenceReward(AudioReward):
    """Bradley-Terry preference score (a logit) per clip.

    Args:
        model: an audio-space :class:`MusicRewardModel`, a token-space model with ``scores_codes = True``, or a
            path / Hub id of either (``music_reward`` configs load with ``AutoModelForAudioClassification``, others
            with ``AutoModelForSequenceClassification``, where ``import musicrl_trl`` registers the token model).
        tokenizer: for token-space models, the generator's text tokenizer (or a path to load it from). Default: loaded
            from ``model`` when that is a path.
        window_s: audio-space only: score ``window_s`` windows and average (MusicRL's preference clips were 20 s);
            default ``None`` scores the whole clip.
        device: where to run the model (default: where its weights are).
        allow_pickle_weights: load a model saved only as ``pytorch_model.bin`` (a pickle, which can run code). Off
            by default: such a model raises :class:`~musicrl_trl.loading.ModelLoadingError`.

    >>> from musicrl_trl.testing import tiny_music_reward
    >>> reward = PreferenceReward(tiny_music_reward())
    >>> reward(audio=0.1 * torch.randn(2, 1, 32_000), sampling_rate=32_000).shape
    torch.Size([2])
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any = None,
        window_s: float | None = None,
        device: torch.device | str | None = None,
        allow_pickle_weights: bool = False,
    ) -> None:
        super().__init__("preference")
        path = None
        if isinstance(model, (str, os.PathLike)):
            what = f"{self.__name__} reward"
            path = resolve_pretrained(model, what)
            # Read the raw model_type: AutoConfig would need the token model registered first.
            model_type = PreTrainedConfig.get_config_dict(path)[0].get("model_type")
            if model_type == MusicRewardConfig.model_type:
                load = AutoModelForAudioClassification.from_pretrained
            elif model_type == "music_token_reward":
                from .token_preference import MusicTokenPreferenceModel  # imports the codebook math only when used

                load = MusicTokenPreferenceModel.from_pretrained
            else:
                load = AutoModelForSequenceClassification.from_pretrained
            model = load_pretrained(load, path, what, allow_pickle_weights=allow_pickle_weights)
        # The agreed marker of token-space reward models (see musicrl_trl/reward_models/token_preference.py).
        self.scores_codes = bool(getattr(model, "scores_codes", False))
        if not self.scores_codes and not isinstance(model, MusicRewardModel):
            raise ValueError(
                f"{self.__name__}: model must be a MusicRewardModel (audio) or a token-space model with "
                f"`scores_codes = True`, got {type(model).__name__}."
            )
        self.model = model.eval().requires_grad_(False)
        if device is not None:
            self.model.to(device)
        if self.scores_codes:
            if isinstance(tokenizer, (str, os.PathLike)):
                what = f"{self.__name__} reward tokenizer"
                tokenizer = load_pretrained(AutoTokenizer.from_pretrained, tokenizer, what, None, allow_pickle_weights)
            elif tokenizer is None and path is not None:
                try:
                    tokenizer = AutoTokenizer.from_pretrained(path)
                except (OSError, ValueError) as error:
                    raise ValueError(
                        f"{self.__name__}: found no tokenizer beside the token-space model at {os.fspath(path)!r}; "
                        "pass `tokenizer=` (the generator's, e.g. `MusicgenProcessor.from_pretrained(...).tokenizer`)."
                    ) from error
            if tokenizer is None:
                raise ValueError(
                    f"{self.__name__}: a token-space model reads the prompt; pass `tokenizer=` (the generator's text "
                    "tokenizer, e.g. `processor.tokenizer` of MusicGen)."
                )
            self.requires_prompts = True
            self.requires_codes = True
        else:
            self.requires_prompts = bool(model.config.text_vocab_size)
        self.tokenizer = tokenizer
        self.window_s = window_s

    def score(
        self,
        prompts: list[str] | None,
        audio: torch.Tensor,
        sampling_rate: int,
        codes: torch.Tensor | None,
        **kwargs: Any,
    ) -> torch.Tensor:
        device = self.model.device
        if self.scores_codes:
            tokens = self.tokenizer(prompts, padding=True, return_tensors="pt").to(device)
            output = self.model(
                input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"], codes=codes.to(device)
            )
            return output.logits[:, 0].float()
        rate = self.model.config.sampling_rate
        audio = resample(to_mono(audio).float().to(device), sampling_rate, rate)  # resample once
        windows = (
            audio[:, None] if self.window_s is None else split_windows(audio, rate, self.window_s)
        )  # [B, W, 1, L]
        batch, num_windows = windows.shape[:2]
        text = {}
        if self.requires_prompts:
            text = self.model.tokenize_prompts([prompt for prompt in prompts for _ in range(num_windows)], device)
        logits = self.model(input_values=windows.flatten(0, 2), sampling_rate=rate, **text).logits
        return logits.view(batch, num_windows).float().mean(dim=1)
