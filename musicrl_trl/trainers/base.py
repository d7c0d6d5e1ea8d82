"""What every on-policy music trainer sets up before its first rollout, on ``transformers.Trainer``.

TRL's ``PPOTrainer`` did this set-up in its own ``__init__`` until TRL removed the trainer in 1.13
(huggingface/trl#7020). :class:`OnlineMusicTrainer` does it in this project's words and on ``Trainer.__init__`` itself,
so that the Accelerator (mixed precision, gradient accumulation, DeepSpeed/FSDP plugins), the callbacks, the state and
the Hub repo come from the config exactly as for any ``transformers.Trainer``. A subclass's ``__init__`` reads:

1. ``policy = self.wrap_policy(model, peft_config, args)``: LoRA adapters (QLoRA on a quantized policy);
2. ``ref_model = self.build_anchor(policy, ref_model)``: the KL anchor (given, the adapter-disabled policy, or a
   frozen copy);
3. ``Trainer.__init__`` with the module that trains (for PPO: policy and value network behind one ``forward``);
4. ``self.setup_online_training(...)``: the batch arithmetic (TRL's names), optimizer and scheduler over the run's
   updates, ``accelerator.prepare``, per-process seeds, the anchor and rewards on the device (DeepSpeed engines for a
   separate anchor).

What stays TRL's: the config's field names and batch arithmetic (:class:`~musicrl_trl.MusicPPOConfig`), the metric
names, ``unwrap_model_for_generation`` and ``prepare_deepspeed`` (both stable in ``trl.models.utils`` since 1.10).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
from collections.abc import Callable

import torch
import torch.nn as nn
from transformers import Trainer, TrainerState
from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

from ..rollout import unwrap_musicgen
from . import fsdp

__all__ = [
    "AdapterDisabledView",
    "load_policy_and_anchor",
    "prepare_models_for_training",
    "OnlineMusicTrainer",
    "OnlineTrainerState",
    "masked_mean",
    "masked_var",
    "masked_whiten",
    "zero_dropout",
]

DROPOUT_ATTRIBUTES = ("dropout", "activation_dropout", "attention_dropout", "layerdrop", "dropout_rate")
#: A prime that spreads the per-process seeds (``seed + rank * prime``), as TRL's PPOTrainer did.
PROCESS_SEED_STRIDE = 100003


def zero_dropout(model: nn.Module) -> None:
    """Zero every dropout probability in ``model``: ``nn.Dropout`` modules *and* the float ``dropout`` /
    ``activation_dropout`` / ``attention_dropout`` / ``layerdrop`` attributes that MusicGen and T5 layers read in
    their forward (TRL's ``disable_dropout_in_model`` only handles the modules, so train-mode logits would still
    differ from the rollout's)."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
        # Layers read the attributes; configs are zeroed too so that a saved checkpoint reloads without dropout.
        for holder in (module, getattr(module, "config", None)):
            for name in DROPOUT_ATTRIBUTES:
                if isinstance(getattr(holder, name, None), float):
                    setattr(holder, name, 0.0)


@dataclasses.dataclass
class OnlineTrainerState(TrainerState):
    """``TrainerState`` with the number of rollouts sampled so far (``episode``), as TRL's on-policy trainers kept it,
    and the KL coefficient in force; ``trainer_state.json`` files of earlier runs load unchanged."""

    episode: int = 0
    kl_coef: float | None = None  # the KL coefficient in force (it moves with MusicPPOConfig.kl_target)


def load_policy_and_anchor(
    model, ref_model, processing_class, allow_pickle_weights: bool = False, anchor_role: str = "KL anchor"
) -> tuple[nn.Module, nn.Module | None, object]:
    """``model`` and ``ref_model`` as MusicGen models (ids and paths are loaded, safetensors only unless
    ``allow_pickle_weights``) and the processor (loaded from ``model`` when it is an id or path)."""
    from transformers import MusicgenForConditionalGeneration, MusicgenProcessor

    from ..loading import load_pretrained

    pickles = allow_pickle_weights
    if isinstance(model, str):
        processing_class = processing_class or load_pretrained(
            MusicgenProcessor.from_pretrained, model, "policy", allow_pickle_weights=pickles
        )
        model = load_pretrained(
            MusicgenForConditionalGeneration.from_pretrained, model, "policy", allow_pickle_weights=pickles
        )
    if isinstance(ref_model, str):
        ref_model = load_pretrained(
            MusicgenForConditionalGeneration.from_pretrained, ref_model, anchor_role, allow_pickle_weights=pickles
        )
    if processing_class is None:
        raise ValueError("processing_class is required: pass the model's MusicgenProcessor.")
    return model, ref_model, processing_class


def prepare_models_for_training(model, ref_model, peft_config, device, train_text_encoder: bool) -> None:
    """What every trainer of a MusicGen policy does to its models before wrapping them: quantized (4/8-bit) models
    checked for this device and given bitsandbytes' CPU fixes (``musicrl_trl.quantization``), a quantized policy
    refused without LoRA, dropout zeroed (train-mode logits must equal the eval-mode ones of rollouts and of the
    anchor), the codec frozen (it decodes or encodes codes, never differentiated) and the text encoder frozen
    unless ``train_text_encoder``."""
    from ..quantization import check_quantization_supported, is_quantized, prepare_quantized_model

    for name, module in (("model", model), ("ref_model", ref_model)):
        if module is None:
            continue
        if is_quantized(module):
            check_quantization_supported(device)
            prepare_quantized_model(module)
            if name == "model" and peft_config is None and not hasattr(module, "peft_config"):
                raise ValueError(
                    "the policy is quantized (4/8-bit): its quantized weights cannot be trained directly. Pass a "
                    "peft_config (LoRA, e.g. --use_peft) to train adapters on top (QLoRA), or load it in full "
                    "precision."
                )
        zero_dropout(module)
    if not train_text_encoder:
        model.text_encoder.requires_grad_(False)
    model.audio_encoder.requires_grad_(False)


# ------------------------------------------------------------------------------------------------ masked statistics
# TRL's masked_mean / masked_var / masked_whiten (trl.experimental.ppo, removed in 1.13), same arithmetic.
def masked_mean(values: torch.Tensor, mask: torch.Tensor, axis: int | None = None) -> torch.Tensor:
    """Mean of ``values`` where ``mask`` is true (over ``axis``, or all of it)."""
    if axis is not None:
        return (values * mask).sum(axis=axis) / mask.sum(axis=axis)
    return (values * mask).sum() / mask.sum()


def masked_var(values: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of ``values`` where ``mask`` is true; ``unbiased`` applies Bessel's correction (needs 2 entries)."""
    centered = values - masked_mean(values, mask)
    variance = masked_mean(centered**2, mask)
    if unbiased:
        count = mask.sum()
        if count < 2:
            raise ValueError(
                f"an unbiased variance needs at least 2 masked entries, got {int(count)}: use larger mini-batches."
            )
        variance = variance * (count / (count - 1))
    return variance


def masked_whiten(values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """``values`` normalised to mean 0 and variance 1 over the masked entries (the mean kept with
    ``shift_mean=False``)."""
    mean, var = masked_mean(values, mask), masked_var(values, mask)
    whitened = (values - mean) * torch.rsqrt(var + 1e-8)
    return whitened if shift_mean else whitened + mean


class AdapterDisabledView(nn.Module):
    """A LoRA policy seen as its anchor: every forward runs inside ``null_ref_context`` (adapter disabled, or the
    reference adapter active), so that code written for two models (``evaluation.drift.kl_per_clip``) takes it as the
    second one without a copy."""

    def __init__(self, policy: nn.Module, null_ref_context: Callable[[], contextlib.AbstractContextManager]):
        super().__init__()
        self.module = policy
        self._null_ref_context = null_ref_context

    def get_base_model(self) -> nn.Module:
        return unwrap_musicgen(self.module)

    def forward_context(self) -> contextlib.AbstractContextManager:
        """Entered by code that calls the policy's submodules rather than its forward
        (``teacher_forcing.decoder_states`` and the LM heads it applies chunk by chunk)."""
        return self._null_ref_context()

    def forward(self, *args, **kwargs):
        with self._null_ref_context():
            return self.module(*args, **kwargs)


# ------------------------------------------------------------------------------------------------ the trainer base
class OnlineMusicTrainer(Trainer):
    """Set-up shared by the trainers that sample their own data from the policy (see the module docstring).

    Attributes set here and read by subclasses: ``policy_model`` (the policy, LoRA-wrapped or not), ``ref_model``
    (the separate anchor, or ``None`` when the adapter-disabled policy is the anchor), ``is_peft_model``,
    ``model_adapter_name`` / ``ref_adapter_name``, ``reward_model`` (the rewards that are modules),
    ``train_dataset_len``, ``local_seed``. After :meth:`setup_online_training`, ``self.model`` is the prepared
    (possibly DDP- or DeepSpeed-wrapped) training module, as in TRL's on-policy trainers.
    """

    # ------------------------------------------------------------------ before Trainer.__init__
    @staticmethod
    def wrap_policy(model: nn.Module, peft_config, bf16: bool) -> nn.Module:
        """``model`` with LoRA adapters from ``peft_config`` (``None``: unchanged)."""
        if peft_config is None:
            return model
        from peft import PeftConfig, PeftModel, get_peft_model

        if not isinstance(peft_config, PeftConfig):
            raise TypeError(
                f"peft_config must be a peft.PeftConfig (e.g. peft.LoraConfig), got {type(peft_config).__name__}."
            )
        if isinstance(model, PeftModel):
            raise ValueError(
                "model already has LoRA adapters and a peft_config was given too: merge the adapters "
                "(model.merge_and_unload()) and pass the merged model with peft_config, or pass the PeftModel alone."
            )
        model = get_peft_model(model, peft_config)
        if bf16 and getattr(model, "is_loaded_in_4bit", False):
            # QLoRA under bf16 (as TRL's trainers do): norms in float32 for stable statistics, embeddings and LM
            # heads in bf16, which autocast computes in anyway (half their memory).
            for name, module in model.named_modules():
                if isinstance(module, nn.LayerNorm) or "norm" in name:
                    module.to(torch.float32)
                elif any(key in name for key in ("lm_head", "embed_tokens")) and hasattr(module, "weight"):
                    if module.weight.dtype == torch.float32:
                        module.to(torch.bfloat16)
        return model

    @staticmethod
    def build_anchor(policy: nn.Module, ref_model: nn.Module | None) -> nn.Module | None:
        """The KL anchor: ``ref_model`` if given; ``None`` for a LoRA policy (its adapter-disabled self, see
        :meth:`null_ref_context`: no second copy); else a frozen copy of the starting policy."""
        if ref_model is not None:
            if ref_model is policy:
                raise ValueError(
                    "model and ref_model are the same object: the anchor must stay fixed while the policy trains. "
                    "Pass ref_model=None (a frozen copy is made, or the adapter-disabled policy with LoRA)."
                )
            return ref_model
        from peft import PeftModel

        if isinstance(policy, PeftModel):
            return None
        if is_deepspeed_zero3_enabled():
            raise ValueError(
                "under DeepSpeed ZeRO-3 the policy's weights are sharded and cannot be copied into an anchor: load "
                "the anchor yourself (MusicgenForConditionalGeneration.from_pretrained) and pass it as ref_model."
            )
        return copy.deepcopy(policy).requires_grad_(False).eval()

    def create_accelerator_and_postprocess(self):
        super().create_accelerator_and_postprocess()
        fsdp.enable_fsdp_on_cpu_ranks(self)  # accelerate drops an FSDP plugin on CPU ranks without a word

    # ------------------------------------------------------------------ after Trainer.__init__
    def setup_online_training(
        self, policy: nn.Module, ref_model: nn.Module | None, reward_modules: nn.Module
    ) -> None:
        """Everything between ``Trainer.__init__`` and the first rollout (see the module docstring)."""
        from peft import PeftModel

        args, accelerator = self.args, self.accelerator
        self.policy_model = policy
        self.is_peft_model = isinstance(policy, PeftModel)
        self.model_adapter_name = args.model_adapter_name
        self.ref_adapter_name = args.ref_adapter_name
        self.ref_model = ref_model
        self.reward_model = reward_modules
        self.train_dataset_len = len(self.train_dataset)
        # TRL's on-policy state (with `episode`) in place of Trainer's, with the same callbacks.
        self.state = OnlineTrainerState(
            is_local_process_zero=self.is_local_process_zero(),
            is_world_process_zero=self.is_world_process_zero(),
            stateful_callbacks=self.state.stateful_callbacks,
        )
        self.set_batch_sizes()
        # Settings that would fail mid-run fail here (see .fsdp); FSDP's layer classes default to MusicGen's.
        if self.is_fsdp_enabled:
            fsdp.check_fsdp_setup(self, policy, ref_model)
        elif self.is_deepspeed_enabled:
            fsdp.check_deepspeed_setup(self)

        # The scheduler counts updates (one lr_scheduler.step() per rollout batch), not optimizer steps.
        self.create_optimizer_and_scheduler(num_training_steps=args.num_total_batches)
        self.callback_handler.optimizer, self.callback_handler.lr_scheduler = self.optimizer, self.lr_scheduler
        self.model, self.optimizer = accelerator.prepare(self.model, self.optimizer)
        if self.is_fsdp_enabled:
            fsdp.autocast_forward(self.model, accelerator)  # bf16 by autocast under FSDP too (see .fsdp)
        self.model_wrapped = self.model
        if self.is_deepspeed_enabled:
            self.deepspeed = self.model
        # Each process samples rollouts of its own: a seed per process (as TRL's PPOTrainer), after everything that
        # consumed the generator while building (LoRA initialisation, Trainer's set_seed).
        self.local_seed = args.seed + accelerator.process_index * PROCESS_SEED_STRIDE
        torch.manual_seed(self.local_seed)

        self.place_anchor_and_rewards(reward_modules)

    def place_anchor_and_rewards(self, reward_modules: nn.Module) -> None:
        """Move the rewards that are modules and a separate anchor to this process's device, in eval mode.

        Rewards are called as plain functions on each process's own batch (CLAP's ``get_audio_features``, feature
        extractors, NumPy), not through an engine's forward in lockstep, so they stay whole on every device, also
        under DeepSpeed. A separate anchor becomes a DeepSpeed inference engine there (sharded under ZeRO-3)."""
        accelerator = self.accelerator
        self.reward_model = reward_modules.to(accelerator.device).eval()
        if self.ref_model is not None:
            if self.is_deepspeed_enabled:
                from trl.models.utils import prepare_deepspeed

                self.ref_model = prepare_deepspeed(self.ref_model, accelerator)
            elif self.is_fsdp_enabled:
                # Its layers sharded, each gathered around its own forward; no optimizer state (see .fsdp).
                self.ref_model = fsdp.shard_anchor(self.ref_model, accelerator)
            else:
                self.ref_model = self.ref_model.to(accelerator.device)
            self.ref_model.eval().requires_grad_(False)

    def set_batch_sizes(self) -> None:
        """The batch arithmetic, written into ``args`` under TRL's field names (see :class:`MusicPPOConfig`):

        - a micro-batch is ``per_device_train_batch_size`` rollouts (one forward/backward);
        - a mini-batch is ``gradient_accumulation_steps`` micro-batches, one optimizer step:
          ``local_mini_batch_size``, and ``mini_batch_size`` over all processes;
        - an update samples ``num_mini_batches`` mini-batches: ``local_batch_size`` per process, ``batch_size`` in all;
        - the run makes ``num_total_batches = ceil(total_episodes / batch_size)`` updates, ``total_episodes``
          defaulting to ``num_train_epochs`` passes over the prompts.
        """
        args = self.args
        sizes = {name: getattr(args, name) for name in ("per_device_train_batch_size", "gradient_accumulation_steps",
                                                         "num_mini_batches", "num_ppo_epochs")}  # fmt: skip
        wrong = {name: value for name, value in sizes.items() if not isinstance(value, int) or value < 1}
        if wrong:
            raise ValueError(f"{', '.join(f'{k}={v!r}' for k, v in wrong.items())}: each must be an integer >= 1.")
        if args.total_episodes is None:
            args.total_episodes = int(args.num_train_epochs * self.train_dataset_len)
        if args.total_episodes < 1:
            raise ValueError(
                f"total_episodes must be >= 1 (rollouts in the run), got {args.total_episodes}; set total_episodes or "
                "num_train_epochs."
            )
        args.world_size = self.accelerator.num_processes
        args.micro_batch_size = args.per_device_train_batch_size * args.world_size
        args.local_mini_batch_size = args.per_device_train_batch_size * args.gradient_accumulation_steps
        args.mini_batch_size = args.local_mini_batch_size * args.world_size
        args.local_batch_size = args.local_mini_batch_size * args.num_mini_batches
        args.batch_size = args.local_batch_size * args.world_size
        args.num_total_batches = math.ceil(args.total_episodes / args.batch_size)

    @contextlib.contextmanager
    def null_ref_context(self):
        """The LoRA anchor: the policy with its adapter disabled (or ``ref_adapter_name`` active). Reads the policy
        through ``accelerator.unwrap_model``, which DDP and DeepSpeed wrappers need."""
        policy = self.accelerator.unwrap_model(self.model).policy
        use_adapter = bool(self.ref_adapter_name)
        with policy.disable_adapter() if self.is_peft_model and not use_adapter else contextlib.nullcontext():
            if use_adapter:
                policy.set_adapter(self.ref_adapter_name)
            try:
                yield
            finally:
                if use_adapter:
                    policy.set_adapter(self.model_adapter_name or "default")
