"""Crash-safe checkpoints: a ``checkpoint-N`` folder is either complete or absent, whenever the run is killed.

transformers' ``Trainer._save_checkpoint`` writes straight into ``<output_dir>/checkpoint-N``, file after file, and
``resume_from_checkpoint=True`` takes the highest-numbered folder whether or not it was finished; a kill during a
save (a pre-empted GPU, an out-of-memory kill) leaves a folder that ends the run at the next start. Here:

1. a save writes into ``<output_dir>/_tmp-checkpoint-N/checkpoint-N``; once every process has written its files,
   the main process fsyncs them and renames the folder to ``<output_dir>/checkpoint-N`` (a rename within one file
   system is atomic), then fsyncs ``output_dir``. The other processes wait for the rename before going on;
2. leftover ``_tmp-checkpoint-*`` folders of a killed save are removed when a trainer starts, with a log line;
3. ``resume_from_checkpoint=True`` takes the newest *complete* checkpoint: the files a resume needs exist and open
   (safetensors headers cover their files, torch archives keep their zip directory, ``trainer_state.json`` parses),
   which also catches folders written by older versions or by hand. It logs which one and why it skipped others;
4. ``save_total_limit`` counts complete checkpoints only, never deletes the newest one, and runs after the rename.

The ``_tmp-`` prefix keeps staging folders out of everything that globs ``checkpoint-*`` (transformers' own
rotation, ``get_last_checkpoint``) and out of Hub uploads of ``output_dir`` (transformers ignores ``_*`` there).

``CrashSafeCheckpointsMixin`` gives a ``transformers.Trainer`` subclass all of this; list it before the Trainer base.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import zipfile
from collections.abc import Iterable
from contextlib import contextmanager

from safetensors import SafetensorError, safe_open
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

__all__ = [
    "STAGING_PREFIX",
    "CrashSafeCheckpointsMixin",
    "check_resumable",
    "checkpoint_problems",
    "find_resumable_checkpoint",
    "list_checkpoints",
    "publish_checkpoint",
    "remove_stale_staging",
    "rotate_checkpoints",
]

logger = logging.getLogger(__name__)

STAGING_PREFIX = f"_tmp-{PREFIX_CHECKPOINT_DIR}-"
CHECKPOINT_PATTERN = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")
TRAINER_STATE_NAME = "trainer_state.json"
WEIGHTS_NAME = "model.safetensors"
WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
OPTIMIZER_NAME = "optimizer.pt"
SCHEDULER_NAME = "scheduler.pt"


# ---------------------------------------------------------------------------------------------- completeness checks
def _safetensors_problem(path: str) -> str | None:
    # safe_open parses the header and checks that the tensors it lists cover the file exactly, so a file cut short
    # anywhere fails here without reading the tensors.
    try:
        with safe_open(path, framework="pt"):
            return None
    except (SafetensorError, OSError, ValueError) as error:
        return f"{os.path.basename(path)} is truncated or corrupt ({error})"


def _torch_archive_problem(path: str) -> str | None:
    # torch.save writes a zip archive whose directory sits at the end of the file: a file cut short loses it.
    try:
        with zipfile.ZipFile(path):
            return None
    except (zipfile.BadZipFile, OSError) as error:
        return f"{os.path.basename(path)} is truncated or corrupt ({error})"


def _weights_problem(checkpoint_dir: str) -> str | None:
    for name in (WEIGHTS_NAME, ADAPTER_WEIGHTS_NAME):
        path = os.path.join(checkpoint_dir, name)
        if os.path.isfile(path):
            return _safetensors_problem(path)
    index_path = os.path.join(checkpoint_dir, WEIGHTS_INDEX_NAME)
    if os.path.isfile(index_path):
        try:
            with open(index_path, encoding="utf-8") as f:
                shards = sorted(set(json.load(f)["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError) as error:
            return f"{WEIGHTS_INDEX_NAME} is truncated or corrupt ({error})"
        for shard in shards:
            shard_path = os.path.join(checkpoint_dir, shard)
            problem = _safetensors_problem(shard_path) if os.path.isfile(shard_path) else f"{shard} is missing"
            if problem:
                return problem
        return None
    return f"no model weights ({WEIGHTS_NAME}, {WEIGHTS_INDEX_NAME} or {ADAPTER_WEIGHTS_NAME})"


def _trainer_state_problem(checkpoint_dir: str) -> str | None:
    path = os.path.join(checkpoint_dir, TRAINER_STATE_NAME)
    if not os.path.isfile(path):
        return f"{TRAINER_STATE_NAME} is missing"
    try:
        with open(path, encoding="utf-8") as f:
            state = json.load(f)
        int(state["global_step"])
    except (OSError, ValueError, KeyError, TypeError) as error:
        return f"{TRAINER_STATE_NAME} is truncated or corrupt ({error!r})"
    return None


def checkpoint_problems(
    checkpoint_dir: str,
    *,
    model_weights: bool = True,
    training_state: bool = True,
    extra_files: Iterable[str] = (),
) -> list[str]:
    """Why ``checkpoint_dir`` cannot be resumed from; empty when it can.

    Checked: ``trainer_state.json`` parses; with ``model_weights`` the policy/model weights (``model.safetensors``,
    a sharded index and its shards, or a LoRA ``adapter_model.safetensors``); with ``training_state`` the
    ``optimizer.pt``, ``scheduler.pt`` and an ``rng_state*.pth``; every name in ``extra_files`` (safetensors or torch
    archives). Each file must exist and open: safetensors headers must cover their file, torch archives must keep
    their zip directory. Tensors are not read, so the check costs a few small reads per file.
    """
    if not os.path.isdir(checkpoint_dir):
        return [f"{checkpoint_dir} is not a directory"]
    problems = [_trainer_state_problem(checkpoint_dir)]
    if model_weights:
        problems.append(_weights_problem(checkpoint_dir))
    names = list(extra_files)
    if training_state:
        names += [OPTIMIZER_NAME, SCHEDULER_NAME]
        rng_files = sorted(f for f in os.listdir(checkpoint_dir) if re.fullmatch(r"rng_state(_\d+)?\.pth", f))
        names += rng_files[:1] if rng_files else ["rng_state.pth"]
    for name in names:
        path = os.path.join(checkpoint_dir, name)
        if not os.path.isfile(path):
            problems.append(f"{name} is missing")
        elif name.endswith(".metadata"):
            # torch.distributed.checkpoint writes its .metadata last, once every rank's shards are written.
            problems.append(None if os.path.getsize(path) else f"{name} is empty")
        elif name.endswith(".safetensors"):
            problems.append(_safetensors_problem(path))
        else:
            problems.append(_torch_archive_problem(path))
    return [problem for problem in problems if problem]


def list_checkpoints(output_dir: str) -> list[tuple[int, str]]:
    """``(step, path)`` of every ``checkpoint-N`` folder in ``output_dir``, oldest step first."""
    if not os.path.isdir(output_dir):
        return []
    found = []
    for name in os.listdir(output_dir):
        match = CHECKPOINT_PATTERN.match(name)
        path = os.path.join(output_dir, name)
        if match and os.path.isdir(path):
            found.append((int(match.group(1)), path))
    return sorted(found)


def find_resumable_checkpoint(output_dir: str, log: bool = True, **requirements) -> str:
    """The newest complete ``checkpoint-N`` in ``output_dir`` (``requirements`` as in :func:`checkpoint_problems`).

    Logs (with ``log``) which checkpoint it takes and, as a warning, every newer one it skipped and why. Raises
    ``ValueError`` when no checkpoint is complete.
    """
    skipped = []
    for _, path in reversed(list_checkpoints(output_dir)):
        problems = checkpoint_problems(path, **requirements)
        if not problems:
            if skipped and log:
                logger.warning(
                    "Resuming from %s, the newest complete checkpoint; skipped %s",
                    path,
                    "; ".join(f"{os.path.basename(p)} ({', '.join(why)})" for p, why in skipped),
                )
            elif log:
                # WARNING, not INFO: the default level hides INFO, and a user must see which checkpoint was taken.
                logger.warning("Resuming from %s.", path)
            return path
        skipped.append((path, problems))
    if not skipped:
        raise ValueError(
            f"resume_from_checkpoint=True but {output_dir} holds no {PREFIX_CHECKPOINT_DIR}-* folder; start without "
            f"resume_from_checkpoint or pass the path of a checkpoint."
        )
    details = "; ".join(f"{os.path.basename(p)}: {', '.join(why)}" for p, why in skipped)
    raise ValueError(
        f"resume_from_checkpoint=True but no checkpoint in {output_dir} is complete ({details}). Start without "
        f"resume_from_checkpoint, or pass the path of a complete checkpoint."
    )


def check_resumable(checkpoint_dir: str, **requirements) -> str:
    """``checkpoint_dir`` if it is complete, else a ``ValueError`` that names what is missing or broken."""
    if not os.path.isdir(checkpoint_dir):
        raise ValueError(f"Cannot resume from {checkpoint_dir}: it is not a directory.")
    problems = checkpoint_problems(checkpoint_dir, **requirements)
    if problems:
        raise ValueError(
            f"Cannot resume from {checkpoint_dir}: {'; '.join(problems)}. It was probably written by a run killed "
            f"while saving: resume from an earlier checkpoint, or with resume_from_checkpoint=True, which takes the "
            f"newest complete one."
        )
    return checkpoint_dir


# ---------------------------------------------------------------------------------------------- writing and removing
def _fsync_tree(path: str) -> None:
    """Flush every file under ``path`` and the folders themselves to disk, so that the rename that follows can
    never publish a folder whose contents a power cut would lose (a plain SIGKILL leaves the page cache intact)."""
    for root, _, files in os.walk(path):
        for name in files:
            _fsync(os.path.join(root, name))
        _fsync_dir(root)


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: str) -> None:
    if os.name == "posix":  # folders cannot be opened for fsync on Windows, where renames are journaled anyway
        _fsync(path)


def _remove(path: str) -> None:
    """Delete a folder so that no half-deleted ``checkpoint-N`` is ever visible: rename it to a staging name
    (atomic), then delete that. A crash in between leaves a ``_tmp-`` folder, removed at the next start."""
    doomed = _move_aside(path)
    shutil.rmtree(doomed, ignore_errors=True)


def _move_aside(path: str) -> str:
    """Rename ``path`` to ``_tmp-<name>.deleted`` beside it (a name the next start cleans up); returns the new path."""
    doomed = os.path.join(os.path.dirname(path), f"_tmp-{os.path.basename(path)}.deleted")
    shutil.rmtree(doomed, ignore_errors=True)
    os.rename(path, doomed)
    return doomed


def publish_checkpoint(staged_dir: str, final_dir: str) -> None:
    """Flush ``staged_dir`` and rename it to ``final_dir`` (replacing an existing folder of that name)."""
    _fsync_tree(staged_dir)
    replaced = None
    if os.path.exists(final_dir):
        # A folder of this step exists when a run resumed from an earlier step, or one from an older version was
        # left incomplete. rename() cannot replace a non-empty folder: move the old one aside (atomic), publish the
        # new one, and only then delete the old one, so that checkpoint-N is missing for two renames at most.
        replaced = _move_aside(final_dir)
    os.rename(staged_dir, final_dir)
    _fsync_dir(os.path.dirname(final_dir))
    if replaced is not None:
        shutil.rmtree(replaced, ignore_errors=True)


def remove_stale_staging(output_dir: str) -> list[str]:
    """Delete the ``_tmp-checkpoint-*`` folders a killed save left in ``output_dir``; returns their paths."""
    if not os.path.isdir(output_dir):
        return []
    removed = []
    for name in sorted(os.listdir(output_dir)):
        path = os.path.join(output_dir, name)
        if name.startswith(STAGING_PREFIX) and os.path.isdir(path):
            shutil.rmtree(path, ignore_errors=True)
            logger.warning("Removed %s, left by a checkpoint save that was interrupted.", path)
            removed.append(path)
    return removed


def rotate_checkpoints(output_dir: str, save_total_limit: int | None, keep: Iterable[str], **requirements) -> None:
    """Delete the oldest complete checkpoints until ``save_total_limit`` complete ones remain, never one in ``keep``
    (the one just written, the best one). Incomplete folders are neither counted nor deleted."""
    if not save_total_limit or save_total_limit <= 0:
        return
    keep = {os.path.abspath(path) for path in keep if path}
    complete = [path for _, path in list_checkpoints(output_dir) if not checkpoint_problems(path, **requirements)]
    excess = len(complete) - max(save_total_limit, len(keep))
    for path in complete:
        if excess <= 0:
            break
        if os.path.abspath(path) not in keep:
            logger.info("Deleting older checkpoint %s (save_total_limit=%d).", path, save_total_limit)
            _remove(path)
            excess -= 1


# ---------------------------------------------------------------------------------------------- the trainer side
class CrashSafeCheckpointsMixin:
    """Atomic checkpoints, resume from the newest complete one, safe rotation, for a ``transformers.Trainer``
    subclass (``class MyTrainer(CrashSafeCheckpointsMixin, Trainer)``).

    The Trainer's own ``_save_checkpoint`` runs unchanged, with its output folder redirected to the staging folder
    (``_get_output_dir``); subclasses add files through ``_save_checkpoint_extras`` and name the files their resume
    needs in ``checkpoint_extra_files``. The subclass's ``__init__`` calls ``_remove_stale_checkpoint_staging()``.
    """

    checkpoint_extra_files: tuple[str, ...] = ()
    _checkpoint_staging_dir: str | None = None

    def _checkpoint_requirements(self) -> dict:
        """What a checkpoint of this trainer must hold to be resumed from (see :func:`checkpoint_problems`)."""
        # DeepSpeed and FSDP keep weights and optimizer in their own sharded layouts (global_step*/, *_fsdp_*);
        # their folders are still published atomically, only the per-file check is limited to the trainer state.
        sharded = self.is_deepspeed_enabled or self.is_fsdp_enabled
        return {
            "model_weights": not sharded,
            "training_state": not sharded and not self.args.save_only_model,
            "extra_files": self.checkpoint_extra_files,
        }

    def _remove_stale_checkpoint_staging(self) -> None:
        if self.args.should_save:
            remove_stale_staging(self.args.output_dir)

    def _resolve_resume_checkpoint(self, resume_from_checkpoint: str | bool) -> str:
        """``True``: the newest complete checkpoint in ``output_dir``; a path: that checkpoint, if complete."""
        requirements = self._checkpoint_requirements()
        if resume_from_checkpoint is True:
            # Every process looks (they all load the checkpoint); the main one says what it found.
            return find_resumable_checkpoint(
                self.args.output_dir, log=self.accelerator.is_main_process, **requirements
            )
        path = check_resumable(str(resume_from_checkpoint), **requirements)
        if self.accelerator.is_main_process:
            logger.warning("Resuming from %s.", path)  # at WARNING, as above: visible at the default level
        return path

    def _save_checkpoint_extras(self, checkpoint_dir: str) -> None:
        """Write files of the subclass's own into the staged ``checkpoint_dir`` (every process calls it)."""

    def _get_output_dir(self, trial) -> str:
        # Trainer._save_checkpoint writes to os.path.join(self._get_output_dir(trial), "checkpoint-N"): pointing it
        # at the staging folder is the one hook needed to keep its logic (and future changes to it) as they are.
        if self._checkpoint_staging_dir is not None:
            return self._checkpoint_staging_dir
        return super()._get_output_dir(trial)

    def _push_from_checkpoint(self, checkpoint_folder: str) -> None:
        # Trainer._save_checkpoint calls this with the staged folder, which is about to be renamed (and PPO's value
        # model and card copy are not in it yet): skip that call and push the published folder once, after the
        # rename. Subclasses customise the upload in _push_published_checkpoint, so that this guard stays first.
        if self._checkpoint_staging_dir is None:
            self._push_published_checkpoint(checkpoint_folder)

    def _push_published_checkpoint(self, checkpoint_folder: str) -> None:
        """Upload the published ``checkpoint_folder`` to the Hub (default: ``Trainer``'s own push)."""
        super()._push_from_checkpoint(checkpoint_folder)

    @contextmanager
    def _staging(self, staging_dir: str):
        self._checkpoint_staging_dir = staging_dir
        try:
            yield
        finally:
            self._checkpoint_staging_dir = None

    def _save_checkpoint(self, model, trial) -> None:
        run_dir = self._get_output_dir(trial)
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        staging_dir = os.path.join(run_dir, f"{STAGING_PREFIX}{self.state.global_step}")
        staged, final = os.path.join(staging_dir, name), os.path.join(run_dir, name)
        writer = self.args.should_save
        if writer:
            shutil.rmtree(staging_dir, ignore_errors=True)
        self.accelerator.wait_for_everyone()  # nobody writes into the staging folder before it is fresh
        try:
            with self._staging(staging_dir):
                super()._save_checkpoint(model, trial)
            self._save_checkpoint_extras(staged)
            best = self.state.best_model_checkpoint
            if best and best.startswith(staged):
                # Trainer recorded the best checkpoint under its staging path: record where it will live, on every
                # process (each loads the best model at the end), in the state file on the writer only.
                self.state.best_model_checkpoint = final + best[len(staged) :]
                if writer:
                    self.state.save_to_json(os.path.join(staged, TRAINER_STATE_NAME))
            self.accelerator.wait_for_everyone()  # every process has written its files (e.g. rng_state_<rank>.pth)
            if writer:
                publish_checkpoint(staged, final)
                shutil.rmtree(staging_dir, ignore_errors=True)
        except BaseException:
            if writer:  # a failed save (disk full, Ctrl-C) leaves no half-written folder behind
                shutil.rmtree(staging_dir, ignore_errors=True)
            raise
        if writer:
            requirements = self._checkpoint_requirements()
            rotate_checkpoints(
                run_dir, self.args.save_total_limit, keep=(final, self.state.best_model_checkpoint), **requirements
            )
            if self.args.push_to_hub:
                self._push_published_checkpoint(final)
        self.accelerator.wait_for_everyone()  # nobody goes on before checkpoint-N exists
