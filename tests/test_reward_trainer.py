"""AudioRewardTrainer: learning from synthetic preferences and ratings, ties, corrupt rows, collation, saving."""

from __future__ import annotations

import importlib.util
import io
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from datasets import Audio, Dataset
from scipy.stats import spearmanr
from transformers import AutoModelForAudioClassification
from transformers.trainer_utils import EvalPrediction

from musicrl_trl.reward_models import MusicRewardConfig, MusicRewardModel
from musicrl_trl.trainers.reward_config import AudioRewardConfig
from musicrl_trl.trainers.reward_trainer import (
    AudioRewardTrainer,
    DataCollatorForAudioReward,
    compute_reward_metrics,
)

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "train_reward_model.py"


def _load_example():
    # The example's synthetic datasets are what the offline demo trains on; the tests train on the same ones.
    spec = importlib.util.spec_from_file_location("train_reward_model_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is being built
    spec.loader.exec_module(module)
    return module


example = _load_example()


pytestmark = pytest.mark.usefixtures("one_thread")


def _args(tmp_path, **kwargs) -> AudioRewardConfig:
    defaults = dict(
        output_dir=str(tmp_path),
        per_device_train_batch_size=8,
        per_device_eval_batch_size=32,
        learning_rate=3e-3,
        num_train_epochs=5,
        logging_steps=10,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        seed=0,
    )
    defaults.update(kwargs)
    return AudioRewardConfig(**defaults)


def _clip(seconds: float = 0.1, rate: int = 16_000, value: float = 0.1) -> dict:
    return {"array": np.full(round(seconds * rate), value, dtype=np.float32), "sampling_rate": rate}


def _wav_bytes(samples: np.ndarray, rate: int) -> bytes:
    buffer = io.BytesIO()
    sf.write(buffer, samples, rate, format="WAV", subtype="FLOAT")
    return buffer.getvalue()


def test_pairwise_reaches_90_percent_held_out_accuracy(tmp_path):
    model = example.tiny_reward_model(text_conditioned=True)
    initial = {name: param.detach().clone() for name, param in model.named_parameters()}
    train = example.synthetic_preferences(320, seconds=0.5, seed=0)
    test = example.synthetic_preferences(80, seconds=0.5, seed=1)
    args = _args(tmp_path, num_train_epochs=8)  # the demo's setting (see example.tiny_reward_model)
    trainer = AudioRewardTrainer(model=model, args=args, train_dataset=train, eval_dataset=test)
    assert trainer.mode == "pairwise" and trainer.sampling_rate == 16_000  # clips are 32 kHz: resampled
    trainer.train()
    metrics = trainer.evaluate()
    assert metrics["eval_accuracy"] > 0.9, metrics
    assert 0 < metrics["eval_tie_fraction"] < 0.3
    assert metrics["eval_margin"] > 0
    for name, param in model.named_parameters():
        if name == "score.bias":
            continue  # Bradley-Terry only sees reward differences: a shared offset gets no gradient
        assert not torch.equal(param, initial[name]), f"{name} did not change"
    train_logs = [log for log in trainer.state.log_history if "loss" in log]
    assert train_logs[-1]["accuracy"] > 0.9 and train_logs[-1]["num_skipped_rows"] == 0


def test_regression_reaches_spearman_above_0_8(tmp_path):
    model = example.tiny_reward_model(text_conditioned=False)
    train = example.synthetic_ratings(320, seconds=0.5, seed=0)
    test = example.synthetic_ratings(80, seconds=0.5, seed=1)
    trainer = AudioRewardTrainer(model=model, args=_args(tmp_path), train_dataset=train, eval_dataset=test)
    assert trainer.mode == "regression"
    trainer.train()
    metrics = trainer.evaluate()
    assert metrics["eval_spearman"] > 0.8, metrics
    assert metrics["eval_mse"] < 0.5, metrics
    assert [log for log in trainer.state.log_history if "loss" in log][-1]["mse"] < 1.0


def _tiny_audio_model(seed: int = 0) -> MusicRewardModel:
    torch.manual_seed(seed)
    return MusicRewardModel(MusicRewardConfig(conv_channels=[4], hidden_size=8, sampling_rate=16_000))


def _pairs_with_ties(num_pairs: int = 8) -> Dataset:
    rng = np.random.default_rng(0)
    return Dataset.from_dict(
        {
            "prompt": ["a tune"] * num_pairs,
            "chosen": [_clip(value=rng.uniform(0.05, 0.5)) for _ in range(num_pairs)],
            "rejected": [_clip(value=rng.uniform(0.05, 0.5)) for _ in range(num_pairs)],
            # full ties and a soft tie (share of tie votes; the synthetic sets use bool ties)
            "tie": [1.0, 0.0, 1.0, 0.0, 0.5, 0.0, 1.0, 0.0][:num_pairs],
        }
    )


def test_tie_loss_is_bradley_terry_with_target_one_half(tmp_path):
    trainer = AudioRewardTrainer(model=_tiny_audio_model(), args=_args(tmp_path), train_dataset=_pairs_with_ties())
    margins = torch.tensor([2.0, -1.0, 0.0, 3.0])
    rewards = torch.cat([margins, torch.zeros(4)])  # chosen first, then rejected
    targets = torch.tensor([1.0, 1.0, 0.5, 0.5])  # two decisive pairs, two ties
    loss, metrics = trainer.reward_loss(rewards, targets)
    sigmoid = torch.sigmoid(margins)
    expected = -torch.stack(
        [
            sigmoid[0].log(),
            sigmoid[1].log(),
            0.5 * (sigmoid[2].log() + (1 - sigmoid[2]).log()),
            0.5 * (sigmoid[3].log() + (1 - sigmoid[3]).log()),
        ]
    ).mean()
    assert torch.allclose(loss, expected)
    assert metrics["_correct"] == 1 and metrics["_decisive"] == 2  # ties never count towards accuracy
    # A tie pulls the rewards together: its loss is smallest (log 2) at equal rewards.
    tie_only, _ = trainer.reward_loss(torch.tensor([0.0, 0.0]), torch.tensor([0.5]))
    assert math.isclose(tie_only.item(), math.log(2), rel_tol=1e-6)

    trainer.args.tie_loss = "ignore"
    ignored, _ = trainer.reward_loss(rewards, targets)
    assert torch.allclose(ignored, -(sigmoid[0].log() + sigmoid[1].log()) / 2)


def test_ties_train_with_finite_loss_and_stay_out_of_accuracy(tmp_path):
    dataset = _pairs_with_ties()
    args = _args(tmp_path, num_train_epochs=1, logging_steps=1, center_rewards_coefficient=0.01)
    trainer = AudioRewardTrainer(model=_tiny_audio_model(), args=args, train_dataset=dataset, eval_dataset=dataset)
    trainer.train()
    assert all(math.isfinite(log["loss"]) for log in trainer.state.log_history if "loss" in log)
    metrics = trainer.evaluate()
    assert math.isfinite(metrics["eval_loss"])
    assert metrics["eval_tie_fraction"] == pytest.approx(3 / 8)  # the soft tie 0.5 has a winner (target 0.75)

    predictions = trainer.predict(trainer.eval_dataset)
    margins = predictions.predictions[:, 0] - predictions.predictions[:, 1]
    decisive = np.array([not tie for tie in [True, False, True, False, False, False, True, False]])
    assert metrics["eval_accuracy"] == pytest.approx((margins[decisive] > 0).mean())


def test_compute_reward_metrics_matches_scipy_and_ignores_ties():
    rng = np.random.default_rng(0)
    predictions = rng.normal(size=50).round(1)  # rounding makes tied ranks
    targets = predictions + rng.normal(scale=0.5, size=50)
    metrics = compute_reward_metrics(EvalPrediction(predictions=predictions, label_ids=targets))
    assert metrics["spearman"] == pytest.approx(spearmanr(predictions, targets).statistic)
    assert metrics["mse"] == pytest.approx(((predictions - targets) ** 2).mean())

    pair_rewards = np.array([[1.0, 0.0], [0.0, 1.0], [5.0, -5.0], [-5.0, 5.0]])
    pair_targets = np.array([1.0, 1.0, 0.5, 0.5])
    metrics = compute_reward_metrics(EvalPrediction(predictions=pair_rewards, label_ids=pair_targets))
    assert metrics == {"accuracy": 0.5, "margin": 0.0, "tie_fraction": 0.5}


def _ratings_with_corrupt_rows() -> Dataset:
    rng = np.random.default_rng(0)
    audio = [
        {"bytes": _wav_bytes(np.full(1600, v, dtype=np.float32), 16_000), "path": None} for v in rng.uniform(0, 1, 8)
    ]
    mos = [float(v) for v in rng.uniform(1, 5, size=8)]
    audio[1] = {"bytes": b"RIFF....not a wav file", "path": "broken.wav"}  # unreadable audio
    mos[3] = float("nan")  # NaN label
    audio[4] = {"bytes": _wav_bytes(np.zeros(1600, dtype=np.float32), 50), "path": None}  # 50 Hz: a frame rate
    audio[6] = {"bytes": _wav_bytes(np.zeros(0, dtype=np.float32), 16_000), "path": None}  # no samples
    return Dataset.from_dict({"audio": audio, "mos": mos}).cast_column("audio", Audio())


def test_corrupt_rows_raise_with_row_column_and_fix(tmp_path):
    with pytest.raises(ValueError) as error:
        AudioRewardTrainer(model=_tiny_audio_model(), args=_args(tmp_path), train_dataset=_ratings_with_corrupt_rows())
    message = str(error.value)
    assert "Row 1 of the train dataset" in message and "'audio'" in message and "could not be decoded" in message
    assert "skip_corrupt_rows=True" in message and "3 more corrupt rows" in message

    nan_row = Dataset.from_dict({"audio": [_clip(), _clip()], "mos": [3.0, float("nan")]})
    with pytest.raises(ValueError, match=r"Row 1 of the train dataset, column 'mos': the value is nan"):
        AudioRewardTrainer(model=_tiny_audio_model(), args=_args(tmp_path), train_dataset=nan_row)

    wrong_rate = Dataset.from_dict({"audio": [_clip(rate=8_000)], "mos": [3.0]})
    with pytest.raises(ValueError, match=r"Row 0 .*at 8000 Hz, the model reads 16000 Hz.*resample=True"):
        AudioRewardTrainer(model=_tiny_audio_model(), args=_args(tmp_path, resample=False), train_dataset=wrong_rate)

    transposed = Dataset.from_dict(
        {
            "audio": [{"array": np.zeros((1, 800), np.float32), "sampling_rate": 16_000}] * 2
            + [{"array": np.zeros((800, 2), np.float32), "sampling_rate": 16_000}],
            "mos": [1.0, 2.0, 3.0],
        }
    )
    with pytest.raises(ValueError, match=r"Row 2 .*read as 800 channels.*transpose \[N, C\] arrays"):
        AudioRewardTrainer(model=_tiny_audio_model(), args=_args(tmp_path), train_dataset=transposed)

    missing = Dataset.from_dict({"clip": [_clip()], "mos": [3.0]})
    with pytest.raises(ValueError, match=r"lacks the column\(s\) \['audio'\].*rename_column"):
        AudioRewardTrainer(model=_tiny_audio_model(), args=_args(tmp_path, mode="regression"), train_dataset=missing)


def test_corrupt_rows_are_skipped_and_counted(tmp_path):
    args = _args(tmp_path, skip_corrupt_rows=True, num_train_epochs=1, logging_steps=1)
    dataset = _ratings_with_corrupt_rows()
    trainer = AudioRewardTrainer(model=_tiny_audio_model(), args=args, train_dataset=dataset, eval_dataset=dataset)
    assert trainer.num_skipped_rows == 8  # 4 in train, the same 4 in eval
    assert trainer.skipped_rows == {"train": [1, 3, 4, 6], "eval": [1, 3, 4, 6]}
    assert len(trainer.train_dataset) == 4
    trainer.train()
    assert [log for log in trainer.state.log_history if "loss" in log][0]["num_skipped_rows"] == 8
    assert math.isfinite(trainer.evaluate()["eval_mse"])


def test_audio_column_files_and_bare_arrays(tmp_path):
    # An Audio column (WAV bytes, decoded with soundfile, no torchcodec needed), a file path and bare arrays.
    rate = 22_050
    tone = (0.3 * np.sin(2 * np.pi * 440 * np.arange(rate // 10) / rate)).astype(np.float32)
    path = tmp_path / "tone.wav"
    sf.write(path, tone, rate, subtype="FLOAT")
    audio_column = Dataset.from_dict(
        {
            "prompt": ["a", "b"],
            "chosen": [{"bytes": _wav_bytes(tone, rate), "path": None}] * 2,
            "rejected": [str(path)] * 2,
        }
    ).cast_column("chosen", Audio())
    trainer = AudioRewardTrainer(model=_tiny_audio_model(), args=_args(tmp_path), train_dataset=audio_column)
    batch = trainer.data_collator([trainer.train_dataset[0], trainer.train_dataset[1]])
    assert batch["input_values"].shape == (4, 1600)  # 0.1 s at 16 kHz: resampled from 22.05 kHz
    assert torch.allclose(batch["input_values"][0], batch["input_values"][2], atol=1e-5)  # bytes == file

    bare = Dataset.from_dict({"audio": [np.zeros(800, dtype=np.float32)], "mos": [2.0]})
    with pytest.raises(ValueError, match="bare array with no sampling rate.*audio_sampling_rate"):
        AudioRewardTrainer(model=_tiny_audio_model(), args=_args(tmp_path), train_dataset=bare)
    trainer = AudioRewardTrainer(
        model=_tiny_audio_model(), args=_args(tmp_path, audio_sampling_rate=8_000), train_dataset=bare
    )
    assert trainer.data_collator([trainer.train_dataset[0]])["input_values"].shape == (1, 1600)


def test_collator_pads_masks_and_keeps_channels():
    collator = DataCollatorForAudioReward(
        mode="pairwise", input_kind="audio", sampling_rate=16_000, mono=False, pad_to_multiple_of=512
    )
    stereo = {"array": np.ones((2, 1000), dtype=np.float32), "sampling_rate": 16_000}
    short = {"array": np.ones((2, 300), dtype=np.float32), "sampling_rate": 16_000}
    batch = collator([{"chosen": stereo, "rejected": short, "tie": 0.5}])
    assert batch["input_values"].shape == (2, 2, 1024)  # [2B, C, N], padded to a multiple of 512
    assert batch["audio_attention_mask"].sum(-1).tolist() == [1000, 300]
    assert batch["input_values"][1, :, 300:].abs().sum() == 0
    assert batch["targets"].tolist() == [0.75]

    mono = DataCollatorForAudioReward(mode="regression", input_kind="audio", sampling_rate=8_000, max_length=500)
    batch = mono([{"audio": stereo, "mos": 4}])
    assert batch["input_values"].shape == (1, 500)  # downmixed, resampled to 500 samples, truncated to max_length
    assert batch["targets"].tolist() == [4.0]


def test_config_validation_says_what_to_change(tmp_path):
    with pytest.raises(ValueError, match="mode must be one of"):
        AudioRewardConfig(output_dir=str(tmp_path), mode="ranking")
    with pytest.raises(ValueError, match="tie_loss must be one of"):
        AudioRewardConfig(output_dir=str(tmp_path), tie_loss="davidson")
    with pytest.raises(ValueError, match="max_length must be a positive integer"):
        AudioRewardConfig(output_dir=str(tmp_path), max_length=0)
    with pytest.raises(ValueError, match="pairwise training only"):
        AudioRewardConfig(output_dir=str(tmp_path), mode="regression", center_rewards_coefficient=0.01)
    with pytest.raises(ValueError, match="Cannot tell the training mode"):
        AudioRewardTrainer(
            model=_tiny_audio_model(), args=_args(tmp_path), train_dataset=Dataset.from_dict({"x": [1]})
        )


def test_save_writes_safetensors_and_reloads(tmp_path):
    dataset = Dataset.from_dict({"audio": [_clip(value=0.1), _clip(value=0.3)], "mos": [2.0, 4.0]})
    trainer = AudioRewardTrainer(
        model=_tiny_audio_model(), args=_args(tmp_path, num_train_epochs=1), train_dataset=dataset
    )
    trainer.train()
    trainer.save_model(str(tmp_path / "model"))
    files = os.listdir(tmp_path / "model")
    assert "model.safetensors" in files and not any(
        name.endswith((".bin", ".pt")) and "model" in name for name in files
    )
    reloaded = AutoModelForAudioClassification.from_pretrained(tmp_path / "model").eval()
    trainer.model.eval()
    batch = trainer.data_collator([dataset[0], dataset[1]])
    with torch.no_grad():
        expected = trainer.model(batch["input_values"], attention_mask=batch["audio_attention_mask"]).logits
        actual = reloaded(batch["input_values"], attention_mask=batch["audio_attention_mask"]).logits
    assert torch.allclose(actual, expected, atol=1e-6)
    # AudioRewardTrainer loads a saved reward model by path too, with its (pass-through) feature extractor.
    again = AudioRewardTrainer(model=str(tmp_path / "model"), args=_args(tmp_path), train_dataset=dataset)
    assert isinstance(again.model, MusicRewardModel) and again.sampling_rate == 16_000


def test_example_maps_ab_votes_from_a_jsonl_file(tmp_path):
    # What a downloaded vote release looks like: a JSONL file with a prompt, two relative audio paths and a winner.
    (tmp_path / "audio").mkdir()
    rows = []
    for index, winner in enumerate(["a", "b", "tie", "both_bad", "b"]):
        for side, value in (("a", 0.1), ("b", 0.2)):
            sf.write(
                tmp_path / "audio" / f"{side}{index}.wav", np.full(800, value, np.float32), 16_000, subtype="FLOAT"
            )
        rows.append({"caption": f"tune {index}", "left": f"a{index}.wav", "right": f"b{index}.wav", "vote": winner})
    votes = tmp_path / "votes.jsonl"
    votes.write_text("".join(json.dumps(row) + "\n" for row in rows))

    script_args = example.ScriptArguments(
        dataset_name=str(votes),
        audio_root=str(tmp_path / "audio"),
        prompt_column="caption",
        a_column="left",
        b_column="right",
        winner_column="vote",
        tie_values="tie",
    )
    votes = example.load_any_dataset(script_args.dataset_name)["train"]
    dataset = example.to_trainer_columns(votes, script_args, "pairwise")
    assert dataset["prompt"] == ["tune 0", "tune 1", "tune 2", "tune 4"]  # "both_bad" is neither a win nor a tie
    assert [os.path.basename(path) for path in dataset["chosen"]] == ["a0.wav", "b1.wav", "a2.wav", "b4.wav"]
    assert [os.path.basename(path) for path in dataset["rejected"]] == ["b0.wav", "a1.wav", "b2.wav", "a4.wav"]
    assert dataset["tie"] == [False, False, True, False]
    trainer = AudioRewardTrainer(model=_tiny_audio_model(), args=_args(tmp_path), train_dataset=dataset)
    batch = trainer.data_collator([trainer.train_dataset[1]])
    assert batch["input_values"][:, 0].tolist() == pytest.approx([0.2, 0.1])  # chosen B, rejected A


@pytest.mark.slow
@pytest.mark.parametrize("mode, metric", [("pairwise", "accuracy"), ("regression", "spearman")])
def test_example_script_runs(tmp_path, mode, metric):
    command = [
        sys.executable,
        str(EXAMPLE),
        "--mode", mode,
        "--output_dir", str(tmp_path / "out"),
        "--num_synthetic", "48",
        "--clip_seconds", "0.25",
        "--num_train_epochs", "1",
        "--report_to", "none",
        "--disable_tqdm", "true",
    ]  # fmt: skip
    env = {**os.environ, "TRL_EXPERIMENTAL_SILENCE": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"held-out {metric}:" in result.stdout
    assert (tmp_path / "out" / "model.safetensors").exists()
