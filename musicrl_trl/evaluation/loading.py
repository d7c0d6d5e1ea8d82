"""What an evaluation reads, checked before anything is sampled: rewards from command-line specs, prompts, policies
(paths, Hub ids, LoRA adapters), and that the policies sample the same kind of codes. Also the CLAP score, the
text-adherence reward used as a metric."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch

from ..loading import check_no_pickle_only_weights, load_pretrained
from ..loading import load_prompts as load_shared_prompts
from ..reward_models import (
    BrightnessReward,
    LoudnessReward,
    PreferenceReward,
    QualityReward,
    SilencePenalty,
    TextAdherenceReward,
)
from ..rollout import unwrap_musicgen

__all__ = ["REWARD_KINDS", "check_compatible", "clap_score", "load_policy", "load_prompts", "load_reward"]

#: Reward names accepted by :func:`load_reward`: signal rewards alone, model rewards as ``NAME=PATH_OR_ID``.
REWARD_KINDS = ("loudness", "brightness", "silence", "adherence", "quality", "preference")
SIGNAL_REWARDS = ("loudness", "brightness", "silence")


def clap_score(prompts: list[str], audio: torch.Tensor, sampling_rate: int, reward: Any) -> torch.Tensor:
    """CLAP score [B] of clips against their prompts: the text-adherence reward (mean CLAP cosine over windows).

    ``reward`` is a :class:`~musicrl_trl.reward_models.TextAdherenceReward`, or a CLAP path / Hub id to build one.
    """
    if not isinstance(reward, TextAdherenceReward):
        reward = TextAdherenceReward(reward)
    return reward(prompts=list(prompts), audio=audio, sampling_rate=sampling_rate)


def load_reward(
    spec: str, device: torch.device | str | None = None, allow_pickle_weights: bool = False
) -> tuple[str, Callable]:
    """A reward from a command-line spec: ``loudness``, ``brightness``, ``silence`` (signal rewards, no weights),
    or ``adherence=PATH_OR_ID``, ``quality=PATH_OR_ID``, ``preference=PATH_OR_ID``. Returns ``(name, reward)``.

    Raises ``ValueError`` naming the spec when it is unknown or its model cannot be loaded (the cause attached: a
    :class:`~musicrl_trl.loading.ModelLoadingError` for a model with only pickle weights, which are loaded only with
    ``allow_pickle_weights=True``).
    """
    kind, _, location = spec.partition("=")
    kind = kind.strip()
    if kind not in REWARD_KINDS:
        raise ValueError(
            f"unknown reward {spec!r}: use one of {', '.join(SIGNAL_REWARDS)} or "
            "adherence=PATH_OR_ID, quality=PATH_OR_ID, preference=PATH_OR_ID."
        )
    if kind in SIGNAL_REWARDS:
        if location:
            raise ValueError(f"reward {spec!r}: {kind} is computed from the signal and takes no model; pass {kind!r}.")
        return kind, {"loudness": LoudnessReward, "brightness": BrightnessReward, "silence": SilencePenalty}[kind]()
    if not location:
        raise ValueError(f"reward {spec!r} needs a model: pass {kind}=PATH_OR_HUB_ID.")
    builder = {"adherence": TextAdherenceReward, "quality": QualityReward, "preference": PreferenceReward}[kind]
    try:
        return kind, builder(location, device=device, allow_pickle_weights=allow_pickle_weights)
    except Exception as error:  # any failure to load is reported the same way, with the cause attached
        raise ValueError(
            f"could not load the {kind} reward from {location!r} ({type(error).__name__}: {error}). Check the path "
            "or Hub id (and your network / HF_HUB_OFFLINE); an adherence reward needs a CLAP checkpoint, quality and "
            "preference rewards a MusicRewardModel (or a token-space preference model)."
        ) from error


def load_prompts(source: Any, split: str = "train", column: str = "prompt") -> list[str]:
    """Prompts to evaluate on: :func:`musicrl_trl.loading.load_prompts` (the one loader the scripts, the trainer and
    the app share: text file, data file, dataset folder, Hub id, ``Dataset`` or list; blank lines and empty rows are
    refused with their number)."""
    return load_shared_prompts(source, split=split, column=column, what="--prompts")


def load_policy(
    source: Any, processor: Any = None, device: torch.device | str | None = None, allow_pickle_weights: bool = False
) -> tuple[Any, Any]:
    """A MusicGen policy and its processor from a path or Hub id, or a model passed as it is.

    A directory or repo with ``adapter_config.json`` is a LoRA adapter: its base model
    (``base_model_name_or_path``) is loaded and wrapped with ``PeftModel.from_pretrained``; the processor is read
    from the adapter when it was saved there (``MusicPPOTrainer.save_model`` does), else from the base.

    Weights that are only pickles (``pytorch_model.bin``, ``adapter_model.bin``: loading them can run code) are
    refused unless ``allow_pickle_weights=True``: the ``ValueError`` then has a
    :class:`~musicrl_trl.loading.ModelLoadingError` as its cause.
    """
    from transformers import MusicgenForConditionalGeneration, MusicgenProcessor

    if not isinstance(source, (str, os.PathLike)):
        if processor is None:
            raise ValueError("pass the processor of a policy given as a model object.")
        unwrap_musicgen(source)  # type check
        model = source
    else:
        from transformers.utils import find_adapter_config_file

        source = os.fspath(source)
        try:
            adapter_config = find_adapter_config_file(source)
            if adapter_config is not None:
                from peft import PeftConfig, PeftModel

                base_id = PeftConfig.from_pretrained(source).base_model_name_or_path
                base = load_pretrained(
                    MusicgenForConditionalGeneration.from_pretrained, base_id, "base model", None, allow_pickle_weights
                )
                # peft has no use_safetensors: it reads adapter_model.bin whenever there is no safetensors file.
                if not allow_pickle_weights:
                    check_no_pickle_only_weights(source, "LoRA adapter")
                model = PeftModel.from_pretrained(base, source)
                if processor is None:
                    try:
                        processor = MusicgenProcessor.from_pretrained(source)
                    except (OSError, ValueError):
                        processor = MusicgenProcessor.from_pretrained(base_id)
            else:
                load = MusicgenForConditionalGeneration.from_pretrained
                model = load_pretrained(load, source, "policy", None, allow_pickle_weights)
                processor = processor or MusicgenProcessor.from_pretrained(source)
        except Exception as error:
            raise ValueError(
                f"could not load the policy {source!r} ({type(error).__name__}: {error}): pass a MusicGen checkpoint "
                "or a LoRA adapter saved by MusicPPOTrainer (a directory or Hub id)."
            ) from error
    model.eval().requires_grad_(False)
    if device is not None:
        model.to(device)
    return model, processor


def _audio_spec(model: Any) -> dict[str, Any]:
    musicgen = unwrap_musicgen(model)
    return {
        "codebooks": musicgen.decoder.num_codebooks,
        "audio channels": musicgen.decoder.config.audio_channels,
        "codebook size": musicgen.decoder.config.vocab_size,
        "sampling rate": musicgen.config.audio_encoder.sampling_rate,
        "frame rate": musicgen.config.audio_encoder.frame_rate,
    }


def check_compatible(models: dict[str, Any]) -> None:
    """Raise ``ValueError`` unless every model samples the same kind of codes: same number of codebooks, audio
    channels, codebook size, sampling rate and frame rate (clips and KLs are compared code by code)."""
    specs = {name: _audio_spec(model) for name, model in models.items()}
    (first_name, first), *others = specs.items()
    for name, spec in others:
        for key, value in spec.items():
            if value != first[key]:
                raise ValueError(
                    f"{name} and {first_name} differ in {key} ({value} vs {first[key]}): a side-by-side evaluation "
                    "and the KL to the base need policies of the same MusicGen family (same codec and codebooks); "
                    "compare checkpoints fine-tuned from the same base."
                )
