"""MusicPPOTrainer: MusicRL's KL-regularised policy gradient (and full PPO) on MusicGen's codec tokens.

Shape letters: B rollouts in the local batch, K codebooks, T frames, A = S - 1 decoder steps (the RL horizon: one
step draws the K codes of one column of the delayed layout), V codebook size, H hidden size.

One update, top to bottom (``train``, one named method per step, filling an :class:`UpdateBatch`):
  1. rollout (``_rollout_and_score``): the policy samples music for a batch of prompts
     (``musicrl_trl.rollout.generate_rollout``), recording the codes and their log-probs under the sampling
     distribution (the old log-probs of the policy gradient);
  2. rewards (``_score``): every reward function scores the decoded audio (and/or codes); scores combine with
     ``reward_weights``; non-finite ones are an error or, with ``drop_nonfinite_rewards``, drop their rollout;
  3. anchor (``_anchor_and_advantages``): the reference model's decoder hidden states [B, A, H] over the rollouts,
     for the exact KL over the whole codebook (its LM heads run per chunk of decoder steps in the update, so the
     anchor's [B, K, A, V] distributions are never kept; :mod:`musicrl_trl.teacher_forcing`);
  4. advantages (``_advantages_and_returns``): the score at the last step (minus ``kl_coef * KL`` at every step with
     ``kl_penalty="reward"``), GAE(gamma, lam) against the value network (MusicRL: gamma = lam = 1, i.e. return minus
     baseline);
  5. update (``_ppo_update``): ``num_ppo_epochs`` passes over mini-batches, one optimizer step each (clipped to
     ``max_grad_norm``), of the loss in :mod:`.ppo_loss`: clipped policy gradient + value regression (+ ``kl_coef *
     KL`` as an analytic loss term with ``kl_penalty="loss"``, MusicRL's objective). The log-probs, KL and entropy
     come from the training module's forward ``logits_chunk_size`` decoder steps at a time;
  6. metrics (``_update_metrics``), logged every ``logging_steps`` updates.
In MusicRL's setting (one pass, one mini-batch) steps 4 and 5 share one forward: the values and the policy's KL
before the update are read from the training forward itself (detached), so an update costs the rollout, the rewards,
one anchor forward and one policy/value forward and backward. With several passes or mini-batches PPO needs them
fixed beforehand, and one extra no-grad forward computes them.
Metrics keep TRL's names (``objective/kl``, ``objective/scores``, ``policy/approxkl_avg``, ``val/ratio``, ...); the
full list is in :class:`MusicPPOConfig`'s docstring.

Why this file is longer than ~600 lines: it is the one trainer a reader follows top to bottom (set-up, the update's
steps, evaluation, saving and resuming). What is not specific to it lives beside it: the on-policy set-up in
:mod:`.base`, the loss in :mod:`.ppo_loss`, the value network in :mod:`.value_model`, publishing in
:mod:`.publishing`, crash-safe checkpoints in :mod:`.checkpointing`.
"""

from __future__ import annotations

import collections
import contextlib
import copy
import dataclasses
import logging
import math
import os
import time
from collections.abc import Callable, Sequence

import torch
import torch.nn as nn
from datasets import Dataset
from safetensors.torch import load_file
from transformers import (
    GenerationConfig,
    MusicgenForConditionalGeneration,
    MusicgenProcessor,
    Trainer,
    TrainerCallback,
)
from transformers.trainer_callback import ProgressCallback

from .. import hub
from ..rollout import (
    MusicRollout,
    SamplingConfig,
    generate_rollout,
    resolve_num_steps,
    unwrap_musicgen,
)
from ..teacher_forcing import DecoderStates, StepStatistics, decoder_states
from . import fsdp
from .advantages import gae, group_advantages
from .base import (
    AdapterDisabledView,
    OnlineMusicTrainer,
    OnlineTrainerState,
    load_policy_and_anchor,
    masked_whiten,
    prepare_models_for_training,
    zero_dropout,
)
from .checkpointing import CrashSafeCheckpointsMixin
from .ppo_config import MusicPPOConfig
from .ppo_loss import PPOLossConfig, PPOMicroBatch, ppo_loss
from .publishing import PolicyPublishingMixin
from .value_model import VALUE_WEIGHTS_NAME, MusicPolicyAndValue, MusicValueModel, load_value_model, save_value_model

__all__ = ["MusicPPOTrainer", "MusicValueModel", "MusicPolicyAndValue", "zero_dropout"]

logger = logging.getLogger(__name__)

RewardFunction = Callable[..., torch.Tensor | Sequence[float]]


class RewardModules(nn.ModuleList):
    """The rewards that are modules: moved to the device with the trainer, in eval mode, kept whole on every process
    (see :meth:`OnlineMusicTrainer.setup_online_training`)."""


