"""The example scripts as users run them: subprocess runs of ppo_musicrl.py and train_reward_model.py, offline.

Covers the offline R/U/RU walkthrough of the README (local reward models, `--reward_model` overrides), recipe
`training:` values with command-line overrides, `--save_steps` alone and `--resume_from_checkpoint`, `--use_peft`
without target modules, and the messages for bad model paths, corrupt weights, offline mode, an unknown Hub id and a
corrupt dataset row. The Hub is a small local HTTP server (the real huggingface_hub client talks to it).
"""

import json
import os
import shutil
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from musicrl_trl.testing import save_tiny_clap, save_tiny_musicgen

REPO = Path(__file__).resolve().parents[1]
PPO = REPO / "examples" / "ppo_musicrl.py"
TRAIN_RM = REPO / "examples" / "train_reward_model.py"
RECIPES = REPO / "examples" / "recipes"
SMALL = ["--per_device_train_batch_size", "4", "--learning_rate", "1e-3", "--report_to", "none"]


def run(args, cwd, **env_overrides) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_HOME": str(Path(cwd) / "hf-home"),  # an empty cache, whatever this machine has downloaded
        "CUDA_VISIBLE_DEVICES": "",
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
        **env_overrides,
    }
    command = [sys.executable, *map(str, args)]
    return subprocess.run(
        command, cwd=cwd, env=env, capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL
    )


