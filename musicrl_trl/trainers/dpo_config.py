"""Configuration of MusicDPOTrainer: TRL's DPO field names on ``transformers.TrainingArguments``, with the sampling
settings of :class:`~musicrl_trl.MusicPPOConfig` (the distribution the log-probs are taken under) and the
music-specific fields.

TRL's ``DPOConfig`` cannot be used as it is: its ``DPOTrainer`` cannot be built on a MusicGen (see DESIGN.md), and
its text fields (chat templates, padding-free packing, ``max_length`` in tokens) have no meaning for codec codes.
The fields that do carry over keep TRL's names and meanings: ``beta``, ``loss_type``, ``label_smoothing``,
``precompute_ref_log_probs``, ``precompute_ref_batch_size``, ``max_prompt_length``, ``max_completion_length``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from transformers import TrainingArguments

__all__ = ["DPO_LOSS_TYPES", "MusicDPOConfig"]

#: Losses of :func:`musicrl_trl.trainers.dpo_loss.dpo_loss`, named as TRL names them.
DPO_LOSS_TYPES = ("sigmoid", "ipo", "hinge", "robust")


@dataclass
class MusicDPOConfig(TrainingArguments):
    r"""
    Configuration for [`MusicDPOTrainer`]: offline preference optimisation (DPO, Rafailov et al. 2023, and its
    variants) of a MusicGen policy on pairs of clips (prompt, chosen, rejected), straight from votes.

    The implicit reward of a clip ``y`` for prompt ``x`` is ``beta * (log pi(y | x) - log pi_ref(y | x))``, where
    ``log pi(y | x)`` sums the log-probs of the clip's real codes (K codebooks x T frames, not the delay pattern's
    pads) under the *sampling* distribution: classifier-free guidance ``guidance_scale`` and ``temperature`` applied
    exactly as ``generate`` applies them. ``top_k`` is not applied to the log-probs (a clip encoded from audio, or
    sampled by another system, has codes outside the policy's top k, whose log-prob would be ``-inf``); it is written
    into the saved generation config and used for the evaluation clips, so that the trained policy samples as the
    user asks.

    Parameters that control the loss:
        beta: temperature of the implicit reward (TRL's ``beta``); higher stays closer to the reference.
        loss_type: ``"sigmoid"`` (DPO), ``"ipo"`` (IPO, Azar et al. 2023; log-probs averaged per code, as TRL does),
            ``"hinge"`` (SLiC, Zhao et al. 2023), ``"robust"`` (rDPO, Chowdhury et al. 2024, for noisy votes).
        label_smoothing: assumed probability that a vote is flipped (cDPO / rDPO), in [0, 0.5).

    Parameters that control the reference:
        precompute_ref_log_probs: compute the reference's log-probs of every pair once before training; a fully
            fine-tuned policy then needs no frozen copy during training (one is kept only for the evaluation KL).
        precompute_ref_batch_size: pairs per batch of that pass (default ``per_device_train_batch_size``).

    Parameters that control the data:
        max_prompt_length: longest prompt in tokens; longer is an error.
        max_completion_length: keep at most this many frames (codes per codebook) of every clip (``None``: all).
        tie_threshold: a row whose ``tie`` is at least this is skipped (``tie`` is a bool or the share of listeners
            who heard no difference); DPO's loss needs a winner.
        skip_corrupt_rows / audio_sampling_rate: as in :class:`~musicrl_trl.AudioRewardConfig`.

    Metrics (TRL's names; ``eval_``-prefixed in evaluation): ``rewards/chosen``, ``rewards/rejected`` (mean implicit
    reward), ``rewards/accuracies`` (share of pairs whose chosen reward is higher), ``rewards/margins``,
    ``logps/chosen``, ``logps/rejected`` (mean sequence log-prob under the policy), ``num_ties_skipped``; evaluation
    adds ``eval_kl``: the exact KL(policy || reference) per clip, in nats, over the whole codebook under guidance and
    temperature, on ``eval_num_samples_per_prompt`` clips sampled for each eval prompt.
    """

    # Overridden defaults (TRL's DPOConfig)
    learning_rate: float = field(default=1e-6, metadata={"help": "AdamW learning rate (TRL's DPO default)."})
    logging_steps: float = field(default=10, metadata={"help": "Log every this many optimizer steps."})
    remove_unused_columns: bool = field(
        default=False, metadata={"help": "Kept False: the trainer reads the columns it needs itself."}
    )
    ddp_find_unused_parameters: bool | None = field(
        default=False,
        metadata={"help": "Every trainable parameter takes part in the loss: no extra DDP graph traversal."},
    )

    # Loss
    beta: float = field(default=0.1, metadata={"help": "DPO beta: temperature of the implicit reward."})
    loss_type: Literal["sigmoid", "ipo", "hinge", "robust"] = field(
        default="sigmoid",
        metadata={"help": "'sigmoid' (DPO), 'ipo', 'hinge' (SLiC) or 'robust' (rDPO, for noisy votes)."},
    )
    label_smoothing: float = field(
        default=0.0, metadata={"help": "Probability that a vote is flipped (cDPO/rDPO), in [0, 0.5)."}
    )

    # Reference
    precompute_ref_log_probs: bool = field(
        default=False,
        metadata={"help": "Compute the reference's log-probs once before training (no frozen copy while training)."},
    )
    precompute_ref_batch_size: int | None = field(
        default=None, metadata={"help": "Pairs per batch when precomputing (default: per_device_train_batch_size)."}
    )

    # Sampling distribution (as MusicPPOConfig)
    guidance_scale: float = field(
        default=1.0, metadata={"help": "Classifier-free guidance scale of the log-probs and samples; 1 disables it."}
    )
    temperature: float = field(default=1.0, metadata={"help": "Sampling temperature of the log-probs and samples."})
    top_k: int = field(
        default=0,
        metadata={"help": "Top-k of the saved generation config and eval samples (not of the log-probs); 0: none."},
    )
    response_length: int | None = field(
        default=None,
        metadata={
            "help": "Decoder steps of the eval clips and max_new_tokens of the saved generation config (default: "
            "the length of the first training clip)."
        },
    )

    # Data
    max_prompt_length: int = field(default=256, metadata={"help": "Longest prompt in tokens; longer is an error."})
    max_completion_length: int | None = field(
        default=None, metadata={"help": "Keep at most this many frames of every clip (None: all of it)."}
    )
    tie_threshold: float = field(
        default=0.5, metadata={"help": "Rows whose 'tie' is at least this are skipped (counted)."}
    )
    skip_corrupt_rows: bool = field(
        default=False, metadata={"help": "Skip rows that cannot be read (logged) instead of raising an error."}
    )
    audio_sampling_rate: int | None = field(
        default=None, metadata={"help": "Sampling rate of audio stored as bare arrays (no rate in the cell)."}
    )

    # Models
    train_text_encoder: bool = field(default=False, metadata={"help": "Also train the T5 text encoder."})
    save_merged_lora: bool = field(
        default=True, metadata={"help": "With LoRA, also save merged weights to <output_dir>/merged."}
    )
    allow_pickle_weights: bool = field(
        default=False,
        metadata={
            "help": "Load a model or ref_model id/path whose weights are pickles only (pytorch_model.bin); refused "
            "by default, since unpickling can run arbitrary code. Only for sources you trust."
        },
    )

    # Publishing (as MusicPPOConfig)
    push_lora: Literal["adapter", "merged", "both"] = field(
        default="both",
        metadata={
            "help": "What push_to_hub uploads for a LoRA policy: 'adapter', 'merged' or 'both' (merged at the root, "
            "the adapter in adapter/)."
        },
    )
    hub_dataset_name: str | None = field(
        default=None, metadata={"help": "Name or Hub id of the preference data, named on the model card."}
    )
    hub_license: str | None = field(
        default=None,
        metadata={
            "help": "Licence of the pushed model's card; default: the most restrictive of the base model's and the "
            "reference's, read from their cards."
        },
    )

    # Evaluation
    eval_num_samples_per_prompt: int = field(
        default=2, metadata={"help": "Clips sampled per eval prompt for eval_kl (0: no KL in evaluation)."}
    )

    def __post_init__(self):
        super().__post_init__()
        if not self.beta > 0:
            raise ValueError(f"beta must be > 0 (the implicit reward's temperature), got {self.beta}.")
        if self.loss_type not in DPO_LOSS_TYPES:
            raise ValueError(f"loss_type must be one of {', '.join(DPO_LOSS_TYPES)}, got {self.loss_type!r}.")
        if not 0 <= self.label_smoothing < 0.5:
            raise ValueError(f"label_smoothing must lie in [0, 0.5), got {self.label_smoothing}.")
        if self.label_smoothing and self.loss_type not in ("sigmoid", "robust"):
            raise ValueError(
                f"label_smoothing={self.label_smoothing} has no meaning for loss_type={self.loss_type!r}: use "
                "loss_type='sigmoid' (cDPO) or 'robust' (rDPO), or set label_smoothing=0."
            )
        from ..rollout import SamplingConfig

        SamplingConfig(self.guidance_scale, self.temperature, self.top_k)  # refuses values it cannot sample with
        for name in ("max_completion_length", "response_length", "precompute_ref_batch_size"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1 (or None), got {value}.")
        if not 0 < self.tie_threshold <= 1:
            raise ValueError(f"tie_threshold must lie in (0, 1], got {self.tie_threshold}.")
        if self.eval_num_samples_per_prompt < 0:
            raise ValueError(f"eval_num_samples_per_prompt must be >= 0, got {self.eval_num_samples_per_prompt}.")
        if self.push_lora not in ("adapter", "merged", "both"):
            raise ValueError(f"push_lora must be 'adapter', 'merged' or 'both', got {self.push_lora!r}.")
