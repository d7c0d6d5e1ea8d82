"""Configuration of :class:`~musicrl_trl.trainers.reward_trainer.AudioRewardTrainer`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import TrainingArguments

__all__ = ["AudioRewardConfig"]

MODES = ("pairwise", "regression")
TIE_LOSSES = ("half", "ignore")


@dataclass
class AudioRewardConfig(TrainingArguments):
    r"""Configuration of [`AudioRewardTrainer`]: audio (or MusicGen-code) reward models from preferences or ratings.

    Only the parameters specific to reward training are listed; every [`~transformers.TrainingArguments`] field is
    accepted as well. Parsed with `HfArgumentParser`/`TrlParser`, every field is a command-line flag.

    Parameters:
        > Parameters that control the model

        model_init_kwargs (`dict[str, Any]`, *optional*):
            Keyword arguments for `from_pretrained`, used when the trainer's `model` is a string.
        allow_pickle_weights (`bool`, *optional*, defaults to `False`):
            Also load a `model` id/path whose weights are pickles only (`pytorch_model.bin`); refused by default,
            since unpickling can run arbitrary code. Only for sources you trust.
        disable_dropout (`bool`, *optional*, defaults to `True`):
            Whether to disable dropout in the model (`nn.Dropout` modules and the float dropout rates MusicGen and
            T5 keep as attributes), so that the chosen and rejected clips of a pair see the same network.

        > Parameters that control the data

        mode (`str`, *optional*):
            `"pairwise"` (columns `prompt`, `chosen`, `rejected`, optional `tie`) or `"regression"` (columns `audio`,
            `mos`, optional `prompt`). With a token-space model (`scores_codes = True`) the audio columns are
            `chosen_codes`/`rejected_codes` or `codes`. `None` infers the mode from the columns.
        sampling_rate (`int`, *optional*):
            Rate the model reads audio at. `None` takes the feature extractor's rate, else
            `model.config.sampling_rate`.
        audio_sampling_rate (`int`, *optional*):
            Rate of audio stored as bare arrays (no `sampling_rate` next to them). Rows of `Audio` columns and
            `{"array", "sampling_rate"}` dicts carry their own rate.
        resample (`bool`, *optional*, defaults to `True`):
            Resample clips to `sampling_rate`. With `False`, a clip at another rate is a corrupt row.
        mono (`bool`, *optional*, defaults to `True`):
            Average the channels of multi-channel clips (inputs [B, N]); `False` keeps them (inputs [B, C, N]).
        max_length (`int`, *optional*):
            Maximum length of one clip, in model inputs: samples at `sampling_rate` for audio, frames for codes.
            Longer clips are truncated from the right. `None` keeps whole clips.
        max_prompt_length (`int`, *optional*, defaults to `256`):
            Maximum number of prompt tokens; longer prompts are truncated from the right.
        pad_to_multiple_of (`int`, *optional*):
            Pad every batch's clips to a multiple of this length.
        dataset_num_proc (`int`, *optional*):
            Number of processes for the row-validation pass over the datasets.
        skip_corrupt_rows (`bool`, *optional*, defaults to `False`):
            Rows that cannot be used (unreadable audio, NaN or missing labels, empty values, bad sampling rates, codes
            out of range) raise a `ValueError` naming the row, the column and the fix. With `True` they are dropped
            instead, counted in `trainer.num_skipped_rows` and logged as `num_skipped_rows`.

        > Parameters that control the loss

        center_rewards_coefficient (`float`, *optional*):
            Coefficient of the auxiliary loss that pushes rewards towards zero mean (proposed by
            https://huggingface.co/papers/2312.09244, Eq. 2). Recommended value: `0.01`. Pairwise mode only.
        tie_loss (`str`, *optional*, defaults to `"half"`):
            How tied pairs enter the Bradley-Terry loss. `"half"`: a tie is the target probability 1/2 that the chosen
            clip wins, i.e. binary cross-entropy of `sigmoid(r_chosen - r_rejected)` against 1/2, which pulls the two
            rewards together; a float `tie` value t in [0, 1] gives the soft target 1 - t/2. `"ignore"`: ties are left
            out of the loss. Either way, accuracy counts only pairs with a winner.

        > Parameters that control publishing

        hub_license (`str`, *optional*):
            Licence id for the card `push_to_hub` writes; default: the licence of the model the reward model starts
            from, read from its card or config (see `musicrl_trl.hub`).

    > [!NOTE]
    > Defaults that differ from [`~transformers.TrainingArguments`], as in TRL's `RewardConfig`:
    > `learning_rate=1e-4`, `logging_steps=10`. Unlike TRL, `bf16` stays off by default: log-mel front-ends and
    > CPU training lose accuracy in bf16. Weights are saved as safetensors (transformers 5 always does).
    """

    # Parameters whose default values are overridden from TrainingArguments (the same as TRL's RewardConfig).
    learning_rate: float = field(default=1e-4, metadata={"help": "The initial learning rate for AdamW."})
    logging_steps: float = field(
        default=10,
        metadata={
            "help": "Log every X updates steps. Should be an integer or a float in range `[0,1)`. If smaller than 1, "
            "will be interpreted as ratio of total training steps."
        },
    )

    # Parameters that control the model
    model_init_kwargs: dict[str, Any] | str | None = field(
        default=None,
        metadata={"help": "Keyword arguments for `from_pretrained`, used when the trainer's `model` is a string."},
    )
    allow_pickle_weights: bool = field(
        default=False,
        metadata={
            "help": "Load a model id/path whose weights are pickles only (pytorch_model.bin); refused by default, "
            "since unpickling can run arbitrary code. Only for sources you trust."
        },
    )
    disable_dropout: bool = field(
        default=True,
        metadata={
            "help": "Whether to disable dropout in the model (`nn.Dropout` modules and the float dropout rates "
            "MusicGen and T5 keep as attributes)."
        },
    )

    # Parameters that control the data
    mode: str | None = field(
        default=None,
        metadata={
            "help": "`pairwise` (columns prompt, chosen, rejected, optional tie) or `regression` (columns audio, mos, "
            "optional prompt); token-space models read chosen_codes/rejected_codes or codes. None infers it from "
            "the columns.",
            "choices": list(MODES),
        },
    )
    sampling_rate: int | None = field(
        default=None,
        metadata={
            "help": "Rate the model reads audio at. None takes the feature extractor's rate, else "
            "`model.config.sampling_rate`."
        },
    )
    audio_sampling_rate: int | None = field(
        default=None,
        metadata={"help": "Rate of audio stored as bare arrays (rows without a sampling_rate of their own)."},
    )
    resample: bool = field(
        default=True,
        metadata={"help": "Resample clips to `sampling_rate`. With False, a clip at another rate is a corrupt row."},
    )
    mono: bool = field(
        default=True,
        metadata={"help": "Average the channels of multi-channel clips; False keeps them (inputs [B, C, N])."},
    )
    max_length: int | None = field(
        default=None,
        metadata={
            "help": "Maximum length of one clip in model inputs: samples at `sampling_rate` for audio, frames for "
            "codes. Longer clips are truncated from the right. None keeps whole clips."
        },
    )
    max_prompt_length: int | None = field(
        default=256,
        metadata={"help": "Maximum number of prompt tokens; longer prompts are truncated from the right."},
    )
    pad_to_multiple_of: int | None = field(
        default=None,
        metadata={"help": "If set, every batch's clips are padded to a multiple of this length."},
    )
    dataset_num_proc: int | None = field(
        default=None,
        metadata={"help": "Number of processes for the row-validation pass over the datasets."},
    )
    skip_corrupt_rows: bool = field(
        default=False,
        metadata={
            "help": "Drop rows that cannot be used (unreadable audio, NaN/missing labels, bad sampling rate, codes "
            "out of range) and count them in `num_skipped_rows`, instead of raising a ValueError that names them."
        },
    )

    # Parameters that control the loss
    center_rewards_coefficient: float | None = field(
        default=None,
        metadata={
            "help": "Coefficient to incentivize the reward model to output mean-zero rewards (proposed by "
            "https://huggingface.co/papers/2312.09244, Eq. 2). Recommended value: `0.01`."
        },
    )
    tie_loss: str = field(
        default="half",
        metadata={
            "help": "How tied pairs enter the Bradley-Terry loss: `half` (binary cross-entropy of "
            "sigmoid(r_chosen - r_rejected) against 1/2; a float tie t gives the target 1 - t/2) or `ignore` (left "
            "out of the loss).",
            "choices": list(TIE_LOSSES),
        },
    )

    # Parameters that control publishing
    hub_license: str | None = field(
        default=None,
        metadata={
            "help": "Licence of the pushed model's card (e.g. 'apache-2.0'); default: the licence of the model the "
            "reward model starts from, read from its card."
        },
    )

    def __post_init__(self):
        super().__post_init__()
        if self.dataloader_pin_memory and not torch.cuda.is_available():
            # Pinned memory only speeds up copies to a GPU; without one torch warns on every epoch that it is unused.
            self.dataloader_pin_memory = False
        if self.mode is not None and self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES} or None (infer from the columns), got {self.mode!r}.")
        if self.tie_loss not in TIE_LOSSES:
            raise ValueError(f"tie_loss must be one of {TIE_LOSSES}, got {self.tie_loss!r}.")
        for name in ("sampling_rate", "audio_sampling_rate", "max_length", "max_prompt_length", "pad_to_multiple_of"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"{name} must be a positive integer or None, got {value}.")
        if self.center_rewards_coefficient is not None and self.center_rewards_coefficient < 0:
            raise ValueError(
                f"center_rewards_coefficient must be >= 0 (0.01 is the recommended value), got "
                f"{self.center_rewards_coefficient}."
            )
        if self.center_rewards_coefficient is not None and self.mode == "regression":
            raise ValueError(
                "center_rewards_coefficient applies to pairwise training only; unset it for mode='regression', "
                "where the MSE loss already fixes the reward scale."
            )
