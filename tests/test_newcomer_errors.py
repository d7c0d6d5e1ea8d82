"""A newcomer's mistakes: each ends in one `error: ...` line that names the input, the problem and the fix, a non-zero
exit, no traceback and nothing new on disk; the consoles of the demo and of `musicrl-app add-rater` carry no warning.

One subprocess run per mistake class (the way a user meets it); the other mistakes of a class run in-process through
the same `main()`, which costs no interpreter start. The shared prompt loader and model-folder check, the resume line
and CLAP_SCORE's tensor input are tested directly.
"""

import importlib.util
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from musicrl_trl.loading import ModelLoadingError, check_model_folder, is_local_path, load_prompts
from musicrl_trl.testing import save_tiny_musicgen

REPO = Path(__file__).resolve().parents[1]
PPO = REPO / "examples" / "ppo_musicrl.py"


def run(args, cwd) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_HOME": str(Path(cwd) / "hf-home"),
        "CUDA_VISIBLE_DEVICES": "",
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    }
    env.pop("TRL_EXPERIMENTAL_SILENCE", None)  # the warnings a user would see
    return subprocess.run(
        [sys.executable, *map(str, args)], cwd=cwd, env=env, capture_output=True, text=True, timeout=600,
        stdin=subprocess.DEVNULL,
    )  # fmt: skip


def assert_one_error_line(stderr: str, expected: str) -> None:
    error_lines = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1 and "Traceback" not in stderr, stderr[-3000:]
    assert expected in error_lines[0], error_lines[0]


def mistakes_folder(tmp_path: Path) -> Path:
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "blank.txt").write_text("\n  \n\n")
    (tmp_path / "gap.txt").write_text("calm piano\n\nloud drums\n")
    (tmp_path / "broken.yaml").write_text("reward_models: [\n")
    (tmp_path / "unknown.yaml").write_text("reward_models:\n  - class: NoSuchReward\n")
    (tmp_path / "a-folder").mkdir()
    (tmp_path / "outputs").mkdir()
    return tmp_path


# One subprocess per class: a recipe file, a prompts file, a number out of range, flags that exclude each other, a
# missing relative model path (the README's own path style, under an existing folder: never looked up on the Hub).
SUBPROCESS_MISTAKES = {
    "recipe": (["--recipe", "missing.yaml"], "error: --recipe: the file 'missing.yaml' does not exist"),
    "prompts": (["--dataset_name", "blank.txt"], "error: --dataset_name: no prompts in 'blank.txt'"),
    "number": (["--total_episodes", "-5"], "error: total_episodes must be >= 1"),
    "flags": (["--load_in_4bit"], "error: --load_in_4bit freezes the policy's weights in 4 bits"),
    "model path": (
        ["--model_name_or_path", "outputs/does-not-exist"],
        "policy: the local path 'outputs/does-not-exist' does not exist",
    ),
}


@pytest.mark.parametrize("mistake", list(SUBPROCESS_MISTAKES))
def test_each_mistake_class_is_one_error_line_and_leaves_nothing(tmp_path, mistake):
    flags, expected = SUBPROCESS_MISTAKES[mistake]
    cwd = mistakes_folder(tmp_path)
    before = sorted(path.name for path in cwd.iterdir())
    result = run([PPO, *flags, "--output_dir", "run"], cwd)
    assert result.returncode != 0
    assert_one_error_line(result.stderr, expected)
    assert sorted(path.name for path in cwd.iterdir() if path.name != "hf-home") == before


