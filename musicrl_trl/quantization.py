"""Quantized MusicGen policies (QLoRA): the decoder's linear layers in 4 or 8 bits through bitsandbytes, LoRA on top.

What is quantized, and why:
  - the decoder's attention and feed-forward layers (``decoder.model.decoder.layers.*``): most of the parameters,
    frozen under LoRA, so their precision only costs a little accuracy in the forward pass;
  - NOT the text encoder (T5, run once per prompt), the codec (``audio_encoder``: it decodes sampled codes into the
    audio the rewards hear), the LM heads (``decoder.lm_heads``: every log-prob and the exact KL read them) or
    ``enc_to_dec_proj``. bitsandbytes matches skip names against full module paths, so ``"lm_heads"`` alone would
    not keep ``decoder.lm_heads.0`` in full precision: the names below are full paths.

Two traps of bitsandbytes' 4-bit layers on CPU (0.46-0.50), handled by :func:`prepare_quantized_model`, which
:class:`~musicrl_trl.MusicPPOTrainer` calls on every model it is given:
  - on CPUs with AVX512-BF16 the first forward without gradients in eval mode (a rollout, the anchor's forward)
    repacks the weights into a layout whose matmul has no autograd path; LoRA gradients computed afterwards are wrong
    (by up to 100 %). ``support_avx512bf16_for_cpu = False`` on every ``Linear4bit`` keeps the autograd path;
  - the repacked layout also needs ``in_features`` to be a multiple of the 64-element quantization block and fails
    with ``shape '[32, 0]' is invalid`` otherwise; with repacking off, any width works.

Memory (weights only, P decoder parameters): fp32 4P bytes, bf16 2P, 8-bit about P, 4-bit NF4 about 0.53P
(4 bits plus one fp32 absmax per 64-weight block). musicgen-small's decoder has about 420M parameters.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

import torch
import torch.nn as nn

if TYPE_CHECKING:
    from transformers import BitsAndBytesConfig

__all__ = [
    "QUANTIZATION_SKIP_MODULES",
    "musicgen_quantization_config",
    "is_quantized",
    "quantization_bits",
    "prepare_quantized_model",
    "check_quantization_supported",
]

# Full module paths inside MusicgenForConditionalGeneration (see the module docstring).
QUANTIZATION_SKIP_MODULES = ("text_encoder", "audio_encoder", "enc_to_dec_proj", "decoder.lm_heads")


def musicgen_quantization_config(
    load_in_4bit: bool = False,
    load_in_8bit: bool = False,
    compute_dtype: torch.dtype | str | None = None,
    quant_type: str = "nf4",
    double_quant: bool = False,
) -> BitsAndBytesConfig | None:
    """The ``BitsAndBytesConfig`` for ``MusicgenForConditionalGeneration.from_pretrained(..., quantization_config=)``
    that quantizes only the decoder's transformer layers (``None`` when neither flag is set).

    ``compute_dtype``: dtype of the 4-bit matmuls (default float32; bfloat16 on GPUs that have it is faster).

    >>> config = musicgen_quantization_config(load_in_4bit=True)
    >>> config.load_in_4bit, "decoder.lm_heads" in config.llm_int8_skip_modules
    (True, True)
    """
    if load_in_4bit and load_in_8bit:
        raise ValueError("load_in_4bit and load_in_8bit are exclusive: choose one.")
    if not (load_in_4bit or load_in_8bit):
        return None
    if isinstance(compute_dtype, str):
        compute_dtype = None if compute_dtype == "auto" else getattr(torch, compute_dtype)
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=load_in_4bit,
        load_in_8bit=load_in_8bit,
        bnb_4bit_compute_dtype=compute_dtype or torch.float32,
        bnb_4bit_quant_type=quant_type,
        bnb_4bit_use_double_quant=double_quant,
        llm_int8_skip_modules=list(QUANTIZATION_SKIP_MODULES),
    )


def _bnb_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    # A model can hold bitsandbytes layers only once bitsandbytes was imported (by a quantized load, or by peft);
    # importing it here for every unquantized model would cost seconds and a Hub lookup for a CPU kernel.
    bnb = sys.modules.get("bitsandbytes")
    if bnb is None:
        return []
    return [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt))
    ]


def quantization_bits(model: nn.Module) -> int | None:
    """4 or 8 when ``model`` holds bitsandbytes layers, else ``None``."""
    layers = _bnb_layers(model)
    if not layers:
        return None
    import bitsandbytes as bnb

    return 4 if any(isinstance(module, bnb.nn.Linear4bit) for _, module in layers) else 8


def is_quantized(model: nn.Module) -> bool:
    """Whether ``model`` (a MusicGen, a PeftModel around one, a value network) holds bitsandbytes layers."""
    return bool(_bnb_layers(model))


def check_quantization_supported(device: torch.device | str) -> None:
    """Raise a clear error where bitsandbytes cannot train a quantized policy on ``device``."""
    device_type = torch.device(device).type
    if device_type not in ("cpu", "cuda", "xpu"):
        raise ValueError(
            f"4-bit/8-bit policies need bitsandbytes on CPU, CUDA or XPU; this run is on {device_type!r}. Load the "
            f"model without load_in_4bit/load_in_8bit (bf16 LoRA is the next-smallest setting)."
        )


def prepare_quantized_model(model: nn.Module) -> nn.Module:
    """Make a bitsandbytes-quantized MusicGen safe to train with LoRA; a no-op for other models.

    - turns off the CPU repacking of 4-bit weights (``support_avx512bf16_for_cpu = False``; see the module docstring);
    - checks that the LM heads and the codec were kept in full precision, which every log-prob, the KL and the audio
      rely on; a model quantized with transformers' default skip list fails here with the config to use instead.
    """
    layers = _bnb_layers(model)
    if not layers:
        return model
    for name, module in layers:
        if any(part in name for part in ("lm_heads", "audio_encoder")):
            raise ValueError(
                f"{name} is quantized: MusicGen's LM heads and codec must stay in full precision (log-probs, KL and "
                f"audio are computed from them). Load with quantization_config="
                f"musicrl_trl.quantization.musicgen_quantization_config(load_in_4bit=True), whose "
                f"llm_int8_skip_modules are {list(QUANTIZATION_SKIP_MODULES)}."
            )
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
            quant_state = getattr(module.weight, "quant_state", None)
            if getattr(quant_state, "packing_format_for_cpu", False):
                # Already repacked by an earlier no-grad forward: back to the layout that has an autograd path.
                from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

                module.weight.data, module.weight.quant_state = _convert_weight_packed_for_cpu_inverse(
                    module.weight.data, quant_state
                )
    return model
