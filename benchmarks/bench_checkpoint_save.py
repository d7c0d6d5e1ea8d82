"""Time of one MusicPPOTrainer checkpoint save: crash-safe (staged, fsynced, renamed) against the old direct write.

Run by hand (not in CI):

    python benchmarks/bench_checkpoint_save.py                       # tiny offline MusicGen
    python benchmarks/bench_checkpoint_save.py --architecture mid    # 8 x 512 decoder, T5-small-sized encoder
    python benchmarks/bench_checkpoint_save.py --architecture small  # facebook/musicgen-small's sizes (~6 GB/save)

"before" is the code this replaced: TRL's/transformers' ``_save_checkpoint`` writing straight into
``checkpoint-N``, then the value model. "after" is ``MusicPPOTrainer._save_checkpoint`` (staging folder, fsync of
every file, rename, fsync of ``output_dir``). Both run on the same trainer, interleaved, each into its own fresh
``output_dir`` on the same file system, in alternating order and after an ``os.sync()``; the median of ``--repeats``
saves after one warm-up each is reported, and the ratio after / before. "before" leaves its data to the kernel's
write-back (later, outside the timing); "after" includes flushing it, the price of a folder that survives a power
cut, not only a killed process.
"""

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time

import torch
from datasets import Dataset
from safetensors.torch import save_model
from transformers import MusicgenForConditionalGeneration, Trainer

from musicrl_trl.testing import tiny_musicgen, tiny_musicgen_config
from musicrl_trl.trainers import MusicPPOConfig, MusicPPOTrainer
from musicrl_trl.trainers.value_model import VALUE_WEIGHTS_NAME

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_rollout import build_architecture  # noqa: E402


def mid_architecture():
    config = tiny_musicgen_config()
    config.text_encoder.update(dict(d_model=512, d_kv=64, d_ff=2048, num_layers=6, num_heads=8))
    config.decoder.update(dict(hidden_size=512, ffn_dim=2048, num_hidden_layers=8, num_attention_heads=8))
    model = MusicgenForConditionalGeneration(config).eval()
    model.generation_config = tiny_musicgen()[0].generation_config
    return model, tiny_musicgen()[1]


def save_before(trainer: MusicPPOTrainer) -> None:
    """The previous MusicPPOTrainer._save_checkpoint: the card, transformers' save straight into checkpoint-N, then the
    value model."""
    trainer.create_model_card()
    Trainer._save_checkpoint(trainer, trainer.model, trial=None)
    checkpoint_dir = os.path.join(trainer.args.output_dir, f"checkpoint-{trainer.state.global_step}")
    save_model(
        trainer.accelerator.unwrap_model(trainer.model).value_model, os.path.join(checkpoint_dir, VALUE_WEIGHTS_NAME)
    )


def save_after(trainer: MusicPPOTrainer) -> None:
    trainer._save_checkpoint(trainer.model, trial=None)


def folder_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(path) for f in files)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--architecture", choices=["tiny", "mid", "small"], default="tiny")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--dir", default=None, help="where to write (default: a temporary folder)")
    options = parser.parse_args()

    model, processor = {"tiny": tiny_musicgen, "mid": mid_architecture, "small": lambda: build_architecture("small")}[
        options.architecture
    ]()
    root = tempfile.mkdtemp(dir=options.dir, prefix="bench-checkpoint-")
    args = MusicPPOConfig(
        output_dir=root,
        per_device_train_batch_size=2,
        total_episodes=2,
        response_length=8,
        report_to=[],
        disable_tqdm=True,
        save_total_limit=1,
        plot_training_curves=False,
    )
    trainer = MusicPPOTrainer(
        args,
        processor,
        model,
        reward_model=lambda **kw: torch.zeros(2),
        train_dataset=Dataset.from_dict({"prompt": ["a"]}),
    )
    # An optimizer with state, as in a running job: one step with zero gradients fills Adam's moments.
    for param in trainer.model.parameters():
        if param.requires_grad:
            param.grad = torch.zeros_like(param)
    trainer.optimizer.step()

    timings = {"before": [], "after": []}
    save = {"before": save_before, "after": save_after}
    try:
        for repeat in range(options.repeats + 1):
            for name in ("before", "after") if repeat % 2 else ("after", "before"):
                trainer.args.output_dir = os.path.join(root, name)
                trainer.state.global_step = repeat + 1
                # Both start with no dirty pages: otherwise one save pays for the write-back of the other's data.
                os.sync()
                start = time.perf_counter()
                save[name](trainer)
                elapsed = time.perf_counter() - start
                if repeat:  # the first save of each warms caches (imports, allocator)
                    timings[name].append(elapsed)
        size = folder_bytes(os.path.join(root, "after", f"checkpoint-{options.repeats + 1}"))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    before, after = statistics.median(timings["before"]), statistics.median(timings["after"])
    print(f"architecture={options.architecture} checkpoint={size / 2**20:.1f} MiB repeats={options.repeats}")
    print(f"before (direct write):            {before * 1000:8.1f} ms")
    print(f"after  (staged, fsync, rename):   {after * 1000:8.1f} ms")
    print(f"ratio after / before:             {after / before:8.2f}")


if __name__ == "__main__":
    main()
