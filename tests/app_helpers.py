"""Shared by the listening-app tests: a pool of synthetic tones, and the app server run as a real subprocess."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import soundfile as sf

from musicrl_trl.app.client import ServerProcess

ROOT = Path(__file__).resolve().parents[1]
RATE = 16_000


def tone_pool(
    directory: Path,
    prompts: int = 5,
    clips_per_prompt: int = 4,
    seconds: float = 0.1,
    systems: tuple[str, ...] = ("sys",),
) -> Path:
    """A pool of sine tones: clip k of a prompt has level 0.1 * (k + 1) (louder = larger k) and system
    ``systems[k % len(systems)]``. Returns the pool folder."""
    (directory / "clips").mkdir(parents=True)
    time = np.arange(round(seconds * RATE)) / RATE
    lines = []
    for p in range(prompts):
        for k in range(clips_per_prompt):
            clip_id = f"p{p}-c{k}"
            level = 0.1 * (k + 1)
            sf.write(directory / "clips" / f"{clip_id}.wav", level * np.sin(2 * np.pi * 220 * (p + 1) * time), RATE)
            system = systems[k % len(systems)]
            lines.append(
                {"clip_id": clip_id, "prompt": f"prompt {p}", "file": f"clips/{clip_id}.wav", "system": system}
            )
    (directory / "pool.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    return directory


def subprocess_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.update(OMP_NUM_THREADS="1", TRL_EXPERIMENTAL_SILENCE="1", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    return env


class AppServer(ServerProcess):
    """The app server as a subprocess importing this checkout."""

    def __init__(self, pool: Path, db: Path, port: int = 0, mode: str = "collect"):
        super().__init__(pool, db, port=port, mode=mode, env=subprocess_env())
