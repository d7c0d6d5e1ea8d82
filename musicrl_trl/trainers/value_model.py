"""The value network of MusicPPOTrainer, its persistence, and the policy + value module that one ``prepare`` wraps.

Shape letters as in :mod:`musicrl_trl.rollout`: B rollouts, L prompt tokens, K codebooks, S delayed-layout length,
A = S - 1 decoder steps (one value per step), H hidden size.
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn
from safetensors.torch import load_file, load_model, save_file, save_model
from transformers import MusicgenForConditionalGeneration

from ..quantization import is_quantized, prepare_quantized_model
from ..rollout import unwrap_musicgen
from ..teacher_forcing import StepStatistics, decoder_states, step_statistics

__all__ = [
    "VALUE_WEIGHTS_NAME",
    "MusicPolicyAndValue",
    "MusicValueModel",
    "load_value_model",
    "save_value_model",
]

VALUE_WEIGHTS_NAME = "value_model.safetensors"


class MusicValueModel(nn.Module):
    """V(s_t) for every decoder step: a MusicGen decoder trunk conditioned on the prompt, and a scalar head.

    With ``backbone=None`` the head reads the policy's own last hidden states (``share_value_backbone``); otherwise
    ``backbone`` is a separate copy of the starting MusicGen (MusicRL's choice: policy and value both start from the
    pretrained checkpoint). ``base_model_prefix`` and ``score`` follow TRL's value-model convention.

    With a quantized (4/8-bit) policy the separate trunk is a LoRA'd copy of the quantized model: its frozen weights
    stay quantized and only LoRA adapters (the policy's ``peft_config``) and the head learn. Its memory is one more
    quantized decoder (about 0.53 bytes per decoder parameter in NF4: ~225 MB for musicgen-small's ~420M) plus the
    full-precision text encoder, codec and LM heads it copies, plus adapters; a full-precision trunk would cost 4 bytes
    per decoder parameter and its Adam state 8 more.
    """

    base_model_prefix = "backbone"

    def __init__(self, hidden_size: int, backbone: MusicgenForConditionalGeneration | None = None):
        super().__init__()
        self.backbone = backbone
        self.score = nn.Linear(hidden_size, 1)
        # Zero-initialised: a new head reading unit-scale hidden states would start with values of order 1 that
        # differ from step to step, far above the reward's spread between rollouts; the early advantages R - V(s_t)
        # would then be mostly that noise (measured on the tiny model: -8 % reward instead of +84 % in 40 updates).
        # At V = 0 the first updates are REINFORCE with the batch-mean baseline that whitening subtracts.
        nn.init.zeros_(self.score.weight)
        nn.init.zeros_(self.score.bias)

    @classmethod
    def from_policy(
        cls, policy: nn.Module, share_backbone: bool, peft_config=None, lora_trunk: bool | None = None
    ) -> MusicValueModel:
        """The value network for ``policy``: a head on the policy's trunk, or on a copy of it, trained fully or,
        with ``lora_trunk`` (default: only for quantized policies), through LoRA adapters (``peft_config``)."""
        musicgen = unwrap_musicgen(policy)
        backbone = None
        if lora_trunk is None:
            lora_trunk = is_quantized(musicgen)
        elif not lora_trunk and not share_backbone and is_quantized(musicgen):
            raise ValueError(
                "lora_value_trunk=False: a copy of a quantized (4/8-bit) policy cannot be trained fully. Leave "
                "lora_value_trunk unset (LoRA trunk) or set share_value_backbone=True."
            )
        if not share_backbone and lora_trunk:
            if peft_config is None:
                raise ValueError(
                    "a LoRA value trunk (always, for a quantized 4/8-bit policy) needs peft_config (e.g. --use_peft), "
                    "or set share_value_backbone=True."
                )
            from peft import get_peft_model

            # Quantized weights cannot require gradients (and deepcopy keeps them quantized): the copy is frozen and
            # learns through adapters of its own. Only the decoder is LoRA'd (the policy's target modules).
            backbone = copy.deepcopy(musicgen).requires_grad_(False)
            backbone = prepare_quantized_model(get_peft_model(backbone, copy.deepcopy(peft_config)))
        elif not share_backbone:
            backbone = copy.deepcopy(musicgen)
            # Only the decoder trunk learns values; the text encoder and the codec stay as they are.
            for param in backbone.parameters():
                param.requires_grad_(False)
            for param in backbone.decoder.parameters():
                param.requires_grad_(True)
            backbone.decoder.lm_heads.requires_grad_(False)  # values read hidden states, never code logits
            if hasattr(backbone, "enc_to_dec_proj"):
                backbone.enc_to_dec_proj.requires_grad_(True)
        return cls(musicgen.decoder.config.hidden_size, backbone)

    @property
    def shares_policy_backbone(self) -> bool:
        return self.backbone is None

    def forward(self, prompt_ids, prompt_mask, grid, policy_hidden_states=None) -> torch.Tensor:
        """Values [B, A] at every decoder step, from the prompt and the grid [B, K, S]."""
        if self.backbone is None:
            hidden = policy_hidden_states
        else:  # the trunk only: values never read code logits
            hidden = decoder_states(self.backbone, prompt_ids, prompt_mask, grid).hidden
        return self.score(hidden.to(self.score.weight.dtype)).squeeze(-1)


def save_value_model(value_model: MusicValueModel, path: str) -> None:
    """Checkpoint the value network (safetensors). A quantized trunk saves only what trains (adapters and head): its
    frozen 4/8-bit weights are the starting checkpoint's, and bitsandbytes' packed tensors do not load back into a
    module with ``load_state_dict``."""
    if is_quantized(value_model):
        save_file({n: p.detach().contiguous() for n, p in value_model.named_parameters() if p.requires_grad}, path)
    else:
        save_model(value_model, path)  # de-duplicates tied tensors (T5's shared embeddings) that save_file refuses


def load_value_model(value_model: MusicValueModel, path: str) -> None:
    if not is_quantized(value_model):
        load_model(value_model, path)
        return
    state = load_file(path)
    trainable = {n for n, p in value_model.named_parameters() if p.requires_grad}
    if set(state) != trainable:
        raise ValueError(
            f"{path} does not match the value network (missing {sorted(trainable - set(state))[:3]}, unexpected "
            f"{sorted(set(state) - trainable)[:3]}); resume with the model and LoRA settings the run started from."
        )
    value_model.load_state_dict(state, strict=False)


class MusicPolicyAndValue(nn.Module):
    """Policy and value model behind one ``forward``, so that a single ``accelerator.prepare`` (DDP, DeepSpeed)
    wraps both and gradients synchronise. Takes the place of TRL's text-only ``PolicyAndValueWrapper``. With a
    value-free baseline (``value_model=None``) the forward returns no values."""

    def __init__(self, policy: nn.Module, value_model: MusicValueModel | None):
        super().__init__()
        self.policy = policy
        self.value_model = value_model
        self.is_gradient_checkpointing = getattr(policy, "is_activation_checkpointing", False)

    def gradient_checkpointing_enable(self, **kwargs):
        self.policy.gradient_checkpointing_enable(**kwargs)
        self.is_gradient_checkpointing = True

    def gradient_checkpointing_disable(self):
        self.policy.gradient_checkpointing_disable()
        self.is_gradient_checkpointing = False

    def forward(
        self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, grid: torch.Tensor, sampling, **statistics_options
    ) -> tuple[StepStatistics, torch.Tensor | None]:
        """The policy's per-step statistics over ``grid`` (:func:`musicrl_trl.teacher_forcing.step_statistics` with
        ``sampling`` and ``statistics_options``: the reference's states, KL estimator, entropy, chunk size, ...) and
        the values [B, A] (None without a value network). The LM heads run inside this forward, chunk by chunk, so
        that DDP, DeepSpeed and FSDP see every parameter used in the module they wrap."""
        states = decoder_states(self.policy, prompt_ids, prompt_mask, grid, guided=sampling.guided)
        statistics = step_statistics(states, grid, sampling, **statistics_options)
        if self.value_model is None:
            return statistics, None
        values = self.value_model(prompt_ids, prompt_mask, grid, policy_hidden_states=states.hidden)
        # Under bf16/fp16 autocast the values come out in half precision; the value loss is computed in float32
        # (accelerate's convert_outputs_to_fp32 skips this dataclass). Log-probs need nothing: the sampling
        # transform (codebooks.sampling_logits) computes in at least float32.
        return statistics, values.float()
