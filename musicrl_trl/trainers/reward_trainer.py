"""Train audio reward models: Bradley-Terry on pairwise preferences, or regression on MOS ratings.

``AudioRewardTrainer`` is TRL's ``RewardTrainer`` for audio. It trains

- audio reward heads (``MusicRewardModel`` or any ``AutoModelForAudioClassification`` with one label) on waveforms,
- MusicRL's token-space preference model (``MusicTokenPreferenceModel``, ``scores_codes = True``) on MusicGen codes,

from one of two dataset layouts:

================  ===========================================================  ===========================
mode              columns (audio model)                                        columns (token-space model)
================  ===========================================================  ===========================
``pairwise``      ``prompt``, ``chosen``, ``rejected``, optional ``tie``      ``prompt``, ``chosen_codes``,
                                                                               ``rejected_codes``, ``tie``
``regression``    ``audio``, ``mos``, optional ``prompt``                      ``codes``, ``mos``, ``prompt``
================  ===========================================================  ===========================

Audio cells are ``datasets.Audio`` values, ``{"array", "sampling_rate"}`` dicts, file paths or bare arrays [N] /
[C, N] (with ``args.audio_sampling_rate``); code cells are integer arrays [K, T]. ``tie`` is a bool or a float in
[0, 1] (the share of listeners who heard no difference).

Losses (``r`` the model's scalar output): pairwise, binary cross-entropy of ``sigmoid(r_chosen - r_rejected)``
against the target ``1 - tie / 2``; for a decisive pair that is exactly Bradley-Terry's ``-log sigmoid(r_c - r_r)``,
for a full tie the target 1/2 (the Bradley-Terry likelihood of a coin flip), which pulls the two rewards together.
Regression: mean squared error against the MOS.

Metrics. Training logs (averaged over the logging window): ``loss``, ``accuracy`` (decisive pairs only), ``margin``
(mean r_c - r_r), ``mean_reward``, ``num_skipped_rows``; regression logs ``mse``. Evaluation
(``eval_``-prefixed): pairwise ``accuracy`` over pairs with a winner (ties never count), ``margin``, ``tie_fraction``;
regression ``mse``, ``spearman``, ``pearson``.

Shape letters: B batch (pairs or rated clips), C channels, N samples, K codebooks, T frames, L prompt tokens.
"""

from __future__ import annotations

import inspect
import logging
import os
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import torch
from datasets import Audio, Dataset
from torch import nn
from transformers import (
    AutoModelForAudioClassification,
    AutoProcessor,
    ByT5Tokenizer,
    FeatureExtractionMixin,
    PreTrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    ProcessorMixin,
    Trainer,
    TrainerCallback,
)
from transformers.trainer_utils import EvalPrediction

from .. import hub
from ..loading import load_pretrained, resolve_pretrained
from ..reward_models.modeling_music_reward import MusicRewardModel
from ..reward_models.token_preference import MusicTokenPreferenceModel
from .base import zero_dropout
from .checkpointing import CrashSafeCheckpointsMixin
from .publishing import HubPublishingMixin
from .reward_config import AudioRewardConfig
from .reward_data import (
    COLUMNS,
    SOURCE_ROW_COLUMN,
    DataCollatorForAudioReward,
    check_row,
    compute_reward_metrics,
)

__all__ = ["AudioRewardTrainer", "DataCollatorForAudioReward", "compute_reward_metrics"]

logger = logging.getLogger(__name__)

def _load_model(name: str, args: AudioRewardConfig) -> PreTrainedModel:
    """A reward model from a checkpoint id/path: a MusicGen checkpoint gives the token-space preference model."""
    kwargs = dict(args.model_init_kwargs or {})
    what, pickles = "reward model to train", args.allow_pickle_weights
    name = resolve_pretrained(name, what)  # a missing path or corrupt weights, said plainly
    model_type = PreTrainedConfig.get_config_dict(name)[0].get("model_type")
    if model_type == "musicgen":
        return MusicTokenPreferenceModel.from_musicgen(name, allow_pickle_weights=pickles, **kwargs)
    if model_type == MusicTokenPreferenceModel.config_class.model_type:
        load = MusicTokenPreferenceModel.from_pretrained
    else:
        load = AutoModelForAudioClassification.from_pretrained
        kwargs.setdefault("num_labels", 1)
    # load_pretrained refuses pickle-only weights unless allowed (from_pretrained would silently unpickle them).
    return load_pretrained(load, name, what, allow_pickle_weights=pickles, **kwargs)


