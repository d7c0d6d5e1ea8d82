"""Peak memory and time of one MusicPPOTrainer update against the clip length, with and without chunked LM heads.

Run by hand (not in CI). Each (model, length) runs in a fresh process: one rollout of ``--batch-size`` clips is
sampled and scored, then the update (anchor forward, PPO forward/backward, optimizer step) runs ``--repeats`` times
for every ``logits_chunk_size`` in ``--chunk-sizes``, alternating, so that the time ratios come from one process on
the same weights' sizes:

    python benchmarks/bench_long_clips.py                                    # tiny model, 100 to 1500 steps
    python benchmarks/bench_long_clips.py --model small --depth-divisor 6 --lora --lengths 100 500 1500
    python benchmarks/bench_long_clips.py --model small --lora --bf16 --batch-size 16 --lengths 1500   # on a GPU

Time: the best of the repeats, wall clock and (on a shared CPU, where other processes make the wall clock noisy) the
process's CPU time. Memory: on CUDA, ``torch.cuda.max_memory_allocated`` during the update minus the allocation before
it; on CPU, the peak anonymous resident memory (RssAnon, sampled every 2 ms) during the update minus that before it.
The worker runs with glibc's mmap threshold fixed at 128 KiB (``MALLOC_MMAP_THRESHOLD_``) so that every large tensor is
mapped and returned to the system when freed: without it glibc raises the threshold after the first free and later
tensors come from a heap that never shrinks, which hides the next phase's peak. Times on CPU are measured with
``--default-malloc`` (glibc as users run it): mapping every tensor afresh adds page faults that weigh more on the
chunked update's many smaller tensors. The per-step slope is fitted by least squares over the lengths and reported in
MB and in fp32 [B, K, V] tensors (the unit of the logits of one decoder step).

Models: ``tiny`` is :func:`musicrl_trl.testing.tiny_musicgen` (V 2048, K 4); ``small`` has musicgen-small's sizes
(T5-base text encoder, 24 x 1024 decoder, 4 codebooks of 2048; random weights), with ``--depth-divisor`` times fewer
layers. The reward is the clip's loudness, computed from the decoded audio.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_memory import _PeakSampler, _release_freed_memory, _rss_kib, musicgen_small_config  # noqa: E402

PROMPTS = ["bright shimmering bells", "deep dark bass", "happy upbeat tune", "slow sad piano"]
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]


def loudness(prompts, audio, sampling_rate, codes, **kwargs):
    return audio.pow(2).mean((1, 2)).sqrt()


def worker(settings: dict) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import MusicgenForConditionalGeneration

    from musicrl_trl import MusicPPOConfig, MusicPPOTrainer
    from musicrl_trl.testing import tiny_musicgen

    torch.manual_seed(0)
    model, processor = tiny_musicgen()
    if settings["model"] == "small":
        generation_config = model.generation_config
        model = MusicgenForConditionalGeneration(musicgen_small_config(settings["depth_divisor"]))
        model.generation_config = generation_config
    cuda = torch.cuda.is_available()
    batch = settings["batch_size"]
    config = MusicPPOConfig(
        output_dir=settings["output_dir"], per_device_train_batch_size=batch, total_episodes=batch,
        response_length=settings["length"], guidance_scale=settings["guidance_scale"], report_to=[],
        disable_tqdm=True, seed=0, bf16=settings["bf16"], use_cpu=not cuda, save_strategy="no",
        share_value_backbone=settings["lora"],  # LoRA: the value head reads the policy's trunk (no second decoder)
        baseline=settings["baseline"],
        num_generations=2 if settings["baseline"] != "value" else 1,
        # Recomputes the decoder trunk's activations in the backward: what is left per decoder step once the code
        # distributions are chunked (None, not False: transformers warns whenever the deprecated flag is not None).
        gradient_checkpointing=True if settings.get("gradient_checkpointing") else None,
    )
    trainer = MusicPPOTrainer(
        config, processor, model, reward_model=loudness,
        train_dataset=Dataset.from_dict({"prompt": (PROMPTS * batch)[:batch]}),
        peft_config=LoraConfig(r=16, lora_alpha=32, target_modules=LORA_TARGETS) if settings["lora"] else None,
    )
    update_batch, _ = trainer._rollout_and_score(trainer._prompt_batch(0))
    num_codebooks = update_batch.rollout.codes.shape[1]
    vocab = trainer.policy_model.config.decoder.vocab_size if hasattr(trainer.policy_model.config, "decoder") else None
    results = {str(chunk): {"peak_mb": [], "seconds": [], "cpu_seconds": []} for chunk in settings["chunk_sizes"]}
    for repeat in range(settings["repeats"]):
        for chunk in settings["chunk_sizes"]:
            if hasattr(trainer.args, "logits_chunk_size"):
                trainer.args.logits_chunk_size = chunk
            elif chunk is not None:
                raise SystemExit("this version of MusicPPOTrainer has no logits_chunk_size")
            gc.collect()
            _release_freed_memory()
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                before = torch.cuda.memory_allocated()
            else:
                sampler = _PeakSampler(interval_s=0.002)
                before = _rss_kib("RssAnon") * 1024
            tic, cpu_tic = time.perf_counter(), time.process_time()
            trainer._anchor_and_advantages(update_batch)
            trainer._ppo_update(update_batch, update=repeat)
            if cuda:
                torch.cuda.synchronize()
            seconds, cpu_seconds = time.perf_counter() - tic, time.process_time() - cpu_tic
            peak = torch.cuda.max_memory_allocated() if cuda else sampler.stop() * 1024
            for name in ("ref_log_dist", "ref_hidden", "kl", "values", "advantages", "returns"):
                if hasattr(update_batch, name):
                    setattr(update_batch, name, None)  # what the update kept is freed before the next one
            results[str(chunk)]["peak_mb"].append((peak - before) / 2**20)
            results[str(chunk)]["seconds"].append(seconds)
            results[str(chunk)]["cpu_seconds"].append(cpu_seconds)
    return {
        "length": settings["length"], "batch": batch, "num_codebooks": num_codebooks, "vocab_size": vocab,
        "device": torch.cuda.get_device_name() if cuda else f"CPU ({os.cpu_count()} cores)", "results": results,
    }


def run_worker(settings: dict) -> dict:
    with tempfile.TemporaryDirectory(prefix="bench-long-clips-") as tmp:
        settings = {**settings, "output_dir": tmp}
        env = {**os.environ, "TRL_EXPERIMENTAL_SILENCE": "1"}
        if not settings["default_malloc"]:
            env["MALLOC_MMAP_THRESHOLD_"] = str(128 * 1024)
        completed = subprocess.run(
            [sys.executable, os.path.abspath(__file__), "--worker", json.dumps(settings)],
            env=env, capture_output=True, text=True,
        )
        if completed.returncode != 0:
            raise RuntimeError(f"length {settings['length']} failed:\n{completed.stderr[-3000:]}")
        return json.loads(completed.stdout.strip().splitlines()[-1])


def slope(lengths: list[int], values: list[float]) -> float:
    """Least-squares slope of ``values`` against ``lengths``."""
    n = len(lengths)
    mean_x, mean_y = sum(lengths) / n, sum(values) / n
    return sum((x - mean_x) * (y - mean_y) for x, y in zip(lengths, values)) / sum((x - mean_x) ** 2 for x in lengths)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--model", choices=["tiny", "small"], default="tiny")
    parser.add_argument("--depth-divisor", type=int, default=1, help="fewer layers for --model small")
    parser.add_argument("--lora", action="store_true", help="LoRA r16 policy, value head on the policy's trunk")
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--gradient-checkpointing", action="store_true", help="recompute the trunk's activations")
    parser.add_argument("--baseline", default="value", choices=["value", "rloo", "group_mean"])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--guidance-scale", type=float, default=3.0)
    parser.add_argument("--lengths", type=int, nargs="+", default=[100, 250, 500, 1000, 1500])
    parser.add_argument(
        "--chunk-sizes", nargs="+", default=["none", "default"],
        help="logits_chunk_size values: 'none' (unchunked), 'default' (MusicPPOConfig's) or a number",
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--default-malloc", action="store_true",
        help="leave glibc's mmap threshold alone: for the times (mapping every tensor afresh costs page faults that "
        "weigh more on the unchunked update's large tensors), not for the memory (freed heap hides later peaks)",
    )
    parser.add_argument("--output", help="write the results as JSON here")
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return

    from musicrl_trl import MusicPPOConfig

    default_chunk = getattr(MusicPPOConfig, "logits_chunk_size", None)
    chunk_sizes = [
        None if c == "none" else (default_chunk if c == "default" else int(c)) for c in args.chunk_sizes
    ]
    chunk_sizes = list(dict.fromkeys(chunk_sizes))
    runs = []
    for length in args.lengths:
        settings = dict(
            model=args.model, depth_divisor=args.depth_divisor, lora=args.lora, bf16=args.bf16,
            gradient_checkpointing=args.gradient_checkpointing,
            baseline=args.baseline, batch_size=args.batch_size, guidance_scale=args.guidance_scale, length=length,
            chunk_sizes=chunk_sizes, repeats=args.repeats, default_malloc=args.default_malloc,
        )
        run = run_worker(settings)
        runs.append(run)
        cells = []
        for chunk in chunk_sizes:
            result = run["results"][str(chunk)]
            cells.append(
                f"chunk {chunk}: peak {max(result['peak_mb']):8.1f} MB, {min(result['seconds']):6.2f} s (best of "
                f"{len(result['seconds'])})"
            )
        print(f"{length:5d} steps | " + " | ".join(cells), flush=True)
    tensor_mb = args.batch_size * runs[0]["num_codebooks"] * (runs[0]["vocab_size"] or 2048) * 4 / 2**20
    print(f"\ndevice: {runs[0]['device']}; one fp32 [B, K, V] tensor = {tensor_mb:.3f} MB")
    summary = {}
    for chunk in chunk_sizes:
        peaks = [max(run["results"][str(chunk)]["peak_mb"]) for run in runs]
        per_step = slope(args.lengths, peaks) if len(runs) > 1 else float("nan")
        summary[str(chunk)] = {"slope_mb_per_step": per_step, "slope_tensors_per_step": per_step / tensor_mb}
        print(f"chunk {chunk}: {per_step:.3f} MB per decoder step = {per_step / tensor_mb:.2f} fp32 [B, K, V] tensors")
    if len(chunk_sizes) > 1:
        for run in runs:
            for clock in ("seconds", "cpu_seconds"):
                base = min(run["results"][str(chunk_sizes[0])][clock])
                ratios = ", ".join(
                    f"chunk {c}: {min(run['results'][str(c)][clock]) / base:.3f}x" for c in chunk_sizes[1:]
                )
                print(f"{clock} (best) at {run['length']} steps vs chunk {chunk_sizes[0]}: {ratios}")
    if args.output:
        with open(args.output, "w") as f:
            json.dump({"settings": vars(args), "runs": runs, "summary": summary}, f, indent=1)


if __name__ == "__main__":
    main()
