"""Crash-safe checkpoints: SIGKILL at random moments, partial folders, save_total_limit, the reward trainer, failed
saves. The PPO runs are ``checkpoint_crash_run.py`` (a tiny MusicGen saving after every update), as a subprocess
where a real SIGKILL is needed and in-process otherwise."""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import random
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from two_ranks import run_two_cpu_ranks

from musicrl_trl.trainers.checkpointing import (
    checkpoint_problems,
    find_resumable_checkpoint,
    rotate_checkpoints,
)

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = Path(__file__).with_name("checkpoint_crash_run.py")
LOGGER = "musicrl_trl.trainers.checkpointing"
CLEANUP_LINE = "left by a checkpoint save that was interrupted"


def _load_script():
    spec = importlib.util.spec_from_file_location("checkpoint_crash_run", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


crash_run = _load_script()


pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------------------------------------- helpers
def _start(output_dir: Path, *flags: str, log: Path) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", TRL_EXPERIMENTAL_SILENCE="1", HF_HUB_OFFLINE="1")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    with open(log, "w") as handle:
        return subprocess.Popen(
            [sys.executable, str(SCRIPT), str(output_dir), *flags], stdout=handle, stderr=subprocess.STDOUT, env=env
        )


def _steps(output_dir: Path, prefix: str = "checkpoint-") -> list[int]:
    names = [p.name[len(prefix) :].split(".")[0] for p in output_dir.glob(f"{prefix}*") if p.is_dir()]
    return sorted(int(n) for n in names if n.isdigit())


def _staging(output_dir: Path) -> list[str]:
    return sorted(p.name for p in output_dir.glob("_tmp-*"))


def _wait_for(condition, process: subprocess.Popen, log: Path, timeout: float = 300.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if process.poll() is not None:
            raise AssertionError(
                f"the run exited ({process.returncode}) before the awaited moment:\n{log.read_text()}"
            )
        if time.monotonic() > deadline:
            process.kill()
            raise AssertionError(f"timed out waiting:\n{log.read_text()[-3000:]}")
        time.sleep(0.005)


def _assert_loadable(checkpoint: Path) -> None:
    """What a resume reads, with the real loaders (independent of checkpoint_problems)."""
    assert load_file(checkpoint / "model.safetensors")
    assert load_file(checkpoint / "value_model.safetensors")
    assert torch.load(checkpoint / "optimizer.pt", weights_only=True)["state"]
    torch.load(checkpoint / "scheduler.pt", weights_only=True)
    with zipfile.ZipFile(checkpoint / "rng_state.pth") as archive:  # holds numpy objects: CRC-check, no unpickling
        assert archive.testzip() is None
    assert json.loads((checkpoint / "trainer_state.json").read_text())["global_step"] == int(checkpoint.name[11:])


def _scores(logs: list[dict]) -> dict[int, float]:
    return {entry["step"]: entry["objective/scores"] for entry in logs}


# ---------------------------------------------------------------------------------------------- SIGKILL
@pytest.mark.slow
def test_sigkill_at_random_moments_resumes_to_the_scores_of_an_uninterrupted_run(tmp_path):
    updates, num_kills = 10, 4
    flags = ["--updates", str(updates), "--save-total-limit", "2"]
    reference = crash_run.main([str(tmp_path / "reference"), *flags])
    expected = _scores(json.loads((tmp_path / "reference" / "final_log.json").read_text()))
    assert sorted(expected) == list(range(1, updates + 1))

    output_dir = tmp_path / "killed"
    output_dir.mkdir()
    seed = random.randrange(2**32)
    rng = random.Random(seed)
    slow = ["--save-delay", "0.1"]  # ~0.1 s after each group of files: a save lasts about half a second
    log = tmp_path / "attempt0.log"
    process = _start(output_dir, *flags, *slow, log=log)
    kills = []
    for attempt in range(num_kills):
        base = max(_steps(output_dir), default=0)
        if attempt % 2 == 0:  # during a save: once the next save's staging folder exists (after checkpoint-1)
            target = max(base, 1)
            _wait_for(lambda t=target: any(s > t for s in _steps(output_dir, "_tmp-checkpoint-")), process, log)
            time.sleep(rng.uniform(0.0, 0.25))
        else:  # at any moment after the run made progress
            _wait_for(lambda b=base: max(_steps(output_dir), default=0) > b, process, log)
            time.sleep(rng.uniform(0.0, 1.0))
        process.send_signal(signal.SIGKILL)
        process.wait()
        left = _staging(output_dir)
        kills.append({"published": _steps(output_dir), "staging": left})
        for step in _steps(output_dir):  # whatever the moment, every checkpoint-N folder is complete
            _assert_loadable(output_dir / f"checkpoint-{step}")
        assert _steps(output_dir), kills
        log = tmp_path / f"attempt{attempt + 1}.log"
        process = _start(output_dir, *flags, *slow, "--resume", log=log)
        if left:  # the next kill must not see these leftovers as a save in progress
            _wait_for(lambda log=log: CLEANUP_LINE in log.read_text(), process, log)
    assert process.wait(timeout=600) == 0, (seed, kills, log.read_text()[-3000:])

    killed_mid_save = [kill for kill in kills if kill["staging"]]
    assert len(killed_mid_save) >= 2, (seed, kills)
    for attempt, kill in enumerate(kills, start=1):
        text = (tmp_path / f"attempt{attempt}.log").read_text()
        assert (CLEANUP_LINE in text) == bool(kill["staging"]), (seed, kill, text[-2000:])
    resumed = _scores(json.loads((output_dir / "final_log.json").read_text()))
    assert sorted(resumed) == list(range(1, updates + 1)), (seed, kills)
    for step in expected:
        assert resumed[step] == pytest.approx(expected[step], rel=1e-5), (seed, step, kills)
    assert _staging(output_dir) == [] and _steps(output_dir) == [updates - 1, updates], (seed, kills)
    assert reference.state.global_step == updates
    print(f"survived {len(kills)} SIGKILLs, {len(killed_mid_save)} during a save (seed {seed}): {kills}")


@pytest.mark.slow
def test_save_total_limit_1_and_a_kill_during_the_second_save_leave_the_first_checkpoint_usable(tmp_path, caplog):
    output_dir, log = tmp_path / "run", tmp_path / "run.log"
    output_dir.mkdir()
    flags = ["--updates", "3", "--save-total-limit", "1"]
    process = _start(output_dir, *flags, "--save-delay", "0.3", log=log)
    _wait_for(lambda: (output_dir / "_tmp-checkpoint-2").is_dir(), process, log)
    time.sleep(0.3)  # the second save has written its weights, not its optimizer and RNG states
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert _staging(output_dir) == ["_tmp-checkpoint-2"] and _steps(output_dir) == [1]
    _assert_loadable(output_dir / "checkpoint-1")

    with caplog.at_level(logging.INFO, logger=LOGGER):
        trainer = crash_run.main([str(output_dir), *flags, "--resume"])
    assert f"Removed {output_dir / '_tmp-checkpoint-2'}, {CLEANUP_LINE}" in caplog.text
    assert f"Resuming from {output_dir / 'checkpoint-1'}" in caplog.text
    assert trainer.state.global_step == 3
    assert [entry["step"] for entry in trainer.state.log_history if "objective/scores" in entry] == [1, 2, 3]
    assert _steps(output_dir) == [3] and _staging(output_dir) == []


# ---------------------------------------------------------------------------------------------- partial folders
@pytest.fixture(scope="module")
def three_checkpoints(tmp_path_factory):
    """checkpoint-1..3 of an uninterrupted 3-update run, and its scores."""
    output_dir = tmp_path_factory.mktemp("three") / "run"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    crash_run.main([str(output_dir), "--updates", "3"])
    torch.set_num_threads(threads)
    return output_dir, _scores(json.loads((output_dir / "final_log.json").read_text()))


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


BREAKAGES = {
    "missing weights": (lambda c: (c / "model.safetensors").unlink(), "no model weights"),
    "truncated weights": (lambda c: _truncate(c / "model.safetensors"), "model.safetensors is truncated"),
    "missing optimizer": (lambda c: (c / "optimizer.pt").unlink(), "optimizer.pt is missing"),
    "truncated optimizer": (lambda c: _truncate(c / "optimizer.pt"), "optimizer.pt is truncated"),
    "truncated value model": (lambda c: _truncate(c / "value_model.safetensors"), "value_model.safetensors is trunc"),
    "truncated trainer state": (lambda c: _truncate(c / "trainer_state.json"), "trainer_state.json is truncated"),
}


@pytest.mark.parametrize("breakage", list(BREAKAGES))
def test_resume_skips_a_partial_checkpoint_and_says_why(three_checkpoints, tmp_path, caplog, breakage):
    source, expected = three_checkpoints
    output_dir = tmp_path / "run"
    shutil.copytree(source, output_dir)
    damage, reason = BREAKAGES[breakage]
    damage(output_dir / "checkpoint-3")

    with caplog.at_level(logging.WARNING, logger=LOGGER):
        trainer = crash_run.main([str(output_dir), "--updates", "3", "--resume"])
    warning = next(r.getMessage() for r in caplog.records if "Resuming from" in r.getMessage())
    assert f"Resuming from {output_dir / 'checkpoint-2'}" in warning
    assert "checkpoint-3" in warning and reason in warning
    assert trainer.state.global_step == 3
    resumed = _scores(json.loads((output_dir / "final_log.json").read_text()))
    assert resumed == pytest.approx(expected, rel=1e-5)  # update 3 redone from checkpoint-2, as in the first run
    _assert_loadable(output_dir / "checkpoint-3")  # the broken folder was replaced by the new save


def test_resume_from_a_partial_checkpoint_path_names_the_problem(three_checkpoints, tmp_path):
    output_dir = tmp_path / "run"
    shutil.copytree(three_checkpoints[0], output_dir)
    (output_dir / "checkpoint-3" / "optimizer.pt").unlink()
    with pytest.raises(ValueError, match=r"Cannot resume from .*checkpoint-3: optimizer.pt is missing.*earlier"):
        crash_run.main([str(output_dir), "--updates", "3", "--resume", str(output_dir / "checkpoint-3")])
    for step in (1, 2):
        (output_dir / f"checkpoint-{step}" / "model.safetensors").unlink()
    with pytest.raises(ValueError, match="no checkpoint in .* is complete .*checkpoint-3: optimizer.pt is missing"):
        crash_run.main([str(output_dir), "--updates", "3", "--resume"])


# ---------------------------------------------------------------------------------------------- the pieces
def _fake_checkpoint(directory: Path, step: int, weights: str = "model.safetensors") -> Path:
    """A minimal complete checkpoint folder as Trainer writes it."""
    checkpoint = directory / f"checkpoint-{step}"
    checkpoint.mkdir(parents=True)
    save_file({"w": torch.ones(4)}, str(checkpoint / weights))
    torch.save({"state": {}, "param_groups": []}, checkpoint / "optimizer.pt")
    torch.save({"last_epoch": step}, checkpoint / "scheduler.pt")
    torch.save({"cpu": torch.random.get_rng_state()}, checkpoint / "rng_state.pth")
    (checkpoint / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    return checkpoint


def test_completeness_check_covers_adapters_and_sharded_weights(tmp_path):
    assert checkpoint_problems(str(_fake_checkpoint(tmp_path, 1, weights="adapter_model.safetensors"))) == []
    sharded = _fake_checkpoint(tmp_path, 2, weights="model-00001-of-00002.safetensors")
    save_file({"v": torch.ones(2)}, str(sharded / "model-00002-of-00002.safetensors"))
    index = {"weight_map": {"w": "model-00001-of-00002.safetensors", "v": "model-00002-of-00002.safetensors"}}
    (sharded / "model.safetensors.index.json").write_text(json.dumps(index))
    assert checkpoint_problems(str(sharded)) == []
    _truncate(sharded / "model-00002-of-00002.safetensors")
    (problem,) = checkpoint_problems(str(sharded))
    assert problem.startswith("model-00002-of-00002.safetensors is truncated or corrupt (Error while deserializing")
    (sharded / "model-00002-of-00002.safetensors").unlink()
    assert checkpoint_problems(str(sharded)) == ["model-00002-of-00002.safetensors is missing"]
    (tmp_path / "checkpoint-3").mkdir()  # an empty folder, e.g. made by hand
    assert find_resumable_checkpoint(str(tmp_path)) == str(tmp_path / "checkpoint-1")


def test_rotation_counts_complete_checkpoints_and_keeps_the_newest(tmp_path):
    for step in (1, 2, 3):
        _fake_checkpoint(tmp_path, step)
    (tmp_path / "checkpoint-4").mkdir()  # incomplete (an older version's leftover): neither counted nor deleted
    rotate_checkpoints(str(tmp_path), 1, keep=[str(tmp_path / "checkpoint-3")])
    assert _steps(tmp_path) == [3, 4] and _staging(tmp_path) == []
    _fake_checkpoint(tmp_path, 5)
    # The best checkpoint is kept beside the newest, even at save_total_limit=1 (as Trainer does).
    rotate_checkpoints(str(tmp_path), 1, keep=[str(tmp_path / "checkpoint-5"), str(tmp_path / "checkpoint-3")])
    assert _steps(tmp_path) == [3, 4, 5]


def test_a_failed_save_leaves_no_folder_and_a_stale_one_is_removed_at_start(tmp_path, caplog):
    class FailingSave(crash_run.SlowSavingTrainer):
        def _save_rng_state(self, output_dir):
            if self.state.global_step == 2:
                raise OSError(28, "No space left on device")
            super()._save_rng_state(output_dir)

    with pytest.raises(OSError, match="No space left"):
        crash_run.main([str(tmp_path / "run"), "--updates", "3"], trainer_class=FailingSave)
    assert _steps(tmp_path / "run") == [1] and _staging(tmp_path / "run") == []

    (tmp_path / "run" / "_tmp-checkpoint-2" / "checkpoint-2").mkdir(parents=True)  # as a SIGKILL leaves it
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        trainer = crash_run.main([str(tmp_path / "run"), "--updates", "2", "--resume"])
    assert f"Removed {tmp_path / 'run' / '_tmp-checkpoint-2'}, {CLEANUP_LINE}" in caplog.text
    assert trainer.state.global_step == 2 and _staging(tmp_path / "run") == []


# ---------------------------------------------------------------------------------------------- AudioRewardTrainer
def _reward_trainer(output_dir: Path, with_eval: bool = False, **overrides):
    from musicrl_trl.reward_models import MusicRewardConfig, MusicRewardModel
    from musicrl_trl.trainers import AudioRewardConfig, AudioRewardTrainer

    torch.manual_seed(0)
    model = MusicRewardModel(MusicRewardConfig(conv_channels=[4], hidden_size=8, sampling_rate=16_000))
    rng = torch.Generator().manual_seed(0)
    clips = [{"array": (torch.rand(1600, generator=rng) * 0.2).numpy(), "sampling_rate": 16_000} for _ in range(16)]
    from datasets import Dataset

    dataset = Dataset.from_dict({"audio": clips, "mos": [1.0 + (i % 5) for i in range(16)]})
    settings = dict(
        output_dir=str(output_dir),
        per_device_train_batch_size=4,
        max_steps=4,
        learning_rate=1e-2,
        logging_steps=1,
        save_strategy="steps",
        save_steps=1,
        save_total_limit=2,
        report_to="none",
        disable_tqdm=True,
        seed=0,
    )
    settings.update(overrides)
    return AudioRewardTrainer(
        model=model,
        args=AudioRewardConfig(**settings),
        train_dataset=dataset,
        eval_dataset=dataset if with_eval else None,
    )


def test_reward_trainer_checkpoints_are_atomic_rotated_and_resume_skips_a_partial_one(tmp_path, caplog):
    output_dir = tmp_path / "rm"
    first = _reward_trainer(output_dir)
    first.train()
    losses = {entry["step"]: entry["loss"] for entry in first.state.log_history if "loss" in entry}
    assert _steps(output_dir) == [3, 4] and _staging(output_dir) == []
    for step in (3, 4):
        assert checkpoint_problems(str(output_dir / f"checkpoint-{step}")) == []
    (output_dir / "checkpoint-4" / "optimizer.pt").unlink()

    with caplog.at_level(logging.WARNING, logger=LOGGER):
        resumed = _reward_trainer(output_dir)
        resumed.train(resume_from_checkpoint=True)
    assert f"Resuming from {output_dir / 'checkpoint-3'}" in caplog.text and "optimizer.pt is missing" in caplog.text
    assert resumed.state.global_step == 4
    again = {entry["step"]: entry["loss"] for entry in resumed.state.log_history if "loss" in entry}
    assert again == pytest.approx(losses, rel=1e-5)  # step 4 redone from checkpoint-3 gives the same loss
    assert checkpoint_problems(str(output_dir / "checkpoint-4")) == []

    (output_dir / "checkpoint-4" / "trainer_state.json").unlink()
    with pytest.raises(ValueError, match="trainer_state.json is missing"):
        _reward_trainer(output_dir).train(resume_from_checkpoint=str(output_dir / "checkpoint-4"))


def test_reward_trainer_best_checkpoint_is_recorded_where_it_is_published(tmp_path):
    # Trainer notes the best checkpoint while saving (into the staging folder here): the path it keeps, and the one
    # in trainer_state.json, must be the published checkpoint-N, which load_best_model_at_end then loads.
    output_dir = tmp_path / "rm"
    trainer = _reward_trainer(
        output_dir, with_eval=True, eval_strategy="steps", eval_steps=1, load_best_model_at_end=True,
        save_total_limit=1, metric_for_best_model="loss", greater_is_better=False,
    )  # fmt: skip
    trainer.train()
    best = trainer.state.best_model_checkpoint
    assert best == str(output_dir / f"checkpoint-{trainer.state.best_global_step}")
    assert checkpoint_problems(best) == [] and _staging(output_dir) == []
    assert json.loads(Path(best, "trainer_state.json").read_text())["best_model_checkpoint"] == best


def test_reward_trainer_failed_save_leaves_no_checkpoint_folder(tmp_path):
    trainer = _reward_trainer(tmp_path / "rm", save_total_limit=None)

    def fail_at_step_3(output_dir, original=trainer._save_optimizer_and_scheduler):
        if trainer.state.global_step == 3:
            raise OSError(28, "No space left on device")
        original(output_dir)

    trainer._save_optimizer_and_scheduler = fail_at_step_3
    with pytest.raises(OSError, match="No space left"):
        trainer.train()
    assert _steps(tmp_path / "rm") == [1, 2] and _staging(tmp_path / "rm") == []


# ---------------------------------------------------------------------------------------------- two processes
@pytest.mark.slow
@pytest.mark.parametrize("trainer_kind", ["ppo", "reward"])
def test_two_processes_only_the_main_one_publishes_and_the_other_waits_for_the_rename(tmp_path, trainer_kind):
    output_dir = tmp_path / "run"
    reward_args = ["--reward", "--load-best"] if trainer_kind == "reward" else []
    run_two_cpu_ranks(SCRIPT, output_dir, "--updates", 2, "--save-delay", 0.2, "--record-saves", *reward_args,
                      TRL_EXPERIMENTAL_SILENCE="1")  # fmt: skip
    for rank in (0, 1):
        seen = json.loads((output_dir / f"saves_seen_rank{rank}.json").read_text())
        # When _save_checkpoint returns on any rank, checkpoint-N is already there and complete.
        assert seen == [{"step": 1, "problems": []}, {"step": 2, "problems": []}], (rank, seen)
    for step in (1, 2):
        files = os.listdir(output_dir / f"checkpoint-{step}")
        expected = {"rng_state_0.pth", "rng_state_1.pth", "model.safetensors", "optimizer.pt"}
        if trainer_kind == "ppo":
            expected |= {"value_model.safetensors", "trainer_state.json"}
        assert expected <= set(files)
    assert _staging(output_dir) == []
    if trainer_kind == "reward":
        # load_best_model_at_end: every rank knows the best checkpoint by its published path, and loaded it.
        best = [json.loads((output_dir / f"best_rank{rank}.json").read_text()) for rank in (0, 1)]
        path = best[0]["best_model_checkpoint"]
        assert [record["best_model_checkpoint"] for record in best] == [path, path]
        assert os.path.dirname(path) == str(output_dir) and os.path.isdir(path), path
        saved = load_file(os.path.join(path, "model.safetensors"))
        for record in best:
            assert set(saved) <= set(record["weights"])
            for name, tensor in saved.items():
                torch.testing.assert_close(torch.tensor(record["weights"][name]), tensor.float(), msg=name)
