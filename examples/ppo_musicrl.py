"""RL fine-tuning of MusicGen with MusicPPOTrainer, the MusicRL way.

Offline demo (no arguments: the tiny random MusicGen, built-in prompts, a signal-based reward; a few minutes on CPU):

    accelerate launch examples/ppo_musicrl.py

A real run (downloads facebook/musicgen-small and the recipe's reward models), LoRA on the decoder:

    accelerate launch examples/ppo_musicrl.py \
        --recipe examples/recipes/musicrl_r.yaml --reward_model quality=ast-music-mos \
        --dataset_name my-org/music-prompts --use_peft --lora_r 16 --lora_alpha 32 \
        --per_device_train_batch_size 8 --total_episodes 80000 --learning_rate 1e-5 \
        --guidance_scale 3 --save_steps 500 --output_dir musicrl-r-musicgen-small

Recipes (examples/recipes/*.yaml): musicrl_r (text adherence + quality), musicrl_u (user preference), musicrl_ru
(preference, anchored to a MusicRL-R checkpoint). A recipe sets the policy (`model_name_or_path`), the rewards and
MusicPPOConfig values (`training:`); flags given on the command line override all of them, e.g. `--temperature 0.7`
or `--reward_model quality=./my-mos-model` (a local folder or another Hub id for the reward named `quality`). Every
model is checked before any is loaded: a missing one is reported with the command that makes it.

`--use_peft` without `--lora_target_modules` targets MusicGen's decoder attention and MLP projections
(q_proj k_proj v_proj out_proj fc1 fc2), on the policy and, with a separate value network, on the value network too.

Checkpoints: `--save_steps N` saves every N updates (it implies `--save_strategy steps`). An interrupted run continues
at its last saved update with `--resume_from_checkpoint true` (same `--output_dir`) or `--resume_from_checkpoint
PATH/checkpoint-N`; pass the same flags as the first run.
"""

from __future__ import annotations

import os
import shutil
import statistics
import sys
import time
from dataclasses import dataclass, field

import torch
import yaml
from accelerate import PartialState
from datasets import Dataset
from transformers import MusicgenForConditionalGeneration, MusicgenProcessor
from trl import ModelConfig, TrlParser

from musicrl_trl import MusicPPOConfig, MusicPPOTrainer
from musicrl_trl.cli import (
    PPO_FIELDS_THAT_MATTER,
    apply_recipe_defaults,
    configured_options,
    layout_help,
    option_value,
    own_fields,
    parse_name_values,
    resolve_resume,
    write_run_config,
)
from musicrl_trl.distributed import end_distributed_run
from musicrl_trl.loading import ModelLoadingError, check_model_folder, load_pretrained, load_prompts
from musicrl_trl.lora import MUSICGEN_LORA_TARGET_MODULES
from musicrl_trl.quantization import musicgen_quantization_config
from musicrl_trl.reward_models import LoudnessReward
from musicrl_trl.reward_models.combination import (
    MODEL_KWARGS,
    check_recipe_models,
    load_recipe,
    rewards_from_recipe,
)
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
    reward_model: list[str] | None = field(
        default=None,
        metadata={
            "help": "NAME=PATH_OR_ID: load the recipe's reward NAME from a local folder or another Hub id "
            "(repeatable: --reward_model quality=./mos text_adherence=./clap)."
        },
    )
    ref_model: str | None = field(
        default=None, metadata={"help": "KL anchor (id or path); default: the recipe's, else the starting policy."}
    )
    eval_dataset_name: str | None = field(
        default=None,
        metadata={
            "help": "Prompts for trainer.evaluate() every eval_steps (with --eval_strategy steps): a dataset id or "
            "path with a 'prompt' column; default: --dataset_name's --eval_dataset_split, or the demo prompts."
        },
    )
    eval_dataset_split: str = field(default="test", metadata={"help": "Split of the eval prompts."})


