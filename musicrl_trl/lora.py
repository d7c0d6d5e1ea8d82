"""LoRA for MusicGen: the default target modules, and a LoRA value network to go with a LoRA policy.

``MUSICGEN_LORA_TARGET_MODULES`` names the projections of MusicGen's decoder: self- and cross-attention (``q_proj``,
``k_proj``, ``v_proj``, ``out_proj``) and the MLP (``fc1``, ``fc2``). On the composite
``MusicgenForConditionalGeneration`` these names hit only the decoder: the T5 text encoder calls its projections
``q``/``k``/``v``/``o`` and the EnCodec codec has convolutions only. peft has no default for MusicGen (its table is
keyed by model type), so without this list ``LoraConfig()`` fails with "Please specify `target_modules`".

With a separate value network (``share_value_backbone=False``, MusicRL's choice) a LoRA policy alone would still
leave a full trainable decoder copy (and its optimizer state) in the value network. :func:`lora_value_model` puts
the same adapters on the value network's decoder instead; only they and the value head train.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from .trainers.ppo_trainer import MusicValueModel, zero_dropout

__all__ = ["MUSICGEN_LORA_TARGET_MODULES", "lora_value_model"]

#: MusicGen decoder attention (self and cross) and MLP projections: the default LoRA targets.
MUSICGEN_LORA_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")


def lora_value_model(policy: nn.Module, peft_config, seed: int = 42) -> MusicValueModel:
    """A separate :class:`MusicValueModel` copied from ``policy`` whose decoder trains through LoRA adapters.

    ``peft_config`` is the policy's ``LoraConfig``; its adapters are injected into the value backbone (in place: the
    backbone stays a ``MusicgenForConditionalGeneration``, so the value forward is unchanged). Trainable: the adapters
    and the value head. The head is initialised under ``seed`` like ``MusicPPOTrainer``'s own value model, so a
    resumed run rebuilds the same parameters.
    """
    from peft import inject_adapter_in_model

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        value_model = MusicValueModel.from_policy(policy, share_backbone=False)
    config = copy.deepcopy(peft_config)
    config.inference_mode = False
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        inject_adapter_in_model(config, value_model.backbone)
    for name, param in value_model.backbone.named_parameters():
        param.requires_grad_("lora_" in name)
    zero_dropout(value_model)
    return value_model
