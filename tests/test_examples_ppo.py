"""examples/ppo_musicrl.py runs end to end under a real `accelerate launch`, offline, with small settings."""

import json
import os
import subprocess
import sys
from pathlib import Path

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "ppo_musicrl.py"


def test_ppo_example_runs_under_accelerate_launch(tmp_path):
    output_dir = tmp_path / "run"
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--cpu", str(EXAMPLE),
        "--total_episodes", "8", "--per_device_train_batch_size", "4", "--response_length", "8",
        "--learning_rate", "1e-3", "--output_dir", str(output_dir), "--report_to", "none",
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "mean reward, first" in result.stdout and "mean reward, last" in result.stdout
    assert str(output_dir) in result.stdout
    assert (output_dir / "model.safetensors").exists()
    assert (output_dir / "training_curves.png").exists()
    history = json.loads((output_dir / "log_history.json").read_text())
    assert [entry["step"] for entry in history if "objective/scores" in entry] == [1, 2]
    assert "rewards/loudness/mean" in history[0]
