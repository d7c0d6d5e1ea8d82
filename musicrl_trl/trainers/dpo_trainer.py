"""MusicDPOTrainer: preference optimisation of a MusicGen policy straight from pairwise votes (DPO, IPO, ...).

No reward model and no rollouts: every step scores the chosen and rejected clips of a batch of pairs under the
policy and the reference by teacher forcing (:func:`.dpo_loss.sequence_logprobs`, the RL trainer's log-probs summed
over each clip's real codes) and applies a preference loss (:func:`.dpo_loss.dpo_loss`). It is a plain
``transformers.Trainer`` (its loop, gradient accumulation, DDP/DeepSpeed, logging, checkpoints and resume), with the
library's crash-safe checkpoints (:mod:`.checkpointing`) and Hub publishing (:mod:`.publishing`).

The reference is ``ref_model`` if given; else, for a LoRA policy, the policy with its adapter disabled (no second
copy); else the starting policy itself: with ``precompute_ref_log_probs`` its log-probs of every pair are computed
once before training, without a copy; otherwise a frozen copy is kept.

Shape letters: B pairs, B' = 2B clips (chosen first), K codebooks, T frames, L prompt tokens.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
from collections import defaultdict
from typing import Any

import torch
import torch.nn as nn
from datasets import Dataset
from torch.utils.data import DataLoader
from transformers import (
    GenerationConfig,
    MusicgenForConditionalGeneration,
    MusicgenProcessor,
    Trainer,
    TrainerCallback,
)

from .. import codebooks, hub
from ..rollout import SamplingConfig, generate_rollout, unwrap_musicgen
from .base import AdapterDisabledView, OnlineMusicTrainer, load_policy_and_anchor, prepare_models_for_training
from .checkpointing import CrashSafeCheckpointsMixin
from .dpo_config import MusicDPOConfig
from .dpo_data import PAIR_COLUMNS, DataCollatorForMusicDPO, prepare_pairs
from .dpo_loss import dpo_loss, sequence_logprobs
from .publishing import PolicyPublishingMixin

__all__ = ["MusicDPOTrainer"]

logger = logging.getLogger(__name__)

DPO_CITATION = """\
@inproceedings{rafailov2023direct,
    title     = {{Direct Preference Optimization: Your Language Model is Secretly a Reward Model}},
    author    = {Rafael Rafailov and Archit Sharma and Eric Mitchell and Christopher D. Manning and Stefano Ermon and
                 Chelsea Finn},
    year      = 2023,
    booktitle = {Advances in Neural Information Processing Systems 36},
}"""
#: Metric sums kept per logging window; divided by the pair count when logged.
METRICS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
           "logps/rejected")  # fmt: skip


class MusicDPOTrainer(PolicyPublishingMixin, CrashSafeCheckpointsMixin, Trainer):
    """Offline preference optimisation of a MusicGen policy on (prompt, chosen, rejected) pairs.

    Args:
        model: ``MusicgenForConditionalGeneration``, or a model id / path to load one from.
        ref_model: the reference (model or path). ``None``: the adapter-disabled policy with LoRA, else the starting
            policy (precomputed with ``precompute_ref_log_probs``, else a frozen copy).
        args: a :class:`MusicDPOConfig`.
        train_dataset: preference pairs (see :mod:`.dpo_data`: audio as ``musicrl-app export`` writes it, or codes).
        eval_dataset: pairs (evaluated with the training metrics), or prompts only; the prompts of either give
            ``eval_kl``.
        processing_class: the ``MusicgenProcessor`` (``None`` loads it from ``model`` when that is an id or path).
        callbacks: extra ``TrainerCallback``s.
        peft_config: a ``peft.LoraConfig`` to train LoRA adapters instead of the full decoder.

    >>> trainer = MusicDPOTrainer(model, args=MusicDPOConfig("out"), train_dataset=votes)  # doctest: +SKIP
    >>> trainer.train(); trainer.save_model()  # doctest: +SKIP
    """

    _tag_names = ["trl", "dpo", "musicrl-trl", "musicgen", "text-to-audio"]
    _name = "MusicDPO"
    _paper = {
        "title": "Direct Preference Optimization: Your Language Model is Secretly a Reward Model",
        "id": "2305.18290",
        "citation": DPO_CITATION,
    }

    def __init__(
        self,
        model: MusicgenForConditionalGeneration | str,
        ref_model: MusicgenForConditionalGeneration | str | None = None,
        args: MusicDPOConfig | None = None,
        train_dataset: Dataset | None = None,
        eval_dataset: Dataset | None = None,
        processing_class: MusicgenProcessor | None = None,
        callbacks: list[TrainerCallback] | None = None,
        peft_config=None,
    ):
        if args is None:
            args = MusicDPOConfig("musicgen-dpo")
        if not isinstance(args, MusicDPOConfig):
            raise TypeError(f"args must be a MusicDPOConfig, got {type(args).__name__}.")
        self._capture_hub_sources(model, ref_model)  # before a path is loaded or a temporary folder disappears
        model, ref_model, processing_class = load_policy_and_anchor(
            model, ref_model, processing_class, args.allow_pickle_weights, anchor_role="reference"
        )
        if train_dataset is None:
            raise ValueError("train_dataset is required: preference pairs (prompt, chosen, rejected).")
        prepare_models_for_training(model, ref_model, peft_config, model.device, args.train_text_encoder)

        musicgen = unwrap_musicgen(model)
        self.audio_channels = musicgen.decoder.config.audio_channels
        self.pad_token_id = musicgen.decoder.config.pad_token_id
        self.sampling = SamplingConfig(args.guidance_scale, args.temperature, args.top_k)
        self.args = args  # prepare_pairs reads it before Trainer.__init__ sets it
        train = prepare_pairs(train_dataset, model, args, "train")
        self.num_ties_skipped, self.num_skipped_rows = train.num_ties_skipped, len(train.skipped_rows)
        self.input_kind, self.num_pairs = train.input_kind, len(train.dataset)
        self.eval_prompts: list[str] = []
        if eval_dataset is not None:
            eval_dataset, self.eval_prompts = self._prepare_eval(eval_dataset, model, args)
        frames = max(len(codes[0]) for column in PAIR_COLUMNS["codes"] for codes in train.dataset[column])
        delay = codebooks.max_delay(musicgen.decoder.num_codebooks, self.audio_channels)
        if frames + delay + 1 > musicgen.decoder.config.max_position_embeddings:
            raise ValueError(
                f"clips of {frames} frames need {frames + delay + 1} decoder positions, more than the decoder's "
                f"{musicgen.decoder.config.max_position_embeddings}: set max_completion_length to at most "
                f"{musicgen.decoder.config.max_position_embeddings - delay - 1} frames."
            )
        first_frames = len(train.dataset[0]["chosen_codes"][0])
        self.response_length = args.response_length or max(
            first_frames + delay, codebooks.min_decoder_steps(musicgen.decoder.num_codebooks, self.audio_channels)
        )

        policy = OnlineMusicTrainer.wrap_policy(model, peft_config, bool(args.bf16))
        from peft import PeftModel

        self.is_peft_model = isinstance(policy, PeftModel)
        needs_eval_anchor = bool(self.eval_prompts) and args.eval_num_samples_per_prompt > 0
        if ref_model is None and args.precompute_ref_log_probs and not needs_eval_anchor:
            ref_model = None  # the starting policy scores the pairs once, below: no copy
        else:
            ref_model = OnlineMusicTrainer.build_anchor(policy, ref_model)

        Trainer.__init__(
            self,
            model=policy,
            args=args,
            data_collator=DataCollatorForMusicDPO(processing_class, self.pad_token_id, args.max_prompt_length),
            train_dataset=train.dataset,
            eval_dataset=eval_dataset,
            # Not Trainer's processing_class: Trainer.train would "align" the model's special tokens with T5's
            # (MusicGen's config has two text configs, and its pad token 2048 is not the tokenizer's 0). The
            # processor is kept here and saved by save_model.
            processing_class=None,
            callbacks=callbacks,
        )
        self.processor = processing_class
        # The loss is computed here, not by the model: Trainer must neither pass loss kwargs nor look for labels,
        # and scales the loss for gradient accumulation itself (as TRL's DPOTrainer).
        self.model_accepts_loss_kwargs = False
        self.label_names = []
        self.can_return_loss = True
        self.ref_model = ref_model
        if ref_model is not None:
            self.ref_model = ref_model.to(self.args.device).eval().requires_grad_(False)
        self._metrics: dict[str, dict[str, list[float]]] = {"train": defaultdict(list), "eval": defaultdict(list)}
        if self.is_peft_model and self.hub_base_model is not None:
            # peft records the base model's name_or_path at wrapping time; make it the id or path the user gave.
            for config in policy.peft_config.values():
                config.base_model_name_or_path = self.hub_base_model
        self._hub_license_sources = None
        # The policy samples as it was trained from here on (its generate(), the saved generation_config.json).
        unwrap_musicgen(policy).generation_config = self.trained_generation_config()
        if args.precompute_ref_log_probs:
            self.train_dataset = self._with_reference_logps(self.train_dataset)
            if self.eval_dataset is not None and "chosen_codes" in self.eval_dataset.column_names:
                self.eval_dataset = self._with_reference_logps(self.eval_dataset)
            if not needs_eval_anchor:
                self.ref_model = None  # a given reference has scored every pair: free its memory for training
        self._remove_stale_checkpoint_staging()

    # ------------------------------------------------------------------ set-up
    @staticmethod
    def _prepare_eval(dataset, model, args: MusicDPOConfig) -> tuple[Dataset, list[str]]:
        """Eval pairs (read like the training pairs) or prompts only; and the eval prompts, each once."""
        if isinstance(dataset, Dataset) and not any(set(pair) <= set(dataset.column_names)
                                                    for pair in PAIR_COLUMNS.values()):  # fmt: skip
            if "prompt" not in dataset.column_names:
                raise ValueError(
                    f"eval_dataset has the columns {dataset.column_names}: give preference pairs (as train_dataset) "
                    "or prompts (a 'prompt' column) for the KL to the reference."
                )
            return dataset, list(dict.fromkeys(dataset["prompt"]))
        pairs = prepare_pairs(dataset, model, args, "eval").dataset
        return pairs, list(dict.fromkeys(pairs["prompt"]))

    def _set_signature_columns_if_needed(self):
        # Trainer keeps only the model's forward arguments; this trainer's inputs are the dataset columns instead.
        if self._signature_columns is None:
            self._signature_columns = ["prompt", "chosen_codes", "rejected_codes", "ref_chosen_logps",
                                       "ref_rejected_logps"]  # fmt: skip

    # ------------------------------------------------------------------ log-probs and loss
    def sequence_logps(self, model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """log pi(clip | prompt) [B'] of a collated batch under ``model`` (see :func:`.dpo_loss.sequence_logprobs`;
        averaged per code for IPO, as TRL does)."""
        return sequence_logprobs(
            model, inputs["prompt_ids"], inputs["prompt_mask"], inputs["codes"], inputs["frame_mask"], self.sampling,
            self.pad_token_id, self.audio_channels, average=self.args.loss_type == "ipo",
        )

    @contextlib.contextmanager
    def reference_context(self):
        """Within it, :meth:`reference_module` is the reference: the LoRA policy's adapter is disabled."""
        policy = self.accelerator.unwrap_model(self.model)
        with policy.disable_adapter() if self.is_peft_model and self.ref_model is None else contextlib.nullcontext():
            yield

    def reference_module(self) -> nn.Module:
        """The reference as a module: the separate model, or the (unwrapped) policy, to use in
        :meth:`reference_context`."""
        return self.ref_model if self.ref_model is not None else self.accelerator.unwrap_model(self.model)

    @torch.no_grad()
    def reference_logps(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """log pi_ref(clip | prompt) [B'] of a collated batch."""
        if self.ref_model is None and not self.is_peft_model and not self._scoring_start:
            raise RuntimeError(
                "the reference log-probs were precomputed but this batch has none: pass datasets through the trainer "
                "(evaluate(eval_dataset) prepares them), or set precompute_ref_log_probs=False."
            )
        with self.reference_context():
            return self.sequence_logps(self.reference_module(), inputs)

    _scoring_start = False  # True while the starting policy scores the pairs as the reference

    def _with_reference_logps(self, dataset: Dataset) -> Dataset:
        """``dataset`` with the reference's log-probs of every pair (``ref_chosen_logps`` / ``ref_rejected_logps``),
        computed once; without a separate reference that is the policy as it starts (or with its adapter off)."""
        batch_size = self.args.precompute_ref_batch_size or self.args.per_device_train_batch_size
        loader = DataLoader(dataset, batch_size=batch_size, collate_fn=self.data_collator, shuffle=False)
        chosen, rejected = [], []
        self._scoring_start = True
        was_training = self.model.training
        self.model.eval()
        try:
            for batch in loader:
                batch = self._prepare_inputs(batch)
                with self.compute_loss_context_manager():  # the training precision, so that rewards start at 0
                    ref_chosen, ref_rejected = self.reference_logps(batch).float().chunk(2)
                chosen += ref_chosen.tolist()
                rejected += ref_rejected.tolist()
        finally:
            self._scoring_start = False
            self.model.train(was_training)
        columns = [c for c in ("ref_chosen_logps", "ref_rejected_logps") if c in dataset.column_names]
        dataset = dataset.remove_columns(columns)
        return dataset.add_column("ref_chosen_logps", chosen).add_column("ref_rejected_logps", rejected)

    def dpo_loss_and_metrics(
        self, model: nn.Module, inputs: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """The mean loss of a batch of pairs and the sums of its metrics (TRL's names, plus ``_pairs``)."""
        logps = self.sequence_logps(model, inputs)
        chosen, rejected = logps.chunk(2)
        if "ref_chosen_logps" in inputs:
            ref_chosen, ref_rejected = inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]
        else:
            ref_chosen, ref_rejected = self.reference_logps(inputs).chunk(2)
        args = self.args
        losses, chosen_rewards, rejected_rewards = dpo_loss(
            chosen, rejected, ref_chosen, ref_rejected, args.beta, args.loss_type, args.label_smoothing
        )
        metrics = {
            "rewards/chosen": chosen_rewards.sum().item(),
            "rewards/rejected": rejected_rewards.sum().item(),
            "rewards/accuracies": (chosen_rewards > rejected_rewards).float().sum().item(),
            "rewards/margins": (chosen_rewards - rejected_rewards).sum().item(),
            "logps/chosen": chosen.detach().sum().item(),
            "logps/rejected": rejected.detach().sum().item(),
            "_pairs": float(len(chosen)),
        }
        return losses.mean(), metrics

    def compute_loss(self, model, inputs, return_outputs: bool = False, num_items_in_batch=None):
        loss, metrics = self.dpo_loss_and_metrics(model, inputs)
        for key, value in metrics.items():
            self._metrics["train" if model.training else "eval"][key].append(value)
        return (loss, metrics) if return_outputs else loss

    def prediction_step(self, model, inputs, prediction_loss_only: bool, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss, metrics = self.dpo_loss_and_metrics(model, inputs)
        for key, value in metrics.items():
            self._metrics["eval"][key].append(value)
        return loss.detach(), None, None

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        # A training log (with "loss") gets the window's training metrics, an evaluation log ("eval_loss") the
        # evaluation's; sums over all processes, divided by the number of pairs.
        mode = "eval" if any(key.startswith("eval_") for key in logs) else "train"
        window = self._metrics[mode]
        if window and ("loss" in logs or "eval_loss" in logs):
            keys = sorted(window)
            sums = torch.tensor([sum(window[k]) for k in keys], device=self.accelerator.device, dtype=torch.float64)
            totals = dict(zip(keys, self.accelerator.reduce(sums, "sum").tolist()))
            pairs = totals.pop("_pairs")
            prefix = "eval_" if mode == "eval" else ""
            logs.update({f"{prefix}{key}": total / pairs for key, total in totals.items()})
            window.clear()
        if mode == "train" and "loss" in logs:
            logs["num_ties_skipped"] = self.num_ties_skipped
        super().log(logs, start_time)

    # ------------------------------------------------------------------ training and evaluation
    def train(self, resume_from_checkpoint: str | bool | None = None, trial=None, ignore_keys_for_eval=None):
        """``Trainer.train``; ``resume_from_checkpoint=True`` takes the newest *complete* checkpoint (see
        :mod:`.checkpointing`)."""
        if resume_from_checkpoint:
            resume_from_checkpoint = self._resolve_resume_checkpoint(resume_from_checkpoint)
        return super().train(resume_from_checkpoint, trial, ignore_keys_for_eval)

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict[str, float]:
        """The training metrics on eval pairs (``eval_rewards/accuracies``...) and ``eval_kl``: the exact
        KL(policy || reference) per clip on ``eval_num_samples_per_prompt`` clips sampled for every eval prompt
        (seed ``args.seed + i`` for prompt i, in a forked RNG). ``eval_dataset`` given here is read like the one given
        at init."""
        prompts = self.eval_prompts
        if eval_dataset is not None:
            eval_dataset, prompts = self._prepare_eval(eval_dataset, self.accelerator.unwrap_model(self.model),
                                                       self.args)  # fmt: skip
            if self.args.precompute_ref_log_probs and "chosen_codes" in eval_dataset.column_names:
                eval_dataset = self._with_reference_logps(eval_dataset)
        dataset = eval_dataset if eval_dataset is not None else self.eval_dataset
        if dataset is None:
            raise ValueError("evaluate() needs an eval_dataset (pairs or prompts): pass one here or at init.")
        metrics: dict[str, float] = {}
        if "chosen_codes" in dataset.column_names:
            metrics = super().evaluate(dataset, ignore_keys, metric_key_prefix)
        if prompts and self.args.eval_num_samples_per_prompt > 0:
            kl = {f"{metric_key_prefix}_kl": self._eval_kl(prompts)}
            self.log(kl)
            metrics.update(kl)
        return metrics

    @torch.no_grad()
    def _eval_kl(self, prompts: list[str]) -> float:
        """Mean exact KL(policy || reference) per clip, in nats, on clips the policy samples for ``prompts``."""
        from ..evaluation.drift import kl_per_clip

        args, accelerator = self.args, self.accelerator
        policy = accelerator.unwrap_model(self.model)
        reference = self.ref_model
        if reference is None and not self.is_peft_model:
            raise ValueError(
                "eval_kl needs the reference, but with precompute_ref_log_probs and no eval_dataset at init none was "
                "kept: pass the eval prompts as eval_dataset when building the trainer (a frozen copy is then kept), "
                "or set eval_num_samples_per_prompt=0."
            )
        if reference is None:  # the LoRA policy seen with its adapter disabled, for code written for two models
            reference = AdapterDisabledView(policy, self.reference_context)
        was_training = policy.training
        policy.eval()
        total, clips = 0.0, 0
        cuda = [accelerator.device] if accelerator.device.type == "cuda" else []
        try:
            with torch.random.fork_rng(devices=cuda):
                for index in range(accelerator.process_index, len(prompts), accelerator.num_processes):
                    torch.manual_seed(args.seed + index)
                    rollout = generate_rollout(
                        policy, self.processor, [prompts[index]] * args.eval_num_samples_per_prompt,
                        num_steps=self.response_length, sampling=self.sampling,
                        max_prompt_length=args.max_prompt_length,
                    )
                    with accelerator.autocast():
                        total += kl_per_clip(policy, reference, rollout, sampling=self.sampling).sum().item()
                    clips += args.eval_num_samples_per_prompt
        finally:
            policy.train(was_training)
        sums = accelerator.reduce(torch.tensor([total, clips], dtype=torch.float64, device=accelerator.device), "sum")
        return (sums[0] / sums[1]).item()

    # ------------------------------------------------------------------ saving
    def save_model(self, output_dir: str | None = None, _internal_call: bool = False):
        """Save the policy (safetensors), the processor and the generation config it samples with. LoRA policies save
        the adapter and (``save_merged_lora``) merged weights to ``<output_dir>/merged``."""
        output_dir = output_dir or self.args.output_dir
        # Internal: Trainer.save_model would push before the generation config and merged weights exist.
        Trainer.save_model(self, output_dir, _internal_call=True)
        if not self.args.should_save:
            return
        self.processor.save_pretrained(output_dir)
        self.trained_generation_config().save_pretrained(output_dir)
        if self.is_peft_model and self.args.save_merged_lora and not _internal_call:
            self._save_merged_policy(os.path.join(output_dir, "merged"))
        if self.args.push_to_hub and not _internal_call:
            self.push_to_hub(commit_message="Model save", revision=self.args.hub_revision)

    def trained_generation_config(self) -> GenerationConfig:
        """The policy's generation config set to sample from the distribution DPO trained (guidance, temperature,
        ``top_k``, no other warpers, ``max_new_tokens = response_length``): MusicGen ships guidance 3 and top-k 250."""
        config = copy.deepcopy(unwrap_musicgen(self.accelerator.unwrap_model(self.model)).generation_config)
        config.update(
            do_sample=True,
            guidance_scale=self.sampling.guidance_scale,
            temperature=self.sampling.temperature,
            top_k=self.sampling.top_k,
            top_p=1.0,
            max_new_tokens=self.response_length,
        )
        return config

    def _save_merged_policy(self, directory: str) -> None:
        """The LoRA policy merged into its base weights, with the processor: a plain MusicGen checkpoint."""
        policy = copy.deepcopy(self.accelerator.unwrap_model(self.model)).merge_and_unload()
        policy.generation_config = self.trained_generation_config()
        policy.save_pretrained(directory)
        self.processor.save_pretrained(directory)

    def _save_checkpoint_extras(self, checkpoint_dir: str) -> None:
        # The card is brought up to date in output_dir (a checkpoint push reads it there) and copied into the staged
        # checkpoint, which is then published atomically (see checkpointing.py).
        if self.args.should_save:
            self.create_model_card()
            hub.copy_card_files(self.args.output_dir, checkpoint_dir)

    # ------------------------------------------------------------------ publishing (see musicrl_trl.hub)
    anchor_license_role = "reference model"  # PolicyPublishingMixin.license_resolution: base model and reference

    def create_model_card(
        self,
        model_name: str | None = None,
        dataset_name: str | None = None,
        tags: str | list[str] | None = None,
        output_dir: str | None = None,
        license: str | None = None,
        layout: str | None = None,
        repo_id: str | None = None,
        sample_url_prefix: str = "",
        **kwargs: Any,
    ) -> hub.LicenseResolution | None:
        """Write the DPO card (``hub_cards/dpo_card.md.jinja``: DPO, beta, the data, the reference, metrics, licence)
        to ``output_dir/README.md``; returns the licence resolution. Other ``Trainer.create_model_card`` arguments
        are ignored."""
        return self._write_card(
            output_dir, license,
            lambda output_dir, resolution: hub.render_dpo_card(
                self, layout or self._card_layout(), resolution, repo_id=repo_id or self.args.hub_model_id,
                output_dir=output_dir, dataset_name=dataset_name or self.args.hub_dataset_name,
                tags=[tags] if isinstance(tags, str) else (tags or []),
            ),
        )

