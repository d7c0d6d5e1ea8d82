"""Subprocess side of tests/test_hub.py: publish to the test Hub, then load back in a fresh process.

    python tests/hub_roundtrip.py publish OUT   # tiny base models, a full policy, a LoRA adapter, a reward model
    python tests/hub_roundtrip.py load OUT      # load each by repo id; compare with OUT/references.safetensors

Run with ``HF_ENDPOINT`` (the test server), ``HF_HUB_DISABLE_XET=1``, a temporary ``HF_HOME`` and ``HF_TOKEN``: they
must be set before ``huggingface_hub`` is imported, hence a separate process. The publish step marks the start and
the end of each second push with a request to ``/api/models/_marker/<name>`` so that the test can find them in the
server's request log. The load step refuses to unpickle anything.
"""

from __future__ import annotations

import json
import os
import sys
import urllib.error
import urllib.request

import numpy as np
import torch

ORG = "test-org"
BASE_REPO = f"{ORG}/tiny-musicgen"
MOS_REPO = f"{ORG}/tiny-mos"
FULL_REPO = f"{ORG}/full-policy"
ADAPTER_REPO = f"{ORG}/lora-adapter"
BOTH_REPO = f"{ORG}/lora-both"  # pushed by examples/ppo_musicrl.py from the test
REWARD_REPO = f"{ORG}/mos-reward"
PROMPTS = ["bright shimmering bells", "deep dark bass", "happy upbeat tune", "slow sad piano"]
LORA_TARGETS = ["q_proj", "v_proj", "fc1"]


def marker(name: str) -> None:
    try:
        urllib.request.urlopen(f"{os.environ['HF_ENDPOINT']}/api/models/_marker/{name}")
    except urllib.error.HTTPError:
        pass  # 401 RepoNotFound: the request is only there to be logged


def policy_inputs(processor):
    """A fixed text prompt and fixed decoder codes [B * K, T] for teacher-forced logits."""
    inputs = processor(text=["calm piano with soft strings"], padding=True, return_tensors="pt")
    codes = torch.randint(0, 2048, (4, 6), generator=torch.Generator().manual_seed(0))
    return dict(inputs), codes


def policy_outputs(model, processor) -> dict[str, torch.Tensor]:
    inputs, codes = policy_inputs(processor)
    with torch.no_grad():
        logits = model(**inputs, decoder_input_ids=codes).logits
        audio = model.generate(**inputs, do_sample=False, max_new_tokens=10)
    return {"logits": logits.float(), "audio": audio.float()}


def reward_waveforms() -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return torch.cat(
        [0.1 * torch.randn(1, 16_000, generator=generator), 0.3 * torch.sin(torch.arange(16_000)[None] / 8)]
    )


