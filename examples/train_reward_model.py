"""Train a music reward model: Bradley-Terry on pairwise preferences, or MOS regression on ratings.

Offline demo, no arguments (about a minute on 2 CPU cores): builds a synthetic preference set (prompts asking for
"high" or "low" music; the clip whose pitch matches the prompt is preferred, some pairs are ties), trains a tiny
text-conditioned ``MusicRewardModel`` on it and prints the held-out accuracy before and after training::

    python examples/train_reward_model.py

The same for ratings (synthetic MOS falls with the noise level of the clip; prints Spearman and MSE)::

    python examples/train_reward_model.py --mode regression

Real preference votes (prompt + two clips + winner), e.g. a local copy of a Music Arena or CMI-Pref release stored as
JSON lines with audio file paths; A/B votes are mapped onto chosen/rejected, listed tie values become ties and other
votes are dropped::

    accelerate launch examples/train_reward_model.py \\
        --dataset_name path/to/votes.jsonl --audio_root path/to/audio --test_size 0.1 \\
        --prompt_column prompt --a_column audio_a --b_column audio_b \\
        --winner_column winner --a_wins_value a --b_wins_value b --tie_values tie \\
        --model_name_or_path laion/larger_clap_music --text_conditioned \\
        --output_dir clap-music-preference-rm --per_device_train_batch_size 8 --num_train_epochs 3 \\
        --learning_rate 1e-5 --eval_strategy epoch --max_length 320000

Datasets that already have ``prompt``/``chosen``/``rejected`` (and optionally ``tie``) need no mapping; other names are
renamed with ``--prompt_column``, ``--chosen_column``, ``--rejected_column``, ``--tie_column``.

MOS ratings (e.g. a local copy of MusicEval: one clip and its 1-5 rating per row), on a CLAP or AST backbone::

    accelerate launch examples/train_reward_model.py --mode regression \\
        --dataset_name path/to/musiceval --audio_column wav --mos_column overall_mos --test_size 0.1 \\
        --model_name_or_path MIT/ast-finetuned-audioset-10-10-0.4593 \\
        --output_dir ast-music-mos --per_device_train_batch_size 8 --num_train_epochs 5 --learning_rate 3e-5

MusicRL's token-space preference model (text + MusicGen codes, initialised from the generator) on pairs of codes
(columns ``prompt``, ``chosen_codes``, ``rejected_codes`` with int arrays [K, T])::

    accelerate launch examples/train_reward_model.py \\
        --dataset_name path/to/code_pairs --model_name_or_path facebook/musicgen-small \\
        --output_dir musicgen-small-token-rm --per_device_train_batch_size 8 --learning_rate 1e-5

Without ``--output_dir`` the model is saved to ``outputs/reward-model-<mode>``; the script prints the folder when done.
A corrupt row (unreadable or missing audio, bad rating) stops training with its row number in your dataset, counted
from 0 before the train/test split, and what is wrong with it (e.g. ``file not found: audio/5_b.wav``).

``--dataset_name`` is a Hub dataset id, a local dataset folder (``audiofolder``/``save_to_disk``) or a single
``.json``/``.jsonl``/``.csv``/``.parquet`` file. ``--model_name_or_path`` names a CLAP or AST checkpoint (a new reward
head on its audio encoder), a saved reward model (trained further) or a MusicGen checkpoint (the token-space model).
Every ``AudioRewardConfig``/``TrainingArguments`` flag works too (``--help`` lists them).
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field

import numpy as np
import torch
from datasets import Dataset, DatasetDict
from transformers import AutoConfig, PreTrainedModel
from trl import TrlParser

from musicrl_trl import AudioRewardConfig, AudioRewardTrainer, MusicRewardConfig, MusicRewardModel
from musicrl_trl.cli import load_any_dataset
from musicrl_trl.distributed import end_distributed_run
from musicrl_trl.loading import ModelLoadingError, resolve_pretrained
from musicrl_trl.trainers.reward_data import SOURCE_ROW_COLUMN

BACKBONE_TYPES = ("clap", "audio-spectrogram-transformer")


@dataclass
class ScriptArguments:
    """Where the data and the starting model come from, and how the dataset's columns map to the trainer's."""

    dataset_name: str | None = field(
        default=None,
        metadata={"help": "Hub dataset id, local dataset folder or .json/.jsonl/.csv/.parquet file. None: synthetic."},
    )
    dataset_config: str | None = field(default=None, metadata={"help": "Dataset configuration name."})
    dataset_train_split: str = field(default="train", metadata={"help": "Split to train on."})
    dataset_test_split: str | None = field(
        default=None, metadata={"help": "Split to evaluate on; None holds out `test_size` of the train split."}
    )
    test_size: float = field(default=0.2, metadata={"help": "Held-out fraction when there is no test split."})
    model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "CLAP/AST checkpoint (new head on its audio encoder), saved reward model, or MusicGen checkpoint "
            "(token-space model). None: a tiny random MusicRewardModel (the offline demo)."
        },
    )
    text_conditioned: bool = field(
        default=False,
        metadata={"help": "Give a new MusicRewardModel a prompt input (always on for the synthetic preference set)."},
    )
    audio_root: str | None = field(
        default=None, metadata={"help": "Folder that relative audio paths in the dataset are relative to."}
    )
    # Column mapping
    prompt_column: str = field(default="prompt", metadata={"help": "Column holding the text prompt."})
    chosen_column: str = field(default="chosen", metadata={"help": "Column holding the preferred clip."})
    rejected_column: str = field(default="rejected", metadata={"help": "Column holding the other clip."})
    tie_column: str = field(default="tie", metadata={"help": "Column marking ties (bool or share of tie votes)."})
    audio_column: str = field(default="audio", metadata={"help": "Column holding the rated clip (regression)."})
    mos_column: str = field(default="mos", metadata={"help": "Column holding the rating (regression)."})
    winner_column: str | None = field(
        default=None,
        metadata={"help": "A/B votes: column holding the winner; the clips are in `a_column` and `b_column`."},
    )
    a_column: str = field(default="audio_a", metadata={"help": "A/B votes: column holding clip A."})
    b_column: str = field(default="audio_b", metadata={"help": "A/B votes: column holding clip B."})
    a_wins_value: str = field(default="a", metadata={"help": "A/B votes: winner value meaning A won."})
    b_wins_value: str = field(default="b", metadata={"help": "A/B votes: winner value meaning B won."})
    tie_values: str = field(
        default="tie", metadata={"help": "A/B votes: comma-separated winner values that count as a tie."}
    )
    # Synthetic data (offline demo)
    num_synthetic: int = field(default=320, metadata={"help": "Synthetic rows (pairs or rated clips)."})
    clip_seconds: float = field(default=0.5, metadata={"help": "Length of the synthetic clips."})


# ---------------------------------------------------------------------------------------------------------------------
# Synthetic data: what the demo and the tests train on offline
# ---------------------------------------------------------------------------------------------------------------------

SYNTHETIC_RATE = 32_000  # MusicGen's rate: the tiny model reads 16 kHz, so the collator resamples every clip
HIGH_HZ, LOW_HZ = (1_500.0, 3_000.0), (110.0, 330.0)
PROMPTS = {
    "high": ["a high whistling melody", "high bright bells", "a melody played high on a flute"],
    "low": ["a low rumbling bass line", "low deep drones", "a slow melody played low on a cello"],
}


def _tone(rng: np.random.Generator, band: tuple[float, float], seconds: float, noise: float) -> np.ndarray:
    """A sine tone [N] at a random pitch in ``band`` (Hz) with white noise of RMS ``noise``."""
    time = np.arange(round(seconds * SYNTHETIC_RATE)) / SYNTHETIC_RATE
    tone = rng.uniform(0.2, 0.5) * np.sin(2 * np.pi * rng.uniform(*band) * time + rng.uniform(0, 2 * np.pi))
    return (tone + noise * rng.standard_normal(time.shape)).astype(np.float32)


def synthetic_preferences(num_pairs: int, seconds: float = 0.5, tie_fraction: float = 0.1, seed: int = 0) -> Dataset:
    """Pairs (``prompt``, ``chosen``, ``rejected``, ``tie``): the clip whose pitch matches the prompt wins.

    A prompt asks for "high" or "low" music; the chosen clip is a tone in the asked-for register, the rejected one in
    the other (both with random noise). ``tie_fraction`` of the pairs hold two matching clips and are ties.
    Clips are ``{"array", "sampling_rate"}`` dicts at 32 kHz.
    """
    rng = np.random.default_rng(seed)
    rows: dict[str, list] = {"prompt": [], "chosen": [], "rejected": [], "tie": []}
    for _ in range(num_pairs):
        register = "high" if rng.random() < 0.5 else "low"
        match, other = (HIGH_HZ, LOW_HZ) if register == "high" else (LOW_HZ, HIGH_HZ)
        tie = bool(rng.random() < tie_fraction)
        rows["prompt"].append(str(rng.choice(PROMPTS[register])))
        rows["chosen"].append(_tone(rng, match, seconds, rng.uniform(0.0, 0.1)))
        rows["rejected"].append(_tone(rng, match if tie else other, seconds, rng.uniform(0.0, 0.1)))
        rows["tie"].append(tie)
    for column in ("chosen", "rejected"):
        rows[column] = [{"array": array, "sampling_rate": SYNTHETIC_RATE} for array in rows[column]]
    return Dataset.from_dict(rows)


def synthetic_ratings(num_clips: int, seconds: float = 0.5, seed: int = 0) -> Dataset:
    """Rated clips (``prompt``, ``audio``, ``mos``): the noisier the tone, the lower its 1-5 rating.

    The noise RMS is drawn uniformly in [0, 0.3]; ``mos = 5 - 4 * noise / 0.3`` plus rater noise (std 0.15), clipped
    to [1, 5].
    """
    rng = np.random.default_rng(seed)
    rows: dict[str, list] = {"prompt": [], "audio": [], "mos": []}
    for _ in range(num_clips):
        noise = rng.uniform(0.0, 0.3)
        register = "high" if rng.random() < 0.5 else "low"
        audio = _tone(rng, HIGH_HZ if register == "high" else LOW_HZ, seconds, noise)
        rows["prompt"].append(str(rng.choice(PROMPTS[register])))
        rows["audio"].append({"array": audio, "sampling_rate": SYNTHETIC_RATE})
        rows["mos"].append(float(np.clip(5.0 - 4.0 * noise / 0.3 + rng.normal(0.0, 0.15), 1.0, 5.0)))
    return Dataset.from_dict(rows)


def tiny_reward_model(text_conditioned: bool, seed: int = 0) -> MusicRewardModel:
    """A small random MusicRewardModel (built-in log-mel conv encoder at 16 kHz) for the offline demo."""
    torch.manual_seed(seed)
    # Whether a clip is good depends on prompt x audio (an XOR of "high" and "high-pitched"), which the head only
    # represents through its GELU. With the default init (std 0.02) the GELU starts out almost linear and training
    # often stalled at chance; a 10x larger init and 64 hidden units escaped that plateau for 11 of 12 seeds in
    # 5 epochs and 12 of 12 in 8.
    config = MusicRewardConfig(
        conv_channels=[8, 16, 32],
        hidden_size=64,
        text_vocab_size=384 if text_conditioned else 0,
        sampling_rate=16_000,
        initializer_range=0.2,
    )
    return MusicRewardModel(config)


# ---------------------------------------------------------------------------------------------------------------------
# Real data
# ---------------------------------------------------------------------------------------------------------------------


def to_trainer_columns(dataset: Dataset, script_args: ScriptArguments, mode: str) -> Dataset:
    """Rename (or, for A/B votes, derive) the columns the trainer reads; resolve relative audio paths."""
    args = script_args
    if mode == "pairwise" and args.winner_column is not None:
        ties = {value.strip() for value in args.tie_values.split(",") if value.strip()}
        known = {args.a_wins_value, args.b_wins_value, *ties}
        before = len(dataset)
        dataset = dataset.filter(lambda winner: str(winner) in known, input_columns=args.winner_column)
        print(f"A/B votes: kept {len(dataset)} of {before} rows (winner in {sorted(known)})")

        def ab_to_pair(row: dict) -> dict:
            b_won = str(row[args.winner_column]) == args.b_wins_value
            return {
                "chosen": row[args.b_column] if b_won else row[args.a_column],
                "rejected": row[args.a_column] if b_won else row[args.b_column],
                "tie": str(row[args.winner_column]) in ties,
            }

        dataset = dataset.map(ab_to_pair, remove_columns=[args.a_column, args.b_column, args.winner_column])
    renames = {args.prompt_column: "prompt"}
    if mode == "pairwise":
        renames.update({args.chosen_column: "chosen", args.rejected_column: "rejected", args.tie_column: "tie"})
    else:
        renames.update({args.audio_column: "audio", args.mos_column: "mos"})
    dataset = dataset.rename_columns(
        {old: new for old, new in renames.items() if old in dataset.column_names and old != new}
    )
    if args.audio_root is not None:
        audio_columns = [column for column in ("chosen", "rejected", "audio") if column in dataset.column_names]

        def absolute(row: dict) -> dict:
            return {
                column: os.path.join(args.audio_root, row[column]) if isinstance(row[column], str) else row[column]
                for column in audio_columns
            }

        dataset = dataset.map(absolute)
    return dataset


def load_model(script_args: ScriptArguments, mode: str, allow_pickle_weights: bool = False) -> PreTrainedModel | str:
    """The model to train: a new head on a CLAP/AST encoder, or a name the trainer loads itself."""
    name = resolve_pretrained(script_args.model_name_or_path, "starting model (--model_name_or_path)")
    model_type = AutoConfig.from_pretrained(name).model_type
    if model_type.startswith(BACKBONE_TYPES):
        text_vocab_size = 384 if script_args.text_conditioned else 0
        return MusicRewardModel.from_backbone(
            name, text_vocab_size=text_vocab_size, allow_pickle_weights=allow_pickle_weights
        )
    return name  # a saved reward model, or a MusicGen checkpoint (the token-space model)


# ---------------------------------------------------------------------------------------------------------------------


# The tiny random model of the offline demo needs a much larger step than fine-tuning a pretrained encoder (what
# AudioRewardConfig's defaults are for). These apply to the demo only, and only where a flag still holds its default.
DEMO_DEFAULTS = {"learning_rate": 3e-3, "num_train_epochs": 8.0}


def number_rows(dataset: DatasetDict) -> DatasetDict:
    """Add each row's number in the user's dataset, so that corrupt-row errors after the train/test split (and the
    A/B filter) still name the row the user can find."""
    return DatasetDict(
        {split: rows.add_column(SOURCE_ROW_COLUMN, list(range(len(rows)))) for split, rows in dataset.items()}
    )


def main(script_args: ScriptArguments, training_args: AudioRewardConfig) -> dict[str, float]:
    mode = training_args.mode or "pairwise"
    training_args.mode = mode
    if training_args.output_dir in (None, "trainer_output"):
        training_args.output_dir = os.path.join("outputs", f"reward-model-{mode}")

    # Model
    synthetic = script_args.dataset_name is None
    if synthetic and script_args.model_name_or_path is None:
        # The demo model's ops are far too small to split across threads: on a busy 2-core machine OpenMP's
        # spin-waiting made 2 threads 5x slower than 1.
        torch.set_num_threads(1)
        for name, value in DEMO_DEFAULTS.items():
            if getattr(training_args, name) == AudioRewardConfig.__dataclass_fields__[name].default:
                setattr(training_args, name, value)
    if script_args.model_name_or_path is None:
        # The synthetic preference task needs the prompt (is a high clip good? only if "high" was asked for).
        text_conditioned = script_args.text_conditioned or (synthetic and mode == "pairwise")
        model = tiny_reward_model(text_conditioned, seed=training_args.seed)
    else:
        model = load_model(script_args, mode, training_args.allow_pickle_weights)

    # Dataset
    if synthetic:
        build = synthetic_preferences if mode == "pairwise" else synthetic_ratings
        train_dataset = build(script_args.num_synthetic, script_args.clip_seconds, seed=training_args.seed)
        eval_dataset = build(
            max(64, script_args.num_synthetic // 4), script_args.clip_seconds, seed=training_args.seed + 1
        )
    else:
        dataset = number_rows(load_any_dataset(script_args.dataset_name, script_args.dataset_config))
        train_dataset = to_trainer_columns(dataset[script_args.dataset_train_split], script_args, mode)
        if script_args.dataset_test_split is not None:
            eval_dataset = to_trainer_columns(dataset[script_args.dataset_test_split], script_args, mode)
        else:
            split = train_dataset.train_test_split(test_size=script_args.test_size, seed=training_args.seed)
            train_dataset, eval_dataset = split["train"], split["test"]

    # Training
    trainer = AudioRewardTrainer(
        model=model, args=training_args, train_dataset=train_dataset, eval_dataset=eval_dataset
    )
    metric = "eval_accuracy" if mode == "pairwise" else "eval_spearman"
    before = trainer.evaluate()
    trainer.train()
    after = trainer.evaluate()
    print(f"held-out {metric.removeprefix('eval_')}: {before[metric]:.3f} before training, {after[metric]:.3f} after")
    if mode == "regression":
        print(f"held-out mse: {before['eval_mse']:.3f} before training, {after['eval_mse']:.3f} after")
    if trainer.num_skipped_rows:
        print(f"skipped {trainer.num_skipped_rows} corrupt rows: {trainer.skipped_rows}")

    # Save and push
    trainer.save_model(training_args.output_dir)
    if trainer.is_world_process_zero():
        print(f"saved the reward model to {os.path.abspath(training_args.output_dir)}")
    if training_args.push_to_hub:
        trainer.push_to_hub(**({"dataset": script_args.dataset_name} if script_args.dataset_name else {}))
    return after


if __name__ == "__main__":
    parser = TrlParser((ScriptArguments, AudioRewardConfig))
    try:  # a config that refuses its numbers is reported like every other mistake: one line, no traceback
        script_args, training_args = parser.parse_args_and_config()
        main(script_args, training_args)
    except (ModelLoadingError, FileNotFoundError, ValueError) as error:  # messages that say what to fix
        sys.exit(f"error: {error}")
    end_distributed_run()  # after main's trainer is gone: see musicrl_trl/distributed.py
