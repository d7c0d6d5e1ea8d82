"""Train audio reward models: Bradley-Terry on pairwise preferences, or regression on MOS ratings.

``AudioRewardTrainer`` is TRL's ``RewardTrainer`` for audio. It trains

- audio reward heads (``MusicRewardModel`` or any ``AutoModelForAudioClassification`` with one label) on waveforms,
- MusicRL's token-space preference model (``MusicTokenPreferenceModel``, ``scores_codes = True``) on MusicGen codes,

from one of two dataset layouts:

================  ===========================================================  ===========================
mode              columns (audio model)                                        columns (token-space model)
================  ===========================================================  ===========================
``pairwise``      ``prompt``, ``chosen``, ``rejected``, optional ``tie``      ``prompt``, ``chosen_codes``,
                                                                               ``rejected_codes``, ``tie``
``regression``    ``audio``, ``mos``, optional ``prompt``                      ``codes``, ``mos``, ``prompt``
================  ===========================================================  ===========================

Audio cells are ``datasets.Audio`` values, ``{"array", "sampling_rate"}`` dicts, file paths or bare arrays [N] /
[C, N] (with ``args.audio_sampling_rate``); code cells are integer arrays [K, T]. ``tie`` is a bool or a float in
[0, 1] (the share of listeners who heard no difference).

Losses (``r`` the model's scalar output): pairwise, binary cross-entropy of ``sigmoid(r_chosen - r_rejected)``
against the target ``1 - tie / 2``; for a decisive pair that is exactly Bradley-Terry's ``-log sigmoid(r_c - r_r)``,
for a full tie the target 1/2 (the Bradley-Terry likelihood of a coin flip), which pulls the two rewards together.
Regression: mean squared error against the MOS.

Metrics. Training logs (averaged over the logging window): ``loss``, ``accuracy`` (decisive pairs only), ``margin``
(mean r_c - r_r), ``mean_reward``, ``num_skipped_rows``; regression logs ``mse``. Evaluation
(``eval_``-prefixed): pairwise ``accuracy`` over pairs with a winner (ties never count), ``margin``, ``tie_fraction``;
regression ``mse``, ``spearman``, ``pearson``.

Shape letters: B batch (pairs or rated clips), C channels, N samples, K codebooks, T frames, L prompt tokens.
"""

from __future__ import annotations

import inspect
import io
import logging
import math
import os
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import soundfile as sf
import torch
from datasets import Audio, Dataset
from torch import nn
from transformers import (
    AutoModelForAudioClassification,
    AutoProcessor,
    ByT5Tokenizer,
    FeatureExtractionMixin,
    PreTrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    ProcessorMixin,
    Trainer,
    TrainerCallback,
)
from transformers.trainer_utils import EvalPrediction

from .. import hub
from ..audio import MAX_SAMPLING_RATE, MIN_SAMPLING_RATE, check_sampling_rate, resample
from ..loading import load_pretrained, resolve_pretrained
from ..reward_models.modeling_music_reward import MusicRewardModel
from ..reward_models.token_preference import MusicTokenPreferenceModel
from .checkpointing import CrashSafeCheckpointsMixin
from .reward_config import AudioRewardConfig

__all__ = ["AudioRewardTrainer", "DataCollatorForAudioReward", "compute_reward_metrics"]

logger = logging.getLogger(__name__)

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


# ------------------------------------------------------------------------------------------------------------------
# Trainer
# ------------------------------------------------------------------------------------------------------------------


def disable_dropout(model: nn.Module) -> None:
    """Zero every dropout in ``model``: ``nn.Dropout`` modules and float rates kept as attributes.

    TRL's ``disable_dropout_in_model`` only touches ``nn.Dropout``; MusicGen's layers call ``F.dropout`` with float
    ``dropout``/``activation_dropout`` attributes (and skip layers with ``layerdrop``), which it misses.
    """
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
        for name in ("dropout", "attention_dropout", "activation_dropout", "layerdrop"):
            value = getattr(module, name, None)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                setattr(module, name, 0.0)


