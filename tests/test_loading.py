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
    with pytest.raises(ModelLoadingError) as error:
        check_recipe_models(recipe, {"policy": "facebook/musicgen-small"}, preference={"model": rm})
    assert str(error.value).startswith("policy: 'facebook/musicgen-small'")  # one problem: one line, no list


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


# --------------------------------------------------------------------------------------------------------------------
# Pickle weights are never loaded unless asked
# --------------------------------------------------------------------------------------------------------------------

PICKLE_ONLY = "has only pickle weights"


def to_pickle_weights(folder, name: str = "pytorch_model.bin") -> Path:
    """Rewrite a saved model's weights as a pickle only, as `save_pretrained(safe_serialization=False)` did.

    transformers 5 writes safetensors whatever ``safe_serialization`` says, so the pickle is written by hand: the
    folder then holds what an old checkpoint on the Hub holds (config.json and pytorch_model.bin).
    """
    from safetensors.torch import load_file

    folder = Path(folder)
    (weights,) = folder.glob("*.safetensors")
    torch.save(load_file(weights), folder / name)
    weights.unlink()
    return folder


def assert_pickles_refused(error, where) -> None:
    message = str(error.value)
    assert f"{where!r} has only pickle weights (" in message and "and no safetensors" in message
    assert "Convert the weights to safetensors" in message and "allow_pickle_weights=True" in message


