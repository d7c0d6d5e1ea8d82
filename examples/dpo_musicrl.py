"""Preference optimisation of MusicGen straight from votes with MusicDPOTrainer (DPO, IPO, ...): no reward model, no
RL rollouts.

Offline demo (no arguments: the tiny random MusicGen votes on its own clips through a scripted rater who prefers the
louder clip, noisily, as the human-feedback loop's raters do; about a minute on CPU, nothing downloaded):

    accelerate launch examples/dpo_musicrl.py

On the votes of the listening app (`musicrl-app export --out votes/` writes prompt, chosen, rejected, tie), LoRA on
the decoder of a real MusicGen:

    accelerate launch examples/dpo_musicrl.py \
        --dataset_name votes/ --model_name_or_path facebook/musicgen-small \
        --use_peft --lora_r 16 --lora_alpha 32 --lora_target_modules q_proj k_proj v_proj out_proj fc1 fc2 \
        --beta 0.1 --learning_rate 5e-6 --per_device_train_batch_size 4 --num_train_epochs 3 \
        --guidance_scale 3 --output_dir musicgen-small-dpo

QLoRA: add `--load_in_4bit` (or `--load_in_8bit`) to `--use_peft`; only the decoder's transformer layers are quantized,
and the reference is the quantized policy with its adapter disabled.

`--dataset_name` is a folder written by `musicrl-app export` (or any `save_to_disk` folder) or a Hub dataset id, with
`prompt` and either `chosen` / `rejected` audio or `chosen_codes` / `rejected_codes`; ties are skipped. `--loss_type
ipo` (or hinge, robust), `--precompute_ref_log_probs` and every TrainingArguments flag work as in TRL's DPO scripts.
"""

from __future__ import annotations

import io
import math
import os
import random
import sys
from dataclasses import dataclass, field

import soundfile as sf
import torch
from datasets import Dataset, Features, load_dataset, load_from_disk
from transformers import MusicgenForConditionalGeneration, MusicgenProcessor
from trl import ModelConfig, TrlParser, get_peft_config

from musicrl_trl import MusicDPOConfig, MusicDPOTrainer, SamplingConfig, generate_rollout
from musicrl_trl.app.export import AUDIO_CELL, CODE_FEATURES, FEATURES
from musicrl_trl.quantization import musicgen_quantization_config, prepare_quantized_model
from musicrl_trl.testing import tiny_musicgen

DEMO_PROMPTS = [
    "bright shimmering bells over a soft pad",
    "deep dark bass drone",
    "an upbeat electronic dance track",
    "slow sad piano ballad",
]
# Offline demo: 160 votes on 0.3 s clips (as many as the human-feedback loop's raters cast), four passes at a learning
# rate the tiny model moves at. Applied only where the flag was left at MusicDPOConfig's default.
DEMO_TRAINING = {
    "learning_rate": 1e-3,
    "per_device_train_batch_size": 8,
    "lr_scheduler_type": "constant",
    "num_train_epochs": 4.0,
}


@dataclass
class ScriptArguments:
    """What to train on (model and LoRA flags come from TRL's ModelConfig)."""

    dataset_name: str | None = field(
        default=None,
        metadata={"help": "Preference pairs: a `musicrl-app export` / save_to_disk folder or a Hub dataset id; "
                  "default: the offline demo's scripted votes."},
    )  # fmt: skip
    dataset_split: str = field(default="train", metadata={"help": "Split of a Hub dataset to train on."})
    ref_model: str | None = field(
        default=None, metadata={"help": "Reference model (id or path); default: the starting policy."}
    )
    demo_votes: int = field(default=160, metadata={"help": "Votes the demo's scripted rater casts."})
    demo_taste_db: float = field(
        default=0.25, metadata={"help": "Demo rater: A wins with probability sigmoid((dB_A - dB_B) / taste_db)."}
    )
    demo_tie_db: float = field(default=0.02, metadata={"help": "Demo rater: a tie below this loudness difference."})


def wav_bytes(clip: torch.Tensor, sampling_rate: int) -> bytes:
    buffer = io.BytesIO()
    sf.write(buffer, clip.float().clamp(-1, 1).T.numpy(), sampling_rate, format="WAV", subtype="PCM_16")
    return buffer.getvalue()


def loudness_db(audio: torch.Tensor) -> torch.Tensor:
    """Mean power in dB per clip, audio [B, C, N]."""
    return 10 * torch.log10(audio.float().pow(2).mean(dim=(1, 2)) + 1e-12)


def scripted_votes(model, processor, args: ScriptArguments, seed: int) -> Dataset:
    """The demo's data: two clips per prompt from the policy, a noisy loudness-loving rater's vote, in the columns
    `musicrl-app export` writes for a pool that kept its codes (audio cells with WAV bytes, and the sampled codes:
    the trainer uses those, the exact tokens the rater heard, rather than a re-encoding of the audio)."""
    rater = random.Random(seed)
    rows = {"prompt": [], "chosen": [], "rejected": [], "tie": [], "chosen_codes": [], "rejected_codes": []}
    torch.manual_seed(seed)
    prompts = [DEMO_PROMPTS[index % len(DEMO_PROMPTS)] for index in range(args.demo_votes)]
    with torch.no_grad():
        rollout = generate_rollout(model, processor, prompts * 2, num_steps=20)
    loudness = loudness_db(rollout.audio).tolist()
    for index, prompt in enumerate(prompts):
        a, b = index, index + len(prompts)
        difference = loudness[a] - loudness[b]
        a_wins = rater.random() < 1 / (1 + math.exp(-difference / args.demo_taste_db))
        won, lost = (a, b) if a_wins else (b, a)
        rows["prompt"].append(prompt)
        for column, clip in (("chosen", won), ("rejected", lost)):
            cell = {"bytes": wav_bytes(rollout.audio[clip], rollout.sampling_rate), "path": f"{clip}.wav"}
            rows[column].append(cell)
            rows[f"{column}_codes"].append(rollout.codes[clip].tolist())
        rows["tie"].append(abs(difference) < args.demo_tie_db)
    features = Features({name: {**FEATURES, **CODE_FEATURES}[name] for name in rows})
    return Dataset.from_dict(rows, features=Features({**features, "chosen": AUDIO_CELL, "rejected": AUDIO_CELL})).cast(
        features
    )


