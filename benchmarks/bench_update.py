"""What one MusicPPOTrainer update costs, as a multiple of its rollout.

Run by hand (not in CI):

    python benchmarks/bench_update.py                        # mid-size MusicGen (decoder 512 x 6), CFG 3, batch 8
    python benchmarks/bench_update.py --architecture tiny --steps 50

An update is rollout + rewards + anchor forward + policy/value forward and backward (+ in older versions a no-grad
policy/value forward that recomputed what the rollout held). The script times every update from start to end (a
callback) and the rollout inside it (``generate_rollout`` wrapped by a timer), for ``--updates`` updates after one
warm-up, and prints the ratio of the medians: update time / rollout time, measured in the same run. It relies only
on the trainer's public surface, so it also runs against older checkouts (``PYTHONPATH=<checkout>``) for a
before/after comparison on the same machine.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch
from datasets import Dataset
from transformers import MusicgenForConditionalGeneration, TrainerCallback
from transformers.trainer_callback import PrinterCallback

import musicrl_trl.trainers.ppo_trainer as ppo_trainer
from musicrl_trl import MusicPPOConfig, MusicPPOTrainer
from musicrl_trl.testing import tiny_musicgen, tiny_musicgen_config


def mid_size_musicgen():
    """A MusicGen with a 512-wide, 6-layer decoder (random weights, offline): between the tiny test model and
    musicgen-small (1024 x 24), large enough that decoder compute dominates as it does on real models."""
    config = tiny_musicgen_config()
    config.decoder.update(dict(hidden_size=512, ffn_dim=2048, num_hidden_layers=6, num_attention_heads=8))
    model = MusicgenForConditionalGeneration(config).eval()
    tiny, processor = tiny_musicgen()
    model.generation_config = tiny.generation_config
    return model, processor


def loudness(prompts, audio, sampling_rate, codes, **kwargs):
    return audio.float().square().mean((1, 2)).sqrt()


class UpdateTimer(TrainerCallback):
    def __init__(self):
        self.started, self.durations = None, []

    def on_train_begin(self, args, state, control, **kwargs):
        self.started = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        now = time.perf_counter()
        self.durations.append(now - self.started)
        self.started = now


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--architecture", choices=["tiny", "mid"], default="mid")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=100, help="decoder steps per rollout")
    parser.add_argument("--guidance_scale", type=float, default=3.0)
    parser.add_argument("--updates", type=int, default=3, help="timed updates (after one warm-up update)")
    parser.add_argument(
        "--rollout_backend", default=None,
        help="MusicPPOConfig.rollout_backend (generate, static, compiled); default: the config's. Versions without "
        "the field always use generate.",
    )
    args = parser.parse_args()

    model, processor = mid_size_musicgen() if args.architecture == "mid" else tiny_musicgen()
    rollout_durations = []
    generate_rollout = ppo_trainer.generate_rollout

    def timed_rollout(*rollout_args, **rollout_kwargs):
        start = time.perf_counter()
        result = generate_rollout(*rollout_args, **rollout_kwargs)
        rollout_durations.append(time.perf_counter() - start)
        return result

    ppo_trainer.generate_rollout = timed_rollout
    timer = UpdateTimer()
    with tempfile.TemporaryDirectory() as output_dir:
        config = MusicPPOConfig(
            output_dir=output_dir, per_device_train_batch_size=args.batch_size,
            total_episodes=args.batch_size * (args.updates + 1), response_length=args.steps,
            guidance_scale=args.guidance_scale, learning_rate=1e-5, report_to=[], disable_tqdm=True,
            plot_training_curves=False,
        )
        if args.rollout_backend is not None:
            config.rollout_backend = args.rollout_backend
        trainer = MusicPPOTrainer(
            config, processor, model, reward_model=loudness, train_dataset=Dataset.from_dict(
                {"prompt": [f"prompt {i}: an upbeat electronic track" for i in range(args.batch_size)]}
            ), callbacks=[timer],
        )
        trainer.remove_callback(PrinterCallback)
        trainer.train()
    updates, rollouts = timer.durations[1:], rollout_durations[1:]
    update_s, rollout_s = statistics.median(updates), statistics.median(rollouts)
    print(f"architecture={args.architecture} batch={args.batch_size} steps={args.steps} "
          f"guidance={args.guidance_scale} threads={torch.get_num_threads()} module={ppo_trainer.__file__} "
          f"rollout_backend={getattr(config, 'rollout_backend', 'generate')}")
    print(f"update  median {update_s:.2f} s (runs: {', '.join(f'{t:.2f}' for t in updates)})")
    print(f"rollout median {rollout_s:.2f} s (runs: {', '.join(f'{t:.2f}' for t in rollouts)})")
    print(f"update / rollout = {update_s / rollout_s:.2f}")


if __name__ == "__main__":
    main()