def ok(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return result


def scores_by_step(output_dir: Path) -> dict[int, float]:
    history = json.loads((output_dir / "log_history.json").read_text())
    return {entry["step"]: entry["objective/scores"] for entry in history if "objective/scores" in entry}


def run_config(output_dir: Path) -> dict:
    return json.loads((output_dir / "run_config.json").read_text())


def test_offline_walkthrough_trains_reward_models_then_runs_r_u_ru(tmp_path):
    """The README's walkthrough with smaller settings: both reward models from train_reward_model.py's defaults
    (saved under outputs/), then the shipped R, U and RU recipes on the tiny policy with local reward models."""
    save_tiny_musicgen(tmp_path / "outputs" / "tiny-musicgen")
    save_tiny_clap(tmp_path / "outputs" / "tiny-clap")
    tiny = ["--num_synthetic", "32", "--num_train_epochs", "1", "--report_to", "none"]
    for mode in ("regression", "pairwise"):
        result = ok(run([TRAIN_RM, "--mode", mode, *tiny], tmp_path))
        saved = tmp_path / "outputs" / f"reward-model-{mode}"
        assert f"saved the reward model to {saved}" in result.stdout
        assert (saved / "model.safetensors").exists() and not (tmp_path / "trainer_output").exists()

    clip = ["--audio_duration_s", "0.2", "--total_episodes", "8", *SMALL]
    ok(run([PPO, "--recipe", RECIPES / "musicrl_r.yaml", "--model_name_or_path", "outputs/tiny-musicgen",
            "--reward_model", "text_adherence=outputs/tiny-clap", "quality=outputs/reward-model-regression",
            *clip, "--output_dir", "outputs/r"], tmp_path))  # fmt: skip
    ok(run([PPO, "--recipe", RECIPES / "musicrl_u.yaml", "--model_name_or_path", "outputs/tiny-musicgen",
            "--reward_model", "preference=outputs/reward-model-pairwise", *clip, "--output_dir", "outputs/u"],
           tmp_path))  # fmt: skip
    # RU starts from the R policy; its recipe anchors the policy to its own starting checkpoint, so the anchor moves
    # with --model_name_or_path (the recipe's musicrl-r-musicgen-small is never looked for).
    ok(run([PPO, "--recipe", RECIPES / "musicrl_ru.yaml", "--model_name_or_path", "outputs/r",
            "--reward_model", "preference=outputs/reward-model-pairwise", *clip, "--output_dir", "outputs/ru"],
           tmp_path))  # fmt: skip

    # R logs each reward; U and RU standardise their one reward ("running"), logged as the combination.
    for name, rewards in {"r": ["text_adherence", "quality"], "u": ["combined"], "ru": ["combined"]}.items():
        output_dir = tmp_path / "outputs" / name
        history = json.loads((output_dir / "log_history.json").read_text())
        assert [entry["step"] for entry in history if "objective/scores" in entry] == [1, 2]
        for reward in rewards:
            assert np.isfinite(history[0][f"rewards/{reward}/mean"])
        training = run_config(output_dir)["training"]
        assert training["audio_duration_s"] == 0.2  # the flag, not the recipe's 30 s / 20 s
        assert training["temperature"] == 0.99 and training["kl_estimator"] == "full"  # the recipe's
    # The RU policy starts at its anchor: the first update's KL is zero.
    ru_history = json.loads((tmp_path / "outputs" / "ru" / "log_history.json").read_text())
    assert ru_history[0]["objective/kl"] == pytest.approx(0.0, abs=1e-6)


LOUDNESS_RECIPE = """\
name: loudness_test
reward_models:
  - name: loudness
    class: LoudnessReward
    kwargs: {floor_db: -25.0, ceiling_db: -15.0}
training:
  temperature: 0.5
  kl_coef: 0.01
  response_length: 8
"""


def test_recipe_training_values_flag_overrides_save_steps_and_resume(tmp_path):
    recipe = tmp_path / "loudness.yaml"
    recipe.write_text(LOUDNESS_RECIPE)
    flags = ["--recipe", recipe, "--kl_coef", "0.02", "--save_steps", "2", "--total_episodes", "16", *SMALL]
    ok(run([PPO, *flags, "--output_dir", "full"], tmp_path))
    full = tmp_path / "full"
    training = run_config(full)["training"]
    assert training["temperature"] == 0.5  # from the recipe's training: block
    assert training["response_length"] == 8
    assert training["kl_coef"] == 0.02  # the flag wins over the recipe's 0.01
    assert training["save_strategy"] == "steps"  # implied by --save_steps
    assert (full / "checkpoint-2").is_dir() and (full / "checkpoint-4").is_dir()

    # An interrupted run: only checkpoint-2 survived. `true` resumes from the latest checkpoint in --output_dir.
    shutil.copytree(full / "checkpoint-2", tmp_path / "resumed" / "checkpoint-2")
    ok(run([PPO, *flags, "--output_dir", "resumed", "--resume_from_checkpoint", "true"], tmp_path))
    uninterrupted, resumed = scores_by_step(full), scores_by_step(tmp_path / "resumed")
    assert sorted(uninterrupted) == sorted(resumed) == [1, 2, 3, 4]
    assert [resumed[step] for step in (3, 4)] == pytest.approx([uninterrupted[step] for step in (3, 4)], abs=1e-6)


def test_use_peft_without_target_modules_targets_decoder_projections_and_resumes(tmp_path):
    """LoRA on the policy and on the value network by default; a LoRA run resumes to the same later update."""
    flags = ["--use_peft", "--total_episodes", "8", "--response_length", "8", "--save_steps", "1", *SMALL]
    result = ok(run([PPO, *flags, "--output_dir", "lora"], tmp_path))
    adapter = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    expected = {"q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"}
    assert set(adapter["target_modules"]) == expected
    assert set(run_config(tmp_path / "lora")["model"]["lora_target_modules"]) == expected
    assert "mean reward, last" in result.stdout

    shutil.copytree(tmp_path / "lora" / "checkpoint-1", tmp_path / "resumed" / "checkpoint-1")
    ok(run([PPO, *flags, "--output_dir", "resumed", "--resume_from_checkpoint", "resumed/checkpoint-1"], tmp_path))
    last = {}
    for name in ("lora", "resumed"):
        history = json.loads((tmp_path / name / "log_history.json").read_text())
        last[name] = next(entry for entry in history if entry.get("step") == 2 and "objective/scores" in entry)
    for key in ("objective/scores", "objective/kl", "loss/value_avg"):  # the value network's adapters came back too
        assert last["resumed"][key] == pytest.approx(last["lora"][key], abs=1e-6), key


class FakeHub(BaseHTTPRequestHandler):
    """Answers every model lookup like the Hub does for an id it does not know (404, X-Error-Code RepoNotFound)."""

    requests: list[str] = []

    def do_GET(self):  # noqa: N802 - http.server's naming
        FakeHub.requests.append(self.path)
        body = b'{"error": "Repository not found"}'
        self.send_response(404)
        self.send_header("X-Error-Code", "RepoNotFound")
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_HEAD = do_GET  # noqa: N815

    def log_message(self, *args):
        pass


@pytest.fixture
def fake_hub():
    FakeHub.requests = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeHub)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_bad_models_are_all_reported_before_anything_loads(tmp_path, fake_hub):
    corrupt = tmp_path / "corrupt-anchor"
    save_tiny_musicgen(corrupt)
    weights = corrupt / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # an interrupted copy
    result = run(
        [PPO, "--recipe", RECIPES / "musicrl_r.yaml", "--model_name_or_path", "./missing-policy",
         "--ref_model", corrupt, "--reward_model", "text_adherence=nobody/no-such-clap", "quality=my/mos-model",
         "--output_dir", "out"],
        tmp_path, HF_HUB_OFFLINE="0", HF_ENDPOINT=fake_hub, HF_HUB_DISABLE_XET="1",
    )  # fmt: skip
    assert result.returncode != 0
    message = result.stderr
    assert "Traceback" not in message
    assert "4 model(s) of musicrl_r cannot be loaded (nothing was loaded yet)" in message
    assert "policy: the local path './missing-policy' does not exist" in message
    assert f"KL anchor: the weights file {weights} is corrupt or truncated" in message
    assert "Re-download it" in message and "re-save the model with `save_pretrained`" in message
    assert f"there is no local folder 'nobody/no-such-clap' (working directory: {tmp_path}) and the Hub at" in message
    assert "has no model 'nobody/no-such-clap'" in message
    assert "quality reward (model): there is no local folder 'my/mos-model'" in message
    made_by = "The recipe makes its own model for this ('ast-music-mos') with: `python examples/train_reward_model.py"
    assert made_by in message
    # One metadata request per Hub id, no retries (the client also asks other endpoints, e.g. /api/agent-harnesses).
    model_requests = sorted(path for path in FakeHub.requests if path.startswith("/api/models/"))
    assert model_requests == ["/api/models/my/mos-model", "/api/models/nobody/no-such-clap"]
    assert not (tmp_path / "out").exists()