def load_pairs(args: ScriptArguments) -> Dataset:
    if os.path.isdir(args.dataset_name):
        dataset = load_from_disk(args.dataset_name)
        return dataset[args.dataset_split] if hasattr(dataset, "keys") else dataset
    return load_dataset(args.dataset_name, split=args.dataset_split)


def mean_loudness(model, processor, seed: int = 1234) -> float:
    torch.manual_seed(seed)
    with torch.no_grad():
        rollout = generate_rollout(model, processor, DEMO_PROMPTS * 4, num_steps=20, sampling=SamplingConfig())
    return loudness_db(rollout.audio).mean().item()


def main() -> None:
    parser = TrlParser((ScriptArguments, MusicDPOConfig, ModelConfig))
    script_args, training_args, model_args = parser.parse_args_and_config()
    demo = script_args.dataset_name is None and model_args.model_name_or_path is None
    if training_args.output_dir in (None, "trainer_output"):
        training_args.output_dir = os.path.join("outputs", "dpo_musicrl")

    # Dataset (read first: a wrong path fails before any model is loaded), model and processor
    train_dataset = None
    if script_args.dataset_name is not None:
        try:
            train_dataset = load_pairs(script_args)
        except (OSError, ValueError) as error:
            sys.exit(f"error: cannot load --dataset_name {script_args.dataset_name}: {error}")
    # --load_in_4bit / --load_in_8bit (QLoRA, with --use_peft) quantize the decoder layers only, as in
    # examples/ppo_musicrl.py (TRL's get_quantization_config would quantize the text encoder too); without this the
    # flags were parsed and silently ignored.
    try:
        quantization = musicgen_quantization_config(
            model_args.load_in_4bit, model_args.load_in_8bit, model_args.dtype, model_args.bnb_4bit_quant_type,
            model_args.use_bnb_nested_quant,
        )  # fmt: skip
    except ValueError as error:
        sys.exit(f"error: {error}")
    if model_args.model_name_or_path is None:
        model, processor = tiny_musicgen(seed=training_args.seed, quantization_config=quantization)
    else:
        model = MusicgenForConditionalGeneration.from_pretrained(model_args.model_name_or_path,
                                                                 quantization_config=quantization)  # fmt: skip
        processor = MusicgenProcessor.from_pretrained(model_args.model_name_or_path)
    # Before the demo samples with a 4-bit model: on AVX512-BF16 CPUs bitsandbytes repacks weights at the first no-grad
    # forward into a layout without autograd (and fails on the tiny model's widths); a no-op for unquantized models.
    prepare_quantized_model(model)
    if train_dataset is None:  # the demo's votes, on the policy's own clips
        train_dataset = scripted_votes(model, processor, script_args, training_args.seed)
    training_args.hub_dataset_name = training_args.hub_dataset_name or script_args.dataset_name  # for the card
    if demo:
        defaults = MusicDPOConfig("_")
        for name, value in DEMO_TRAINING.items():
            if getattr(training_args, name) == getattr(defaults, name):
                setattr(training_args, name, value)
    eval_dataset = Dataset.from_dict({"prompt": DEMO_PROMPTS}) if demo else None
    before = mean_loudness(model, processor) if demo else None

    # Training
    try:
        trainer = MusicDPOTrainer(
            model, ref_model=script_args.ref_model, args=training_args, train_dataset=train_dataset,
            eval_dataset=eval_dataset, processing_class=processor, peft_config=get_peft_config(model_args),
        )
    except (ValueError, TypeError) as error:  # unreadable rows, missing columns, settings that do not fit
        sys.exit(f"error: {error}")
    resume = training_args.resume_from_checkpoint
    trainer.train(resume_from_checkpoint=True if str(resume).lower() == "true" else resume)

    # Save (and push, with --push_to_hub), evaluate
    trainer.save_model(training_args.output_dir)
    metrics = trainer.evaluate() if eval_dataset is not None else {}
    if trainer.is_world_process_zero():
        print(f"trained on {trainer.num_pairs} pairs ({trainer.num_ties_skipped} ties skipped); saved to "
              f"{training_args.output_dir}")  # fmt: skip
        if demo:
            after = mean_loudness(trainer.accelerator.unwrap_model(trainer.model), processor)
            print(f"mean loudness of fresh samples: {before:.2f} dB before, {after:.2f} dB after; "
                  f"KL to the reference {metrics.get('eval_kl', float('nan')):.3g} nats per clip")  # fmt: skip


if __name__ == "__main__":
    main()
