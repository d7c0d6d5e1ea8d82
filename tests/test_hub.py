"""Publishing to the Hub and loading back, through the real huggingface_hub client and a local Hub server.

The server (tests/hub_server.py) runs in this process on 127.0.0.1; publishing and loading run in subprocesses
(tests/hub_roundtrip.py, examples/ppo_musicrl.py) whose HF_ENDPOINT, HF_HUB_DISABLE_XET, HF_HOME and HF_TOKEN are set
before huggingface_hub is imported. The licence, card and upload helpers are also tested alone, without a server.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import soundfile
import yaml
from hub_server import HubServer

from musicrl_trl import hub

ROOT = Path(__file__).resolve().parents[1]
ROUNDTRIP = ROOT / "tests" / "hub_roundtrip.py"
EXAMPLE = ROOT / "examples" / "ppo_musicrl.py"
TOKEN = "hf_MusicRLtestTOKEN4c1f9e2b7a"
BASE_REPO, MOS_REPO = "test-org/tiny-musicgen", "test-org/tiny-mos"
FULL_REPO, ADAPTER_REPO, BOTH_REPO, REWARD_REPO = (
    "test-org/full-policy",
    "test-org/lora-adapter",
    "test-org/lora-both",
    "test-org/mos-reward",
)
PICKLE_MAGIC = (b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05", b"PK\x03\x04")


# --------------------------------------------------------------------------------------------------------------------
# Licences, commands and file selection, without a server
# --------------------------------------------------------------------------------------------------------------------


def source(role, license_id, name="org/model"):
    return hub.LicenseSource(role, name, license_id, "test")


def test_most_restrictive_licence_wins_and_can_be_overridden():
    sources = [source("base model", "cc-by-nc-4.0"), source("reward 'a'", "apache-2.0"), source("reward 'b'", "mit")]
    resolution = hub.resolve_license(sources)
    assert resolution.license == "cc-by-nc-4.0"
    assert [s.role for s in resolution.non_commercial] == ["base model"]
    assert "base model" in resolution.explanation()
    assert hub.resolve_license(sources[1:]).license in ("apache-2.0", "mit")
    assert hub.resolve_license(sources + [source("reward 'c'", "cc-by-nc-sa-4.0")]).license == "cc-by-nc-sa-4.0"
    assert hub.resolve_license([source("base model", "apache-2.0"), source("x", "gpl-3.0")]).license == "gpl-3.0"
    # An ingredient whose licence could not be read makes the result unknown, and the card says which one.
    unknown = hub.resolve_license(sources + [source("reward 'c'", None, name="./local-mos")])
    assert unknown.license == "unknown" and "./local-mos" in unknown.explanation()
    # Signal rewards have no weights and no say.
    no_weights = hub.LicenseSource("reward 'loudness'", None, None, "no model weights")
    assert hub.resolve_license([source("base model", "apache-2.0"), no_weights]).license == "apache-2.0"
    overridden = hub.resolve_license(sources, override="CC-BY-NC-SA-4.0")
    assert overridden.license == "cc-by-nc-sa-4.0" and overridden.overridden
    assert "hub_license" in overridden.explanation()


def test_licence_is_read_from_a_local_card_or_config(tmp_path):
    card_dir, config_dir, bare_dir = tmp_path / "card", tmp_path / "config", tmp_path / "bare"
    for folder in (card_dir, config_dir, bare_dir):
        folder.mkdir()
    (card_dir / "README.md").write_text("---\nlicense: CC-BY-NC-4.0\ntags: [music]\n---\n# a model\n")
    (config_dir / "config.json").write_text(json.dumps({"model_type": "x", "license": "apache-2.0"}))
    (bare_dir / "config.json").write_text("{}")
    found = hub.find_license(str(card_dir), "base model")
    assert (found.license, found.origin) == ("cc-by-nc-4.0", f"README.md of {card_dir}")
    assert hub.find_license(str(config_dir), "x").license == "apache-2.0"
    assert hub.find_license(str(bare_dir), "x").license is None
    gone = hub.find_license(None, "base model")
    assert gone.license is None and gone.name == hub.UNSAVED


def test_non_commercial_ingredient_warns():
    resolution = hub.resolve_license([source("base model", "cc-by-nc-4.0", name="facebook/musicgen-small")])
    with pytest.warns(hub.NonCommercialLicenseWarning, match="facebook/musicgen-small"):
        hub.warn_license(resolution, "me/my-model")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        hub.warn_license(hub.resolve_license([source("base model", "apache-2.0")]), "me/my-model")


def test_model_source_keeps_ids_and_given_paths_but_not_vanished_folders(tmp_path):
    from musicrl_trl.testing import tiny_music_reward

    assert hub.model_source("facebook/musicgen-small") == "facebook/musicgen-small"
    assert hub.model_source(str(tmp_path)) == str(tmp_path)
    model = tiny_music_reward()  # loaded from a temporary folder that no longer exists
    assert not os.path.exists(model.name_or_path)
    assert hub.model_source(model) is None
    assert hub.model_source(tiny_music_reward(save_directory=tmp_path / "mos")) == str(tmp_path / "mos")


def test_reward_model_built_on_a_backbone_records_it(tmp_path):
    from musicrl_trl.reward_models import MusicRewardModel
    from musicrl_trl.testing import save_tiny_clap

    clap_dir = save_tiny_clap(tmp_path / "clap")
    (tmp_path / "clap" / "README.md").write_text("---\nlicense: apache-2.0\n---\n")
    model = MusicRewardModel.from_backbone(clap_dir, hidden_size=16)
    assert hub.model_source(model) == clap_dir
    assert hub.find_license(hub.model_source(model), "base model").license == "apache-2.0"


def test_launch_command_masks_tokens():
    argv = ["examples/ppo_musicrl.py", "--hub_token", TOKEN, f"--hub_token={TOKEN}", "--output_dir", "out dir"]
    command = hub.launch_command(argv)
    assert TOKEN not in command
    assert command.startswith(("python examples/ppo_musicrl.py", "accelerate launch examples/ppo_musicrl.py"))
    assert "--hub_token '<redacted>'" in command or "--hub_token <redacted>" in command
    assert "'out dir'" in command


def test_only_safe_files_are_selected_and_pickles_are_refused(tmp_path):
    for name in ("model.safetensors", "config.json", "README.md", "training_args.bin", "optimizer.pt", "rng.pth"):
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "samples").mkdir()
    (tmp_path / "samples" / "after_0.wav").write_bytes(b"x")
    (tmp_path / "checkpoint-1").mkdir()
    (tmp_path / "checkpoint-1" / "model.safetensors").write_bytes(b"x")
    assert sorted(hub.hub_files(str(tmp_path))) == [
        "README.md",
        "config.json",
        "model.safetensors",
        "samples/after_0.wav",
    ]
    with pytest.raises(ValueError, match="training_args.bin"):
        hub.upload_files("me/model", {"training_args.bin": str(tmp_path / "training_args.bin")}, "push")


def test_push_lora_is_checked():
    from musicrl_trl import MusicPPOConfig

    with pytest.raises(ValueError, match="push_lora"):
        MusicPPOConfig(output_dir="unused", push_lora="weights")


# --------------------------------------------------------------------------------------------------------------------
# Round trip through the real client and the test Hub
# --------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hub_server():
    server = HubServer(token=TOKEN).start()
    yield server
    server.stop()


def run(command: list[str], env: dict, logs: list[str]) -> str:
    start = time.time()
    result = subprocess.run(
        command, capture_output=True, text=True, env=env, cwd=ROOT, timeout=600, stdin=subprocess.DEVNULL
    )
    print(f"{command[1:3]}: {time.time() - start:.0f} s")
    logs.append(result.stdout + result.stderr)
    assert result.returncode == 0, f"{command[1:3]} failed:\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}"
    return result.stdout


@pytest.fixture(scope="module")
def published(hub_server, tmp_path_factory):
    out = tmp_path_factory.mktemp("hub-roundtrip")
    env = {key: value for key, value in os.environ.items() if not key.startswith(("HF_", "HUGGINGFACE_"))}
    env.update(
        HF_ENDPOINT=hub_server.endpoint,
        HF_HUB_DISABLE_XET="1",
        HF_HOME=str(out / "hf-home"),
        HF_TOKEN=TOKEN,
        HF_HUB_OFFLINE="0",
        TRANSFORMERS_OFFLINE="0",
        HF_HUB_DISABLE_TELEMETRY="1",
        PYTHONPATH=str(ROOT),
        CUDA_VISIBLE_DEVICES="",
        OMP_NUM_THREADS="1",
        TRL_EXPERIMENTAL_SILENCE="1",
        TRANSFORMERS_VERBOSITY="info",
    )
    logs: list[str] = []
    run([sys.executable, str(ROUNDTRIP), "publish", str(out)], env, logs)
    # The example script, with Hub ids for the policy, the anchor and the reward, pushes a LoRA policy as "both".
    recipe = out / "recipe.yaml"
    recipe.write_text(
        yaml.safe_dump(
            {
                "name": "hub-test",
                "reward_models": [
                    {"name": "quality", "class": "QualityReward", "kwargs": {"model": MOS_REPO, "window_s": 0.1}}
                ],
                "reward_normalization": "none",
            }
        )
    )
    run(
        [
            sys.executable,
            str(EXAMPLE),
            "--model_name_or_path",
            BASE_REPO,
            "--ref_model",
            BASE_REPO,
            "--recipe",
            str(recipe),
            "--use_peft",
            "--lora_r",
            "4",
            "--lora_alpha",
            "8",
            "--lora_target_modules",
            "q_proj",
            "v_proj",
            "--total_episodes",
            "4",
            "--per_device_train_batch_size",
            "4",
            "--response_length",
            "8",
            "--learning_rate",
            "1e-2",
            "--output_dir",
            str(out / "example"),
            "--report_to",
            "none",
            "--push_to_hub",
            "--hub_model_id",
            BOTH_REPO,
            "--push_lora",
            "both",
            "--save_strategy",
            "steps",
            "--save_steps",
            "1",
            "--hub_token",
            TOKEN,
            "--hub_sample_prompts",
            "calm piano",
        ],
        env,
        logs,
    )
    stdout = run([sys.executable, str(ROUNDTRIP), "load", str(out)], env, logs)
    results = json.loads(stdout.split("RESULTS ", 1)[1].splitlines()[0])
    return SimpleNamespace(out=out, results=results, logs=logs, server=hub_server)


def card_of(server: HubServer, repo_id: str):
    from huggingface_hub import ModelCard

    return ModelCard(server.files(repo_id)["README.md"].decode())


@pytest.mark.slow
def test_pushed_models_load_back_by_repo_id_with_identical_outputs(published):
    differences = {key: value for key, value in published.results.items() if key != "cards"}
    expected = {
        "full/logits",
        "full/audio",
        "full/pipeline_audio",
        "adapter/logits",
        "adapter/audio",
        "reward/logits",
        "reward/pipeline",
        "both/logits",
        "both/audio",
        "both/pipeline_audio",
        "both_adapter/logits",
        "both_adapter/audio",
    }
    assert set(differences) == expected
    # Bit-identical, except the audio-classification pipeline: it feeds the clip through the feature extractor (float64
    # numpy, an attention mask), which moves the score by float32 rounding.
    pipeline_score = differences.pop("reward/pipeline")
    assert all(value == 0.0 for value in differences.values()), json.dumps(differences)
    assert pipeline_score < 1e-5


@pytest.mark.slow
def test_cards_parse_and_carry_the_metadata(published):
    server = published.server
    loaded = published.results["cards"]  # parsed by ModelCard.load(repo_id) in the loading process
    for repo_id in (FULL_REPO, ADAPTER_REPO, BOTH_REPO):
        data = loaded[repo_id]
        assert data == card_of(server, repo_id).data.to_dict()
        assert data["base_model"] == BASE_REPO
        assert data["license"] == "cc-by-nc-4.0"  # MusicGen's CC-BY-NC beats the MOS model's Apache-2.0
        assert data["pipeline_tag"] == "text-to-audio"
        assert {"musicrl", "trl"} <= set(data["tags"])
        assert data["library_name"] == ("peft" if repo_id == ADAPTER_REPO else "transformers")
    assert loaded[FULL_REPO]["datasets"] == ["test-org/music-prompts"]
    assert {"lora", "peft"} <= set(loaded[ADAPTER_REPO]["tags"])
    reward = loaded[REWARD_REPO]
    assert reward["base_model"] == MOS_REPO and reward["license"] == "apache-2.0"
    assert reward["pipeline_tag"] == "audio-classification" and reward["datasets"] == ["test-org/music-ratings"]
    assert {"musicrl", "trl", "reward-model"} <= set(reward["tags"])

    text = card_of(server, FULL_REPO).text
    for expected in (
        "| `quality` | 1 | `QualityReward` | `test-org/tiny-mos` |",  # rewards and their weights
        "| `loudness` | 1 | `LoudnessReward` |",
        "coefficient 0.05",  # KL coefficient and form
        "Steps: 2 updates",
        f"{server.endpoint}/{FULL_REPO}/resolve/main/training_curves.png",  # the reward-vs-KL plot
        f'<audio controls src="{server.endpoint}/{FULL_REPO}/resolve/main/samples/before_0.wav">',
        f'<audio controls src="{server.endpoint}/{FULL_REPO}/resolve/main/samples/after_1.wav">',
        "tests/hub_roundtrip.py publish",  # the command that reproduces the run
        "| `learning_rate` | 0.01 |",
        "| base model | `test-org/tiny-musicgen` | cc-by-nc-4.0 | model card of test-org/tiny-musicgen |",
        "| reward 'quality' | `test-org/tiny-mos` | apache-2.0 | model card of test-org/tiny-mos |",
        "Non-commercial",
        'pipeline("text-to-audio", "test-org/full-policy")',
        "## Intended use and limitations",
        "@article{cideron2024musicrl",
        "@misc{vonwerra2022trl",
    ):
        assert expected in text, expected
    assert 'PeftModel.from_pretrained(base, "test-org/lora-adapter")' in card_of(server, ADAPTER_REPO).text
    both = card_of(server, BOTH_REPO).text
    assert 'subfolder="adapter"' in both and "examples/ppo_musicrl.py --model_name_or_path" in both
    assert "--hub_token" in both and TOKEN not in both
    reward_text = card_of(server, REWARD_REPO).text
    assert 'pipeline("audio-classification", "test-org/mos-reward", function_to_apply="none")' in reward_text
    assert 'QualityReward("test-org/mos-reward")' in reward_text
    assert "## Evaluation" in reward_text and "| `eval_spearman` |" in reward_text


@pytest.mark.slow
def test_repo_layouts_and_samples(published):
    server = published.server
    full = server.files(FULL_REPO)
    assert {"model.safetensors", "config.json", "generation_config.json", "README.md", "training_curves.png"} <= set(
        full
    )
    before, after = full["samples/before_0.wav"], full["samples/after_0.wav"]
    audio, rate = soundfile.read(io.BytesIO(after))
    assert rate == 32_000 and len(audio) > 0
    assert before != after  # the "after" samples come from the trained policy
    adapter = server.files(ADAPTER_REPO)
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(adapter)
    assert "model.safetensors" not in adapter and "config.json" not in adapter
    assert json.loads(adapter["adapter_config.json"])["base_model_name_or_path"] == BASE_REPO
    both = server.files(BOTH_REPO)
    assert {
        "model.safetensors",
        "config.json",
        "adapter/adapter_config.json",
        "adapter/adapter_model.safetensors",
    } <= (set(both))
    assert "adapter_config.json" not in both  # at the root it would make transformers load an adapter
    # Checkpoint folders get the card and samples too (the adapter run saved after every update).
    checkpoint = published.out / "adapter" / "checkpoint-1"
    assert (checkpoint / "README.md").is_file() and (checkpoint / "samples" / "after_0.wav").is_file()
    assert "library_name: peft" in (checkpoint / "README.md").read_text()
    reward_checkpoint_card = (published.out / "reward" / "checkpoint-1" / "README.md").read_text()
    assert "pipeline_tag: audio-classification" in reward_checkpoint_card
    reward_commits = [title for _, _, title in server.repos[("model", REWARD_REPO)].commits]
    assert reward_commits[:3] == ["initial commit", "Training in progress, step 1", "Training in progress, step 2"]


@pytest.mark.slow
def test_no_pickle_in_any_pushed_repo(published):
    server = published.server
    assert {FULL_REPO, ADAPTER_REPO, BOTH_REPO, REWARD_REPO} <= {repo_id for _, repo_id in server.repos}
    for _, repo_id in server.repos:
        for path, content in server.files(repo_id).items():
            assert path == ".gitattributes" or hub.is_safe_file(path), (repo_id, path)
            assert not content.startswith(PICKLE_MAGIC), (repo_id, path)
            if path.endswith("config.json"):  # loading needs no remote code: no auto_map pointing at repo files
                assert "auto_map" not in json.loads(content), (repo_id, path)
    # training_args.bin was written locally, and stayed there.
    assert (published.out / "reward" / "training_args.bin").is_file()
    assert "training_args.bin" not in server.files(REWARD_REPO)


@pytest.mark.slow
def test_second_push_of_an_unchanged_model_uploads_nothing(published):
    requests = published.server.requests
    for name in ("full", "reward"):
        begin = requests.index(("GET", f"/api/models/_marker/{name}-second-push-begin"))
        end = requests.index(("GET", f"/api/models/_marker/{name}-second-push-end"))
        second_push = requests[begin + 1 : end]
        assert any(method == "POST" and path.endswith("/preupload/main") for method, path in second_push)
        assert not [request for request in second_push if request[0] == "PUT" or "/commit/" in request[1]]
    # The example pushed its one checkpoint, then saved (a push of the same files: at most one commit, for a file
    # that differs from the checkpoint's) and pushed again (unchanged: no commit).
    titles = [title for _, _, title in published.server.repos[("model", BOTH_REPO)].commits]
    assert titles[:2] == ["initial commit", "Training in progress, step 1"] and titles[2:] in ([], ["Model save"])


@pytest.mark.slow
def test_every_checkpoint_is_pushed_once_from_its_published_folder(published):
    requests = published.server.requests
    for name, repo_id, folder in (("adapter", ADAPTER_REPO, "adapter"), ("reward", REWARD_REPO, "reward")):
        begin = requests.index(("GET", f"/api/models/_marker/{name}-train-begin"))
        end = requests.index(("GET", f"/api/models/_marker/{name}-train-end"))
        preuploads = [path for method, path in requests[begin:end] if path == f"/api/models/{repo_id}/preupload/main"]
        saves = sorted((published.out / folder).glob("checkpoint-*"))
        assert len(saves) >= 2 and len(preuploads) == len(saves), (name, len(saves), len(preuploads))


@pytest.mark.slow
def test_checkpoint_pushes_follow_push_lora(published):
    # --push_lora both: the checkpoint commit already has the merged weights at the root and the adapter in adapter/.
    commits = published.server.repos[("model", BOTH_REPO)].commits
    (files,) = [files for _, files, title in commits if title == "Training in progress, step 1"]
    assert {"model.safetensors", "config.json", "adapter/adapter_model.safetensors"} <= set(files)
    assert "adapter_config.json" not in files and "adapter_model.safetensors" not in files
    assert "library_name: transformers" in files["README.md"].content.decode()


@pytest.mark.slow
def test_token_never_appears_in_logs_or_files(published):
    assert published.logs and all(TOKEN not in log for log in published.logs)
    assert any("NonCommercialLicenseWarning" in log for log in published.logs)
    for _, repo_id in published.server.repos:
        assert all(TOKEN.encode() not in content for content in published.server.files(repo_id).values())
    for path in published.out.rglob("*"):
        if path.is_file() and path.suffix in (".md", ".json", ".txt"):
            assert TOKEN not in path.read_text(errors="replace"), path
