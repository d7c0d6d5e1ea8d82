"""Reading preference pairs for :class:`~musicrl_trl.MusicDPOTrainer`: rows -> the codes the policy is trained on.

A dataset has a text column ``prompt`` and either

- audio: ``chosen`` and ``rejected`` (``datasets.Audio``, ``{"array", "sampling_rate"}`` dicts, file paths or bare
  arrays with ``audio_sampling_rate``), as ``musicrl-app export`` writes them; the clips are encoded once, at
  construction, with the policy's own codec (``model.audio_encoder``), after resampling to its rate; or
- codes: ``chosen_codes`` and ``rejected_codes``, integer arrays [K, T] (e.g. the exact codes a pool sampled), used
  as stored.

An optional ``tie`` (bool, or the share of listeners who heard no difference) marks rows that are skipped and counted
(DPO's loss needs a winner). Cells are read with the reward trainer's readers (:mod:`.reward_data`), so a row is
named with its number and what is wrong with it exactly as there.

Shape letters: B pairs, K codebooks, T frames, L prompt tokens, C channels, N samples.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import torch
from datasets import Audio, Dataset

from ..audio import codec_sampling_rate, encode
from ..rollout import tokenize_prompts, unwrap_musicgen
from .reward_data import (
    SOURCE_ROW_COLUMN,
    CorruptRowError,
    DataCollatorForAudioReward,
    check_row,
    read_codes_cell,
    read_number_cell,
)

__all__ = ["PAIR_COLUMNS", "DataCollatorForMusicDPO", "PreparedPairs", "prepare_pairs"]

logger = logging.getLogger(__name__)

#: The two layouts: input kind -> (chosen column, rejected column).
PAIR_COLUMNS = {"codes": ("chosen_codes", "rejected_codes"), "audio": ("chosen", "rejected")}


@dataclasses.dataclass
class PreparedPairs:
    """A preference dataset as the trainer reads it: one row per decisive pair, codes [K, T] as nested lists."""

    dataset: Dataset  # prompt, chosen_codes, rejected_codes, source_row
    input_kind: str  # "audio" (encoded here) or "codes" (as stored)
    num_ties_skipped: int
    skipped_rows: list[int]  # corrupt rows left out (skip_corrupt_rows), numbered in the user's dataset


def _input_kind(dataset: Dataset, name: str) -> str:
    columns = set(dataset.column_names)
    for kind, pair in PAIR_COLUMNS.items():
        if set(pair) <= columns:
            return kind
    raise ValueError(
        f"The {name} dataset has the columns {sorted(columns)}; preference pairs need 'prompt' and either 'chosen' / "
        "'rejected' (audio, as `musicrl-app export` writes them) or 'chosen_codes' / 'rejected_codes' (codes [K, T]). "
        "Rename yours with `dataset.rename_column(old, new)`."
    )


def prepare_pairs(dataset: Any, model: torch.nn.Module, args: Any, name: str = "train") -> PreparedPairs:
    """Check every row of ``dataset``, skip ties, encode audio with ``model``'s codec; see the module docstring.

    ``args`` is a :class:`~musicrl_trl.MusicDPOConfig` (``tie_threshold``, ``skip_corrupt_rows``,
    ``audio_sampling_rate``, ``max_completion_length``). Raises ``ValueError`` naming the first corrupt row unless
    ``skip_corrupt_rows``."""
    if not isinstance(dataset, Dataset):
        raise TypeError(
            f"The {name} dataset must be a datasets.Dataset (map-style), got {type(dataset).__name__}: rows are "
            "checked and encoded up front, which a streaming dataset does not allow."
        )
    kind = _input_kind(dataset, name)
    if "prompt" not in dataset.column_names:
        raise ValueError(
            f"The {name} dataset has no 'prompt' column: DPO trains pi(clip | prompt), so every pair needs the text "
            "it was generated from."
        )
    musicgen = unwrap_musicgen(model)
    num_codebooks, codebook_size = musicgen.decoder.num_codebooks, musicgen.decoder.config.vocab_size
    if kind == "audio" and musicgen.decoder.config.audio_channels != 1:
        raise ValueError(
            "Encoding audio pairs is implemented for mono MusicGen models only; for a stereo model store the clips' "
            "codes as 'chosen_codes' / 'rejected_codes' [K, T] (interleaved left/right codebooks)."
        )
    pair = PAIR_COLUMNS[kind]
    columns = ["prompt", *pair, *(["tie"] if "tie" in dataset.column_names else [])]
    for column in pair:
        feature = dataset.features.get(column)
        if isinstance(feature, Audio) and feature.decode:
            # Decoding Audio columns needs torchcodec in datasets >= 4; soundfile reads the stored bytes.
            dataset = dataset.cast_column(column, Audio(decode=False))
    codec_rate = codec_sampling_rate(musicgen.audio_encoder) if kind == "audio" else None
    # The reward trainer's row checker and audio reader: decoding, rate checks, resampling, downmixing.
    reader = DataCollatorForAudioReward(
        mode="pairwise", input_kind=kind, sampling_rate=codec_rate, audio_sampling_rate=args.audio_sampling_rate,
        resample=True, mono=True, num_codebooks=num_codebooks, codebook_size=codebook_size,
    )
    source_rows = dataset[SOURCE_ROW_COLUMN] if SOURCE_ROW_COLUMN in dataset.column_names else range(len(dataset))
    kept: dict[str, list] = {"prompt": [], "chosen_codes": [], "rejected_codes": [], SOURCE_ROW_COLUMN: []}
    errors: list[tuple[int, str]] = []
    num_ties = 0
    for row_number, row in zip(source_rows, dataset.select_columns(columns)):
        try:
            problem = check_row(*(row[column] for column in columns), collator=reader, columns=columns)["error"]
            if problem:
                errors.append((row_number, problem))
                continue
            if not row["prompt"].strip():
                raise CorruptRowError("prompt", "the prompt is empty", "Store the text the clips were generated from.")
            if read_number_cell(row.get("tie") or 0.0, "tie", 0.0, 1.0) >= args.tie_threshold:
                num_ties += 1
                continue
            clips = [_read_clip(row[column], column, kind, reader, musicgen) for column in pair]
            for column, codes in zip(pair, clips):
                if codes.shape[0] != num_codebooks:
                    raise CorruptRowError(
                        column, f"the codec gives {codes.shape[0]} codebooks, the decoder reads {num_codebooks}",
                        "Encode with the policy's own codec at its bandwidth, or store codes [K, T].",
                    )
        except CorruptRowError as error:
            errors.append((row_number, str(error)))
            continue
        limit = args.max_completion_length
        kept["prompt"].append(row["prompt"])
        kept["chosen_codes"].append(clips[0][:, :limit].tolist())
        kept["rejected_codes"].append(clips[1][:, :limit].tolist())
        kept[SOURCE_ROW_COLUMN].append(int(row_number))
    where = f"of the {name} dataset" if SOURCE_ROW_COLUMN not in dataset.column_names else "of the dataset"
    if errors and not args.skip_corrupt_rows:
        more = f" ({len(errors) - 1} more corrupt rows follow.)" if len(errors) > 1 else ""
        raise ValueError(
            f"Row {errors[0][0]} {where}, {errors[0][1]} Or set skip_corrupt_rows=True (--skip_corrupt_rows) to "
            f"skip such rows.{more}"
        )
    if errors:
        logger.warning("Skipping %d corrupt rows %s, e.g. row %d: %s", len(errors), where, *errors[0])
    if num_ties:
        logger.info("Skipping %d tied pairs of the %s dataset (tie >= %s).", num_ties, name, args.tie_threshold)
    if not kept["prompt"]:
        raise ValueError(
            f"The {name} dataset has no decisive pair to train on ({len(dataset)} rows: {num_ties} ties, "
            f"{len(errors)} corrupt). Collect votes with a winner, or raise tie_threshold."
        )
    return PreparedPairs(Dataset.from_dict(kept), kind, num_ties, [row for row, _ in errors])


def _read_clip(value: Any, column: str, kind: str, reader: DataCollatorForAudioReward, musicgen) -> torch.Tensor:
    """One clip cell -> codes [K, T]: stored codes as they are, audio encoded with the policy's codec."""
    if kind == "codes":
        return read_codes_cell(value, column, reader.num_codebooks, reader.codebook_size)
    audio = reader.prepare_clip(value, column)  # [1, N] at the codec's rate
    return encode(musicgen.audio_encoder, audio[None], reader.sampling_rate)[0].cpu()


