"""Reward throughput: clips scored per second, batch of 10 s clips at MusicGen's 32 kHz.

Run by hand (not in CI):

    python benchmarks/bench_rewards.py                              # tiny offline models, CPU
    python benchmarks/bench_rewards.py --architecture full          # real-size CLAP / AST towers, random weights
    python benchmarks/bench_rewards.py --device cuda --batch-size 32

With the tiny models the numbers measure this library's own work around the models (resampling to each reward's
rate, windowing, torch log-mel / fbank features, batching) plus a very small network: an upper bound on throughput,
not what laion/larger_clap_music costs. ``--architecture full`` builds the towers at the size of the public
checkpoints (CLAP HTSAT-base + RoBERTa-base, AST-base) with random weights, which is the realistic compute.

Each reward is timed ``--repeats`` times after one warm-up call (kernels, caches); the table gives the median.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers import ASTConfig, ClapConfig, ClapModel

from musicrl_trl.reward_models import (
    BrightnessReward,
    LoudnessReward,
    MusicRewardConfig,
    MusicRewardModel,
    PreferenceReward,
    QualityReward,
    SilencePenalty,
    TextAdherenceReward,
)
from musicrl_trl.testing import tiny_clap, tiny_music_reward


def build_rewards(architecture: str, device: str) -> dict[str, object]:
    clap, processor = tiny_clap()
    if architecture == "full":
        # laion/clap-htsat-unfused's sizes (ClapConfig defaults); the tiny processor's tokenizer has a small
        # vocabulary,
        # which changes nothing in the cost of a forward pass.
        config = ClapConfig()
        config.text_config.vocab_size = len(processor.tokenizer)
        clap = ClapModel(config).eval()
        quality_model = MusicRewardModel(
            MusicRewardConfig(backbone_config=ASTConfig(), sampling_rate=16_000, num_mel_bins=128, max_length_s=10.255)
        ).eval()
    else:
        quality_model = tiny_music_reward()
    return {
        "TextAdherenceReward (CLAP, 10 s windows)": TextAdherenceReward(clap, processor, device=device),
        "QualityReward (first/last 20 s)": QualityReward(quality_model, device=device),
        "PreferenceReward (audio space)": PreferenceReward(quality_model, device=device),
        "LoudnessReward": LoudnessReward(),
        "BrightnessReward(target_from_prompt)": BrightnessReward(target_from_prompt=True),
        "SilencePenalty": SilencePenalty(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--architecture", choices=["tiny", "full"], default="tiny")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--sampling-rate", type=int, default=32_000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    rewards = build_rewards(args.architecture, args.device)
    generator = torch.Generator().manual_seed(0)
    audio = 0.1 * torch.randn(args.batch_size, 1, round(args.seconds * args.sampling_rate), generator=generator)
    audio = audio.to(args.device)
    prompts = ["bright shimmering synth arpeggio", "deep dark bass drone"] * (args.batch_size // 2 + 1)
    prompts = prompts[: args.batch_size]

    print(
        f"architecture={args.architecture} device={args.device} threads={torch.get_num_threads()} "
        f"batch={args.batch_size} x {args.seconds:g} s at {args.sampling_rate} Hz, median of {args.repeats}"
    )
    print(f"{'reward':<42} {'s/batch':>9} {'clips/s':>9}")
    for name, reward in rewards.items():
        reward(prompts=prompts, audio=audio, sampling_rate=args.sampling_rate)  # warm-up
        times = []
        for _ in range(args.repeats):
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            start = time.perf_counter()
            reward(prompts=prompts, audio=audio, sampling_rate=args.sampling_rate)
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        median = statistics.median(times)
        print(f"{name:<42} {median:>9.3f} {args.batch_size / median:>9.1f}")


if __name__ == "__main__":
    main()