def load_example(name: str):
    spec = importlib.util.spec_from_file_location(f"example_{name}", REPO / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


# The other mistakes of each class, through the same main() in-process.
IN_PROCESS_MISTAKES = [
    (["--recipe", "a-folder"], "--recipe: 'a-folder' is a folder; pass a recipe YAML file"),
    (["--recipe", "broken.yaml"], "--recipe: 'broken.yaml' is not valid YAML ("),
    (["--recipe", "unknown.yaml"], "every reward_models entry needs `class:` one of"),
    (["--dataset_name", "empty.txt"], "--dataset_name: no prompts in 'empty.txt': the file is empty or blank"),
    (["--dataset_name", "gap.txt"], "--dataset_name: line 2 of 'gap.txt' is blank"),
    (["--per_device_train_batch_size", "0"], "per_device_train_batch_size=0: it must be an integer >= 1"),
    (["--learning_rate", "-1"], "learning_rate must be a finite number > 0"),
    (["--audio_duration_s", "0"], "audio_duration_s must be > 0 seconds"),
    (["--fp16"], "fp16 mixed precision needs a GPU"),
    (["--model_name_or_path", "./nowhere"], "policy: the local path './nowhere' does not exist"),
]


def test_other_mistakes_of_each_class_are_one_error_line_and_leave_nothing(tmp_path, monkeypatch, capsys):
    if torch.cuda.is_available():
        pytest.skip("--fp16 is refused only without a GPU")
    example = load_example("ppo_musicrl")
    monkeypatch.chdir(mistakes_folder(tmp_path))
    before = sorted(path.name for path in tmp_path.iterdir())
    for flags, expected in IN_PROCESS_MISTAKES:
        monkeypatch.setattr(sys, "argv", ["ppo_musicrl.py", *flags, "--output_dir", "run"])
        with pytest.raises(SystemExit) as exit_info:
            example.main()
        message = str(exit_info.value.code)
        assert message.startswith("error: ") and expected in message, (flags, message)
        assert sorted(path.name for path in tmp_path.iterdir()) == before, flags
    capsys.readouterr()


def test_app_commands_that_read_a_database_refuse_a_missing_one(tmp_path):
    from musicrl_trl.app import cli

    result = run(["-m", "musicrl_trl.app", "report", "--db", "votse.sqlite", "--out", "report"], tmp_path)
    assert result.returncode == 2
    assert_one_error_line(result.stderr, "error: musicrl-app report: --db: the database 'votse.sqlite' does not exist")
    (tmp_path / "pool").mkdir()
    assert cli.main(["export", "--db", str(tmp_path / "nope.sqlite"), "--pool", str(tmp_path / "pool"),
                     "--out", str(tmp_path / "prefs")]) == 2  # fmt: skip
    assert sorted(path.name for path in tmp_path.iterdir() if path.name != "hf-home") == ["pool"]


def warning_lines(stderr: str) -> list[str]:
    """stderr without progress bars and blank lines: what is left is a message to the user."""
    lines = [part.strip() for line in stderr.splitlines() for part in line.split("\r")]
    return [line for line in lines if line and "it/s" not in line and "s/it" not in line and "?it" not in line]


def test_demo_and_add_rater_print_no_warnings(tmp_path):
    demo = run([PPO, "--total_episodes", "32", "--output_dir", "demo"], tmp_path)
    assert demo.returncode == 0, demo.stderr[-3000:]
    assert warning_lines(demo.stderr) == [], demo.stderr[-3000:]
    assert "{'" not in demo.stdout  # no raw metric dicts: those go to the progress bar and log_history.json
    rater = run(["-m", "musicrl_trl.app", "add-rater", "--db", "votes.sqlite", "ana"], tmp_path)
    assert rater.returncode == 0 and warning_lines(rater.stderr) == [], rater.stderr[-3000:]


def test_resume_says_which_checkpoint_at_the_default_log_level(tmp_path, caplog):
    from musicrl_trl.trainers.checkpointing import find_resumable_checkpoint

    for step in (1, 2):
        folder = tmp_path / f"checkpoint-{step}"
        folder.mkdir()
        (folder / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    # No caplog.set_level: the record must pass the level a plain run has (WARNING).
    assert logging.getLogger("musicrl_trl").getEffectiveLevel() <= logging.WARNING
    path = find_resumable_checkpoint(str(tmp_path), model_weights=False, training_state=False)
    assert path == str(tmp_path / "checkpoint-2")
    assert any(f"Resuming from {path}" in record.getMessage() for record in caplog.records)


def test_clap_score_takes_the_reward_convention(tmp_path, monkeypatch):
    import evaluate

    from musicrl_trl.metrics import CLAP_SCORE
    from musicrl_trl.testing import save_tiny_clap

    monkeypatch.setenv("HF_EVALUATE_OFFLINE", "1")
    clap_dir = save_tiny_clap(tmp_path / "clap")
    prompts = ["calm piano", "loud rock guitar"]
    audio = 0.1 * torch.randn(2, 2, 16_000, generator=torch.Generator().manual_seed(0))  # [B, C, N], stereo
    module = evaluate.load(CLAP_SCORE)
    mono = [clip.mean(dim=0).numpy() for clip in audio]
    expected = module.compute(prompts=prompts, audio=mono, sampling_rate=32_000, model_name_or_path=clap_dir)
    for batch in (audio, audio.mean(dim=1), list(audio)):  # [B, C, N], [B, N], a list of [C, N] clips
        result = module.compute(prompts=prompts, audio=batch, sampling_rate=32_000, model_name_or_path=clap_dir)
        assert result["scores"] == pytest.approx(expected["scores"], abs=1e-6)
    with pytest.raises(ValueError, match=r"expected a \[B, C, N\] or \[B, N\] batch"):
        module.compute(prompts=prompts[:1], audio=audio[0, 0], sampling_rate=32_000, model_name_or_path=clap_dir)


# ------------------------------------------------------------------------------------------- the shared loaders
def test_one_prompt_loader_refuses_empty_sources_and_names_the_line_or_row(tmp_path):
    from datasets import Dataset

    (tmp_path / "ok.txt").write_text("calm piano\n  loud drums \n\n\n")  # trailing blank lines are an editor's
    assert load_prompts(tmp_path / "ok.txt") == ["calm piano", "loud drums"]
    (tmp_path / "gap.txt").write_text("calm piano\n   \nloud drums\n")
    with pytest.raises(ValueError, match=r"--prompts: line 2 of .*gap.txt' is blank; write one prompt a line"):
        load_prompts(tmp_path / "gap.txt", what="--prompts")
    for content in ("", "\n \n"):
        (tmp_path / "none.txt").write_text(content)
        with pytest.raises(ValueError, match="no prompts in .* the file is empty or blank"):
            load_prompts(tmp_path / "none.txt")
    (tmp_path / "rows.jsonl").write_text('{"prompt": "a"}\n{"prompt": " "}\n')
    with pytest.raises(ValueError, match=r"row 1 of .*rows.jsonl' is empty"):
        load_prompts(tmp_path / "rows.jsonl")
    Dataset.from_dict({"prompt": ["a", " "]}).save_to_disk(str(tmp_path / "saved"))
    with pytest.raises(ValueError, match=r"row 1 of .*saved' is empty"):
        load_prompts(tmp_path / "saved")
    (tmp_path / "header-only.csv").write_text("prompt\n")
    with pytest.raises(ValueError, match="no prompts in"):
        load_prompts(tmp_path / "header-only.csv")
    with pytest.raises(ValueError, match=r"item 1 of the prompt list is empty"):
        load_prompts(["a", None])
    with pytest.raises(ValueError, match="there is no file or folder 'missing/prompts.txt'"):
        load_prompts("missing/prompts.txt")


def test_path_looking_names_are_local_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "outputs").mkdir()
    for name in ("outputs/run-1", "./run", "../run", ".hidden/run", "~/run", "a/b/c", "C:\\models\\run", "/abs"):
        assert is_local_path(name), name
    assert not is_local_path("facebook/musicgen-small")  # no folder 'facebook' here: a Hub id
    with pytest.raises(ModelLoadingError, match="policy: the local path 'outputs/run-1' does not exist"):
        check_model_folder("outputs/run-1", "policy")


def test_one_model_folder_check_by_role(tmp_path):
    tiny = save_tiny_musicgen(tmp_path / "tiny")
    assert check_model_folder(tiny, "policy") == str(tiny)
    no_processor = tmp_path / "no-processor"
    no_processor.mkdir()
    for name in ("config.json", "generation_config.json", "model.safetensors"):
        (no_processor / name).write_bytes((Path(tiny) / name).read_bytes())
    with pytest.raises(ModelLoadingError, match="policy: .* has no MusicGen processor"):
        check_model_folder(no_processor, "policy")
    assert check_model_folder(no_processor, "anchor") == str(no_processor)  # an anchor needs no processor
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "base_model_name_or_path": tiny}))
    with pytest.raises(ModelLoadingError, match="holds a LoRA adapter .* not a full MusicGen. Start from its merged"):
        check_model_folder(adapter, "policy")
    assert check_model_folder(adapter, "policy", adapters=True) == str(adapter)  # evaluation and app load it
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": str(tmp_path / "gone")}))
    with pytest.raises(ModelLoadingError, match="the base model of the adapter .* does not exist"):
        check_model_folder(adapter, "policy", adapters=True)
    (tmp_path / "half").mkdir()
    with pytest.raises(ModelLoadingError, match="reward: the folder .* holds no config.json"):
        check_model_folder(tmp_path / "half", "reward")
    with pytest.raises(ModelLoadingError, match="holds neither config.json nor adapter_config.json"):
        check_model_folder(tmp_path / "half", "policy", adapters=True)