class AudioRewardTrainer(HubPublishingMixin, CrashSafeCheckpointsMixin, Trainer):
    """Trainer for audio reward models from pairwise preferences (Bradley-Terry) or MOS ratings (regression).

    Args:
        model: the reward model (one scalar output, ``logits`` [B, 1]) or a checkpoint id/path: a MusicGen checkpoint
            becomes a ``MusicTokenPreferenceModel`` (MusicRL's recipe: initialise from the generator), any other goes
            through ``AutoModelForAudioClassification`` with ``num_labels=1``.
        args: :class:`AudioRewardConfig`.
        train_dataset, eval_dataset: ``datasets.Dataset`` with the columns of the module docstring (``eval_dataset``
            may be a dict of them). Every row is checked once at init (see ``skip_corrupt_rows``).
        processing_class: a tokenizer (prompts), a feature extractor (audio front-end of a Hub audio classifier) or a
            processor holding both (e.g. ``MusicgenProcessor``); ``None`` feeds raw waveforms and no prompts.
        data_collator: defaults to :class:`DataCollatorForAudioReward` built from ``args`` and the model.
        compute_metrics: defaults to :func:`compute_reward_metrics`.

    >>> args = AudioRewardConfig("out")
    >>> trainer = AudioRewardTrainer(model=reward_model, args=args, train_dataset=pairs)  # doctest: +SKIP
    >>> trainer.train(); trainer.save_model()  # doctest: +SKIP
    """

    _tag_names = ["trl", "reward-trainer", "musicrl-trl", "audio"]
    _name = "AudioReward"
    _paper = {
        "title": "MusicRL: Aligning Music Generation to Human Preferences",
        "id": "2402.04229",
        "citation": hub.MUSICRL_CITATION,
    }

    def __init__(
        self,
        model: PreTrainedModel | str,
        args: AudioRewardConfig | None = None,
        data_collator: Callable[[list[dict[str, Any]]], dict[str, Any]] | None = None,
        train_dataset: Dataset | None = None,
        eval_dataset: Dataset | dict[str, Dataset] | None = None,
        processing_class: PreTrainedTokenizerBase | FeatureExtractionMixin | ProcessorMixin | None = None,
        compute_metrics: Callable[[EvalPrediction], dict] | None = None,
        callbacks: list[TrainerCallback] | None = None,
        optimizers: tuple[torch.optim.Optimizer | None, torch.optim.lr_scheduler.LambdaLR | None] = (None, None),
        optimizer_cls_and_kwargs: tuple[type[torch.optim.Optimizer], dict[str, Any]] | None = None,
    ):
        self._capture_hub_sources(model)  # before a path is loaded or a temporary folder disappears
        if args is None:
            name = model if isinstance(model, str) else (model.config.name_or_path or model.config.model_type)
            args = AudioRewardConfig(f"{os.path.basename(str(name).rstrip('/'))}-reward")
        if train_dataset is None:
            raise ValueError("`train_dataset` is required.")
        if isinstance(model, str):
            model_name = model
            model = _load_model(model, args)
            if processing_class is None:
                processing_class = self._load_processing_class(model_name)
        elif args.model_init_kwargs is not None:
            logger.warning("`model_init_kwargs` is ignored: the model is already instantiated.")
        if model.config.num_labels != 1:
            raise ValueError(
                f"The model has num_labels={model.config.num_labels}, but a reward model outputs one scalar: build it "
                "with num_labels=1 (or pass a checkpoint name to have it configured)."
            )
        if args.disable_dropout:
            zero_dropout(model)

        # MusicTokenPreferenceModel (and any model that declares it) reads codes; everything else reads audio.
        self.input_kind = "codes" if getattr(type(model), "scores_codes", False) else "audio"
        self._forward_parameters = set(inspect.signature(model.forward).parameters)
        tokenizer, feature_extractor = self._split_processing_class(processing_class)
        if isinstance(model, MusicRewardModel):
            # MusicRewardModel takes prompts only when text-conditioned (it rejects input_ids otherwise), and then as
            # ByT5 byte ids, whose tokenizer needs no files.
            uses_prompts = bool(model.config.text_vocab_size)
            tokenizer = (tokenizer or ByT5Tokenizer()) if uses_prompts else None
        elif self.input_kind == "audio" and "input_ids" not in self._forward_parameters:
            tokenizer = None  # an audio-only classifier: prompts have nowhere to go
        if feature_extractor is not None and self.input_kind == "codes":
            feature_extractor = None  # a MusicgenProcessor's codec front-end: codes need no audio features
        if feature_extractor is not None and not args.mono:
            raise ValueError("Feature extractors take mono clips: set mono=True or pass processing_class=None.")
        self.mode = args.mode or self._infer_mode(train_dataset)
        if tokenizer is None and "prompt" in train_dataset.column_names and self.input_kind == "codes":
            logger.warning(
                "The dataset has prompts but no tokenizer was given: the token-space model scores the codes without "
                "them. Pass the MusicGen processor (or its tokenizer) as processing_class to condition on the prompt."
            )
        self.sampling_rate = self._resolve_sampling_rate(args, model, feature_extractor)

        if data_collator is None:
            decoder_config = model.config.decoder if self.input_kind == "codes" else None
            data_collator = DataCollatorForAudioReward(
                mode=self.mode,
                input_kind=self.input_kind,
                sampling_rate=self.sampling_rate,
                audio_sampling_rate=args.audio_sampling_rate,
                resample=args.resample,
                mono=args.mono,
                max_length=args.max_length,
                pad_to_multiple_of=args.pad_to_multiple_of,
                tokenizer=tokenizer,
                max_prompt_length=args.max_prompt_length,
                feature_extractor=feature_extractor,
                num_codebooks=decoder_config.num_codebooks if decoder_config is not None else None,
                codebook_size=decoder_config.vocab_size if decoder_config is not None else None,
                code_pad_token_id=decoder_config.pad_token_id if decoder_config is not None else None,
            )
        # Row validation uses the collator's own readers, so a row that passes is a row the collator can batch.
        self._row_collator = data_collator if isinstance(data_collator, DataCollatorForAudioReward) else None
        self.args = args  # _prepare_dataset reads it before Trainer.__init__ sets it
        self.num_skipped_rows = 0
        self.skipped_rows: dict[str, list[int]] = {}
        train_dataset = self._prepare_dataset(train_dataset, "train")
        if isinstance(eval_dataset, dict):
            eval_dataset = {key: self._prepare_dataset(data, f"eval_{key}") for key, data in eval_dataset.items()}
        elif eval_dataset is not None:
            eval_dataset = self._prepare_dataset(eval_dataset, "eval")

        super().__init__(
            model=model,
            args=args,
            data_collator=data_collator,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            compute_metrics=compute_metrics if compute_metrics is not None else compute_reward_metrics,
            callbacks=callbacks,
            optimizers=optimizers,
            optimizer_cls_and_kwargs=optimizer_cls_and_kwargs,
        )
        # The loss is computed here, not by the model: Trainer must neither pass loss kwargs nor look for labels,
        # and must scale the loss for gradient accumulation itself (as TRL's RewardTrainer does).
        self.model_accepts_loss_kwargs = False
        self.label_names = []
        self.can_return_loss = True
        # Training metrics of the current logging window (evaluation metrics come from compute_metrics).
        self._metrics: dict[str, list[float]] = defaultdict(list)
        if isinstance(self.model, PreTrainedModel):
            self.model.add_model_tags(self._tag_names)
        self._remove_stale_checkpoint_staging()

    def train(self, resume_from_checkpoint: str | bool | None = None, trial=None, ignore_keys_for_eval=None):
        """``Trainer.train``; ``resume_from_checkpoint=True`` takes the newest *complete* checkpoint (Trainer takes
        the highest-numbered folder, finished or not); a checkpoint path must be complete (see checkpointing.py)."""
        if resume_from_checkpoint:
            resume_from_checkpoint = self._resolve_resume_checkpoint(resume_from_checkpoint)
        return super().train(resume_from_checkpoint, trial, ignore_keys_for_eval)

    # ---- setup helpers ---------------------------------------------------------------------------------------------

    @staticmethod
    def _load_processing_class(name: str) -> Any:
        try:
            return AutoProcessor.from_pretrained(name)
        except (OSError, ValueError, TypeError, KeyError):
            # Audio reward heads with a built-in front-end (MusicRewardModel) ship no processor: raw waveforms.
            logger.info("No processor found at %s: feeding raw waveforms and no prompt tokens.", name)
            return None

    @staticmethod
    def _split_processing_class(
        processing_class: Any,
    ) -> tuple[PreTrainedTokenizerBase | None, FeatureExtractionMixin | None]:
        if processing_class is None:
            return None, None
        if isinstance(processing_class, PreTrainedTokenizerBase):
            return processing_class, None
        if isinstance(processing_class, FeatureExtractionMixin):
            return None, processing_class
        if isinstance(processing_class, ProcessorMixin):
            return getattr(processing_class, "tokenizer", None), getattr(processing_class, "feature_extractor", None)
        raise TypeError(
            "processing_class must be a tokenizer, a feature extractor, a processor or None, got "
            f"{type(processing_class).__name__}."
        )

    def _infer_mode(self, dataset: Dataset) -> str:
        columns = set(dataset.column_names)
        for mode in ("pairwise", "regression"):
            if set(COLUMNS[(mode, self.input_kind)][0]) <= columns:
                return mode
        expected = " or ".join(str(list(COLUMNS[(mode, self.input_kind)][0])) for mode in ("pairwise", "regression"))
        raise ValueError(
            f"Cannot tell the training mode from the columns {sorted(columns)}: a {self.input_kind} reward model "
            f"needs {expected}. Rename the columns (`dataset.rename_column`) or set `mode`."
        )

    @staticmethod
    def _resolve_sampling_rate(
        args: AudioRewardConfig, model: PreTrainedModel, feature_extractor: FeatureExtractionMixin | None
    ) -> int | None:
        # Explicit argument first, then the front-end's rate (what the checkpoint was trained on), then the model's.
        if args.sampling_rate is not None:
            return args.sampling_rate
        if feature_extractor is not None and getattr(feature_extractor, "sampling_rate", None) is not None:
            return int(feature_extractor.sampling_rate)
        if getattr(model.config, "sampling_rate", None) is not None:
            return int(model.config.sampling_rate)
        if getattr(type(model), "scores_codes", False):
            return None
        raise ValueError(
            f"Cannot tell which sampling rate {type(model).__name__} reads: set `sampling_rate` in AudioRewardConfig."
        )

    # ---- data ------------------------------------------------------------------------------------------------------

    def _prepare_dataset(self, dataset: Dataset, name: str) -> Dataset:
        """Check every row once (drop or report corrupt ones); Audio columns are read undecoded (soundfile later)."""
        if not isinstance(dataset, Dataset):
            raise TypeError(
                f"The {name} dataset must be a datasets.Dataset (map-style), got {type(dataset).__name__}: rows are "
                "validated up front, which a streaming dataset does not allow."
            )
        required, optional = COLUMNS[(self.mode, self.input_kind)]
        missing = [column for column in required if column not in dataset.column_names]
        if missing:
            raise ValueError(
                f"The {name} dataset lacks the column(s) {missing} that {self.mode} training of a {self.input_kind} "
                f"reward model needs (it has {dataset.column_names}). Rename yours with `dataset.rename_column(old, "
                f"new)` or pick the other `mode`."
            )
        for column in required + optional:
            feature = dataset.features.get(column)
            if isinstance(feature, Audio) and feature.decode:
                # Decoding Audio columns needs torchcodec in datasets >= 4; soundfile reads the stored bytes here.
                dataset = dataset.cast_column(column, Audio(decode=False))
        if self._row_collator is None:
            return dataset  # a custom collator: its rows are its business

        columns = [column for column in required + optional if column in dataset.column_names]
        checker = self._row_collator
        errors = dataset.map(
            check_row,
            fn_kwargs={"collator": checker, "columns": columns},
            input_columns=columns,
            remove_columns=dataset.column_names,
            num_proc=self.args.dataset_num_proc,
            desc=f"Checking {name} rows",
            load_from_cache_file=False,
        )["error"]
        bad = [index for index, error in enumerate(errors) if error]
        if not bad:
            return dataset
        # Rows are counted in the user's own dataset when a SOURCE_ROW_COLUMN says where each came from (a script
        # that splits or filters first adds it); else by position in the dataset given.
        if SOURCE_ROW_COLUMN in dataset.column_names:
            source_rows = dataset[SOURCE_ROW_COLUMN]
            rows, where = [source_rows[index] for index in bad], f"of the dataset (in the {name} split)"
        else:
            rows, where = bad, f"of the {name} dataset"
        if not self.args.skip_corrupt_rows:
            more = f" ({len(bad) - 1} more corrupt rows follow.)" if len(bad) > 1 else ""
            raise ValueError(
                f"Row {rows[0]} {where}, {errors[bad[0]]} Or set skip_corrupt_rows=True (the scripts' "
                f"--skip_corrupt_rows) to skip such rows.{more}"
            )
        logger.warning("Skipping %d corrupt rows %s, e.g. row %d: %s", len(bad), where, rows[0], errors[bad[0]])
        self.skipped_rows[name] = rows
        self.num_skipped_rows += len(bad)
        keep = sorted(set(range(len(dataset))) - set(bad))
        if not keep:
            raise ValueError(f"Every row of the {name} dataset is corrupt, e.g. row {bad[0]}: {errors[bad[0]]}")
        return dataset.select(keep)

    def _set_signature_columns_if_needed(self):
        # Trainer keeps only the model's forward arguments; this trainer's inputs are the dataset columns instead.
        if self._signature_columns is None:
            required, optional = COLUMNS[(self.mode, self.input_kind)]
            self._signature_columns = list(required + optional)

    def evaluate(
        self,
        eval_dataset: Dataset | dict[str, Dataset] | str | None = None,
        ignore_keys: list[str] | None = None,
        metric_key_prefix: str = "eval",
    ) -> dict[str, float]:
        # A dataset passed here (a held-out test set) gets the same checks as those given at init.
        if isinstance(eval_dataset, Dataset):
            eval_dataset = self._prepare_dataset(eval_dataset, metric_key_prefix)
        elif isinstance(eval_dataset, dict):
            eval_dataset = {
                key: self._prepare_dataset(data, f"{metric_key_prefix}_{key}") for key, data in eval_dataset.items()
            }
        return super().evaluate(
            eval_dataset=eval_dataset, ignore_keys=ignore_keys, metric_key_prefix=metric_key_prefix
        )

    # ---- loss ------------------------------------------------------------------------------------------------------

    def compute_rewards(self, model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """Scalar rewards [B'] of a collated batch (chosen rows first for pairwise batches)."""
        if self.input_kind == "codes":
            kwargs = {"codes": inputs["codes"], "codes_attention_mask": inputs["codes_attention_mask"]}
            if "prompt_input_ids" in inputs:
                kwargs["input_ids"] = inputs["prompt_input_ids"]
                kwargs["attention_mask"] = inputs["prompt_attention_mask"]
        else:
            reserved = {"targets", "audio_attention_mask", "prompt_input_ids", "prompt_attention_mask"}
            kwargs = {key: value for key, value in inputs.items() if key not in reserved}
            if "audio_attention_mask" in inputs and "attention_mask" in self._forward_parameters:
                kwargs["attention_mask"] = inputs["audio_attention_mask"]
            if "prompt_input_ids" in inputs and "input_ids" in self._forward_parameters:
                kwargs["input_ids"] = inputs["prompt_input_ids"]
            if "prompt_input_ids" in inputs and "text_attention_mask" in self._forward_parameters:
                kwargs["text_attention_mask"] = inputs["prompt_attention_mask"]
            if self.sampling_rate is not None and "sampling_rate" in self._forward_parameters:
                kwargs["sampling_rate"] = self.sampling_rate
        logits = model(**kwargs).logits  # [B', 1]
        return logits.reshape(-1).float()

    def reward_loss(self, rewards: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        """The training loss of a batch and its metrics (see the module docstring)."""
        if self.mode == "regression":
            mse = nn.functional.mse_loss(rewards, targets.float())
            return mse, {"mse": mse.item(), "mean_reward": rewards.mean().item()}
        rewards_chosen, rewards_rejected = rewards.chunk(2)  # [B], [B]
        margins = rewards_chosen - rewards_rejected
        # BCE against 1 - tie/2: -log sigmoid(margin) for decisive pairs (Bradley-Terry), a pull towards equal
        # rewards for ties.
        per_pair = nn.functional.binary_cross_entropy_with_logits(margins, targets, reduction="none")
        decisive = targets >= 1.0
        if self.args.tie_loss == "ignore":
            weights = decisive.to(per_pair.dtype)
            loss = (per_pair * weights).sum() / weights.sum().clamp(min=1.0)
        else:
            loss = per_pair.mean()
        if self.args.center_rewards_coefficient is not None:
            loss = loss + self.args.center_rewards_coefficient * torch.mean((rewards_chosen + rewards_rejected) ** 2)
        with torch.no_grad():
            won = targets > 0.5
            metrics = {"mean_reward": rewards.mean().item(), "margin": margins.mean().item()}
            metrics["_correct"] = float((margins[won] > 0).sum().item())
            metrics["_decisive"] = float(won.sum().item())
        return loss, metrics

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, torch.Tensor],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, dict[str, torch.Tensor]]:
        rewards = self.compute_rewards(model, inputs)
        loss, metrics = self.reward_loss(rewards, inputs["targets"])
        if model.training:
            for key, value in metrics.items():
                self._metrics[key].append(value)
        return (loss, {"rewards": rewards}) if return_outputs else loss

    def prediction_step(
        self,
        model: nn.Module,
        inputs: dict[str, torch.Tensor],
        prediction_loss_only: bool,
        ignore_keys: list[str] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """Loss, rewards ([B, 2] chosen/rejected for pairs, [B] for ratings) and targets of an eval batch."""
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            rewards = self.compute_rewards(model, inputs)
            loss, _ = self.reward_loss(rewards, inputs["targets"])
        if prediction_loss_only:
            return loss.detach(), None, None
        if self.mode == "pairwise":
            rewards = torch.stack(rewards.chunk(2), dim=-1)
        return loss.detach(), rewards.detach(), inputs["targets"].detach()

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs and self._metrics:  # a training log: add the window's metrics, summed over all processes
            keys = sorted(self._metrics)
            sums = torch.tensor([sum(self._metrics[key]) for key in keys], device=self.accelerator.device)
            counts = torch.tensor([len(self._metrics[key]) for key in keys], device=self.accelerator.device)
            sums, counts = (
                self.accelerator.reduce(sums, "sum").tolist(),
                self.accelerator.reduce(counts, "sum").tolist(),
            )
            window = dict(zip(keys, zip(sums, counts)))
            # Accuracy is correct / decisive over the window, not a mean of batch means: batches hold different
            # numbers of ties.
            correct, decisive = window.pop("_correct", (0.0, 0))[0], window.pop("_decisive", (0.0, 0))[0]
            logs.update({key: total / count for key, (total, count) in window.items() if count})
            if decisive:
                logs["accuracy"] = correct / decisive
            logs["num_skipped_rows"] = self.num_skipped_rows
            self._metrics.clear()
        super().log(logs, start_time)

    # ---- publishing (see musicrl_trl.hub) ---------------------------------------------------------------------------

    def license_resolution(self, override: str | None = None) -> hub.LicenseResolution:
        """``override``, else the licence of the model the reward model starts from (its card or config)."""
        return hub.resolve_license([hub.find_license(self.hub_base_model, "base model")], override)

    def create_model_card(
        self,
        model_name: str | None = None,
        dataset_name: str | None = None,
        tags: str | list[str] | None = None,
        output_dir: str | None = None,
        license: str | None = None,
        repo_id: str | None = None,
        **kwargs: Any,
    ) -> hub.LicenseResolution | None:
        """Write the reward-model card (``hub_cards/reward_card.md.jinja``) to ``output_dir/README.md``; returns the
        licence resolution. Extra ``Trainer.create_model_card`` arguments (``language``, ``tasks``...) are ignored."""
        return self._write_card(
            output_dir, license,
            lambda output_dir, resolution: hub.render_reward_card(
                self, resolution, repo_id=repo_id or self.hub_model_id or self.args.hub_model_id,
                output_dir=output_dir, dataset_name=dataset_name,
            ),
        )

    def _prepare_push(self, revision: str | None, options: dict[str, Any]) -> tuple[dict[str, str], Any]:
        """For ``push_to_hub``: the reward model, its feature extractor/processor and card (``dataset_name=`` or
        Trainer's ``dataset=``, and ``license=``, go to the card; Trainer's other card arguments are ignored)."""
        dataset_name = options.pop("dataset_name", None) or options.pop("dataset", None)
        resolution = self.create_model_card(
            dataset_name=dataset_name, license=options.pop("license", None), repo_id=self.hub_model_id
        )
        for ignored in ("model_name", "language", "tags", "finetuned_from", "tasks", "dataset_tags", "dataset_args"):
            options.pop(ignored, None)
        return hub.hub_files(self.args.output_dir, subfolders=()), resolution

    def _save_checkpoint_extras(self, checkpoint_dir: str) -> None:
        # The card goes into the staged folder, so that a published checkpoint-N carries it (see checkpointing.py).
        if self.args.should_save:
            self.create_model_card(output_dir=checkpoint_dir)

    def _checkpoint_push_files(self, checkpoint_folder: str) -> dict[str, str]:
        """A checkpoint's weights and card; optimizer, scheduler, RNG and trainer state stay local."""
        self.create_model_card(output_dir=checkpoint_folder)
        files = hub.hub_files(checkpoint_folder, subfolders=())
        files.pop("trainer_state.json", None)
        return files