def _load_model(name: str, args: AudioRewardConfig) -> PreTrainedModel:
    """A reward model from a checkpoint id/path: a MusicGen checkpoint gives the token-space preference model."""
    kwargs = dict(args.model_init_kwargs or {})
    what, pickles = "reward model to train", args.allow_pickle_weights
    name = resolve_pretrained(name, what)  # a missing path or corrupt weights, said plainly
    model_type = PreTrainedConfig.get_config_dict(name)[0].get("model_type")
    if model_type == "musicgen":
        return MusicTokenPreferenceModel.from_musicgen(name, allow_pickle_weights=pickles, **kwargs)
    if model_type == MusicTokenPreferenceModel.config_class.model_type:
        load = MusicTokenPreferenceModel.from_pretrained
    else:
        load = AutoModelForAudioClassification.from_pretrained
        kwargs.setdefault("num_labels", 1)
    # load_pretrained refuses pickle-only weights unless allowed (from_pretrained would silently unpickle them).
    return load_pretrained(load, name, what, allow_pickle_weights=pickles, **kwargs)


class AudioRewardTrainer(CrashSafeCheckpointsMixin, Trainer):
    """Trainer for audio reward models from pairwise preferences (Bradley-Terry) or MOS ratings (regression).

    Args:
        model: the reward model (one scalar output, ``logits`` [B, 1]) or a checkpoint id/path: a MusicGen checkpoint
            becomes a ``MusicTokenPreferenceModel`` (MusicRL's recipe: initialise from the generator), any other goes
            through ``AutoModelForAudioClassification`` with ``num_labels=1``.
        args: :class:`AudioRewardConfig`.
        train_dataset, eval_dataset: ``datasets.Dataset`` with the columns of the module docstring (``eval_dataset``
            may be a dict of them). Every row is checked once at init (see ``skip_corrupt_rows``).
        processing_class: a tokenizer (prompts), a feature extractor (audio front-end of a Hub audio classifier) or a
            processor holding both (e.g. ``MusicgenProcessor``); ``None`` feeds raw waveforms and no prompts.
        data_collator: defaults to :class:`DataCollatorForAudioReward` built from ``args`` and the model.
        compute_metrics: defaults to :func:`compute_reward_metrics`.

    >>> args = AudioRewardConfig("out")
    >>> trainer = AudioRewardTrainer(model=reward_model, args=args, train_dataset=pairs)  # doctest: +SKIP
    >>> trainer.train(); trainer.save_model()  # doctest: +SKIP
    """

    _tag_names = ["trl", "reward-trainer", "musicrl-trl", "audio"]
    _name = "AudioReward"
    _paper = {
        "title": "MusicRL: Aligning Music Generation to Human Preferences",
        "id": "2402.04229",
        "citation": hub.MUSICRL_CITATION,
    }

    def __init__(
        self,
        model: PreTrainedModel | str,
        args: AudioRewardConfig | None = None,
        data_collator: Callable[[list[dict[str, Any]]], dict[str, Any]] | None = None,
        train_dataset: Dataset | None = None,
        eval_dataset: Dataset | dict[str, Dataset] | None = None,
        processing_class: PreTrainedTokenizerBase | FeatureExtractionMixin | ProcessorMixin | None = None,
        compute_metrics: Callable[[EvalPrediction], dict] | None = None,
        callbacks: list[TrainerCallback] | None = None,
        optimizers: tuple[torch.optim.Optimizer | None, torch.optim.lr_scheduler.LambdaLR | None] = (None, None),
        optimizer_cls_and_kwargs: tuple[type[torch.optim.Optimizer], dict[str, Any]] | None = None,
    ):
        self._capture_hub_sources(model)  # before a path is loaded or a temporary folder disappears
        if args is None:
            name = model if isinstance(model, str) else (model.config.name_or_path or model.config.model_type)
            args = AudioRewardConfig(f"{os.path.basename(str(name).rstrip('/'))}-reward")
        if train_dataset is None:
            raise ValueError("`train_dataset` is required.")
        if isinstance(model, str):
            model_name = model
            model = _load_model(model, args)
            if processing_class is None:
                processing_class = self._load_processing_class(model_name)
        elif args.model_init_kwargs is not None:
            logger.warning("`model_init_kwargs` is ignored: the model is already instantiated.")
        if model.config.num_labels != 1:
            raise ValueError(
                f"The model has num_labels={model.config.num_labels}, but a reward model outputs one scalar: build it "
                "with num_labels=1 (or pass a checkpoint name to have it configured)."
            )
        if args.disable_dropout:
            disable_dropout(model)

        # MusicTokenPreferenceModel (and any model that declares it) reads codes; everything else reads audio.
        self.input_kind = "codes" if getattr(type(model), "scores_codes", False) else "audio"
        self._forward_parameters = set(inspect.signature(model.forward).parameters)
        tokenizer, feature_extractor = self._split_processing_class(processing_class)
        if isinstance(model, MusicRewardModel):
            # MusicRewardModel takes prompts only when text-conditioned (it rejects input_ids otherwise), and then as
            # ByT5 byte ids, whose tokenizer needs no files.
            uses_prompts = bool(model.config.text_vocab_size)
            tokenizer = (tokenizer or ByT5Tokenizer()) if uses_prompts else None
        elif self.input_kind == "audio" and "input_ids" not in self._forward_parameters:
            tokenizer = None  # an audio-only classifier: prompts have nowhere to go
        if feature_extractor is not None and self.input_kind == "codes":
            feature_extractor = None  # a MusicgenProcessor's codec front-end: codes need no audio features
        if feature_extractor is not None and not args.mono:
            raise ValueError("Feature extractors take mono clips: set mono=True or pass processing_class=None.")
        self.mode = args.mode or self._infer_mode(train_dataset)
        if tokenizer is None and "prompt" in train_dataset.column_names and self.input_kind == "codes":
            logger.warning(
                "The dataset has prompts but no tokenizer was given: the token-space model scores the codes without "
                "them. Pass the MusicGen processor (or its tokenizer) as processing_class to condition on the prompt."
            )
        self.sampling_rate = self._resolve_sampling_rate(args, model, feature_extractor)

        if data_collator is None:
            decoder_config = model.config.decoder if self.input_kind == "codes" else None
            data_collator = DataCollatorForAudioReward(
                mode=self.mode,
                input_kind=self.input_kind,
                sampling_rate=self.sampling_rate,
                audio_sampling_rate=args.audio_sampling_rate,
                resample=args.resample,
                mono=args.mono,
                max_length=args.max_length,
                pad_to_multiple_of=args.pad_to_multiple_of,
                tokenizer=tokenizer,
                max_prompt_length=args.max_prompt_length,
                feature_extractor=feature_extractor,
                num_codebooks=decoder_config.num_codebooks if decoder_config is not None else None,
                codebook_size=decoder_config.vocab_size if decoder_config is not None else None,
                code_pad_token_id=decoder_config.pad_token_id if decoder_config is not None else None,
            )
        # Row validation uses the collator's own readers, so a row that passes is a row the collator can batch.
        self._row_collator = data_collator if isinstance(data_collator, DataCollatorForAudioReward) else None
        self.args = args  # _prepare_dataset reads it before Trainer.__init__ sets it
        self.num_skipped_rows = 0
        self.skipped_rows: dict[str, list[int]] = {}
        train_dataset = self._prepare_dataset(train_dataset, "train")
        if isinstance(eval_dataset, dict):
            eval_dataset = {key: self._prepare_dataset(data, f"eval_{key}") for key, data in eval_dataset.items()}
        elif eval_dataset is not None:
            eval_dataset = self._prepare_dataset(eval_dataset, "eval")

        super().__init__(
            model=model,
            args=args,
            data_collator=data_collator,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            compute_metrics=compute_metrics if compute_metrics is not None else compute_reward_metrics,
            callbacks=callbacks,
            optimizers=optimizers,
            optimizer_cls_and_kwargs=optimizer_cls_and_kwargs,
        )
        # The loss is computed here, not by the model: Trainer must neither pass loss kwargs nor look for labels,
        # and must scale the loss for gradient accumulation itself (as TRL's RewardTrainer does).
        self.model_accepts_loss_kwargs = False
        self.label_names = []
        self.can_return_loss = True
        # Training metrics of the current logging window (evaluation metrics come from compute_metrics).
        self._metrics: dict[str, list[float]] = defaultdict(list)
        if isinstance(self.model, PreTrainedModel):
            self.model.add_model_tags(self._tag_names)
        self._remove_stale_checkpoint_staging()

    def train(self, resume_from_checkpoint: str | bool | None = None, trial=None, ignore_keys_for_eval=None):
        """``Trainer.train``; ``resume_from_checkpoint=True`` takes the newest *complete* checkpoint (Trainer takes
        the highest-numbered folder, finished or not); a checkpoint path must be complete (see checkpointing.py)."""
        if resume_from_checkpoint:
            resume_from_checkpoint = self._resolve_resume_checkpoint(resume_from_checkpoint)
        return super().train(resume_from_checkpoint, trial, ignore_keys_for_eval)

    # ---- setup helpers ---------------------------------------------------------------------------------------------

    @staticmethod
    def _load_processing_class(name: str) -> Any:
        try:
            return AutoProcessor.from_pretrained(name)
        except (OSError, ValueError, TypeError, KeyError):
            # Audio reward heads with a built-in front-end (MusicRewardModel) ship no processor: raw waveforms.
            logger.info("No processor found at %s: feeding raw waveforms and no prompt tokens.", name)
            return None

    @staticmethod
    def _split_processing_class(
        processing_class: Any,
    ) -> tuple[PreTrainedTokenizerBase | None, FeatureExtractionMixin | None]:
        if processing_class is None:
            return None, None
        if isinstance(processing_class, PreTrainedTokenizerBase):
            return processing_class, None
        if isinstance(processing_class, FeatureExtractionMixin):
            return None, processing_class
        if isinstance(processing_class, ProcessorMixin):
            return getattr(processing_class, "tokenizer", None), getattr(processing_class, "feature_extractor", None)
        raise TypeError(
            "processing_class must be a tokenizer, a feature extractor, a processor or None, got "
            f"{type(processing_class).__name__}."
        )

    def _infer_mode(self, dataset: Dataset) -> str:
        columns = set(dataset.column_names)
        for mode in ("pairwise", "regression"):
            if set(COLUMNS[(mode, self.input_kind)][0]) <= columns:
                return mode
        expected = " or ".join(str(list(COLUMNS[(mode, self.input_kind)][0])) for mode in ("pairwise", "regression"))
        raise ValueError(
            f"Cannot tell the training mode from the columns {sorted(columns)}: a {self.input_kind} reward model "
            f"needs {expected}. Rename the columns (`dataset.rename_column`) or set `mode`."
        )

    @staticmethod
    def _resolve_sampling_rate(
        args: AudioRewardConfig, model: PreTrainedModel, feature_extractor: FeatureExtractionMixin | None
    ) -> int | None:
        # Explicit argument first, then the front-end's rate (what the checkpoint was trained on), then the model's.
        if args.sampling_rate is not None:
            return args.sampling_rate
        if feature_extractor is not None and getattr(feature_extractor, "sampling_rate", None) is not None:
            return int(feature_extractor.sampling_rate)
        if getattr(model.config, "sampling_rate", None) is not None:
            return int(model.config.sampling_rate)
        if getattr(type(model), "scores_codes", False):
            return None
        raise ValueError(
            f"Cannot tell which sampling rate {type(model).__name__} reads: set `sampling_rate` in AudioRewardConfig."
        )

    # ---- data ------------------------------------------------------------------------------------------------------

    def _prepare_dataset(self, dataset: Dataset, name: str) -> Dataset:
        """Check every row once (drop or report corrupt ones); Audio columns are read undecoded (soundfile later)."""
        if not isinstance(dataset, Dataset):
            raise TypeError(
                f"The {name} dataset must be a datasets.Dataset (map-style), got {type(dataset).__name__}: rows are "
                "validated up front, which a streaming dataset does not allow."
            )
        required, optional = COLUMNS[(self.mode, self.input_kind)]
        missing = [column for column in required if column not in dataset.column_names]
        if missing:
            raise ValueError(
                f"The {name} dataset lacks the column(s) {missing} that {self.mode} training of a {self.input_kind} "
                f"reward model needs (it has {dataset.column_names}). Rename yours with `dataset.rename_column(old, "
                f"new)` or pick the other `mode`."
            )
        for column in required + optional:
            feature = dataset.features.get(column)
            if isinstance(feature, Audio) and feature.decode:
                # Decoding Audio columns needs torchcodec in datasets >= 4; soundfile reads the stored bytes here.
                dataset = dataset.cast_column(column, Audio(decode=False))
        if self._row_collator is None:
            return dataset  # a custom collator: its rows are its business

        columns = [column for column in required + optional if column in dataset.column_names]
        checker = self._row_collator
        errors = dataset.map(
            _check_row,
            fn_kwargs={"collator": checker, "columns": columns},
            input_columns=columns,
            remove_columns=dataset.column_names,
            num_proc=self.args.dataset_num_proc,
            desc=f"Checking {name} rows",
            load_from_cache_file=False,
        )["error"]
        bad = [index for index, error in enumerate(errors) if error]
        if not bad:
            return dataset
        # Rows are counted in the user's own dataset when a SOURCE_ROW_COLUMN says where each came from (a script
        # that splits or filters first adds it); else by position in the dataset given.
        if SOURCE_ROW_COLUMN in dataset.column_names:
            source_rows = dataset[SOURCE_ROW_COLUMN]
            rows, where = [source_rows[index] for index in bad], f"of the dataset (in the {name} split)"
        else:
            rows, where = bad, f"of the {name} dataset"
        if not self.args.skip_corrupt_rows:
            more = f" ({len(bad) - 1} more corrupt rows follow.)" if len(bad) > 1 else ""
            raise ValueError(
                f"Row {rows[0]} {where}, {errors[bad[0]]} Or set skip_corrupt_rows=True (the scripts' "
                f"--skip_corrupt_rows) to skip such rows.{more}"
            )
        logger.warning("Skipping %d corrupt rows %s, e.g. row %d: %s", len(bad), where, rows[0], errors[bad[0]])
        self.skipped_rows[name] = rows
        self.num_skipped_rows += len(bad)
        keep = sorted(set(range(len(dataset))) - set(bad))
        if not keep:
            raise ValueError(f"Every row of the {name} dataset is corrupt, e.g. row {bad[0]}: {errors[bad[0]]}")
        return dataset.select(keep)

    def _set_signature_columns_if_needed(self):
        # Trainer keeps only the model's forward arguments; this trainer's inputs are the dataset columns instead.
        if self._signature_columns is None:
            required, optional = COLUMNS[(self.mode, self.input_kind)]
            self._signature_columns = list(required + optional)

    def evaluate(
        self,
        eval_dataset: Dataset | dict[str, Dataset] | str | None = None,
        ignore_keys: list[str] | None = None,
        metric_key_prefix: str = "eval",
    ) -> dict[str, float]:
        # A dataset passed here (a held-out test set) gets the same checks as those given at init.
        if isinstance(eval_dataset, Dataset):
            eval_dataset = self._prepare_dataset(eval_dataset, metric_key_prefix)
        elif isinstance(eval_dataset, dict):
            eval_dataset = {
                key: self._prepare_dataset(data, f"{metric_key_prefix}_{key}") for key, data in eval_dataset.items()
            }
        return super().evaluate(
            eval_dataset=eval_dataset, ignore_keys=ignore_keys, metric_key_prefix=metric_key_prefix
        )

    # ---- loss ------------------------------------------------------------------------------------------------------

    def compute_rewards(self, model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """Scalar rewards [B'] of a collated batch (chosen rows first for pairwise batches)."""
        if self.input_kind == "codes":
            kwargs = {"codes": inputs["codes"], "codes_attention_mask": inputs["codes_attention_mask"]}
            if "prompt_input_ids" in inputs:
                kwargs["input_ids"] = inputs["prompt_input_ids"]
                kwargs["attention_mask"] = inputs["prompt_attention_mask"]
        else:
            reserved = {"targets", "audio_attention_mask", "prompt_input_ids", "prompt_attention_mask"}
            kwargs = {key: value for key, value in inputs.items() if key not in reserved}
            if "audio_attention_mask" in inputs and "attention_mask" in self._forward_parameters:
                kwargs["attention_mask"] = inputs["audio_attention_mask"]
            if "prompt_input_ids" in inputs and "input_ids" in self._forward_parameters:
                kwargs["input_ids"] = inputs["prompt_input_ids"]
            if "prompt_input_ids" in inputs and "text_attention_mask" in self._forward_parameters:
                kwargs["text_attention_mask"] = inputs["prompt_attention_mask"]
            if self.sampling_rate is not None and "sampling_rate" in self._forward_parameters:
                kwargs["sampling_rate"] = self.sampling_rate
        logits = model(**kwargs).logits  # [B', 1]
        return logits.reshape(-1).float()

    def reward_loss(self, rewards: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        """The training loss of a batch and its metrics (see the module docstring)."""
        if self.mode == "regression":
            mse = nn.functional.mse_loss(rewards, targets.float())
            return mse, {"mse": mse.item(), "mean_reward": rewards.mean().item()}
        rewards_chosen, rewards_rejected = rewards.chunk(2)  # [B], [B]
        margins = rewards_chosen - rewards_rejected
        # BCE against 1 - tie/2: -log sigmoid(margin) for decisive pairs (Bradley-Terry), a pull towards equal
        # rewards for ties.
        per_pair = nn.functional.binary_cross_entropy_with_logits(margins, targets, reduction="none")
        decisive = targets >= 1.0
        if self.args.tie_loss == "ignore":
            weights = decisive.to(per_pair.dtype)
            loss = (per_pair * weights).sum() / weights.sum().clamp(min=1.0)
        else:
            loss = per_pair.mean()
        if self.args.center_rewards_coefficient is not None:
            loss = loss + self.args.center_rewards_coefficient * torch.mean((rewards_chosen + rewards_rejected) ** 2)
        with torch.no_grad():
            won = targets > 0.5
            metrics = {"mean_reward": rewards.mean().item(), "margin": margins.mean().item()}
            metrics["_correct"] = float((margins[won] > 0).sum().item())
            metrics["_decisive"] = float(won.sum().item())
        return loss, metrics

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, torch.Tensor],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, dict[str, torch.Tensor]]:
        rewards = self.compute_rewards(model, inputs)
        loss, metrics = self.reward_loss(rewards, inputs["targets"])
        if model.training:
            for key, value in metrics.items():
                self._metrics[key].append(value)
        return (loss, {"rewards": rewards}) if return_outputs else loss

    def prediction_step(
        self,
        model: nn.Module,
        inputs: dict[str, torch.Tensor],
        prediction_loss_only: bool,
        ignore_keys: list[str] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """Loss, rewards ([B, 2] chosen/rejected for pairs, [B] for ratings) and targets of an eval batch."""
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            rewards = self.compute_rewards(model, inputs)
            loss, _ = self.reward_loss(rewards, inputs["targets"])
        if prediction_loss_only:
            return loss.detach(), None, None
        if self.mode == "pairwise":
            rewards = torch.stack(rewards.chunk(2), dim=-1)
        return loss.detach(), rewards.detach(), inputs["targets"].detach()

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs and self._metrics:  # a training log: add the window's metrics, summed over all processes
            keys = sorted(self._metrics)
            sums = torch.tensor([sum(self._metrics[key]) for key in keys], device=self.accelerator.device)
            counts = torch.tensor([len(self._metrics[key]) for key in keys], device=self.accelerator.device)
            sums, counts = (
                self.accelerator.reduce(sums, "sum").tolist(),
                self.accelerator.reduce(counts, "sum").tolist(),
            )
            window = dict(zip(keys, zip(sums, counts)))
            # Accuracy is correct / decisive over the window, not a mean of batch means: batches hold different
            # numbers of ties.
            correct, decisive = window.pop("_correct", (0.0, 0))[0], window.pop("_decisive", (0.0, 0))[0]
            logs.update({key: total / count for key, (total, count) in window.items() if count})
            if decisive:
                logs["accuracy"] = correct / decisive
            logs["num_skipped_rows"] = self.num_skipped_rows
            self._metrics.clear()
        super().log(logs, start_time)

    # ---- publishing (see musicrl_trl.hub) ---------------------------------------------------------------------------

    def _capture_hub_sources(self, model: PreTrainedModel | str) -> None:
        """Remember where the starting model came from (Hub id or the path given) and the launch command."""
        self.hub_base_model = hub.model_source(model)
        self.hub_command = hub.launch_command()

    def license_resolution(self, override: str | None = None) -> hub.LicenseResolution:
        """``override``, else the licence of the model the reward model starts from (its card or config)."""
        return hub.resolve_license([hub.find_license(self.hub_base_model, "base model")], override)

    def create_model_card(
        self,
        model_name: str | None = None,
        dataset_name: str | None = None,
        tags: str | list[str] | None = None,
        output_dir: str | None = None,
        license: str | None = None,
        repo_id: str | None = None,
        **kwargs: Any,
    ) -> hub.LicenseResolution | None:
        """Write the reward-model card (``hub_cards/reward_card.md.jinja``) to ``output_dir/README.md``; returns the
        licence resolution. Extra ``Trainer.create_model_card`` arguments (``language``, ``tasks``...) are ignored."""
        if not self.is_world_process_zero():
            return None
        output_dir = output_dir or self.args.output_dir
        os.makedirs(output_dir, exist_ok=True)
        resolution = self.license_resolution(license or self.args.hub_license)
        card = hub.render_reward_card(
            self, resolution, repo_id=repo_id or self.hub_model_id or self.args.hub_model_id, output_dir=output_dir,
            dataset_name=dataset_name,
        )
        with open(os.path.join(output_dir, hub.CARD_NAME), "w", encoding="utf-8") as handle:
            handle.write(card)
        return resolution

    def push_to_hub(
        self,
        commit_message: str | None = "End of training",
        blocking: bool = True,
        token: str | None = None,
        revision: str | None = None,
        private: bool | None = None,
        **kwargs: Any,
    ):
        """Upload the reward model, its feature extractor/processor and card to ``args.hub_model_id``.

        Only safetensors, JSON and text files go up: ``training_args.bin`` (a pickle) stays local. Files the Hub
        already has are not uploaded again, so pushing an unchanged model makes no new commit. ``dataset_name=`` and
        ``license=`` go to the card; a non-commercial ingredient warns (``NonCommercialLicenseWarning``).
        """
        self.callback_handler.on_push_begin(self.args, self.state, self.control)
        token = token if token is not None else self.args.hub_token
        if self.hub_model_id is None:
            self.init_hf_repo(token=token, private=private)
        self.save_model(_internal_call=True)
        if not self.is_world_process_zero():
            return None
        dataset_name = kwargs.pop("dataset_name", None) or kwargs.pop("dataset", None)  # Trainer's name: dataset
        resolution = self.create_model_card(
            dataset_name=dataset_name, license=kwargs.pop("license", None), repo_id=self.hub_model_id
        )
        hub.warn_license(resolution, self.hub_model_id)
        self._finish_current_push()
        return hub.upload_files(
            self.hub_model_id, hub.hub_files(self.args.output_dir, subfolders=()), commit_message, token=token,
            revision=revision or self.args.hub_revision, run_as_future=not blocking,
        )

    def _save_checkpoint_extras(self, checkpoint_dir: str) -> None:
        # The card goes into the staged folder, so that a published checkpoint-N carries it (see checkpointing.py).
        if self.args.should_save:
            self.create_model_card(output_dir=checkpoint_dir)

    def _push_published_checkpoint(self, checkpoint_folder: str) -> None:
        """Push a published checkpoint's weights and card, blocking and safetensors-only (``Trainer``'s version uploads
        ``training_args.bin``, and with ``hub_strategy="checkpoint"`` the optimizer and RNG pickles)."""
        if not self.is_world_process_zero() or self.args.hub_strategy == "end":
            return
        self.callback_handler.on_push_begin(self.args, self.state, self.control)
        self.create_model_card(output_dir=checkpoint_folder)
        files = hub.hub_files(checkpoint_folder, subfolders=())
        files.pop("trainer_state.json", None)
        hub.upload_files(
            self.hub_model_id, files, f"Training in progress, step {self.state.global_step}",
            token=self.args.hub_token, revision=self.args.hub_revision,
        )


def _check_row(*cells: Any, collator: DataCollatorForAudioReward, columns: Sequence[str]) -> dict[str, str]:
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
