"""Loading checks (musicrl_trl.loading), command-line helpers (musicrl_trl.cli) and the LoRA value network."""

import importlib.util
import json
import os
import struct
import sys
from pathlib import Path

import pytest
import torch
from huggingface_hub import constants

from musicrl_trl.cli import explicit_options, parse_name_values, resolve_resume
from musicrl_trl.loading import ModelLoadingError, check_safetensors_file, load_pretrained, resolve_pretrained
from musicrl_trl.lora import MUSICGEN_LORA_TARGET_MODULES
from musicrl_trl.reward_models import QualityReward
from musicrl_trl.reward_models.combination import check_recipe_models
from musicrl_trl.testing import save_tiny_music_reward, tiny_musicgen

REPO = Path(__file__).resolve().parents[1]


def safetensors_bytes(length: int = 16) -> bytes:
    header = json.dumps({"w": {"dtype": "F32", "shape": [length // 4], "data_offsets": [0, length]}}).encode()
    return struct.pack("<Q", len(header)) + header + bytes(length)


def test_missing_local_paths_are_named(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for name in ("./nope", "outputs/runs/rm", str(tmp_path / "absent"), "~/surely-not-here-rm"):
        with pytest.raises(ModelLoadingError, match="does not exist") as error:
            resolve_pretrained(name, "quality reward", hint="Train it with X.")
        assert repr(name) in str(error.value) and str(error.value).endswith("Train it with X.")
    (tmp_path / "weights.safetensors").write_bytes(safetensors_bytes())
    with pytest.raises(ModelLoadingError, match="is a file; pass the folder"):
        resolve_pretrained("weights.safetensors", "policy")


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (lambda good: good[: len(good) - 5], "the tensors need"),  # cut short
        (lambda good: good[:6], "the file has only 6 bytes"),
        (lambda good: b"<!DOCTYPE html><html>Bad gateway</html>", "its header claims"),
        (lambda good: b"version https://git-lfs.github.com/spec/v1\noid sha256:ab\nsize 9\n", "git lfs pull"),
        (lambda good: struct.pack("<Q", 4) + b"{{{{", "not valid JSON"),
    ],
)
def test_corrupt_safetensors_name_the_file_and_the_fix(tmp_path, content, problem):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    weights = folder / "model.safetensors"
    weights.write_bytes(content(safetensors_bytes()))
    with pytest.raises(ModelLoadingError) as error:
        resolve_pretrained(folder, "KL anchor")
    message = str(error.value)
    assert message.startswith(f"KL anchor: the weights file {weights} is corrupt or truncated")
    assert problem in message and "Re-download it" in message and "re-save" in message
    weights.write_bytes(safetensors_bytes())
    check_safetensors_file(weights)  # a whole file passes
    assert resolve_pretrained(folder) == str(folder)


def test_a_reward_with_a_corrupt_model_names_its_file(tmp_path):
    folder = save_tiny_music_reward(tmp_path / "mos")
    weights = Path(folder) / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(ModelLoadingError, match=f"quality reward: the weights file {weights} is corrupt"):
        QualityReward(folder)


def test_offline_mode_fails_at_once_for_an_uncached_id(tmp_path, monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    with pytest.raises(ModelLoadingError) as error:
        resolve_pretrained("laion/larger_clap_music", "text_adherence reward", hint="HINT")
    message = str(error.value)
    assert "is neither a local folder" in message and "HF_HUB_OFFLINE=1 forbids downloading it" in message
    assert "Unset HF_HUB_OFFLINE" in message and message.endswith("HINT")


def test_an_unreachable_hub_fails_at_once(tmp_path, monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # discard port: connection refused
    calls = []

    def never(*args, **kwargs):
        calls.append(args)

    with pytest.raises(ModelLoadingError, match="cannot reach the Hub at http://127.0.0.1:9 to download 'org/model'"):
        load_pretrained(never, "org/model", "policy")
    assert calls == []  # nothing was loaded


def test_recipe_check_skips_the_tokenizer_of_an_audio_space_preference_model(tmp_path, monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    rm = save_tiny_music_reward(tmp_path / "rm", text_conditioned=True)
    recipe = REPO / "examples" / "recipes" / "musicrl_u.yaml"
    check_recipe_models(recipe, preference={"model": rm})  # the recipe's tokenizer (a Hub id) is not needed
    with pytest.raises(ModelLoadingError, match="1 model\\(s\\) of musicrl_u") as error:
        check_recipe_models(recipe, {"policy": "facebook/musicgen-small"}, preference={"model": rm})
    assert "policy: 'facebook/musicgen-small'" in str(error.value)


def test_explicit_options_and_name_values():
    from trl import TrlParser

    from musicrl_trl import MusicPPOConfig

    parser = TrlParser((MusicPPOConfig,))
    argv = ["--save-steps", "3", "--learning_rate=1e-3", "--output_dir", "x", "--temper", "1"]
    given = explicit_options(parser, argv)
    assert given == {"save_steps", "learning_rate", "output_dir", "temperature"}
    assert parse_name_values(["quality=./a", "text_adherence=org/clap"], "--reward_model") == {
        "quality": "./a",
        "text_adherence": "org/clap",
    }
    with pytest.raises(ValueError, match="NAME=VALUE"):
        parse_name_values(["./a"], "--reward_model")


def test_resolve_resume(tmp_path):
    assert resolve_resume(None, str(tmp_path)) is None and resolve_resume("false", str(tmp_path)) is None
    with pytest.raises(ValueError, match="holds no checkpoint"):
        resolve_resume("true", str(tmp_path))
    (tmp_path / "checkpoint-4").mkdir()
    assert resolve_resume("true", str(tmp_path)) is True
    assert resolve_resume(str(tmp_path / "checkpoint-4"), "elsewhere") == str(tmp_path / "checkpoint-4")
    with pytest.raises(ValueError, match="the checkpoint folder 'nowhere/checkpoint-2' does not exist"):
        resolve_resume("nowhere/checkpoint-2", str(tmp_path))


def test_lora_value_trunk_trains_only_adapters_and_head():
    from peft import LoraConfig

    from musicrl_trl.trainers.ppo_trainer import MusicValueModel

    policy, _ = tiny_musicgen()
    config = LoraConfig(r=4, lora_alpha=8, target_modules=list(MUSICGEN_LORA_TARGET_MODULES))

    def build():
        torch.manual_seed(3)  # as the trainer does with args.seed
        return MusicValueModel.from_policy(policy, share_backbone=False, peft_config=config, lora_trunk=True)

    value_model = build()
    trainable = [name for name, param in value_model.named_parameters() if param.requires_grad]
    assert trainable and all("lora_" in name or name.startswith("score.") for name in trainable)
    adapted = {name.split(".lora_")[0].rsplit(".", 1)[-1] for name in trainable if "lora_" in name}
    assert adapted == set(MUSICGEN_LORA_TARGET_MODULES)
    assert all(".decoder." in f".{name}" for name in trainable if "lora_" in name)
    assert not any("lora_" in name for name, _ in policy.named_parameters())  # the policy itself is untouched
    again = build()  # a resumed run rebuilds the same parameters
    for (name, a), (_, b) in zip(value_model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), name


def test_help_lists_music_fields_first_and_hides_text_only_fields(capsys, monkeypatch):
    spec = importlib.util.spec_from_file_location("ppo_musicrl", REPO / "examples" / "ppo_musicrl.py")
    script = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "ppo_musicrl", script)  # dataclasses look their module up there
    spec.loader.exec_module(script)
    with pytest.raises(SystemExit):
        script.parse_arguments(["--help"])
    text = capsys.readouterr().out
    sections = [text.index(title) for title in ("script options:", "music RL options (MusicPPOConfig):",
                                                "model and LoRA options", "other Trainer options")]  # fmt: skip
    assert sections == sorted(sections)
    music = text[sections[1] : sections[2]]
    for flag in ("--temperature", "--audio_duration_s", "--guidance_scale", "--kl_coef", "--save_steps"):
        assert flag in music
    assert "--reward_model" in text[: sections[1]]
    for flag in ("--sft_model_path", "--reward_model_path", "--stop_token", "--missing_eos_penalty", "--world_size"):
        assert flag not in text
    words = " ".join(text.split())  # argparse wraps help lines
    assert "given alone it implies --save_strategy steps" in words and "q_proj k_proj v_proj out_proj fc1 fc2" in words
    assert os.linesep.join(text.splitlines()[:1]).startswith("usage: accelerate launch examples/ppo_musicrl.py")


def test_offline_cached_models_load_by_id_and_corrupt_cached_files_are_named(tmp_path, monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    repo = tmp_path / "cache" / "models--org--model"
    snapshot = repo / "snapshots" / ("a" * 40)
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("a" * 40)
    (snapshot / "config.json").write_text("{}")
    (snapshot / "model.safetensors").write_bytes(safetensors_bytes())
    assert resolve_pretrained("org/model", "policy") == "org/model"
    (snapshot / "model.safetensors").write_bytes(safetensors_bytes()[:-3])
    with pytest.raises(ModelLoadingError, match="policy: the weights file .*models--org--model.* is corrupt"):
        resolve_pretrained("org/model", "policy")
