"""RL fine-tuning of MusicGen with MusicPPOTrainer, the MusicRL way.

Offline demo (no arguments: the tiny random MusicGen, built-in prompts, a signal-based reward; a few minutes on CPU):

    accelerate launch examples/ppo_musicrl.py

A real run (downloads facebook/musicgen-small and the recipe's reward models), LoRA on the decoder:

    accelerate launch examples/ppo_musicrl.py \
        --model_name_or_path facebook/musicgen-small --recipe examples/recipes/musicrl_r.yaml \
        --dataset_name my-org/music-prompts --use_peft --lora_r 16 --lora_alpha 32 \
        --lora_target_modules q_proj k_proj v_proj out_proj fc1 fc2 \
        --per_device_train_batch_size 8 --total_episodes 80000 --learning_rate 1e-5 \
        --guidance_scale 3 --output_dir musicrl-r-musicgen-small

Recipes (examples/recipes/*.yaml): musicrl_r (text adherence + quality), musicrl_u (user preference), musicrl_ru
(preference, anchored to a MusicRL-R checkpoint). Command-line flags override a recipe's `training:` values.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field

import torch
from accelerate import PartialState
from datasets import Dataset, load_dataset
from transformers import MusicgenForConditionalGeneration, MusicgenProcessor
from trl import ModelConfig, TrlParser, get_peft_config

from musicrl_trl import MusicPPOConfig, MusicPPOTrainer
from musicrl_trl.quantization import musicgen_quantization_config
from musicrl_trl.reward_models import LoudnessReward
from musicrl_trl.reward_models.combination import load_recipe, rewards_from_recipe
from musicrl_trl.testing import tiny_musicgen

DEMO_PROMPTS = [
    "bright shimmering bells over a soft pad",
    "deep dark bass drone",
    "an upbeat electronic dance track",
    "slow sad piano ballad",
    "energetic rock guitar riff",
    "calm ambient soundscape with rain",
    "funky groove with slap bass",
    "epic orchestral fanfare",
]


@dataclass
class ScriptArguments:
    """What to train on and against which rewards (model and LoRA flags come from TRL's ModelConfig)."""

    dataset_name: str | None = field(
        default=None,
        metadata={"help": "Hub id or local path of a dataset with a 'prompt' column; default: the demo prompts."},
    )
    dataset_split: str = field(default="train", metadata={"help": "Dataset split to train on."})
    prompt_column: str = field(default="prompt", metadata={"help": "Name of the text column holding the prompts."})
    recipe: str | None = field(
        default=None,
        metadata={"help": "Reward recipe YAML (examples/recipes/musicrl_r.yaml, ...); default: the demo's loudness."},
    )
    ref_model: str | None = field(
        default=None, metadata={"help": "KL anchor (id or path); default: the recipe's, else the starting policy."}
    )


def load_policy(model_args: ModelConfig):
    # --load_in_4bit / --load_in_8bit quantize the decoder layers only (text encoder, codec and LM heads stay in full
    # precision; TRL's get_quantization_config would quantize the text encoder and miss MusicGen's module names).
    quantization = musicgen_quantization_config(
        model_args.load_in_4bit, model_args.load_in_8bit, model_args.dtype, model_args.bnb_4bit_quant_type,
        model_args.use_bnb_nested_quant,
    )
    if model_args.model_name_or_path is None:
        return tiny_musicgen(seed=0, quantization_config=quantization)  # the embedded offline default
    model = MusicgenForConditionalGeneration.from_pretrained(
        model_args.model_name_or_path,
        revision=model_args.model_revision,
        quantization_config=quantization,
        # Quantized weights load straight onto this rank's GPU (one full copy per rank under DDP).
        device_map={"": PartialState().local_process_index} if quantization and torch.cuda.is_available() else None,
        dtype=model_args.dtype if model_args.dtype in (None, "auto") else getattr(torch, model_args.dtype),
    )
    return model, MusicgenProcessor.from_pretrained(model_args.model_name_or_path, revision=model_args.model_revision)


def load_prompts(script_args: ScriptArguments) -> Dataset:
    if script_args.dataset_name is None:
        return Dataset.from_dict({"prompt": DEMO_PROMPTS * 4})
    dataset = load_dataset(script_args.dataset_name, split=script_args.dataset_split)
    if script_args.prompt_column != "prompt":
        dataset = dataset.rename_column(script_args.prompt_column, "prompt")
    return dataset.select_columns(["prompt"])


def load_rewards(script_args: ScriptArguments, training_args: MusicPPOConfig):
    """The recipe's rewards as a list (each logged as rewards/<name>/mean) with their weights, or the demo reward."""
    if script_args.recipe is None:
        # The tiny codec's random filters give every code a similar spectrum but different levels, so loudness is
        # the signal a few minutes of RL on CPU can visibly move; the tiny model starts near -19 dBFS.
        return [LoudnessReward(floor_db=-25.0, ceiling_db=-15.0)], None, script_args.ref_model
    recipe = load_recipe(script_args.recipe)
    combination = rewards_from_recipe(recipe)
    ref_model = script_args.ref_model or recipe["ref_model"]
    if recipe["reward_normalization"] == "none":
        names = list(combination.rewards)
        return list(combination.rewards.values()), [combination.weights[n] for n in names], ref_model
    return [combination], None, ref_model  # normalisation needs the scores of all rewards together


def main():
    parser = TrlParser((ScriptArguments, MusicPPOConfig, ModelConfig))
    script_args, training_args, model_args = parser.parse_args_and_config()
    if training_args.output_dir in (None, "trainer_output"):
        training_args.output_dir = os.path.join("outputs", "ppo_musicrl")
    offline_demo = model_args.model_name_or_path is None
    if offline_demo and "--total_episodes" not in sys.argv:
        # Demo defaults: 0.34 s clips, 40 updates of 8 rollouts; about a minute on a 2-core CPU.
        training_args.total_episodes = 8 * 40
        training_args.per_device_train_batch_size = 8
        training_args.response_length = 20
        training_args.learning_rate = 1e-3
        training_args.kl_coef = 0.005

    model, processor = load_policy(model_args)
    train_dataset = load_prompts(script_args)
    rewards, weights, ref_model = load_rewards(script_args, training_args)
    if weights is not None and training_args.reward_weights is None:
        training_args.reward_weights = weights

    start = time.time()
    trainer = MusicPPOTrainer(
        args=training_args,
        processing_class=processor,
        model=model,
        ref_model=ref_model,
        reward_model=rewards,
        train_dataset=train_dataset,
        peft_config=get_peft_config(model_args),
    )
    trainer.train()
    trainer.save_model(training_args.output_dir)

    if trainer.accelerator.is_main_process:
        scores = [entry["objective/scores"] for entry in trainer.state.log_history if "objective/scores" in entry]
        kls = [entry["objective/kl"] for entry in trainer.state.log_history if "objective/kl" in entry]
        window = max(1, len(scores) // 4)
        print(f"mean reward, first {window} updates: {sum(scores[:window]) / window:.4f}")
        print(f"mean reward, last {window} updates:  {sum(scores[-window:]) / window:.4f}")
        print(f"KL to the anchor at the end: {kls[-1]:.4f} nats per clip; {len(scores)} updates in "
              f"{time.time() - start:.0f} s")
        print(f"model:  {os.path.abspath(training_args.output_dir)}")
        print(f"log:    {os.path.abspath(os.path.join(training_args.output_dir, 'log_history.json'))}")
        print(f"plot:   {os.path.abspath(os.path.join(training_args.output_dir, 'training_curves.png'))}")
    if training_args.push_to_hub:
        trainer.push_to_hub()


if __name__ == "__main__":
    main()