def test_a_reward_with_only_pickle_weights_is_refused_unless_allowed(tmp_path, monkeypatch):
    import transformers.modeling_utils

    folder = to_pickle_weights(save_tiny_music_reward(tmp_path / "mos"))
    loads = []
    monkeypatch.setattr(transformers.modeling_utils, "load_state_dict", lambda *a, **k: loads.append(a) or 1 / 0)
    with pytest.raises(
        ModelLoadingError, match=f"^quality reward: '{folder}' {PICKLE_ONLY} \\(pytorch_model.bin\\)"
    ) as error:
        QualityReward(str(folder))
    assert_pickles_refused(error, str(folder))
    assert loads == []  # refused before anything was read
    monkeypatch.undo()
    reward = QualityReward(str(folder), allow_pickle_weights=True)
    audio = 0.1 * torch.randn(2, 1, 16_000, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(reward(audio=audio, sampling_rate=16_000)).all()


def test_preference_clap_and_backbone_loads_refuse_pickle_weights(tmp_path):
    from musicrl_trl.reward_models import MusicRewardModel, PreferenceReward, TextAdherenceReward
    from musicrl_trl.testing import save_tiny_clap

    rm = to_pickle_weights(save_tiny_music_reward(tmp_path / "rm"))
    with pytest.raises(ModelLoadingError, match=f"^preference reward: '{rm}' {PICKLE_ONLY}"):
        PreferenceReward(str(rm))
    assert PreferenceReward(str(rm), allow_pickle_weights=True).model.config.model_type == "music_reward"

    clap = to_pickle_weights(save_tiny_clap(tmp_path / "clap"))
    with pytest.raises(ModelLoadingError, match=f"^text_adherence reward \\(CLAP\\): '{clap}' {PICKLE_ONLY}"):
        TextAdherenceReward(str(clap))
    TextAdherenceReward(str(clap), window_s=1.0, allow_pickle_weights=True)
    with pytest.raises(ModelLoadingError, match=f"^reward backbone: '{clap}' {PICKLE_ONLY}"):
        MusicRewardModel.from_backbone(clap, hidden_size=16)
    MusicRewardModel.from_backbone(clap, allow_pickle_weights=True, hidden_size=16)


def test_token_preference_model_refuses_a_pickled_musicgen(tmp_path):
    from musicrl_trl.reward_models.token_preference import MusicTokenPreferenceModel
    from musicrl_trl.testing import save_tiny_musicgen

    folder = to_pickle_weights(save_tiny_musicgen(tmp_path / "musicgen"))
    with pytest.raises(ModelLoadingError, match=f"^MusicGen for the token preference model: '{folder}' {PICKLE_ONLY}"):
        MusicTokenPreferenceModel.from_musicgen(str(folder))
    MusicTokenPreferenceModel.from_musicgen(str(folder), allow_pickle_weights=True)


def test_evaluation_refuses_pickled_policies_and_adapters(tmp_path):
    from peft import LoraConfig, get_peft_model

    from musicrl_trl.evaluation import load_policy, load_reward
    from musicrl_trl.testing import save_tiny_musicgen

    base = save_tiny_musicgen(tmp_path / "base")
    full = to_pickle_weights(save_tiny_musicgen(tmp_path / "full"))
    with pytest.raises(ValueError, match="could not load the policy") as error:
        load_policy(str(full))
    assert isinstance(error.value.__cause__, ModelLoadingError)
    assert str(error.value.__cause__).startswith(f"policy: '{full}' {PICKLE_ONLY} (pytorch_model.bin)")
    load_policy(str(full), allow_pickle_weights=True)

    model, processor = tiny_musicgen(save_directory=tmp_path / "for-lora")
    model.config.name_or_path = base  # the adapter's base_model_name_or_path
    adapter = tmp_path / "adapter"
    get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(
        adapter, safe_serialization=False
    )
    assert (adapter / "adapter_model.bin").is_file() and not list(adapter.glob("*.safetensors"))
    with pytest.raises(ValueError, match="could not load the policy") as error:
        load_policy(str(adapter), processor)
    assert str(error.value.__cause__).startswith(f"LoRA adapter: '{adapter}' {PICKLE_ONLY} (adapter_model.bin)")
    assert type(load_policy(str(adapter), processor, allow_pickle_weights=True)[0]).__name__ == "PeftModel"

    rm = to_pickle_weights(save_tiny_music_reward(tmp_path / "rm"))
    with pytest.raises(ValueError, match=PICKLE_ONLY):
        load_reward(f"quality={rm}")
    load_reward(f"quality={rm}", allow_pickle_weights=True)


def test_pickle_check_reads_hub_file_lists_subfolders_and_the_offline_cache(tmp_path, monkeypatch):
    from musicrl_trl.loading import check_no_pickle_only_weights

    bins = ["config.json", "pytorch_model-00001-of-00002.bin", "pytorch_model-00002-of-00002.bin"]
    with pytest.raises(
        ModelLoadingError, match="'org/m' has only pickle weights \\(pytorch_model-00001-of-00002.bin, "
    ):
        check_no_pickle_only_weights("org/m", "policy", repo_files=bins)
    check_no_pickle_only_weights("org/m", repo_files=[*bins, "model.safetensors"])  # safetensors win: no pickle read
    check_no_pickle_only_weights("org/m", repo_files=["config.json", "training_args.bin"])  # not weights
    both = ["model.safetensors", "adapter/adapter_config.json", "adapter/adapter_model.bin"]
    check_no_pickle_only_weights("org/m", repo_files=both)
    with pytest.raises(ModelLoadingError, match="'org/m/adapter' has only pickle weights \\(adapter_model.bin\\)"):
        check_no_pickle_only_weights("org/m", "LoRA adapter", subfolder="adapter", repo_files=both)

    # Offline, a cached Hub model is judged by its cached files, before from_pretrained reads any.
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    repo = tmp_path / "cache" / "models--org--old"
    snapshot = repo / "snapshots" / ("b" * 40)
    save_tiny_music_reward(snapshot)
    to_pickle_weights(snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("b" * 40)

    def never(*args, **kwargs):
        raise AssertionError("loaded")

    with pytest.raises(ModelLoadingError, match=f"^quality reward: '{snapshot}' {PICKLE_ONLY}"):
        load_pretrained(never, "org/old", "quality reward")


def test_models_load_with_use_safetensors_and_processors_without_it(tmp_path):
    from transformers import MusicgenForConditionalGeneration, MusicgenProcessor

    from musicrl_trl.testing import save_tiny_musicgen

    folder = save_tiny_musicgen(tmp_path / "musicgen")
    seen = {}

    class Spy(MusicgenForConditionalGeneration):
        @classmethod
        def from_pretrained(cls, path, **kwargs):
            seen.update(kwargs)
            return super().from_pretrained(path, **kwargs)

    load_pretrained(Spy.from_pretrained, folder, "policy")
    assert seen == {"use_safetensors": True}
    # A processor would keep use_safetensors and write it into its tokenizer_config.json: it gets none.
    load_pretrained(MusicgenProcessor.from_pretrained, folder, "policy").save_pretrained(tmp_path / "saved")
    assert "use_safetensors" not in (tmp_path / "saved" / "tokenizer_config.json").read_text()


def test_trainers_refuse_pickled_checkpoints_unless_their_config_allows(tmp_path):
    from datasets import Dataset

    from musicrl_trl import AudioRewardConfig, AudioRewardTrainer, MusicPPOConfig, MusicPPOTrainer
    from musicrl_trl.testing import save_tiny_musicgen

    policy = str(to_pickle_weights(save_tiny_musicgen(tmp_path / "policy")))
    prompts = Dataset.from_dict({"prompt": ["calm piano", "loud drums"]})

    def ppo(**config):
        args = MusicPPOConfig(
            output_dir=str(tmp_path / "ppo"), per_device_train_batch_size=2, total_episodes=2, response_length=8,
            report_to=[], **config,
        )  # fmt: skip
        loudness = lambda audio, **kwargs: audio.pow(2).mean((1, 2))  # noqa: E731
        return MusicPPOTrainer(args, None, policy, reward_model=loudness, train_dataset=prompts)

    with pytest.raises(ModelLoadingError, match=f"^policy: '{policy}' {PICKLE_ONLY}"):
        ppo()
    assert ppo(allow_pickle_weights=True).args.allow_pickle_weights

    rm = str(to_pickle_weights(save_tiny_music_reward(tmp_path / "rm")))
    clips = [{"array": [0.1] * 1600, "sampling_rate": 16_000}] * 4
    ratings = Dataset.from_dict({"audio": clips, "mos": [1.0, 2.0, 3.0, 4.0]})

    def reward(**config):
        args = AudioRewardConfig(output_dir=str(tmp_path / "rm-out"), report_to=[], **config)
        return AudioRewardTrainer(rm, args, train_dataset=ratings)

    with pytest.raises(ModelLoadingError, match=f"^reward model to train: '{rm}' {PICKLE_ONLY}"):
        reward()
    assert reward(allow_pickle_weights=True).model.config.model_type == "music_reward"