class MusicProgressCallback(ProgressCallback):
    """transformers' progress bar over updates, with the reward and the KL as its postfix instead of a printed dict of
    every metric after every update (those stay in ``state.log_history`` and ``log_history.json``)."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and self.training_bar is not None and logs and "objective/scores" in logs:
            self.training_bar.set_postfix(
                reward=f"{logs['objective/scores']:.4g}", kl=f"{logs['objective/kl']:.3g}", refresh=False
            )


@dataclasses.dataclass
class UpdateBatch:
    """What one update knows about its local batch, filled in step by step (shapes: B rollouts, A decoder steps)."""

    rollout: MusicRollout
    scores: torch.Tensor  # [B] combined reward (0 where dropped)
    per_reward_scores: dict[str, torch.Tensor]  # name -> [B], as each reward returned them
    sample_mask: torch.Tensor  # [B] bool, rollouts whose rewards are all finite
    step_mask: torch.Tensor  # [B, A] the same per step
    old_logprobs: torch.Tensor  # [B, A] log-probs of the taken steps under the sampling weights
    ref_states: DecoderStates | None = None  # the anchor's decoder states [B, A, H]; its heads run per chunk
    kl: torch.Tensor | None = None  # [B, A] KL to the anchor per step, before the update
    values: torch.Tensor | None = None  # [B, A] V(s_t) before the update
    advantages: torch.Tensor | None = None  # [B, A]
    returns: torch.Tensor | None = None  # [B, A] value targets


def _collate_prompts(rows: list[dict]) -> dict[str, list[str]]:
    return {"prompt": [row["prompt"] for row in rows]}


class MusicPPOTrainer(PolicyPublishingMixin, CrashSafeCheckpointsMixin, OnlineMusicTrainer):
    """RL fine-tuning of a MusicGen policy on sequence-level audio rewards, as in MusicRL.

    Args:
        args: a :class:`MusicPPOConfig`.
        processing_class: the ``MusicgenProcessor`` (``None`` loads it from ``model`` when that is an id or path).
        model: ``MusicgenForConditionalGeneration``, or a model id / path to load one from.
        ref_model: the KL anchor. ``None``: the adapter-disabled policy with LoRA (no second copy), else a frozen
            copy of the starting policy. For MusicRL-RU pass the MusicRL-R checkpoint (model or path).
        reward_model: one reward function or a list (called as ``reward(prompts=, audio=, sampling_rate=, codes=)``
            and returning ``Tensor[B]``; see DESIGN.md), combined with ``args.reward_weights``.
        train_dataset: a ``datasets.Dataset`` with a text column ``prompt``.
        value_model: a :class:`MusicValueModel`; ``None`` builds one from the policy.
        eval_dataset: prompts for sample generations (optional).
        callbacks: extra ``TrainerCallback``s.
        peft_config: a ``peft.LoraConfig`` to train LoRA adapters instead of the full decoder.
    """

    _tag_names = ["trl", "ppo", "musicrl", "musicgen", "text-to-audio"]
    _name = "MusicPPO"
    _paper = {
        "title": "MusicRL: Aligning Music Generation to Human Preferences",
        "id": "2402.04229",
        "citation": hub.MUSICRL_CITATION,
    }

    def __init__(
        self,
        args: MusicPPOConfig,
        processing_class: MusicgenProcessor | None,
        model: MusicgenForConditionalGeneration | str,
        ref_model: MusicgenForConditionalGeneration | str | None = None,
        reward_model: RewardFunction | list[RewardFunction] | None = None,
        train_dataset: Dataset | None = None,
        value_model: MusicValueModel | None = None,
        eval_dataset: Dataset | None = None,
        callbacks: list[TrainerCallback] | None = None,
        peft_config=None,
    ):
        if not isinstance(args, MusicPPOConfig):
            raise TypeError(f"args must be a MusicPPOConfig, got {type(args).__name__}.")
        self._capture_hub_sources(model, ref_model)  # before a path is loaded or a temporary folder disappears
        model, ref_model, processing_class = load_policy_and_anchor(
            model, ref_model, processing_class, args.allow_pickle_weights, anchor_role="KL anchor"
        )
        self._check_dataset(train_dataset, "train_dataset")
        if eval_dataset is not None:
            self._check_dataset(eval_dataset, "eval_dataset")
        self.reward_funcs = self._check_rewards(reward_model, args.reward_weights)
        if args.audio_duration_s is not None:
            args.response_length = resolve_num_steps(model, duration_s=args.audio_duration_s)
        resolve_num_steps(model, num_steps=args.response_length)  # fail now, not after loading everything

        self.sampling = SamplingConfig(args.guidance_scale, args.temperature, args.top_k)
        # The KL compares the guided, tempered distributions before the top-k cut (teacher_forcing.step_statistics):
        # once the policy's top k codes differ from the anchor's, the cut distributions give a code the policy may
        # draw probability 0 under the anchor, and the exact KL (and its gradient) is infinite. Ratios use the cut.
        self.loss_config = PPOLossConfig.from_args(args)
        self._check_precision(args)
        prepare_models_for_training(model, ref_model, peft_config, args.device, args.train_text_encoder)
        if args.baseline != "value":
            if value_model is not None:
                raise ValueError(
                    f"baseline={args.baseline!r} uses no value network, but a value_model was given: drop it, or use "
                    "baseline='value'."
                )
            if args.vf_coef != MusicPPOConfig.vf_coef:
                logger.warning(f"baseline={args.baseline!r} has no value network: vf_coef={args.vf_coef} is ignored.")
        elif value_model is None:
            # Seeded, so that a run (and its resumption) does not depend on what consumed the global RNG before.
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(args.seed)
                value_model = MusicValueModel.from_policy(
                    model, share_backbone=args.share_value_backbone, peft_config=peft_config,
                    lora_trunk=args.lora_value_trunk,
                )

        if args.eval_strategy != "no" and eval_dataset is None:
            raise ValueError(
                f"eval_strategy={args.eval_strategy.value!r} needs an eval_dataset (a datasets.Dataset with a "
                "'prompt' column); pass one or set eval_strategy='no'."
            )

        policy = self.wrap_policy(model, peft_config, bool(args.bf16))
        ref_model = self.build_anchor(policy, ref_model)
        # One module behind one forward, so that a single accelerator.prepare (DDP, DeepSpeed) wraps both and their
        # gradients synchronise together.
        Trainer.__init__(
            self,
            model=MusicPolicyAndValue(policy, value_model),
            args=args,
            data_collator=_collate_prompts,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            callbacks=callbacks,
        )
        reward_modules = RewardModules([r for r in self.reward_funcs if isinstance(r, nn.Module)])
        self.setup_online_training(policy, ref_model, reward_modules)
        if args.local_batch_size % args.num_generations:
            raise ValueError(
                f"each process samples {args.local_batch_size} rollouts per update (per_device_train_batch_size x "
                f"gradient_accumulation_steps x num_mini_batches), not a multiple of num_generations="
                f"{args.num_generations}: every prompt's clips must stay together on one process."
            )
        self.value_model = value_model
        # What a resume needs besides Trainer's files (under FSDP: the sharded state, complete once .metadata exists).
        self.checkpoint_extra_files = (VALUE_WEIGHTS_NAME,) if value_model is not None else ()
        if self.is_fsdp_enabled:
            self.checkpoint_extra_files = (f"{fsdp.FSDP_STATE_DIR}/.metadata",)
        self.kl_coef = args.kl_coef  # adapted after every update with kl_target; saved in the trainer state
        if not args.disable_tqdm:
            self.remove_callback(ProgressCallback)
            self.add_callback(MusicProgressCallback)
        self.audio_channels = unwrap_musicgen(self.policy_model).decoder.config.audio_channels
        self.reward_names = [self._reward_name(r) for r in self.reward_funcs]
        if args.gradient_checkpointing:
            self._enable_gradient_checkpointing()
        # The policy samples as it is trained from here on: its own generate(), the saved generation_config.json
        # and pipeline("text-to-audio") on the result (MusicGen ships guidance 3 and top-k 250).
        unwrap_musicgen(self.accelerator.unwrap_model(self.model).policy).generation_config = (
            self.trained_generation_config()
        )
        self._remove_stale_checkpoint_staging()
        self._init_hub_publishing()
        self._init_evaluation(args, eval_dataset)

    # ------------------------------------------------------------------ checks
    @staticmethod
    def _check_precision(args: MusicPPOConfig) -> None:
        """A clear error for a precision this device cannot run (never a silently ignored flag)."""
        from accelerate.state import AcceleratorState, PartialState

        device = args.device
        if args.mixed_precision == "fp16" and device.type == "cpu":
            raise ValueError(
                "fp16 mixed precision needs a GPU (PyTorch has no fp16 autocast with loss scaling on CPU, and "
                "accelerate would silently run in float32): use bf16=True on CPU, or run on a GPU."
            )
        state = AcceleratorState._shared_state
        if state.get("_mixed_precision") not in (None, args.mixed_precision) and PartialState().num_processes == 1:
            # accelerate's precision is process-wide and fixed by the first Accelerator; a second trainer in the same
            # process (a notebook, a test, a benchmark) that asks for another precision gets a fresh state.
            AcceleratorState._reset_state()

    def _enable_gradient_checkpointing(self) -> None:
        """Recompute decoder (and text-encoder) activations in the backward pass, on the policy and on a separate
        value trunk. Rollouts run in eval mode, where checkpointing (which drops the KV cache) is off."""
        kwargs = self.args.gradient_checkpointing_kwargs or {"use_reentrant": False}
        wrapper = self.accelerator.unwrap_model(self.model)
        unwrap_musicgen(wrapper.policy).gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        wrapper.is_gradient_checkpointing = True
        if wrapper.value_model is not None and wrapper.value_model.backbone is not None:
            unwrap_musicgen(wrapper.value_model.backbone).gradient_checkpointing_enable(
                gradient_checkpointing_kwargs=kwargs
            )

    @staticmethod
    def _check_dataset(dataset, name: str) -> None:
        if dataset is None:
            raise ValueError(f"{name} is required: a datasets.Dataset with a text column 'prompt'.")
        columns = getattr(dataset, "column_names", None) or []
        if "prompt" not in columns:
            raise ValueError(
                f"{name} has no 'prompt' column (columns: {columns}); rename your text column, e.g. "
                f"dataset.rename_column('text', 'prompt')."
            )
        if len(dataset) == 0:
            raise ValueError(f"{name} is empty: it needs at least one prompt.")

    @staticmethod
    def _reward_name(reward) -> str:
        return getattr(reward, "__name__", None) or type(reward).__name__

    @classmethod
    def _check_rewards(cls, reward_model, weights) -> list[RewardFunction]:
        rewards = reward_model if isinstance(reward_model, (list, tuple)) else [reward_model]
        if not rewards or any(r is None or not callable(r) for r in rewards):
            raise ValueError("reward_model must be a callable reward or a non-empty list of them.")
        if weights is not None and len(weights) != len(rewards):
            raise ValueError(f"reward_weights has {len(weights)} entries for {len(rewards)} reward functions.")
        names = [cls._reward_name(r) for r in rewards]
        if len(set(names)) != len(names):
            raise ValueError(f"reward functions need distinct __name__s for logging, got {names}.")
        return list(rewards)

    # ------------------------------------------------------------------ pieces of one update
    def _prompt_batch(self, update: int) -> list[str]:
        """The distinct prompts of update ``update`` (0-based) on this process, ``local_batch_size /
        num_generations`` of them (each is sampled ``num_generations`` times): a fixed, seeded order over the
        dataset, so that resuming at step n continues with exactly the prompts the interrupted run would have used."""
        args, size = self.args, self.train_dataset_len
        per_process = args.local_batch_size // args.num_generations
        start = (update * args.world_size + self.accelerator.process_index) * per_process
        orders = {}  # one permutation per epoch the batch touches (at most a few), not one per prompt
        indices = []
        for position in range(start, start + per_process):
            epoch, offset = divmod(position, size)
            if epoch not in orders:
                orders[epoch] = torch.randperm(size, generator=torch.Generator().manual_seed(args.seed + epoch))
            indices.append(orders[epoch][offset].item())
        return list(self.train_dataset.select(indices)["prompt"])

    def _mini_batch_order(self, update: int, epoch: int) -> torch.Tensor:
        """The order [local_batch_size] in which PPO epoch ``epoch`` of update ``update`` visits the local rollouts:
        a permutation drawn from its own generator, seeded by the process's seed, the update and the epoch, so that
        a seed gives the same run and a resumed run the same mini-batches (NumPy's unseeded global generator did
        neither)."""
        seed = (self.local_seed * 1_000_003 + update) * 1_009 + epoch
        return torch.randperm(self.args.local_batch_size, generator=torch.Generator().manual_seed(seed))

    def _score(self, rollout: MusicRollout) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
        """Combined scores [B], each reward's scores [B], and the mask [B] of samples whose rewards are finite."""
        batch, device = len(rollout.prompts), rollout.audio.device
        weights = self.args.reward_weights or [1.0] * len(self.reward_funcs)
        per_reward, total = {}, torch.zeros(batch, device=device)
        finite = torch.ones(batch, dtype=torch.bool, device=device)
        for reward, name, weight in zip(self.reward_funcs, self.reward_names, weights):
            scores = reward(
                prompts=rollout.prompts, audio=rollout.audio, sampling_rate=rollout.sampling_rate, codes=rollout.codes
            )
            scores = torch.as_tensor(scores, dtype=torch.float32).to(device)
            if scores.shape != (batch,):
                raise ValueError(
                    f"reward {name!r} returned shape {tuple(scores.shape)} for {batch} samples; a reward must "
                    f"return one score per sample, a Tensor[B] or a list of B floats."
                )
            nonfinite = ~torch.isfinite(scores)
            if nonfinite.any() and not self.args.drop_nonfinite_rewards:
                raise ValueError(
                    f"reward {name!r} returned non-finite scores {scores[nonfinite].tolist()} for prompts "
                    f"{[rollout.prompts[i] for i in nonfinite.nonzero().flatten().tolist()]}; fix the reward or set "
                    f"drop_nonfinite_rewards=True to leave such samples out of the update."
                )
            finite &= ~nonfinite
            per_reward[name] = scores
            total = total + weight * torch.nan_to_num(scores, nan=0.0, posinf=0.0, neginf=0.0)
        return total, per_reward, finite

    def _policy_statistics(
        self, rollout: MusicRollout, rows, ref_states: DecoderStates, with_entropy: bool = False, unwrapped=False
    ) -> tuple[StepStatistics, torch.Tensor | None]:
        """The training module's forward over the rollouts ``rows`` of the current batch: the policy's per-step
        statistics (log-probs under the sampling transform; with ``ref_states`` the KL to the anchor, differentiable
        only as MusicRL's loss term; entropy) and the values. The LM heads run ``logits_chunk_size`` decoder steps at
        a time (:mod:`musicrl_trl.teacher_forcing`). ``unwrapped``: without the DDP wrapper (passes that train
        nothing)."""
        args = self.args
        module = self.accelerator.unwrap_model(self.model) if unwrapped else self.model
        return module(
            rollout.prompt_ids[rows], rollout.prompt_mask[rows], rollout.grid[rows], self.sampling,
            ref_states=ref_states, kl_estimator=args.kl_estimator, differentiate_kl=args.kl_penalty == "loss",
            with_entropy=with_entropy, chunk_size=args.logits_chunk_size, audio_channels=self.audio_channels,
        )

    def anchor_module(self) -> nn.Module:
        """The KL anchor as a module: the separate reference model, or the LoRA policy seen with its adapter disabled
        (:class:`AdapterDisabledView`)."""
        if self.ref_model is not None:
            return self.ref_model
        return AdapterDisabledView(self.accelerator.unwrap_model(self.model).policy, self.null_ref_context)

    @torch.no_grad()
    def _anchor_states(self, rollout: MusicRollout) -> DecoderStates:
        """The anchor's decoder states over the rollouts, kept for the update instead of its distributions
        ([B, A, H] against [B, K, A, V]): the KL applies its LM heads chunk by chunk."""
        with self.accelerator.autocast():  # the policy's precision (bf16/fp16), so that KL = 0 at the start
            return decoder_states(
                self.anchor_module(), rollout.prompt_ids, rollout.prompt_mask, rollout.grid, self.sampling.guided
            )

    def _advantages_and_returns(
        self, kl: torch.Tensor, scores: torch.Tensor, values: torch.Tensor | None, sample_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Advantages and value targets [B, A] from the per-step KL, the scores [B] and the values [B, A] (None with
        a value-free baseline, which has no targets; see :mod:`.advantages`).

        The score is the reward of the last step. With ``kl_penalty="reward"`` every step's reward also carries
        ``-kl_coef * KL_t`` (TRL's shaping); with ``"loss"`` the KL is a loss term instead and the value network
        regresses the score-only return (MusicRL). A value-free baseline compares each clip's whole return with the
        other clips of its prompt, one advantage for all its steps. Dropped samples (non-finite rewards) get 0.
        """
        args = self.args
        rewards = torch.zeros_like(kl)
        rewards[:, -1] += scores
        if args.kl_penalty == "reward":
            rewards -= self.kl_coef * kl
        if args.baseline == "value":
            advantages, returns = gae(rewards, values, args.gamma, args.lam)
        else:
            per_clip = group_advantages(
                rewards.sum(1), sample_mask, args.num_generations, args.baseline, args.scale_group_rewards
            )
            advantages, returns = per_clip[:, None].expand_as(rewards).contiguous(), None
        step_mask = sample_mask[:, None].expand_as(advantages)
        if args.whiten_advantages and sample_mask.sum() > 1:
            advantages = masked_whiten(advantages, step_mask)
        return advantages.masked_fill(~step_mask, 0.0), returns

    def _single_pass(self) -> bool:
        """MusicRL's setting: one forward/backward over the whole local batch per rollout (one epoch, one
        mini-batch, no gradient accumulation), where the values and KL before the update come from that forward."""
        args = self.args
        return args.num_ppo_epochs == 1 and args.num_mini_batches == 1 and args.gradient_accumulation_steps == 1

    def _optimizer_step(self, kept_samples: torch.Tensor) -> torch.Tensor | None:
        """Clip the summed gradients to ``max_grad_norm`` (None or 0: no clipping, the norm is still measured) and
        step, unless the mini-batch kept no sample on any process or the gradient norm is not finite (then the
        gradients are dropped with a warning). Returns the norm before clipping, or None for a skipped step."""
        args, accelerator = self.args, self.accelerator
        if accelerator.num_processes > 1:
            kept_samples = accelerator.reduce(kept_samples.reshape(1), reduction="sum")
        max_norm = args.max_grad_norm if args.max_grad_norm else float("inf")
        # Frozen parameters have no gradient and are skipped; the gradients are all-reduced: equal on every rank.
        grad_norm = accelerator.clip_grad_norm_(self.model.parameters(), max_norm)
        if kept_samples.sum() == 0 or not torch.isfinite(grad_norm):
            reason = "no sample of the mini-batch has a finite reward" if kept_samples.sum() == 0 else (
                f"the gradient norm is {grad_norm.item()}"
            )
            logger.warning(f"update {self.state.global_step + 1}: optimizer step skipped, {reason}.")
            self.optimizer.zero_grad()
            return None
        self.optimizer.step()
        self.optimizer.zero_grad()
        return grad_norm.detach().float()

    def _adapted_kl_coef(self, kl: float) -> float:
        """Ziegler et al. (2019)'s proportional controller: the coefficient after an update whose mean KL per clip
        (over all processes, so the same on each) was ``kl``, moving towards ``kl_target`` by at most 20 % per
        ``kl_horizon`` rollouts."""
        args = self.args
        horizon = args.kl_horizon or args.batch_size
        error = min(max(kl / args.kl_target - 1.0, -0.2), 0.2)
        return self.kl_coef * (1.0 + error * args.batch_size / horizon)

    def _steps_from_ratio(self, steps: float) -> int:
        """``steps`` updates, or a fraction of the run's updates when < 1 (rounded up, as transformers does)."""
        return math.ceil(self.args.num_total_batches * steps) if steps < 1 else int(steps)

    def _log_updates(self, pending_logs: list[dict[str, float]]) -> None:
        """Log the metrics of the updates since the last log: means, and the latest ``lr``/``episode``/``eps``."""
        latest = pending_logs[-1]
        logs = {
            name: latest[name] if name in ("lr", "episode", "eps") else sum(e[name] for e in pending_logs if name in e)
            / sum(name in e for e in pending_logs)
            for name in latest
        }
        if "objective/skipped_steps" in logs:  # a count, summed over the updates
            logs["objective/skipped_steps"] = sum(e["objective/skipped_steps"] for e in pending_logs)
        pending_logs.clear()
        self.log(logs)
        self.control.should_log = False

    # ------------------------------------------------------------------ the loop
    def train(self, resume_from_checkpoint: str | bool | None = None):
        """Run ``num_total_batches`` updates (see the module docstring); ``resume_from_checkpoint``: a
        ``checkpoint-N`` folder, or ``True`` for the newest complete one in ``output_dir``."""
        args = self.args
        self.state.global_step = 0
        self.state.episode = 0
        self.state.max_steps = args.num_total_batches
        self.state.num_train_epochs = args.total_episodes / self.train_dataset_len
        # Ratios (< 1) are fractions of the run's updates, as transformers.Trainer reads them.
        self.state.logging_steps = self._steps_from_ratio(args.logging_steps)
        self.state.save_steps = self._steps_from_ratio(args.save_steps)
        if args.eval_steps is not None:
            self.state.eval_steps = self._steps_from_ratio(args.eval_steps)
        if resume_from_checkpoint:
            self._resume(resume_from_checkpoint)
        with fsdp.gathered_weights(self.model, part="policy"):  # the card's "before" samples (FSDP: all processes)
            self.control = self.callback_handler.on_train_begin(args, self.state, self.control)
        start_time, pending_logs = time.time(), []  # metrics of the updates since the last log
        self.model.train()

        for update in range(self.state.global_step, args.num_total_batches):
            self.state.episode += args.batch_size
            batch, timing = self._rollout_and_score(self._prompt_batch(update))
            tic = time.perf_counter()
            # LoRA's anchor is the adapter-disabled policy, read through its submodules: under FSDP the policy is
            # gathered for that pass (a separate anchor is whole on every device; without FSDP this is a no-op).
            with fsdp.gathered_weights(self.model if self.ref_model is None else None, part="policy"):
                self._anchor_and_advantages(batch)
            stats = self._ppo_update(batch, update)
            timing["update"] = time.perf_counter() - tic
            metrics = self._update_metrics(batch, stats, timing, start_time)
            pending_logs.append(metrics)
            if args.kl_target is not None:
                self.kl_coef = self._adapted_kl_coef(metrics["objective/kl"])
            self.state.kl_coef = self.kl_coef  # saved with every checkpoint, restored on resume
            self.state.epoch = self.state.episode / self.train_dataset_len
            self.state.global_step += 1

            self.lr_scheduler.step()
            self.control = self.callback_handler.on_step_end(args, self.state, self.control)
            if self.control.should_log:  # every logging_steps updates (DefaultFlowCallback)
                self._log_updates(pending_logs)
            if self.control.should_evaluate:  # every eval_steps with eval_strategy="steps"
                self.evaluate()
            if self.control.should_save:
                self._save_checkpoint(self.model, trial=None)
                self.control = self.callback_handler.on_save(args, self.state, self.control)
            if self.control.should_training_stop:
                break

        if pending_logs:
            self._log_updates(pending_logs)
        self.control = self.callback_handler.on_train_end(args, self.state, self.control)
        if self.control.should_save:
            self._save_checkpoint(self.model, trial=None)
            self.control = self.callback_handler.on_save(args, self.state, self.control)
        if args.plot_training_curves and self.accelerator.is_main_process:
            self.write_training_curves(args.output_dir)

    def _rollout_and_score(self, prompts: list[str]) -> tuple[UpdateBatch, dict[str, float]]:
        """Steps 1 and 2: sample rollouts for ``prompts`` and score them; seconds spent in each."""
        args, accelerator = self.args, self.accelerator
        tic = time.perf_counter()
        # The full weights for the length of the sampling loop: gathered FSDP units, or TRL's unwrap (which gathers
        # ZeRO-3-sharded weights); freed after. The gather's own seconds are logged as timing/gather_s.
        gather = {}
        with fsdp.generation_weights(self.model, accelerator, args.ds3_gather_for_generation, gather) as unwrapped:
            rollout = generate_rollout(
                unwrapped.policy, self.processing_class, prompts, num_steps=args.response_length,
                sampling=self.sampling, max_prompt_length=args.max_prompt_length, backend=args.rollout_backend,
                num_generations=args.num_generations,
            )
        timing = {"rollout": time.perf_counter() - tic}
        if "gather_s" in gather:
            timing["gather"] = gather["gather_s"]
        tic = time.perf_counter()
        scores, per_reward_scores, sample_mask = self._score(rollout)
        timing["rewards"] = time.perf_counter() - tic
        batch = UpdateBatch(
            rollout=rollout, scores=scores, per_reward_scores=per_reward_scores, sample_mask=sample_mask,
            step_mask=sample_mask[:, None].expand(-1, rollout.num_steps),
            old_logprobs=rollout.step_logprobs(),  # the sampling policy's, recorded by the rollout
        )
        return batch, timing

    @torch.no_grad()
    def _anchor_and_advantages(self, batch: UpdateBatch) -> None:
        """Steps 3 and 4: the anchor's decoder states; with mixed precision the old log-probs again, in the training
        forward's precision; and, when PPO needs them fixed over several passes, values, KL and advantages (in the
        single pass they come from the training forward itself, which computes them under the same weights)."""
        rollout = batch.rollout
        batch.ref_states = self._anchor_states(rollout)
        mixed_precision = self.accelerator.mixed_precision != "no"
        if self._single_pass() and not mixed_precision:
            return
        # The training module's forward: under autocast with mixed precision.
        statistics, values = self._policy_statistics(rollout, slice(None), batch.ref_states, unwrapped=True)
        if mixed_precision:
            # The rollout samples in float32; against bf16 log-probs the first ratio was off by up to 0.16 per step,
            # enough for PPO's clip to fire in MusicRL's single pass, where the ratio is 1 by definition.
            batch.old_logprobs = statistics.logprobs.sum(1)
        if not self._single_pass():
            self._set_advantages(batch, statistics.kl.sum(1), values)

    def _set_advantages(self, batch: UpdateBatch, kl: torch.Tensor, values: torch.Tensor) -> None:
        batch.kl, batch.values = kl, values
        batch.advantages, batch.returns = self._advantages_and_returns(kl, batch.scores, values, batch.sample_mask)

    def _ppo_update(self, batch: UpdateBatch, update: int) -> dict[str, list[torch.Tensor]]:
        """Step 5: ``num_ppo_epochs`` passes over the local batch in mini-batches, one optimizer step per mini-batch
        of ``gradient_accumulation_steps`` micro-batches; the statistics of every micro-batch (detached)."""
        args, accelerator, model = self.args, self.accelerator, self.model
        rollout, single_pass = batch.rollout, self._single_pass()
        loss_config = dataclasses.replace(self.loss_config, kl_coef=self.kl_coef)  # the controller's, with kl_target
        stats = collections.defaultdict(list)
        for epoch in range(args.num_ppo_epochs):
            order = self._mini_batch_order(update, epoch).to(accelerator.device)
            for mb_start in range(0, args.local_batch_size, args.local_mini_batch_size):
                mini_batch = order[mb_start : mb_start + args.local_mini_batch_size]
                micro_batches = mini_batch.split(args.per_device_train_batch_size)
                for micro, mb in enumerate(micro_batches):
                    sync = micro == len(micro_batches) - 1  # DDP all-reduces the summed gradients once
                    with contextlib.nullcontext() if sync else accelerator.no_sync(model):
                        # The KL needs a gradient only as MusicRL's loss term (analytic, over the whole codebook).
                        mb_statistics, vpred = self._policy_statistics(
                            rollout, mb, batch.ref_states.select(mb), with_entropy=True
                        )
                        mb_kl = mb_statistics.kl.sum(1)  # [b, A]
                        if single_pass:  # mb is the whole local batch, in some order
                            self._set_advantages(
                                batch, torch.empty_like(mb_kl).index_copy_(0, mb, mb_kl.detach()),
                                None if vpred is None else torch.empty_like(vpred).index_copy_(0, mb, vpred.detach()),
                            )
                        loss, mb_stats = ppo_loss(
                            PPOMicroBatch(
                                logprobs=mb_statistics.logprobs.sum(1),
                                old_logprobs=batch.old_logprobs[mb], advantages=batch.advantages[mb], kl=mb_kl,
                                mask=batch.step_mask[mb], values=vpred,
                                old_values=None if vpred is None else batch.values[mb],
                                returns=None if vpred is None else batch.returns[mb],
                            ),
                            loss_config,
                        )
                        accelerator.backward(loss / len(micro_batches))
                    for name, value in mb_stats.items():
                        stats[name].append(value)
                    # The mean over the clips' codes (pad cells hold 0).
                    stats["entropy"].append(mb_statistics.entropy.sum() / (len(mb) * rollout.codes[0].numel()))
                    if epoch == 0 and mb_start == 0:
                        # On-policy check: before the first optimizer step the policy is the sampling policy.
                        stats["first_ratio_error"].append(mb_stats["ratio_max_error"])
                    del mb_statistics, mb_kl, loss
                grad_norm = self._optimizer_step(kept_samples=batch.sample_mask[mini_batch].sum())
                stats["skipped_steps"].append(torch.tensor(float(grad_norm is None), device=accelerator.device))
                if grad_norm is not None:
                    stats["grad_norm"].append(grad_norm)
        return stats

    @torch.no_grad()
    def _update_metrics(
        self, batch: UpdateBatch, stats: dict[str, list[torch.Tensor]], timing: dict[str, float], start_time: float
    ) -> dict[str, float]:
        """The metrics of one update (TRL's names, listed in :class:`MusicPPOConfig`), averaged over processes."""
        accelerator, device = self.accelerator, self.accelerator.device

        def mean_of(x):
            values = torch.as_tensor(x, device=device, dtype=torch.float32).reshape(-1)
            return accelerator.gather_for_metrics(values).mean().item()

        kept = batch.sample_mask.float()
        mean_kl = (batch.kl.sum(1) * kept).sum() / kept.sum().clamp(min=1)
        mean_non_score = -self.kl_coef * mean_kl  # in both KL forms
        mean_score = (batch.scores * kept).sum() / kept.sum().clamp(min=1)
        metrics = {
            "eps": int(self.state.episode / (time.time() - start_time)),
            "objective/kl": mean_of(mean_kl),
            "objective/entropy": mean_of(-(batch.rollout.logprobs.sum((1, 2)))),
            "objective/non_score_reward": mean_of(mean_non_score),
            "objective/rlhf_reward": mean_of(mean_non_score + mean_score),
            "objective/scores": mean_of(mean_score),
            "objective/dropped_samples": mean_of((~batch.sample_mask).sum()) * accelerator.num_processes,
            # The decision to skip is the same on every process (taken on all-reduced quantities).
            "objective/skipped_steps": torch.stack(stats["skipped_steps"]).sum().item(),
            "policy/approxkl_avg": mean_of(torch.stack(stats["approxkl"])),
            "policy/clipfrac_avg": mean_of(torch.stack(stats["clipfrac"])),
            "policy/entropy_avg": mean_of(torch.stack(stats["entropy"])),
            # A maximum over processes, not a mean.
            "policy/first_ratio_max_error": accelerator.gather(
                torch.stack(stats["first_ratio_error"]).max().reshape(1)
            ).max().item(),
            "loss/policy_avg": mean_of(torch.stack(stats["pg_loss"])),
            "loss/kl_avg": mean_of(torch.stack(stats["kl_loss"])),
            "objective/kl_coef": self.kl_coef,
            "val/ratio": mean_of(torch.stack(stats["ratio"])),
            "val/ratio_var": torch.stack(stats["ratio"]).var().item() if len(stats["ratio"]) > 1 else 0.0,
        }
        if stats["vf_loss"]:  # a value network (baseline="value")
            metrics["loss/value_avg"] = mean_of(torch.stack(stats["vf_loss"]))
            metrics["val/clipfrac_avg"] = mean_of(torch.stack(stats["vf_clipfrac"]))
        if stats["grad_norm"]:
            metrics["grad_norm"] = torch.stack(stats["grad_norm"]).mean().item()
        for k, entropy in enumerate(batch.rollout.entropies.mean(0)):
            metrics[f"policy/entropy_q{k}"] = mean_of(entropy)
        for name, reward_scores in batch.per_reward_scores.items():
            finite = torch.isfinite(reward_scores)
            metrics[f"rewards/{name}/mean"] = mean_of(reward_scores[finite].mean() if finite.any() else 0.0)
        for phase, seconds in timing.items():
            metrics[f"timing/{phase}_s"] = seconds
        metrics["lr"] = self.lr_scheduler.get_last_lr()[0]
        metrics["episode"] = self.state.episode
        return metrics

    # ------------------------------------------------------------------ evaluation: drift and diversity
    def _init_evaluation(self, args: MusicPPOConfig, eval_dataset) -> None:
        if args.eval_steps is not None:
            self.state.eval_steps = self._steps_from_ratio(args.eval_steps)  # DefaultFlowCallback reads the state

    @torch.no_grad()
    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict[str, float]:
        """Rewards, drift and diversity of the current policy on the eval prompts; logged and returned.

        Every prompt ``i`` gets ``args.eval_num_samples_per_prompt`` clips sampled with the seed ``args.seed + i`` in
        a forked RNG (the same clips' randomness at every evaluation, and the training RNG stream untouched). Prompts
        are split across processes and the sums reduced. Metrics (with ``metric_key_prefix``, default ``eval``):

        - ``eval/scores``, ``eval/rewards/<name>/mean``: combined and per-reward scores;
        - ``eval/kl``: exact KL(policy || anchor) in nats per clip, over the whole codebook under the sampling
          transform (as ``objective/kl`` with ``kl_estimator="full"``);
        - ``eval/entropy_q{k}``: mean sampling entropy of codebook k (nats);
        - ``eval/diversity/mean_pairwise_distance``: mean distance between the clips of one prompt (log-mel
          statistics, dB); ``eval/diversity/vendi_score``: their effective number (1 to M).
        """
        from ..evaluation.diversity import LogMelEmbedding, diversity
        from ..evaluation.drift import kl_per_clip

        dataset = eval_dataset if eval_dataset is not None else self.eval_dataset
        if dataset is None or len(dataset) == 0:
            raise ValueError("evaluate() needs prompts: pass eval_dataset here or to MusicPPOTrainer.")
        self._check_dataset(dataset, "eval_dataset")
        args, accelerator = self.args, self.accelerator
        prompts = list(dataset["prompt"])
        policy = accelerator.unwrap_model(self.model).policy
        num_samples, embedding = args.eval_num_samples_per_prompt, LogMelEmbedding()
        # "scored" counts clips whose rewards are all finite (the others count with drop_nonfinite_rewards only).
        sums = {"prompts": 0.0, "clips": 0.0, "scored": 0.0, "scores": 0.0, "kl": 0.0, "distance": 0.0, "vendi": 0.0}
        sums.update({f"rewards/{name}/mean": 0.0 for name in self.reward_names})
        num_codebooks = unwrap_musicgen(policy).decoder.num_codebooks
        sums.update({f"entropy_q{k}": 0.0 for k in range(num_codebooks)})
        cuda = [accelerator.device] if accelerator.device.type == "cuda" else []
        # Under FSDP, policy and anchor whole for the evaluation (sampling and teacher-forced passes call submodules).
        gathered = contextlib.ExitStack()
        gathered.enter_context(fsdp.gathered_weights(self.model, part="policy"))
        with gathered, torch.random.fork_rng(devices=cuda):
            for index in range(accelerator.process_index, len(prompts), accelerator.num_processes):
                torch.manual_seed(args.seed + index)
                rollout = generate_rollout(
                    policy, self.processing_class, [prompts[index]] * num_samples, num_steps=args.response_length,
                    sampling=self.sampling, max_prompt_length=args.max_prompt_length, backend=args.rollout_backend,
                )
                scores, per_reward, finite = self._score(rollout)
                with accelerator.autocast():  # policy and anchor both in the training precision, as in train()
                    kl = kl_per_clip(policy, self.anchor_module(), rollout, sampling=self.sampling)  # [M] nats
                spread = diversity(embedding(rollout.audio, rollout.sampling_rate).cpu(), embedding.metric,
                                   embedding.bandwidth)
                sums["prompts"] += 1
                sums["clips"] += num_samples
                sums["scored"] += finite.sum().item()
                sums["scores"] += scores[finite].sum().item()
                sums["kl"] += kl.sum().item()
                sums["distance"] += spread["mean_pairwise_distance"]
                sums["vendi"] += spread["vendi_score"]
                for name, values in per_reward.items():
                    sums[f"rewards/{name}/mean"] += values[finite].sum().item()
                for k, entropy in enumerate(rollout.entropies.sum(0)):
                    sums[f"entropy_q{k}"] += entropy.item()
        totals = accelerator.reduce(
            torch.tensor(list(sums.values()), dtype=torch.float64, device=accelerator.device), reduction="sum"
        )
        totals = dict(zip(sums, totals.tolist()))
        prefix = metric_key_prefix
        metrics = {
            f"{prefix}/scores": totals["scores"] / max(totals["scored"], 1),
            f"{prefix}/kl": totals["kl"] / totals["clips"],
            f"{prefix}/diversity/mean_pairwise_distance": totals["distance"] / totals["prompts"],
            f"{prefix}/diversity/vendi_score": totals["vendi"] / totals["prompts"],
        }
        for key, total in totals.items():
            if key.startswith("rewards/"):
                metrics[f"{prefix}/{key}"] = total / max(totals["scored"], 1)
            elif key.startswith("entropy_q"):
                metrics[f"{prefix}/{key}"] = total / totals["clips"]
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(args, self.state, self.control, metrics)
        return metrics

    # ------------------------------------------------------------------ saving and resuming
    def save_model(self, output_dir: str | None = None, _internal_call: bool = False):
        """Save the policy (safetensors) and the processor. LoRA policies save the adapter, loadable with
        ``PeftModel.from_pretrained``, and (``save_merged_lora``) merged full weights to ``<output_dir>/merged``
        for ``MusicgenForConditionalGeneration.from_pretrained`` and ``pipeline("text-to-audio")``."""
        output_dir = output_dir or self.args.output_dir
        if self.is_fsdp_enabled:
            self._save_fsdp_policy(output_dir, _internal_call)
            return
        wrapped, engine = self.model, self.deepspeed
        # Trainer.save_model saves self.model (self.deepspeed's state under DeepSpeed): the policy alone, not the
        # value network beside it (with whom it would also share T5's tied embeddings, which safetensors refuses).
        self.model = self.accelerator.unwrap_model(wrapped).policy
        if self.is_deepspeed_enabled:
            self.deepspeed = self.model
        try:
            # Internal: Trainer.save_model would push while self.model is swapped for the bare policy and before the
            # merged weights exist; the push comes last instead.
            Trainer.save_model(self, output_dir, _internal_call=True)
        finally:
            self.model, self.deepspeed = wrapped, engine
        if not self.args.should_save:
            return
        # Written beside the adapter too: PeftModel ignores it, but it documents how the adapter was trained.
        self.trained_generation_config().save_pretrained(output_dir)
        if self.is_peft_model and self.args.save_merged_lora and not _internal_call:
            self._save_merged_policy(os.path.join(output_dir, "merged"))
        if self.args.push_to_hub and not _internal_call:
            self.push_to_hub(commit_message="Model save", revision=self.args.hub_revision)

    def _save_fsdp_policy(self, output_dir: str, _internal_call: bool) -> None:
        """save_model under FSDP: every rank takes part in gathering the full weights; the main process writes them
        with save_pretrained (safetensors), as Trainer._save does without FSDP."""
        state = fsdp.full_state_dict(self.model, prefix="policy.")
        if self.args.should_save:
            wrapped = self.model
            self.model = self.accelerator.unwrap_model(wrapped).policy  # Trainer._save saves self.model
            try:
                self._save(output_dir, state_dict=state)
            finally:
                self.model = wrapped
            self.trained_generation_config().save_pretrained(output_dir)
            if self.is_peft_model and self.args.save_merged_lora and not _internal_call:
                self._save_merged_policy(os.path.join(output_dir, "merged"), state)
        self.accelerator.wait_for_everyone()
        if self.args.push_to_hub and not _internal_call:
            self.push_to_hub(commit_message="Model save", revision=self.args.hub_revision)

    def trained_generation_config(self) -> GenerationConfig:
        """The policy's generation config set to sample exactly as training did (guidance, temperature, top-k, no
        other warpers, ``max_new_tokens = response_length``): MusicGen ships guidance 3 and top-k 250, and a policy
        trained under other settings would otherwise be sampled from a distribution that was never trained."""
        config = copy.deepcopy(unwrap_musicgen(self.accelerator.unwrap_model(self.model).policy).generation_config)
        config.update(
            do_sample=True,
            guidance_scale=self.sampling.guidance_scale,
            temperature=self.sampling.temperature,
            top_k=self.sampling.top_k,
            top_p=1.0,
            max_new_tokens=self.args.response_length,
        )
        return config

    def _save_checkpoint(self, model, trial) -> None:
        # The card, its samples and curves are brought up to date in output_dir before every checkpoint (as TRL's
        # trainers do); _save_checkpoint_extras copies them into the checkpoint.
        self.create_model_card()
        super()._save_checkpoint(model, trial)

    def _save_checkpoint_extras(self, checkpoint_dir: str) -> None:
        # Called inside the staged checkpoint folder, before it is renamed to checkpoint-N (see checkpointing.py).
        if self.args.should_save:
            value_model = self.accelerator.unwrap_model(self.model).value_model
            # Under FSDP the value network's shards are in fsdp_state/ (see _save_optimizer_and_scheduler).
            if value_model is not None and not self.is_fsdp_enabled:  # none with a value-free baseline
                save_value_model(value_model, os.path.join(checkpoint_dir, VALUE_WEIGHTS_NAME))
            hub.copy_card_files(self.args.output_dir, checkpoint_dir)  # written by create_model_card above

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        if not self.is_fsdp_enabled:
            return super()._save_optimizer_and_scheduler(output_dir)
        # Sharded: every rank writes its shards of policy, value network and optimizer state (no full gather, no
        # pickles); a resume on the same number of ranks reads them back exactly.
        fsdp.save_sharded_training_state(self.model, self.optimizer, os.path.join(output_dir, fsdp.FSDP_STATE_DIR))
        if self.args.should_save:
            torch.save(self.lr_scheduler.state_dict(), os.path.join(output_dir, "scheduler.pt"))

    def _resume(self, checkpoint: str | bool) -> None:
        """Restore policy, value model, optimizer, scheduler, RNG and trainer state from a checkpoint directory
        (``True``: the newest complete ``checkpoint-*`` in ``output_dir``; incomplete ones are skipped and logged)."""
        checkpoint = self._resolve_resume_checkpoint(checkpoint)
        unwrapped = self.accelerator.unwrap_model(self.model)
        if self.is_fsdp_enabled:
            fsdp.load_sharded_training_state(self.model, self.optimizer, os.path.join(checkpoint, fsdp.FSDP_STATE_DIR))
        elif self.is_peft_model:
            from peft import set_peft_model_state_dict

            adapter = load_file(os.path.join(checkpoint, "adapter_model.safetensors"))
            set_peft_model_state_dict(unwrapped.policy, adapter)
        else:
            policy_state = load_file(os.path.join(checkpoint, "model.safetensors"))
            missing, unexpected = unwrapped.policy.load_state_dict(policy_state, strict=False)
            # save_pretrained stores tied tensors once (T5's shared embeddings); their aliases are loaded with them.
            current = unwrapped.policy.state_dict()
            loaded = {current[k].data_ptr() for k in policy_state if k in current}
            if unexpected or [k for k in missing if current[k].data_ptr() not in loaded]:
                raise ValueError(
                    f"checkpoint {checkpoint} does not match the policy (missing {missing[:3]}, unexpected "
                    f"{unexpected[:3]}); resume with the model the run started from."
                )
        if not self.is_fsdp_enabled:
            if unwrapped.value_model is not None:
                load_value_model(unwrapped.value_model, os.path.join(checkpoint, VALUE_WEIGHTS_NAME))
            # Trainer._load_optimizer_and_scheduler needs Trainer state PPOTrainer never sets; the files are the
            # same. weights_only=True: tensors and plain containers only, no arbitrary pickles.
            optimizer_state = torch.load(
                os.path.join(checkpoint, "optimizer.pt"), map_location="cpu", weights_only=True
            )
            self.optimizer.load_state_dict(optimizer_state)
        self.lr_scheduler.load_state_dict(torch.load(os.path.join(checkpoint, "scheduler.pt"), weights_only=True))
        self._load_rng_state(checkpoint)
        saved = OnlineTrainerState.load_from_json(os.path.join(checkpoint, "trainer_state.json"))
        self.state.global_step = saved.global_step
        self.state.episode = saved.global_step * self.args.batch_size
        self.state.log_history = saved.log_history
        if saved.kl_coef is not None:  # the KL controller's coefficient (kl_target), where the run left it
            self.kl_coef = self.state.kl_coef = saved.kl_coef
