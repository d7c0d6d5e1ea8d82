"""Reading reward data for :class:`~musicrl_trl.AudioRewardTrainer`: dataset layouts, cells (audio, codes, numbers)
with errors that name the row's problem and its fix, the collator that pads and resamples a batch, and the evaluation
metrics (pairwise accuracy and margin, regression MSE and rank correlation).

Shape letters: B batch (pairs or rated clips), C channels, N samples, K codebooks, T frames, L prompt tokens.
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import soundfile as sf
import torch
from transformers import FeatureExtractionMixin, PreTrainedTokenizerBase
from transformers.trainer_utils import EvalPrediction

from ..audio import MAX_SAMPLING_RATE, MIN_SAMPLING_RATE, check_sampling_rate, resample

__all__ = [
    "COLUMNS",
    "SOURCE_ROW_COLUMN",
    "CorruptRowError",
    "DataCollatorForAudioReward",
    "check_row",
    "compute_reward_metrics",
    "decode_audio_cell",
    "read_codes_cell",
    "read_number_cell",
]

# Columns per (mode, input kind): the required ones, then the optional ones.
COLUMNS: dict[tuple[str, str], tuple[tuple[str, ...], tuple[str, ...]]] = {
    ("pairwise", "audio"): (("chosen", "rejected"), ("prompt", "tie")),
    ("pairwise", "codes"): (("chosen_codes", "rejected_codes"), ("prompt", "tie")),
    ("regression", "audio"): (("audio", "mos"), ("prompt",)),
    ("regression", "codes"): (("codes", "mos"), ("prompt",)),
}
#: Optional int column: the row's number in the user's dataset before any split or filter, used in error messages.
SOURCE_ROW_COLUMN = "source_row"
# A clip with more "channels" than this is almost surely a [N, C] array passed where [C, N] is expected.
MAX_CHANNELS = 8


class CorruptRowError(ValueError):
    """One cell of one row cannot be used: says which column, what is wrong and how to fix it."""

    def __init__(self, column: str, problem: str, fix: str):
        self.column, self.problem, self.fix = column, problem, fix
        super().__init__(f"column {column!r}: {problem}. {fix}")


# ------------------------------------------------------------------------------------------------------------------
# Reading cells
# ------------------------------------------------------------------------------------------------------------------


def decode_audio_cell(value: Any, column: str, audio_sampling_rate: int | None = None) -> tuple[torch.Tensor, int]:
    """One audio cell -> (waveform [C, N] float32, sampling_rate). Raises :class:`CorruptRowError`.

    Accepts ``datasets.Audio`` cells stored undecoded (``{"bytes", "path"}``; the trainer casts Audio columns to
    ``decode=False`` so that no decoding backend beyond soundfile is needed), ``{"array", "sampling_rate"}`` dicts,
    file paths, and bare arrays [N] or [C, N] at ``audio_sampling_rate``.
    """
    if value is None:
        raise CorruptRowError(column, "the cell is empty (None)", "Fill it with audio or drop the row.")
    sampling_rate: Any = audio_sampling_rate
    array: Any = value
    from_file = False
    if isinstance(value, dict) and value.get("array") is not None:
        array, sampling_rate = value["array"], value.get("sampling_rate", audio_sampling_rate)
    elif isinstance(value, dict) and (value.get("bytes") is not None or value.get("path") is not None):
        source = io.BytesIO(value["bytes"]) if value.get("bytes") is not None else value["path"]
        array, sampling_rate = _read_file(source, column, value.get("path"))
        from_file = True
    elif isinstance(value, (str, os.PathLike)):
        array, sampling_rate = _read_file(os.fspath(value), column, os.fspath(value))
        from_file = True
    elif not isinstance(value, (list, tuple, np.ndarray, torch.Tensor)):
        raise CorruptRowError(
            column,
            f"cannot read audio from a {type(value).__name__}",
            "Store a datasets.Audio value, a {'array', 'sampling_rate'} dict, a file path or an array [C, N].",
        )
    if sampling_rate is None:
        raise CorruptRowError(
            column,
            "the audio is a bare array with no sampling rate",
            "Store {'array': ..., 'sampling_rate': ...} dicts or an Audio column, or set `audio_sampling_rate`.",
        )
    try:
        sampling_rate = check_sampling_rate(sampling_rate, f"column {column!r}")
    except ValueError:
        raise CorruptRowError(
            column,
            f"sampling rate {sampling_rate!r} is not an audio rate in [{MIN_SAMPLING_RATE}, {MAX_SAMPLING_RATE}] Hz",
            "Store the clip's real rate in samples per second (50 is a codec frame rate, 10 or 30 a duration).",
        ) from None
    try:
        audio = torch.as_tensor(np.asarray(array, dtype=np.float32))
    except (TypeError, ValueError) as error:
        raise CorruptRowError(column, f"the audio is not a numeric array ({error})", "Store float samples.") from None
    if audio.dim() == 1:
        audio = audio[None]
    if audio.dim() != 2:
        raise CorruptRowError(column, f"audio has shape {tuple(audio.shape)}", "Store [N] (mono) or [C, N] arrays.")
    if audio.shape[0] > MAX_CHANNELS and not from_file:
        raise CorruptRowError(
            column,
            f"audio has shape {tuple(audio.shape)}, read as {audio.shape[0]} channels",
            "Arrays are channels-first [C, N]: transpose [N, C] arrays.",
        )
    if audio.shape[-1] == 0:
        raise CorruptRowError(column, "the clip has no samples", "Drop the row or replace the clip.")
    if not torch.isfinite(audio).all():
        raise CorruptRowError(column, "the clip contains NaN or inf samples", "Replace or drop the clip.")
    return audio, sampling_rate


def _read_file(source: Any, column: str, name: str | None) -> tuple[np.ndarray, int]:
    if isinstance(source, str) and not os.path.exists(source):
        # soundfile reports a missing file as "System error."
        relative = "" if os.path.isabs(source) else f" (relative paths are read from {os.getcwd()})"
        raise CorruptRowError(
            column,
            f"file not found: {source}",
            f"Fix the path or add the file{relative}; examples/train_reward_model.py takes --audio_root FOLDER for "
            "paths relative to another folder.",
        )
    try:
        data, sampling_rate = sf.read(source, dtype="float32", always_2d=True)  # [N, C]
    except (sf.SoundFileError, RuntimeError, TypeError, OSError) as error:
        raise CorruptRowError(
            column,
            f"the audio{f' {name!r}' if name else ''} could not be decoded ({error})",
            "soundfile reads WAV, FLAC, OGG and MP3: convert or replace the file (e.g. `ffmpeg -i in.m4a out.wav`).",
        ) from None
    return data.T, sampling_rate


def read_codes_cell(value: Any, column: str, num_codebooks: int, codebook_size: int) -> torch.Tensor:
    """One code cell -> LongTensor [K, T] with every code in [0, V). Raises :class:`CorruptRowError`."""
    if value is None:
        raise CorruptRowError(column, "the cell is empty (None)", "Fill it with codes [K, T] or drop the row.")
    try:
        codes = torch.as_tensor(np.asarray(value))
    except (TypeError, ValueError) as error:
        raise CorruptRowError(
            column, f"codes are not a rectangular array ({error})", "Store int arrays [K, T]."
        ) from None
    if codes.dim() != 2 or codes.shape[0] != num_codebooks or codes.shape[1] == 0:
        raise CorruptRowError(
            column,
            f"codes have shape {tuple(codes.shape)}, the model reads [{num_codebooks}, T>0]",
            "Store codes [K, T] from the MusicGen checkpoint the reward model was built from.",
        )
    if codes.is_floating_point() or codes.dtype == torch.bool:
        if codes.is_floating_point() and not (torch.isfinite(codes).all() and (codes == codes.round()).all()):
            raise CorruptRowError(column, "codes are not integers", "Store integer codes.")
        codes = codes.long()
    if codes.min() < 0 or codes.max() >= codebook_size:
        raise CorruptRowError(
            column,
            f"codes span [{int(codes.min())}, {int(codes.max())}], outside [0, {codebook_size})",
            "Store the sampled codes without the delay pattern's pad/start tokens (codebooks.grid_to_codes).",
        )
    return codes.long()


def read_number_cell(value: Any, column: str, low: float | None = None, high: float | None = None) -> float:
    """A finite number (bools count as 0/1) within [low, high]. Raises :class:`CorruptRowError`."""
    if isinstance(value, (bool, np.bool_)):
        return float(value)
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise CorruptRowError(column, f"{value!r} is not a number", "Store a number or drop the row.") from None
    if not math.isfinite(number):
        raise CorruptRowError(column, f"the value is {number}", "Store a finite number or drop the row.")
    if (low is not None and number < low) or (high is not None and number > high):
        raise CorruptRowError(column, f"{number} is outside [{low}, {high}]", f"Store a value in [{low}, {high}].")
    return number


# ------------------------------------------------------------------------------------------------------------------
# Collator
# ------------------------------------------------------------------------------------------------------------------


@dataclass
class DataCollatorForAudioReward:
    """Turns rows of a preference or rating dataset into one padded model batch.

    Pairwise batches hold the B chosen clips first, then the B rejected ones (2B rows, as TRL's
    ``DataCollatorForPreference``), so one forward scores both; the prompt ids are repeated to match.

    Returned keys (tensors):

    - audio: ``input_values`` [B', N] (mono) or [B', C, N], ``audio_attention_mask`` [B', N] (1 = real sample), or
      the keys a ``feature_extractor`` returns (its ``attention_mask`` renamed ``audio_attention_mask``);
    - codes: ``codes`` [B', K, T] right-padded with ``code_pad_token_id``, ``codes_attention_mask`` [B', T];
    - ``prompt_input_ids`` / ``prompt_attention_mask`` [B', L] when a ``tokenizer`` is set and rows have a ``prompt``;
    - ``targets`` [B]: the probability that the chosen clip wins (``1 - tie / 2``), or the MOS.

    B' is 2B for pairwise and B for regression. Audio is resampled to ``sampling_rate`` (``musicrl_trl.audio``'s
    windowed sinc), downmixed when ``mono``, truncated to ``max_length`` and zero-padded to the batch maximum (a
    multiple of ``pad_to_multiple_of``).

    >>> import numpy as np
    >>> collator = DataCollatorForAudioReward(mode="pairwise", input_kind="audio", sampling_rate=16_000)
    >>> clip = {"array": np.zeros(8_000), "sampling_rate": 8_000}
    >>> batch = collator([{"chosen": clip, "rejected": {"array": np.zeros(16_000), "sampling_rate": 16_000}}])
    >>> batch["input_values"].shape, batch["targets"]
    (torch.Size([2, 16000]), tensor([1.]))
    """

    mode: str
    input_kind: str
    sampling_rate: int | None = None
    audio_sampling_rate: int | None = None
    resample: bool = True
    mono: bool = True
    max_length: int | None = None
    pad_to_multiple_of: int | None = None
    tokenizer: PreTrainedTokenizerBase | None = None
    max_prompt_length: int | None = None
    feature_extractor: FeatureExtractionMixin | None = None
    num_codebooks: int | None = None
    codebook_size: int | None = None
    code_pad_token_id: int | None = None

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        required = COLUMNS[(self.mode, self.input_kind)][0]
        batch: dict[str, torch.Tensor] = {}
        if self.mode == "pairwise":
            clips = [example[required[0]] for example in examples] + [example[required[1]] for example in examples]
            ties = [read_number_cell(example.get("tie") or 0.0, "tie", 0.0, 1.0) for example in examples]
            batch["targets"] = 1.0 - 0.5 * torch.tensor(ties, dtype=torch.float32)
            prompts = [example.get("prompt") for example in examples] * 2
        else:
            clips = [example[required[0]] for example in examples]
            batch["targets"] = torch.tensor([read_number_cell(example["mos"], "mos") for example in examples])
            prompts = [example.get("prompt") for example in examples]
        batch.update(
            self._codes(clips, required[0]) if self.input_kind == "codes" else self._audio(clips, required[0])
        )
        if self.tokenizer is not None and all(prompt is not None for prompt in prompts):
            tokens = self.tokenizer(
                prompts,
                padding=True,
                truncation=self.max_prompt_length is not None,
                max_length=self.max_prompt_length,
                return_tensors="pt",
            )
            batch["prompt_input_ids"], batch["prompt_attention_mask"] = tokens["input_ids"], tokens["attention_mask"]
        return batch

    def check_clip(self, value: Any, column: str) -> tuple[torch.Tensor, int]:
        """Decode one audio cell and check that it can be used: ([C, N] at its own rate, rate).

        Raises :class:`CorruptRowError`."""
        audio, rate = decode_audio_cell(value, column, self.audio_sampling_rate)
        if self.sampling_rate is not None and rate != self.sampling_rate and not self.resample:
            raise CorruptRowError(
                column,
                f"the clip is at {rate} Hz, the model reads {self.sampling_rate} Hz",
                "Set resample=True, or resample the column first "
                f"(`dataset.cast_column(name, Audio(sampling_rate={self.sampling_rate}))`).",
            )
        return audio, rate

    def prepare_clip(self, value: Any, column: str) -> torch.Tensor:
        """One audio cell -> [C, N] at ``sampling_rate``, downmixed and truncated as configured."""
        audio, rate = self.check_clip(value, column)
        if self.sampling_rate is not None and rate != self.sampling_rate:
            audio = resample(audio, rate, self.sampling_rate)
        if self.mono:
            audio = audio.mean(dim=0, keepdim=True)
        if self.max_length is not None:
            audio = audio[:, : self.max_length]
        return audio

    def _padded_length(self, length: int) -> int:
        if self.pad_to_multiple_of is None:
            return length
        return -(-length // self.pad_to_multiple_of) * self.pad_to_multiple_of

    def _audio(self, cells: list[Any], column: str) -> dict[str, torch.Tensor]:
        clips = [self.prepare_clip(cell, column) for cell in cells]  # each [C, N_i]
        if self.feature_extractor is not None:
            # The feature extractor pads and normalises the way its model was trained; it takes mono [N] arrays.
            features = self.feature_extractor(
                [clip[0].numpy() for clip in clips],
                sampling_rate=self.sampling_rate,
                padding=True,
                pad_to_multiple_of=self.pad_to_multiple_of,
                return_attention_mask=True,
                return_tensors="pt",
            )
            features = dict(features)
            if "attention_mask" in features:
                features["audio_attention_mask"] = features.pop("attention_mask")
            return features
        channels = {clip.shape[0] for clip in clips}
        if len(channels) > 1:
            raise ValueError(
                f"clips in one batch have different channel counts {sorted(channels)}: set mono=True or store clips "
                "with the same number of channels."
            )
        length = self._padded_length(max(clip.shape[-1] for clip in clips))
        values = torch.zeros(len(clips), channels.pop(), length)
        mask = torch.zeros(len(clips), length, dtype=torch.long)
        for row, clip in enumerate(clips):
            values[row, :, : clip.shape[-1]] = clip
            mask[row, : clip.shape[-1]] = 1
        return {"input_values": values[:, 0] if self.mono else values, "audio_attention_mask": mask}

    def _codes(self, cells: list[Any], column: str) -> dict[str, torch.Tensor]:
        codes = [read_codes_cell(cell, column, self.num_codebooks, self.codebook_size) for cell in cells]
        if self.max_length is not None:
            codes = [code[:, : self.max_length] for code in codes]
        frames = self._padded_length(max(code.shape[-1] for code in codes))
        batch = torch.full((len(codes), self.num_codebooks, frames), self.code_pad_token_id, dtype=torch.long)
        mask = torch.zeros(len(codes), frames, dtype=torch.long)
        for row, code in enumerate(codes):
            batch[row, :, : code.shape[-1]] = code
            mask[row, : code.shape[-1]] = 1
        return {"codes": batch, "codes_attention_mask": mask}


# ------------------------------------------------------------------------------------------------------------------
# Metrics
# ------------------------------------------------------------------------------------------------------------------


def _rank(values: np.ndarray) -> np.ndarray:
    """Ranks 1..n with tied values sharing their average rank (scipy.stats.rankdata's default)."""
    order = np.argsort(values, kind="mergesort")
    ranks = np.empty(len(values), dtype=np.float64)
    ranks[order] = np.arange(1, len(values) + 1)
    _, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    return (np.bincount(inverse, weights=ranks) / counts)[inverse]


def _pearson(x: np.ndarray, y: np.ndarray) -> float:
    x, y = x - x.mean(), y - y.mean()
    denominator = math.sqrt(float((x * x).sum() * (y * y).sum()))
    return float((x * y).sum() / denominator) if denominator > 0 else float("nan")


def compute_reward_metrics(eval_prediction: EvalPrediction) -> dict[str, float]:
    """Default evaluation metrics of :class:`AudioRewardTrainer`.

    Pairwise (``predictions`` [n, 2] rewards of chosen and rejected, ``label_ids`` [n] targets ``1 - tie / 2``):
    ``accuracy`` over pairs with a winner (target > 1/2; ties are left out), ``margin`` (mean r_c - r_r over them),
    ``tie_fraction``. Regression (``predictions`` [n], ``label_ids`` [n] MOS): ``mse``, ``spearman`` (Pearson of
    average ranks, as ``scipy.stats.spearmanr``), ``pearson``.
    """
    predictions = np.asarray(eval_prediction.predictions, dtype=np.float64)
    targets = np.asarray(eval_prediction.label_ids, dtype=np.float64)
    if predictions.ndim == 2 and predictions.shape[-1] == 2:
        margins = predictions[:, 0] - predictions[:, 1]
        decisive = targets > 0.5
        return {
            "accuracy": float((margins[decisive] > 0).mean()) if decisive.any() else float("nan"),
            "margin": float(margins[decisive].mean()) if decisive.any() else float("nan"),
            "tie_fraction": float(1.0 - decisive.mean()),
        }
    predictions = predictions.reshape(-1)
    return {
        "mse": float(((predictions - targets) ** 2).mean()),
        "spearman": _pearson(_rank(predictions), _rank(targets)),
        "pearson": _pearson(predictions, targets),
    }


def check_row(*cells: Any, collator: DataCollatorForAudioReward, columns: Sequence[str]) -> dict[str, str]:
    """'' for a usable row, else what is wrong with which cell and how to fix it."""
    try:
        for column, value in zip(columns, cells):
            if column in ("chosen", "rejected", "audio"):
                collator.check_clip(value, column)
            elif column in ("chosen_codes", "rejected_codes", "codes"):
                read_codes_cell(value, column, collator.num_codebooks, collator.codebook_size)
            elif column == "mos":
                if value is None:
                    raise CorruptRowError(column, "the rating is missing (None)", "Store a rating or drop the row.")
                read_number_cell(value, column)
            elif column == "tie" and value is not None:
                read_number_cell(value, column, 0.0, 1.0)
            elif column == "prompt" and not isinstance(value, str):
                raise CorruptRowError(
                    column, f"the prompt is a {type(value).__name__}, not a string", "Store text ('' for no prompt)."
                )
    except CorruptRowError as error:
        return {"error": str(error)}
    return {"error": ""}
