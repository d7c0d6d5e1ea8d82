"""Votes -> a ``datasets`` preference dataset that :class:`~musicrl_trl.AudioRewardTrainer` trains on directly.

One row per vote: ``prompt``, ``chosen`` and ``rejected`` (``datasets.Audio``, the clips' bytes embedded so that the
folder is self-contained), ``tie`` (for a tie ``chosen`` is clip A), ``rater`` (name), ``created_at`` (ISO 8601,
UTC), and for bookkeeping ``pair_id``, ``chosen_clip_id``, ``rejected_clip_id``, ``chosen_system``,
``rejected_system``, ``reason``, ``mode``. The trainer reads only the columns it needs. When the pool kept the codes
of every voted clip (pools made by ``make_pool`` do), the rows also carry ``chosen_codes`` / ``rejected_codes`` [K, T]:
``MusicDPOTrainer`` then trains on the exact tokens that were voted on.

The audio columns are saved with ``decode=False``: decoding ``Audio`` in datasets 4+ needs torchcodec, which the
library does not depend on; rows hold ``{"bytes", "path"}`` that soundfile reads (``AudioRewardTrainer`` does), and
``dataset.cast_column("chosen", Audio())`` turns decoding on where torchcodec is installed.
"""

from __future__ import annotations

import os
from pathlib import Path

from datasets import Audio, Dataset, Features, Sequence, Value

from .pool import Pool
from .store import Store

__all__ = ["export_dataset", "votes_to_dataset", "FEATURES"]

AUDIO_CELL = {"bytes": Value("binary"), "path": Value("string")}
FEATURES = Features(
    {
        "prompt": Value("string"),
        "chosen": Audio(decode=False),
        "rejected": Audio(decode=False),
        "tie": Value("bool"),
        "rater": Value("string"),
        "created_at": Value("string"),
        "pair_id": Value("string"),
        "chosen_clip_id": Value("string"),
        "rejected_clip_id": Value("string"),
        "chosen_system": Value("string"),
        "rejected_system": Value("string"),
        "reason": Value("string"),
        "mode": Value("string"),
    }
)
#: Columns added when every voted clip's codes are known ([K, T] integers).
CODE_FEATURES = {name: Sequence(Sequence(Value("int64"))) for name in ("chosen_codes", "rejected_codes")}


def votes_to_dataset(store: Store, pool: Pool) -> tuple[Dataset, int]:
    """The votes on clips of ``pool`` as a dataset, and how many votes were left out (clips of other pools)."""
    rows: dict[str, list] = {name: [] for name in FEATURES}
    codes: dict[str, list] = {name: [] for name in CODE_FEATURES}
    skipped = 0
    for vote in store.votes():
        if vote["clip_a"] not in pool.clips or vote["clip_b"] not in pool.clips:
            skipped += 1
            continue
        b_won = vote["choice"] == "b"
        chosen, rejected = (vote["clip_b"], vote["clip_a"]) if b_won else (vote["clip_a"], vote["clip_b"])
        for column, clip_id in (("chosen", chosen), ("rejected", rejected)):
            path = pool.path_of(clip_id)
            rows[column].append({"bytes": path.read_bytes(), "path": path.name})
            rows[f"{column}_clip_id"].append(clip_id)
            rows[f"{column}_system"].append(pool.clips[clip_id].system)
            clip_codes = pool.codes_of(clip_id)
            codes[f"{column}_codes"].append(None if clip_codes is None else clip_codes.tolist())
        rows["prompt"].append(vote["prompt"])
        rows["tie"].append(vote["choice"] == "tie")
        rows["rater"].append(vote["rater"])
        rows["created_at"].append(vote["created_at"])
        rows["pair_id"].append(vote["pair_id"])
        rows["reason"].append(vote["reason"])
        rows["mode"].append(vote["mode"])
    # datasets 5 encodes Audio values through torchcodec, even {"bytes", "path"} cells that need no encoding; the
    # cells are built as plain structs and cast to Audio, which only relabels the Arrow column.
    features = FEATURES
    if rows["prompt"] and all(cell is not None for column in codes.values() for cell in column):
        rows.update(codes)
        features = Features({**FEATURES, **CODE_FEATURES})
    dataset = Dataset.from_dict(rows, features=Features({**features, "chosen": AUDIO_CELL, "rejected": AUDIO_CELL}))
    return dataset.cast(features), skipped


def export_dataset(
    store: Store | str | os.PathLike,
    pool: Pool,
    out: str | os.PathLike,
    push_to_hub: str | None = None,
    private: bool = True,
) -> Dataset:
    """Write the votes on ``pool``'s clips to ``out`` with ``save_to_disk`` (and push them to a Hub dataset repo)."""
    store = store if isinstance(store, Store) else Store(store)
    dataset, skipped = votes_to_dataset(store, pool)
    if len(dataset) == 0:
        raise ValueError(
            f"no votes on clips of the pool in {pool.root} in {store.path}"
            + (f" ({skipped} votes are on clips of other pools)" if skipped else "")
            + ": collect some with `musicrl-app serve` first."
        )
    if Path(out).exists() and any(Path(out).iterdir()):
        raise FileExistsError(f"{out} exists and is not empty: export into a new folder.")
    dataset.save_to_disk(os.fspath(out))
    if skipped:
        print(f"left out {skipped} votes on clips that are not in {pool.root}")
    if push_to_hub:
        dataset.push_to_hub(push_to_hub, private=private)
    return dataset