# --------------------------------------------------------------------------------------------------------------------
def publish(out: str) -> None:
    from datasets import Dataset
    from huggingface_hub import HfApi
    from peft import LoraConfig
    from transformers import MusicgenForConditionalGeneration, MusicgenProcessor

    from musicrl_trl import AudioRewardConfig, AudioRewardTrainer, MusicPPOConfig, MusicPPOTrainer, QualityReward
    from musicrl_trl.reward_models import LoudnessReward
    from musicrl_trl.testing import save_tiny_music_reward, save_tiny_musicgen

    references: dict[str, torch.Tensor] = {}
    api = HfApi()

    # The ingredients, published with the licences their real counterparts carry (MusicGen: CC-BY-NC 4.0).
    base_dir = save_tiny_musicgen(os.path.join(out, "base"))
    with open(os.path.join(base_dir, "README.md"), "w") as handle:
        handle.write("---\nlicense: cc-by-nc-4.0\nlibrary_name: transformers\n---\n# tiny MusicGen\n")
    mos_dir = save_tiny_music_reward(os.path.join(out, "mos"))
    with open(os.path.join(mos_dir, "README.md"), "w") as handle:
        handle.write("---\nlicense: apache-2.0\n---\n# tiny MOS model\n")
    for repo_id, folder in ((BASE_REPO, base_dir), (MOS_REPO, mos_dir)):
        api.create_repo(repo_id, exist_ok=True)
        api.upload_folder(repo_id=repo_id, folder_path=folder)

    prompts = Dataset.from_dict({"prompt": PROMPTS * 2})

    def ppo_trainer(name: str, **config):
        args = MusicPPOConfig(
            output_dir=os.path.join(out, name),
            per_device_train_batch_size=4,
            total_episodes=8,
            response_length=8,
            learning_rate=1e-2,
            report_to=[],
            disable_tqdm=True,
            seed=0,
            hub_sample_prompts=["calm piano", "loud drums"],
            **config,
        )
        model = MusicgenForConditionalGeneration.from_pretrained(BASE_REPO)
        processor = MusicgenProcessor.from_pretrained(BASE_REPO)
        rewards = [QualityReward(MOS_REPO, window_s=0.1), LoudnessReward()]
        peft_config = LoraConfig(r=4, lora_alpha=8, target_modules=LORA_TARGETS) if "push_lora" in config else None
        return MusicPPOTrainer(
            args, processor, model, reward_model=rewards, train_dataset=prompts, peft_config=peft_config
        )

    # 1. A fully fine-tuned policy, pushed twice.
    trainer = ppo_trainer("full", push_to_hub=True, hub_model_id=FULL_REPO)
    trainer.train()
    trainer.push_to_hub(dataset_name=f"{ORG}/music-prompts")
    policy = trainer.accelerator.unwrap_model(trainer.model).policy
    references.update({f"full/{k}": v for k, v in policy_outputs(policy, trainer.processing_class).items()})
    marker("full-second-push-begin")
    trainer.push_to_hub(dataset_name=f"{ORG}/music-prompts")
    marker("full-second-push-end")

    # 2. A LoRA policy pushed as an adapter, with a checkpoint (and its card) after every update.
    trainer = ppo_trainer(
        "adapter",
        push_lora="adapter",
        hub_model_id=ADAPTER_REPO,
        push_to_hub=True,
        save_strategy="steps",
        save_steps=1,
    )
    marker("adapter-train-begin")
    trainer.train()
    marker("adapter-train-end")
    trainer.push_to_hub()
    policy = trainer.accelerator.unwrap_model(trainer.model).policy
    references.update({f"adapter/{k}": v for k, v in policy_outputs(policy, trainer.processing_class).items()})

    # 3. A reward model (MOS regression) fine-tuned from the published one, pushed twice.
    rng = np.random.default_rng(0)
    ratings = Dataset.from_dict(
        {
            "audio": [(level * rng.standard_normal(8_000)).astype(np.float32) for level in np.linspace(0.01, 0.5, 8)],
            "mos": list(np.linspace(1.0, 5.0, 8)),
        }
    )
    reward_args = AudioRewardConfig(
        output_dir=os.path.join(out, "reward"),
        max_steps=2,
        per_device_train_batch_size=4,
        report_to=[],
        audio_sampling_rate=16_000,
        hub_model_id=REWARD_REPO,
        push_to_hub=True,
        save_strategy="steps",
        save_steps=1,
        disable_tqdm=True,
    )
    reward_trainer = AudioRewardTrainer(MOS_REPO, reward_args, train_dataset=ratings, eval_dataset=ratings)
    marker("reward-train-begin")
    reward_trainer.train()
    marker("reward-train-end")
    reward_trainer.evaluate()  # evaluation numbers for the card
    reward_trainer.push_to_hub(dataset_name=f"{ORG}/music-ratings")
    model = reward_trainer.accelerator.unwrap_model(reward_trainer.model).eval()
    with torch.no_grad():
        references["reward/logits"] = model(reward_waveforms(), sampling_rate=16_000).logits.float()
    marker("reward-second-push-begin")
    reward_trainer.push_to_hub(dataset_name=f"{ORG}/music-ratings")
    marker("reward-second-push-end")

    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in references.items()}, os.path.join(out, "references.safetensors"))
    print("published", json.dumps([FULL_REPO, ADAPTER_REPO, REWARD_REPO]))


# --------------------------------------------------------------------------------------------------------------------
def refuse_pickles() -> None:
    """Loading must never unpickle: make every way to do it fail loudly in this process."""
    import pickle

    def refuse(*args, **kwargs):
        raise AssertionError("a pickle was loaded")

    class RefusingUnpickler(pickle.Unpickler):  # a class: torch subclasses pickle.Unpickler at import
        load = refuse

    torch.load = refuse
    pickle.load = pickle.loads = refuse
    pickle.Unpickler = RefusingUnpickler


