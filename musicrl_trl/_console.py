"""Quiet consoles: drop third-party log lines a user of this library cannot act on.

Each filter drops one known message and nothing else, so every other warning of these libraries still shows.
Only the standard ``logging`` module is touched here (filters attach to loggers by name before their libraries are
imported), so installing them costs nothing at import time.
"""

from __future__ import annotations

import logging
import re
import warnings

__all__ = ["quiet_third_party_logs"]

# bitsandbytes 0.50 looks up an optional faster 4-bit CPU kernel on the Hub as soon as it is imported (peft imports
# it whenever it is installed, quantized model or not) and logs a failure that kernels >= 0.19 always reports for
# this unsigned repository. 4-bit training works without that kernel (quantization.py turns its repacking off anyway).
_BNB_LOGGER = "bitsandbytes.backends.cpu.ops"
_BNB_MESSAGE = "Failed to load CPU gemm_4bit_forward"
# Offline (HF_HUB_OFFLINE=1), the same lookup first logs that it skips the publisher check of that repository.
_KERNELS_LOGGER = "kernels._internals.hf_hub"
_KERNELS_MESSAGE = "Skipping publisher trust check for 'kernels-community/quantization-bitsandbytes'"

# transformers 5.25 checks MusicgenConfig's special tokens with the generic rule `token < vocab_size`, while MusicGen
# itself (MusicgenDecoderConfig.validate_token_ids) allows `token == vocab_size`: the pad/start token 2048 is the
# extra embedding row of every MusicGen checkpoint, facebook/musicgen-* included. Only that exact case is dropped.
_TRANSFORMERS_LOGGER = "transformers.configuration_utils"
_TOKEN_MESSAGE = re.compile(r"Model config: \w+_token_id must be .* \(between 0 and (\d+)\), got (\d+)\.")


class _DropBitsandbytesKernelLookup(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith((_BNB_MESSAGE, _KERNELS_MESSAGE))


class _DropMusicgenPadToken(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        match = _TOKEN_MESSAGE.search(record.getMessage())
        return not (match and int(match.group(2)) == int(match.group(1)) + 1)  # token == vocab_size


# transformers 5.25 deprecated `PreTrainedModel.is_gradient_checkpointing`; peft 0.21 (`PeftModel.__init__`) and
# trl 1.16 (`unwrap_model_for_generation`) still read it, so every LoRA load warned about code the user cannot change.
_GRADIENT_CHECKPOINTING_ALIAS = r"`is_gradient_checkpointing` is deprecated"


def quiet_third_party_logs() -> None:
    """Install the filters above (idempotent)."""
    warnings.filterwarnings("ignore", message=_GRADIENT_CHECKPOINTING_ALIAS, category=FutureWarning)
    for name, filter_type in (
        (_BNB_LOGGER, _DropBitsandbytesKernelLookup),
        (_KERNELS_LOGGER, _DropBitsandbytesKernelLookup),
        (_TRANSFORMERS_LOGGER, _DropMusicgenPadToken),
    ):
        logger = logging.getLogger(name)
        if not any(isinstance(existing, filter_type) for existing in logger.filters):
            logger.addFilter(filter_type())