@dataclasses.dataclass
class DataCollatorForMusicDPO:
    """Rows of :func:`prepare_pairs` -> one batch of 2B clips, the B chosen first, then the B rejected.

    Returned keys: ``prompt_ids`` / ``prompt_mask`` [2B, L] (each prompt twice), ``codes`` [2B, K, T] right-padded
    with ``pad_token_id``, ``frame_mask`` [2B, T] (1 = a real frame), and ``ref_chosen_logps`` /
    ``ref_rejected_logps`` [B] when the rows carry precomputed reference log-probs.
    """

    processing_class: Any
    pad_token_id: int
    max_prompt_length: int | None = None

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        prompts = [row["prompt"] for row in rows]
        prompt_ids, prompt_mask = tokenize_prompts(
            self.processing_class, prompts, max_prompt_length=self.max_prompt_length
        )
        clips = [torch.as_tensor(row["chosen_codes"]) for row in rows]
        clips += [torch.as_tensor(row["rejected_codes"]) for row in rows]
        frames = max(clip.shape[-1] for clip in clips)
        codes = torch.full((len(clips), clips[0].shape[0], frames), self.pad_token_id, dtype=torch.long)
        frame_mask = torch.zeros(len(clips), frames, dtype=torch.long)
        for index, clip in enumerate(clips):
            codes[index, :, : clip.shape[-1]] = clip
            frame_mask[index, : clip.shape[-1]] = 1
        batch = {
            "prompt_ids": prompt_ids.repeat(2, 1),
            "prompt_mask": prompt_mask.repeat(2, 1),
            "codes": codes,
            "frame_mask": frame_mask,
        }
        if "ref_chosen_logps" in rows[0]:
            batch["ref_chosen_logps"] = torch.tensor([row["ref_chosen_logps"] for row in rows])
            batch["ref_rejected_logps"] = torch.tensor([row["ref_rejected_logps"] for row in rows])
        return batch
