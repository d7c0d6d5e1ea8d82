"""examples/evaluate_musicrl.py and examples/plot_runs.py run offline on tiny models as subprocesses."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from musicrl_trl.evaluation import plot_training_runs
from musicrl_trl.testing import save_tiny_clap, save_tiny_musicgen

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_EVALUATE_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}


def run(script, *args):
    command = [sys.executable, str(EXAMPLES / script), *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, timeout=600, env=ENV, stdin=subprocess.DEVNULL)


@pytest.mark.slow
def test_evaluate_example_compares_two_tiny_policies(tmp_path):
    policy_a = save_tiny_musicgen(tmp_path / "a", seed=1)
    policy_b = save_tiny_musicgen(tmp_path / "b", seed=0)
    clap = save_tiny_clap(tmp_path / "clap")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("bright shimmering bells\ndeep dark bass\nslow sad piano\n")
    output_dir = tmp_path / "eval"
    result = run(
        "evaluate_musicrl.py",
        "--policy_a", policy_a, "--policy_b", policy_b, "--prompts", prompts,
        "--reward", "loudness", "--reward", "silence", "--reward", f"adherence={clap}",
        "--num_samples_per_prompt", "2", "--response_length", "10", "--seed", "3",
        "--num_resamples", "500", "--output_dir", output_dir,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((output_dir / "results.json").read_text())
    assert results["policy_a"] == policy_a and results["policy_b"] == policy_b
    assert results["base_model"] == policy_b  # the KL reference defaults to policy B
    assert results["num_prompts"] == 3 and results["num_samples_per_prompt"] == 2 and results["seed"] == 3
    assert set(results["rewards"]) == {"loudness", "silence", "adherence"}
    for reward in results["rewards"].values():
        assert reward["wins"] + reward["ties"] + reward["losses"] == 3
        assert reward["ci95_a"][0] <= reward["mean_a"] <= reward["ci95_a"][1]
        assert 0 <= reward["wilcoxon_p"] <= 1
    assert results["kl_to_base"]["a"] > 0 and results["kl_to_base"]["b"] == 0
    assert len(results["diversity"]["a"]["entropy_per_codebook"]) == 4
    assert results["diversity"]["b"]["vendi_score"] >= 1
    table = (output_dir / "results.md").read_text()
    assert "| loudness |" in table and "KL to base" in table and "Vendi" in table
    assert table in result.stdout
    for plot in ("rewards.png", "reward_vs_kl.png"):
        assert (output_dir / plot).stat().st_size > 1000
    assert (output_dir / "audio" / "a_prompt0_sample0.wav").exists()


@pytest.mark.slow
def test_evaluate_example_rejects_bad_input_before_sampling(tmp_path):
    # Each kind of bad input is covered in tests/test_evaluation.py; here, how the script reports one: a message on
    # stderr that names the problem, a failing exit code, and nothing sampled or written.
    policy = save_tiny_musicgen(tmp_path / "a")
    two_codebooks = save_tiny_musicgen(tmp_path / "k2", num_codebooks=2)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("deep dark bass\n")
    result = run(
        "evaluate_musicrl.py", "--policy_a", policy, "--policy_b", two_codebooks, "--prompts", prompts,
        "--reward", "loudness", "--response_length", "10", "--output_dir", tmp_path / "eval",
    )  # fmt: skip
    assert result.returncode != 0
    assert "error: policy_b and policy_a differ in codebooks (2 vs 4)" in result.stderr, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert "1/1 prompts" not in result.stdout  # no progress line: nothing was sampled
    assert not (tmp_path / "eval").exists()


@pytest.mark.slow
def test_evaluate_example_reports_missing_and_broken_inputs_without_a_traceback(tmp_path):
    policy = save_tiny_musicgen(tmp_path / "a")
    empty_folder = tmp_path / "interrupted-save"
    empty_folder.mkdir()
    prompts = tmp_path / "prompts.lst"  # any text file holds one prompt a line, whatever its extension
    prompts.write_text("deep dark bass\n")
    cases = [
        (["--policy_a", tmp_path / "missing"], f"error: policy_a: the local path '{tmp_path / 'missing'}' does not"),
        (["--policy_a", empty_folder], "error: policy_a: the folder"),
        (["--policy_b", tmp_path / "gone"], "error: policy_b: the local path"),
        (["--prompts", tmp_path / "nope.txt"], f"error: --prompts: there is no file or folder '{tmp_path}/nope.txt'"),
    ]
    for override, message in cases:
        flags = {"--policy_a": policy, "--policy_b": policy, "--prompts": prompts}
        flags.update(dict(zip(override[::2], override[1::2])))
        args = [value for pair in flags.items() for value in pair]
        result = run("evaluate_musicrl.py", *args, "--reward", "loudness", "--response_length", "10",
                      "--output_dir", tmp_path / "eval")  # fmt: skip
        assert result.returncode == 1, (override, result.stderr[-2000:])
        assert message in result.stderr, (override, result.stderr[-2000:])
        assert "Traceback" not in result.stderr
        assert not (tmp_path / "eval").exists()


def test_plot_runs_draws_several_runs_on_one_figure(tmp_path):
    runs = []
    for name, slope in (("musicrl-r", 0.02), ("musicrl-u", 0.01)):
        history = [
            {"step": step, "objective/kl": 3.0 * step, "objective/scores": 0.5 + slope * step,
             "rewards/loudness/mean": 0.4 + slope * step}
            for step in range(1, 11)
        ]  # fmt: skip
        history.append({"step": 10, "eval/kl": 31.0, "eval/scores": 0.6})
        (tmp_path / name).mkdir()
        (tmp_path / name / "log_history.json").write_text(json.dumps(history))
        runs.append(tmp_path / name)
    output = tmp_path / "runs.png"
    result = run("plot_runs.py", *runs, "--output", output)
    assert result.returncode == 0, result.stderr[-3000:]
    assert output.stat().st_size > 5000
    with pytest.raises(ValueError, match="log_history.json"):
        plot_training_runs([str(tmp_path / "nothing")], str(tmp_path / "other.png"))


def test_evaluate_example_has_the_issue_flags_and_a_help():
    import importlib.util

    from transformers import HfArgumentParser

    spec = importlib.util.spec_from_file_location("evaluate_musicrl", EXAMPLES / "evaluate_musicrl.py")
    script = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = script  # dataclasses resolve the script's annotations through sys.modules
    spec.loader.exec_module(script)
    parser = HfArgumentParser((script.EvaluationArguments,))
    text = parser.format_help()  # renders every help string
    for flag in ("--policy_a", "--policy_b", "--base_model", "--prompts", "--reward", "--num_samples_per_prompt",
                 "--response_length", "--audio_duration_s", "--seed", "--output_dir"):  # fmt: skip
        assert flag in text
    (args,) = parser.parse_args_into_dataclasses(
        ["--policy_a", "a", "--policy_b", "b", "--prompts", "p.txt", "--reward", "loudness", "--reward", "quality=q"]
    )
    assert [spec for group in args.reward for spec in group] == ["loudness", "quality=q"]