def test_shipped_recipe_offline_says_what_to_unset_or_make(tmp_path):
    result = run([PPO, "--recipe", RECIPES / "musicrl_u.yaml"], tmp_path)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "policy: 'facebook/musicgen-small' is neither a local folder" in result.stderr
    assert "HF_HUB_OFFLINE=1 forbids downloading it. Unset HF_HUB_OFFLINE" in result.stderr
    assert "preference reward (model): 'musicgen-small-token-rm'" in result.stderr
    assert (
        "The recipe makes it with: `python examples/train_reward_model.py --dataset_name path/to/code_pairs "
        "--model_name_or_path facebook/musicgen-small --output_dir musicgen-small-token-rm`"
    ) in result.stderr


def test_corrupt_row_is_reported_with_its_row_in_the_users_file(tmp_path):
    (tmp_path / "audio").mkdir()
    rows = []
    for index in range(8):
        for side in ("a", "b"):
            if (index, side) != (5, "b"):
                sf.write(tmp_path / "audio" / f"{index}_{side}.wav", 0.1 * np.ones(1600, np.float32), 16_000)
        rows.append({"prompt": "calm piano", "chosen": f"audio/{index}_a.wav", "rejected": f"audio/{index}_b.wav"})
    (tmp_path / "votes.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    result = run([TRAIN_RM, "--dataset_name", "votes.jsonl", "--test_size", "0.25", "--report_to", "none"], tmp_path)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "Row 5 of the dataset (in the " in result.stderr
    assert "column 'rejected': file not found: audio/5_b.wav" in result.stderr


def test_demo_defaults_yield_to_the_recipe_a_config_file_and_equals_flags(tmp_path):
    """No policy anywhere (the tiny demo): the demo's batch, length, episodes and learning rate apply only to fields
    that no flag (also `--flag=value` and abbreviations), `--config` file or recipe sets; `save_steps` from a recipe
    implies `save_strategy: steps`; a .txt file gives one prompt a line; run_config.json holds the final settings."""
    recipe = tmp_path / "short.yaml"
    recipe.write_text(
        LOUDNESS_RECIPE + "  total_episodes: 8\n  per_device_train_batch_size: 4\n  save_steps: 1\n"
    )
    (tmp_path / "config.yaml").write_text("kl_coef: 0.03\n")
    (tmp_path / "prompts.txt").write_text("calm piano\nloud drums\nsoft strings\n")
    flags = ["--rec", recipe, "--config", "config.yaml", "--learning_rate=1e-3", "--dataset_name", "prompts.txt"]
    result = ok(run([PPO, *flags, "--report_to", "none", "--output_dir", "out"], tmp_path))
    training = run_config(tmp_path / "out")["training"]
    assert (training["total_episodes"], training["per_device_train_batch_size"]) == (8, 4)  # the recipe's
    assert training["response_length"] == 8 and training["temperature"] == 0.5  # the recipe's, not the demo's 20
    assert training["learning_rate"] == 1e-3  # the flag's, not the demo's 5e-4
    assert training["kl_coef"] == 0.03  # the config file's, above the recipe's 0.01
    assert training["save_strategy"] == "steps" and (tmp_path / "out" / "checkpoint-2").is_dir()
    assert training["reward_weights"] == [1.0]  # recorded after the recipe's rewards were built
    assert "2 updates" in result.stdout


def test_a_token_space_preference_model_replaces_the_recipes_with_its_own_tokenizer(tmp_path):
    """MusicRL-U's recipe names facebook/musicgen-small's tokenizer; a local token-space model saved with its own
    tokenizer runs offline with `--reward_model preference=PATH` alone."""
    from transformers import MusicgenForConditionalGeneration, MusicgenProcessor

    from musicrl_trl.reward_models.token_preference import MusicTokenPreferenceModel

    save_tiny_musicgen(tmp_path / "tiny-musicgen")
    token_rm = MusicTokenPreferenceModel.from_musicgen(
        MusicgenForConditionalGeneration.from_pretrained(tmp_path / "tiny-musicgen")
    )
    token_rm.save_pretrained(tmp_path / "token-rm")
    MusicgenProcessor.from_pretrained(tmp_path / "tiny-musicgen").tokenizer.save_pretrained(tmp_path / "token-rm")
    clip = ["--audio_duration_s", "0.2", "--total_episodes", "8", *SMALL]
    ok(run([PPO, "--recipe", RECIPES / "musicrl_u.yaml", "--model_name_or_path", "tiny-musicgen",
            "--reward_model", "preference=token-rm", *clip, "--output_dir", "u"], tmp_path))  # fmt: skip
    assert run_config(tmp_path / "u")["script"]["reward_model"] == ["preference=token-rm"]
    # NAME.KEY=PATH names the tokenizer explicitly; an unknown key is refused with the keys it takes.
    ok(run([PPO, "--recipe", RECIPES / "musicrl_u.yaml", "--model_name_or_path", "tiny-musicgen",
            "--reward_model", "preference=token-rm", "preference.tokenizer=tiny-musicgen", *clip,
            "--output_dir", "u2"], tmp_path))  # fmt: skip
    result = run([PPO, "--recipe", RECIPES / "musicrl_u.yaml", "--reward_model", "preference.window=3"], tmp_path)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "--reward_model preference.window=...: a reward's 'window' cannot be set here" in result.stderr


def test_bad_policy_folders_and_datasets_are_named_before_loading(tmp_path):
    save_tiny_musicgen(tmp_path / "tiny")
    (tmp_path / "no-processor").mkdir()
    for name in ("config.json", "generation_config.json", "model.safetensors"):
        shutil.copy(tmp_path / "tiny" / name, tmp_path / "no-processor" / name)
    adapter = tmp_path / "lora-run"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
    cases = {
        ("--model_name_or_path", "no-processor"): "policy: 'no-processor' has no MusicGen processor (no feature "
        "extractor (processor_config.json or preprocessor_config.json), no tokenizer",
        ("--model_name_or_path", "lora-run"): "policy: 'lora-run' holds a LoRA adapter (adapter_config.json), not a "
        "full MusicGen. Start from its merged weights ('lora-run/merged'",
        ("--dataset_name", "missing.jsonl"): "--dataset_name: there is no file or folder 'missing.jsonl' (working "
        f"directory: {tmp_path})",
        ("--dataset_name", "nobody/prompts"): "--dataset_name: could not read prompts from 'nobody/prompts'",
    }
    for flags, expected in cases.items():
        result = run([PPO, *flags, "--output_dir", "out"], tmp_path)
        assert result.returncode != 0 and "Traceback" not in result.stderr, (flags, result.stderr[-2000:])
        assert expected in result.stderr, (flags, result.stderr[-2000:])
    (tmp_path / "prompts.jsonl").write_text(json.dumps({"text": "calm piano"}) + "\n")
    result = run([PPO, "--dataset_name", "prompts.jsonl", "--output_dir", "out"], tmp_path)
    assert "--dataset_name: 'prompts.jsonl' has no 'prompt' column (columns: ['text'])" in result.stderr
    assert "--prompt_column" in result.stderr and not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "flags, expected",
    [
        (["--model_name_or_path", "./missing-rm"], "starting model (--model_name_or_path): the local path "
         "'./missing-rm' does not exist"),
        (["--model_name_or_path", "truncated"], "is corrupt or truncated"),
        (["--model_name_or_path", "nobody/no-such-clap"], "HF_HUB_OFFLINE=1 forbids downloading it"),
        (["--dataset_name", "missing.jsonl"], "--dataset_name: the local path 'missing.jsonl' does not exist"),
        (["--dataset_name", "nobody/votes"], "--dataset_name: 'nobody/votes' is not a local path"),
    ],
)  # fmt: skip
def test_train_reward_model_names_bad_models_and_datasets(tmp_path, flags, expected):
    save_tiny_clap(tmp_path / "truncated")
    weights = tmp_path / "truncated" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    result = run([TRAIN_RM, *flags, "--report_to", "none", "--output_dir", "out"], tmp_path)
    assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert expected in result.stderr, result.stderr[-2000:]
    assert not (tmp_path / "out" / "model.safetensors").exists()