# Inherited fields whose TrainingArguments/ModelConfig help does not say what they do in this script.
# Defaults of the offline demo (no policy given anywhere): 300 updates of 16 clips of 0.34 s, about a minute on an
# idle 2-core CPU. Batch 16 halves the variance of the per-update mean reward of batch 8, and a small learning rate
# spreads the rise over the run instead of spending it in the first updates, so that with the default kl_coef the
# last quarter's mean loudness reward lies 6.6-8.7 standard deviations of the first quarter's rewards above it, for
# each of seeds 0-6 (at lr 2e-3 over 100 updates one seed in seven learned inside the first quarter and showed 2.7).
# Each applies only where neither a flag, a --config file nor the recipe sets that field.
DEMO_TRAINING = {
    "total_episodes": 16 * 300,
    "per_device_train_batch_size": 16,
    "response_length": 20,
    "learning_rate": 5e-4,
}

HELP_TEXTS = {
    "save_steps": "Save a checkpoint (policy, value network, optimizer, RNG) every N updates; given alone it implies "
    "--save_strategy steps. (default: 500, used only with --save_strategy steps)",
    "resume_from_checkpoint": "Continue an interrupted run at its last saved update: a checkpoint-N folder, or `true` "
    "for the latest one in --output_dir. Pass the first run's other flags too.",
    "lora_target_modules": "Modules that get LoRA adapters; default with --use_peft: MusicGen's decoder attention "
    "and MLP projections q_proj k_proj v_proj out_proj fc1 fc2 (the policy's, and the value network's).",
    "model_name_or_path": "Policy to start from (Hub id or local folder); default: the recipe's, else the tiny "
    "offline MusicGen of the demo.",
}


