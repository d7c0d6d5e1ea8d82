"""The reward calling convention and its input checks, shared by every reward callable in this package.

A reward is called as::

    reward(prompts=list[str], audio=Tensor[B, C, N], sampling_rate=int, codes=LongTensor[B, K, T], **kwargs)

and returns ``Tensor[B]`` (float32, on ``audio``'s device). Subclasses implement :meth:`AudioReward.score` on
already-validated inputs; the base class checks shapes, NaN/inf, the sampling rate and the prompt count, runs
``score`` under ``torch.no_grad()`` and checks the output, so that a bad batch fails with a message naming the
reward and the fix instead of a shape error deep inside a model.
"""

from __future__ import annotations

from typing import Any

import torch

from ..audio import check_audio, check_sampling_rate

__all__ = ["AudioReward"]


class AudioReward:
    """Base class of the reward callables. ``__name__`` is the name used in logs and by ``combine_rewards``."""

    #: Whether ``score`` reads the prompts (then ``prompts`` must be given, one per clip).
    requires_prompts: bool = False
    #: Whether ``score`` reads the codes (then ``codes`` [B, K, T] must be given).
    requires_codes: bool = False

    def __init__(self, name: str) -> None:
        # An instance attribute, as TRL reads `reward_func.__name__` for its logs and plain functions have one.
        self.__name__ = name

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.__name__!r})"

    def score(
        self,
        prompts: list[str] | None,
        audio: torch.Tensor,
        sampling_rate: int,
        codes: torch.Tensor | None,
        **kwargs: Any,
    ) -> torch.Tensor:
        """Scores ``[B]`` for validated inputs. Called under ``torch.no_grad()``."""
        raise NotImplementedError

    def __call__(
        self,
        prompts: list[str] | None = None,
        audio: torch.Tensor | None = None,
        sampling_rate: int | None = None,
        codes: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        name = self.__name__
        if audio is None:
            raise ValueError(f"{name}: pass the waveforms as `audio=` (Tensor[B, C, N]) with `sampling_rate=`.")
        audio = check_audio(audio, name)
        if sampling_rate is None:
            raise ValueError(f"{name}: pass `sampling_rate=` (the rate of `audio`, 32000 for MusicGen).")
        sampling_rate = check_sampling_rate(sampling_rate, name)
        batch_size = audio.shape[0]
        prompts = self._check_prompts(prompts, batch_size)
        codes = self._check_codes(codes, batch_size)
        with torch.no_grad():
            scores = self.score(prompts, audio, sampling_rate, codes, **kwargs)
        if scores.shape != (batch_size,):
            raise RuntimeError(f"{name}: produced scores of shape {tuple(scores.shape)}, expected ({batch_size},).")
        return scores.to(device=audio.device, dtype=torch.float32)

    def _check_prompts(self, prompts: Any, batch_size: int) -> list[str] | None:
        name = self.__name__
        if prompts is None:
            if self.requires_prompts:
                raise ValueError(
                    f"{name}: this reward reads the text prompts; pass `prompts=` with one string per clip."
                )
            return None
        if isinstance(prompts, str) or not isinstance(prompts, (list, tuple)):
            raise ValueError(
                f"{name}: prompts must be a list of strings (one per clip), got {type(prompts).__name__}."
            )
        if len(prompts) != batch_size:
            raise ValueError(
                f"{name}: got {len(prompts)} prompts for a batch of {batch_size} clips; pass exactly one prompt per "
                "clip (repeat a prompt for several samples of it)."
            )
        if not all(isinstance(prompt, str) for prompt in prompts):
            raise ValueError(f"{name}: every prompt must be a string.")
        return list(prompts)

    def _check_codes(self, codes: Any, batch_size: int) -> torch.Tensor | None:
        name = self.__name__
        if codes is None:
            if self.requires_codes:
                raise ValueError(f"{name}: this reward scores audio codes; pass `codes=` (LongTensor[B, K, T]).")
            return None
        if not isinstance(codes, torch.Tensor) or codes.dim() != 3 or codes.is_floating_point():
            shape = tuple(codes.shape) if isinstance(codes, torch.Tensor) else type(codes).__name__
            raise ValueError(f"{name}: codes must be an integer tensor of shape [B, K, T], got {shape}.")
        if codes.shape[0] != batch_size:
            raise ValueError(
                f"{name}: codes hold {codes.shape[0]} clips but audio holds {batch_size}; pass matching batches."
            )
        return codes