def load(out: str) -> None:
    refuse_pickles()
    from huggingface_hub import ModelCard
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import (
        AutoModelForAudioClassification,
        GenerationConfig,
        MusicgenForConditionalGeneration,
        MusicgenProcessor,
        pipeline,
    )

    import musicrl_trl  # noqa: F401  (registers the reward-model Auto classes)

    references = load_file(os.path.join(out, "references.safetensors"))
    results: dict[str, object] = {}

    def check(name: str, got: torch.Tensor, want: torch.Tensor) -> None:
        results[name] = float((got.float() - want).abs().max()) if got.shape == want.shape else f"shape {got.shape}"

    def check_policy(prefix: str, model, processor, with_audio: bool = True) -> None:
        outputs = policy_outputs(model, processor)
        check(f"{prefix}/logits", outputs["logits"], references[f"{prefix}/logits"])
        if with_audio:
            check(f"{prefix}/audio", outputs["audio"], references[f"{prefix}/audio"])

    processor = MusicgenProcessor.from_pretrained(FULL_REPO)
    check_policy("full", MusicgenForConditionalGeneration.from_pretrained(FULL_REPO), processor)
    synthesiser = pipeline("text-to-audio", FULL_REPO)
    music = synthesiser("calm piano with soft strings", forward_params={"do_sample": False, "max_new_tokens": 10})
    check(
        "full/pipeline_audio",
        torch.as_tensor(music["audio"]).reshape(references["full/audio"].shape),
        references["full/audio"],
    )

    base = MusicgenForConditionalGeneration.from_pretrained(BASE_REPO)
    # As the card says: the adapter repo's generation_config.json samples as training did (the base's differs).
    base.generation_config = GenerationConfig.from_pretrained(ADAPTER_REPO)
    adapter_policy = PeftModel.from_pretrained(base, ADAPTER_REPO)
    check_policy("adapter", adapter_policy, MusicgenProcessor.from_pretrained(ADAPTER_REPO))

    reward = AutoModelForAudioClassification.from_pretrained(REWARD_REPO)
    with torch.no_grad():
        check("reward/logits", reward(reward_waveforms(), sampling_rate=16_000).logits, references["reward/logits"])
    scorer = pipeline("audio-classification", REWARD_REPO, function_to_apply="none")
    scores = [scorer({"raw": clip.numpy(), "sampling_rate": 16_000})[0]["score"] for clip in reward_waveforms()]
    check("reward/pipeline", torch.tensor(scores)[:, None], references["reward/logits"])

    # The LoRA policy the example script pushed as "both": merged at the root, the adapter in adapter/.
    example_dir = os.path.join(out, "example")
    merged_local = MusicgenForConditionalGeneration.from_pretrained(os.path.join(example_dir, "merged"))
    example_processor = MusicgenProcessor.from_pretrained(os.path.join(example_dir, "merged"))
    references.update({f"both/{k}": v for k, v in policy_outputs(merged_local, example_processor).items()})
    check_policy("both", MusicgenForConditionalGeneration.from_pretrained(BOTH_REPO), example_processor)
    local_adapter = PeftModel.from_pretrained(MusicgenForConditionalGeneration.from_pretrained(BASE_REPO), example_dir)
    references.update({f"both_adapter/{k}": v for k, v in policy_outputs(local_adapter, example_processor).items()})
    hub_adapter = PeftModel.from_pretrained(
        MusicgenForConditionalGeneration.from_pretrained(BASE_REPO), BOTH_REPO, subfolder="adapter"
    )
    check_policy("both_adapter", hub_adapter, example_processor)
    music = pipeline("text-to-audio", BOTH_REPO)(
        "calm piano with soft strings", forward_params={"do_sample": False, "max_new_tokens": 10}
    )
    check(
        "both/pipeline_audio",
        torch.as_tensor(music["audio"]).reshape(references["both/audio"].shape),
        references["both/audio"],
    )

    results["cards"] = {
        repo: ModelCard.load(repo).data.to_dict() for repo in (FULL_REPO, ADAPTER_REPO, BOTH_REPO, REWARD_REPO)
    }
    print("RESULTS " + json.dumps(results))


if __name__ == "__main__":
    {"publish": publish, "load": load}[sys.argv[1]](sys.argv[2])