def parse_arguments(argv: list[str] | None = None) -> tuple[ScriptArguments, MusicPPOConfig, ModelConfig, dict | None]:
    """Flags > `--config` file > the recipe's `training:` block and policy > dataclass defaults; `--help` grouped."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = TrlParser(
        (ScriptArguments, MusicPPOConfig, ModelConfig),
        usage="accelerate launch examples/ppo_musicrl.py [--recipe YAML] [--model_name_or_path ID_OR_PATH] [options]",
    )
    layout_help(
        parser,
        [
            ("script options", own_fields(ScriptArguments)),
            ("music RL options (MusicPPOConfig)", own_fields(MusicPPOConfig) + list(PPO_FIELDS_THAT_MATTER)),
            ("model and LoRA options (TRL ModelConfig)", own_fields(ModelConfig)),
        ],
        help_texts=HELP_TEXTS,
    )
    recipe_path = option_value(argv, "--recipe", parser)
    recipe = read_recipe(recipe_path) if recipe_path else None
    chosen = configured_options(parser, argv, recipe)  # by flag, --config file or recipe
    if "model_name_or_path" not in chosen:
        # The offline demo's defaults, below everything a user chose (set first: later defaults override them).
        # A clip length given in seconds replaces the demo's length in steps (setting both is an error).
        skip = chosen | ({"response_length"} if "audio_duration_s" in chosen else set())
        parser.set_defaults_with_config(**{key: value for key, value in DEMO_TRAINING.items() if key not in skip})
    if recipe is not None:
        apply_recipe_defaults(parser, recipe)
    if "save_steps" in chosen and "save_strategy" not in chosen:
        parser.set_defaults_with_config(save_strategy="steps")  # `save_steps: N` alone used to save nothing
    script_args, training_args, model_args = parser.parse_args_and_config(argv)
    if model_args.use_peft and not model_args.lora_target_modules:
        model_args.lora_target_modules = list(MUSICGEN_LORA_TARGET_MODULES)
    if (model_args.load_in_4bit or model_args.load_in_8bit) and not model_args.use_peft:
        bits = "--load_in_4bit" if model_args.load_in_4bit else "--load_in_8bit"
        raise ValueError(
            f"{bits} freezes the policy's weights in {bits[10]} bits, so only LoRA adapters can learn: add --use_peft "
            f"(e.g. --use_peft --lora_r 16), or drop {bits} to train the full model."
        )
    return script_args, training_args, model_args, recipe


def read_recipe(path: str) -> dict:
    """`--recipe PATH` read and checked, with errors naming the flag, the file and the fix (not yaml's traceback)."""
    shipped = "examples/recipes/musicrl_r.yaml, musicrl_u.yaml or musicrl_ru.yaml"
    if os.path.isdir(path):
        raise ValueError(f"--recipe: {path!r} is a folder; pass a recipe YAML file ({shipped}).")
    if not os.path.isfile(path):
        raise ValueError(
            f"--recipe: the file {path!r} does not exist (working directory: {os.getcwd()}); pass a recipe YAML file "
            f"({shipped})."
        )
    try:
        return load_recipe(path)
    except yaml.YAMLError as error:
        problem = " ".join(str(error).split())  # yaml's message spans several lines
        raise ValueError(
            f"--recipe: {path!r} is not valid YAML ({problem}); fix the file or start from {shipped}."
        ) from None


def anchor_of(script_args: ScriptArguments, model_args: ModelConfig, recipe: dict | None) -> str | None:
    """The KL anchor: `--ref_model`, else the recipe's. A recipe anchored to its own starting checkpoint (MusicRL-RU)
    stays anchored to the policy's starting point when `--model_name_or_path` moves it."""
    if script_args.ref_model or recipe is None:
        return script_args.ref_model
    if recipe["ref_model"] is not None and recipe["ref_model"] == recipe.get("model_name_or_path"):
        return model_args.model_name_or_path
    return recipe["ref_model"]


def check_models(script_args: ScriptArguments, model_args: ModelConfig, recipe: dict | None) -> None:
    """Every model of the run (policy, anchor, rewards) can be loaded: checked before any is (ModelLoadingError)."""
    models = {"policy": model_args.model_name_or_path, "KL anchor": anchor_of(script_args, model_args, recipe)}
    overrides = reward_overrides(script_args, recipe)
    try:
        check_recipe_models(recipe or {"reward_models": [], "name": "this run"}, models, **overrides)
        problems = []
        for (role, what), path in zip((("policy", "policy"), ("anchor", "KL anchor")), models.values()):
            if path is None:
                continue
            try:  # training starts from full weights (an adapter's merged folder), the policy with its processor
                check_model_folder(path, role, what, adapters=False, revision=model_args.model_revision)
            except ModelLoadingError as error:
                problems.append(str(error))
        if len(problems) == 1:
            raise ModelLoadingError(problems[0])
        if problems:
            raise ModelLoadingError(
                f"{len(problems)} models of this run cannot be loaded (nothing was loaded yet):\n- "
                + "\n- ".join(problems)
            )
    except ModelLoadingError as error:
        raise ModelLoadingError(
            f"{error} Point the policy elsewhere with --model_name_or_path, the anchor with --ref_model, and a "
            "recipe's reward with --reward_model NAME=PATH_OR_ID."
        ) from None


def reward_overrides(script_args: ScriptArguments, recipe: dict | None) -> dict[str, dict[str, str]]:
    """`--reward_model NAME=PATH` (the model) and `NAME.KEY=PATH` (its `tokenizer` or `processor`) as per-reward
    keyword overrides, NAME checked against the recipe's rewards.

    A model folder that holds its own tokenizer (a token-space preference model saved by train_reward_model.py)
    replaces the recipe's `tokenizer` too: the recipe's names the tokenizer of the recipe's model."""
    values = parse_name_values(script_args.reward_model, "--reward_model")
    if values and recipe is None:
        raise ValueError("--reward_model changes a recipe's reward models: pass --recipe as well.")
    entries = {entry.get("name"): entry for entry in (recipe or {}).get("reward_models", [])}
    overrides: dict[str, dict[str, str]] = {}
    for key, value in values.items():
        name, _, kwarg = key.partition(".")
        if name not in entries:
            raise ValueError(
                f"--reward_model: the recipe has no reward named {name!r}; its rewards are {list(entries)}."
            )
        if kwarg not in ("", *MODEL_KWARGS):
            raise ValueError(
                f"--reward_model {key}=...: a reward's {kwarg!r} cannot be set here; use NAME=PATH for its model or "
                f"NAME.KEY=PATH with KEY one of {[k for k in MODEL_KWARGS if k != 'model']}."
            )
        overrides.setdefault(name, {})[kwarg or "model"] = value
    for name, kwargs in overrides.items():
        recipe_kwargs = entries[name].get("kwargs") or {}
        model = kwargs.get("model")
        if model and "tokenizer" in recipe_kwargs and "tokenizer" not in kwargs and has_tokenizer(model):
            kwargs["tokenizer"] = model
    return overrides


def has_tokenizer(folder: str) -> bool:
    return os.path.isdir(folder) and any(
        os.path.isfile(os.path.join(folder, name)) for name in ("tokenizer_config.json", "tokenizer.json")
    )


def load_policy(model_args: ModelConfig, allow_pickle_weights: bool = False):
    # --load_in_4bit / --load_in_8bit quantize the decoder layers only (text encoder, codec and LM heads stay in full
    # precision; TRL's get_quantization_config would quantize the text encoder and miss MusicGen's module names).
    quantization = musicgen_quantization_config(
        model_args.load_in_4bit, model_args.load_in_8bit, model_args.dtype, model_args.bnb_4bit_quant_type,
        model_args.use_bnb_nested_quant,
    )
    if model_args.model_name_or_path is None:
        return tiny_musicgen(seed=0, quantization_config=quantization)  # the embedded offline default
    model = load_pretrained(
        MusicgenForConditionalGeneration.from_pretrained,
        model_args.model_name_or_path,
        "policy",
        allow_pickle_weights=allow_pickle_weights,  # --allow_pickle_weights (MusicPPOConfig): refused by default
        revision=model_args.model_revision,
        quantization_config=quantization,
        # Quantized weights load straight onto this rank's GPU (one full copy per rank under DDP).
        device_map={"": PartialState().local_process_index} if quantization and torch.cuda.is_available() else None,
        dtype=model_args.dtype if model_args.dtype in (None, "auto") else getattr(torch, model_args.dtype),
    )
    processor = load_pretrained(
        MusicgenProcessor.from_pretrained,
        model_args.model_name_or_path,
        "processor",
        allow_pickle_weights=allow_pickle_weights,
        revision=model_args.model_revision,
    )
    return model, processor


def load_train_prompts(script_args: ScriptArguments) -> Dataset:
    if script_args.dataset_name is None:
        return Dataset.from_dict({"prompt": DEMO_PROMPTS * 4})
    return prompt_split(script_args.dataset_name, script_args.dataset_split, script_args, "--dataset_name")


def prompt_split(name: str, split: str, script_args: ScriptArguments, flag: str) -> Dataset:
    """One split's prompts (column `prompt`) through the library's one prompt loader (text file, data file, dataset
    folder or Hub id; blank lines and empty rows refused with their number), errors naming `flag`."""
    return Dataset.from_dict({"prompt": load_prompts(name, split=split, column=script_args.prompt_column, what=flag)})


def load_eval_prompts(script_args: ScriptArguments, training_args: MusicPPOConfig) -> Dataset | None:
    """Prompts on which the trainer logs rewards, KL to the anchor and diversity (eval/*) every eval_steps."""
    if training_args.eval_strategy == "no":
        return None
    name = script_args.eval_dataset_name or script_args.dataset_name
    if name is None:
        return Dataset.from_dict({"prompt": DEMO_PROMPTS})
    flag = "--eval_dataset_name" if script_args.eval_dataset_name else "--dataset_name (for evaluation)"
    return prompt_split(name, script_args.eval_dataset_split, script_args, flag)


def load_rewards(script_args: ScriptArguments, model_args: ModelConfig):
    """The recipe's rewards as a list (each logged as rewards/<name>/mean) with their weights, or the demo reward."""
    if script_args.recipe is None:
        # The tiny codec's random filters give every code a similar spectrum but different levels, so loudness is
        # the signal a few minutes of RL on CPU can visibly move; the tiny model starts near -19 dBFS.
        return [LoudnessReward(floor_db=-25.0, ceiling_db=-15.0)], None, script_args.ref_model
    recipe = load_recipe(script_args.recipe)
    combination = rewards_from_recipe(recipe, **reward_overrides(script_args, recipe))
    ref_model = anchor_of(script_args, model_args, recipe)
    if recipe["reward_normalization"] == "none":
        names = list(combination.rewards)
        return list(combination.rewards.values()), [combination.weights[n] for n in names], ref_model
    return [combination], None, ref_model  # normalisation needs the scores of all rewards together


def print_summary(log_history: list[dict], output_dir: str, seconds: float) -> None:
    """A few lines instead of every update's metrics (those are in log_history.json): did the reward move, beyond
    the update-to-update noise, and how far did the policy go from its anchor."""
    scores = [entry["objective/scores"] for entry in log_history if "objective/scores" in entry]
    kls = [entry["objective/kl"] for entry in log_history if "objective/kl" in entry]
    if not scores:
        print(f"no update ran; output in {os.path.abspath(output_dir)}")
        return
    quarter = max(1, len(scores) // 4)
    first, last = scores[:quarter], scores[-quarter:]
    noise = statistics.stdev(first) if len(first) > 1 else float("nan")
    gain = statistics.mean(last) - statistics.mean(first)
    print(f"mean reward, first {quarter} updates: {statistics.mean(first):.4f} (sd {noise:.4f} between updates)")
    print(f"mean reward, last {quarter} updates:  {statistics.mean(last):.4f} ({gain / noise:+.1f} sd of the first "
          f"quarter)")
    print(f"KL to the anchor at the end: {kls[-1]:.2f} nats per clip; {len(scores)} updates in {seconds:.0f} s")
    print(f"model:  {os.path.abspath(output_dir)}")
    print(f"log:    {os.path.abspath(os.path.join(output_dir, 'log_history.json'))}")
    print(f"plot:   {os.path.abspath(os.path.join(output_dir, 'training_curves.png'))}")


def main():
    # Every mistake in the inputs ends in one `error: ...` line (the input, the problem, the fix), a non-zero exit and
    # nothing new on disk: everything is checked before a model is loaded or a folder is created.
    try:
        script_args, training_args, model_args, recipe = parse_arguments()
    except (ValueError, OSError) as error:  # recipe files, numbers out of range, flags that exclude each other
        sys.exit(f"error: {error}")
    if training_args.output_dir in (None, "trainer_output"):
        training_args.output_dir = os.path.join("outputs", "ppo_musicrl")

    try:
        check_models(script_args, model_args, recipe)
        resume = resolve_resume(training_args.resume_from_checkpoint, training_args.output_dir)
        train_dataset = load_train_prompts(script_args)
        eval_dataset = load_eval_prompts(script_args, training_args)
    except (ModelLoadingError, ValueError) as error:
        sys.exit(f"error: {error}")

    try:  # what only loading can find (e.g. pickle-only weights, refused without --allow_pickle_weights)
        model, processor = load_policy(model_args, training_args.allow_pickle_weights)
        rewards, weights, ref_model = load_rewards(script_args, model_args)
    except (ModelLoadingError, ValueError) as error:
        sys.exit(f"error: {error}")
    if weights is not None and training_args.reward_weights is None:
        training_args.reward_weights = weights
    # Imported here, not at the top: it imports peft, and peft bitsandbytes, whose import-time log line
    # musicrl_trl silences only once it is imported itself (see musicrl_trl/_console.py).
    from trl import get_peft_config

    peft_config = get_peft_config(model_args)
    if peft_config is not None and training_args.lora_value_trunk is None:
        # A LoRA run trains the separate value network through the same adapters (not a full decoder copy).
        training_args.lora_value_trunk = True

    start = time.time()
    output_existed = os.path.exists(training_args.output_dir)
    try:  # the trainer checks what depends on the model and the machine (e.g. --fp16 without a GPU)
        trainer = MusicPPOTrainer(
            args=training_args,
            processing_class=processor,
            model=model,
            ref_model=ref_model,
            reward_model=rewards,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            peft_config=peft_config,
        )
    except (ValueError, ModelLoadingError) as error:
        if not output_existed and os.path.isdir(training_args.output_dir) and training_args.should_save:
            shutil.rmtree(training_args.output_dir)  # only what this run made: an empty run is no run
        sys.exit(f"error: {error}")
    if training_args.should_save:  # every setting is final now, the reward weights and LoRA value trunk included
        write_run_config(training_args.output_dir, script=script_args, training=training_args, model=model_args)
    trainer.train(resume_from_checkpoint=resume)
    trainer.save_model(training_args.output_dir)

    if trainer.accelerator.is_main_process:
        print_summary(trainer.state.log_history, training_args.output_dir, time.time() - start)
    if training_args.push_to_hub:
        trainer.push_to_hub(dataset_name=script_args.dataset_name)  # card, samples, weights (see --push_lora)


if __name__ == "__main__":
    main()
    end_distributed_run()  # after main's trainer is gone: see musicrl_trl/distributed.py
