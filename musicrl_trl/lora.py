"""LoRA for MusicGen: the default target modules, and a LoRA value network to go with a LoRA policy.

``MUSICGEN_LORA_TARGET_MODULES`` names the projections of MusicGen's decoder: self- and cross-attention (``q_proj``,
``k_proj``, ``v_proj``, ``out_proj``) and the MLP (``fc1``, ``fc2``). On the composite
``MusicgenForConditionalGeneration`` these names hit only the decoder: the T5 text encoder calls its projections
``q``/``k``/``v``/``o`` and the EnCodec codec has convolutions only. peft has no default for MusicGen (its table is
keyed by model type), so without this list ``LoraConfig()`` fails with "Please specify `target_modules`".

With a separate value network (``share_value_backbone=False``, MusicRL's choice) a LoRA policy alone would still
leave a full trainable decoder copy (and its optimizer state) in the value network; ``MusicPPOConfig``'s
``lora_value_trunk=True`` puts the same adapters on the value network's decoder instead (the example script sets it
with ``--use_peft``).
"""

from __future__ import annotations

__all__ = ["MUSICGEN_LORA_TARGET_MODULES"]

#: MusicGen decoder attention (self and cross) and MLP projections: the default LoRA targets.
MUSICGEN_LORA_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")
