"""Rollout time of every backend of `generate_rollout` against plain `model.generate`, in one run.

Run by hand (not in CI):

    OMP_NUM_THREADS=1 python benchmarks/bench_rollout.py                       # CPU: tiny and mid-size decoders
    python benchmarks/bench_rollout.py --architectures small --device cuda \\
        --dtype bfloat16 --batch-size 16 --steps 500                            # GPU: musicgen-small's sizes
    python benchmarks/bench_rollout.py --model facebook/musicgen-small --device cuda --dtype bfloat16

Architectures (random weights, offline): ``tiny`` is the test model (decoder 32 x 2 layers), ``mid`` a decoder of
512 x 6 layers, ``small`` facebook/musicgen-small's sizes (T5-base encoder, decoder 1024 x 24 layers). Every variant
runs the same prompts, batch, length and sampling (CFG 3, temperature 0.99, top-k 250 by default):

- ``generate``: plain ``model.generate`` (the baseline, ratio 1);
- ``rollout[<backend>]``: ``generate_rollout(..., backend=<backend>)`` for ``generate``, ``static``, ``compiled``.

Each variant gets one warm-up call first (for ``compiled`` that call includes ``torch.compile``; its time is
reported as "first call"), then the variants are timed interleaved, ``--repeats`` rounds, and the median is
reported with its ratio to plain ``generate``'s median, in wall-clock time and in this process's CPU time (on a
shared machine the CPU time, with ``OMP_NUM_THREADS=1``, is the steadier measure of the work done). On CUDA the
table also gives decoder steps per second against the memory-bandwidth bound: one step must read every decoder
weight once, so the bound is HBM bandwidth / decoder weight bytes (``--hbm-gbps``, default from the device name).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers import MusicgenForConditionalGeneration, MusicgenProcessor

from musicrl_trl.rollout import SamplingConfig, generate_rollout, tokenize_prompts
from musicrl_trl.sampler import ROLLOUT_BACKENDS
from musicrl_trl.testing import tiny_musicgen, tiny_musicgen_config

# Peak HBM bandwidth in GB/s of the accelerators this is likely to run on (vendor data sheets).
HBM_GBPS = {"H100": 3350.0, "H200": 4800.0, "A100": 2039.0, "L4": 300.0, "A10": 600.0}


def build_architecture(name: str):
    """A MusicGen with random weights at one of the sizes above, with the tiny model's processor and sampling
    defaults (offline: nothing is downloaded)."""
    tiny, processor = tiny_musicgen()
    if name == "tiny":
        return tiny, processor
    config = tiny_musicgen_config()
    if name == "mid":
        config.decoder.update(dict(hidden_size=512, ffn_dim=2048, num_hidden_layers=6, num_attention_heads=8))
    elif name == "small":
        config.text_encoder.update(dict(d_model=768, d_kv=64, d_ff=3072, num_layers=12, num_heads=12))
        config.decoder.update(dict(hidden_size=1024, ffn_dim=4096, num_hidden_layers=24, num_attention_heads=16))
        config.audio_encoder.update(dict(hidden_size=128, codebook_dim=128, num_filters=64, num_lstm_layers=2))
    else:
        raise ValueError(f"unknown architecture {name!r}: use tiny, mid or small")
    model = MusicgenForConditionalGeneration(config).eval()
    model.generation_config = tiny.generation_config
    return model, processor


def decoder_weight_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.decoder.parameters())


def hbm_bandwidth(device: str, override: float | None) -> float | None:
    if override:
        return override
    if not device.startswith("cuda"):
        return None
    name = torch.cuda.get_device_name(torch.device(device))
    return next((gbps for key, gbps in HBM_GBPS.items() if key in name), None)


def bench(model, processor, label: str, args) -> list[dict]:
    device = args.device
    model.to(device=device, dtype=getattr(torch, args.dtype))
    prompts = [f"prompt number {i}: an upbeat electronic track with drums" for i in range(args.batch_size)]
    sampling = SamplingConfig(guidance_scale=args.guidance_scale, temperature=0.99, top_k=args.top_k)
    ids, mask = tokenize_prompts(processor, prompts, device)

    def plain():
        model.generate(
            input_ids=ids,
            attention_mask=mask,
            do_sample=True,
            max_new_tokens=args.steps,
            guidance_scale=sampling.guidance_scale,
            temperature=sampling.temperature,
            top_k=sampling.top_k,
        )

    def rollout(backend):
        return lambda: generate_rollout(
            model, processor, prompts, num_steps=args.steps, sampling=sampling, backend=backend
        )

    def timed(fn):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        start, start_cpu = time.perf_counter(), time.process_time()
        with torch.no_grad():
            fn()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        return time.perf_counter() - start, time.process_time() - start_cpu

    variants = {"generate": plain} | {f"rollout[{b}]": rollout(b) for b in args.backends}
    first = {name: timed(fn)[0] for name, fn in variants.items()}  # warm-up; includes torch.compile
    times = {name: [] for name in variants}
    cpu_times = {name: [] for name in variants}
    for _ in range(args.repeats):
        for name, fn in variants.items():
            wall, cpu = timed(fn)
            times[name].append(wall)
            cpu_times[name].append(cpu)
    base = statistics.median(times["generate"])
    base_cpu = statistics.median(cpu_times["generate"])
    bandwidth = hbm_bandwidth(device, args.hbm_gbps)
    bound = bandwidth * 1e9 / decoder_weight_bytes(model) if bandwidth else None
    rows = []
    for name in variants:
        median, median_cpu = statistics.median(times[name]), statistics.median(cpu_times[name])
        rows.append(
            dict(
                architecture=label,
                variant=name,
                median_s=median,
                ratio=median / base,
                first_call_s=first[name],
                cpu_s=median_cpu,
                cpu_ratio=median_cpu / base_cpu,
                steps_per_s=args.steps / median,
                bound_steps_per_s=bound,
            )
        )
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="model id or path instead of --architectures")
    parser.add_argument("--architectures", nargs="+", default=["tiny", "mid"], choices=["tiny", "mid", "small"])
    parser.add_argument("--backends", nargs="+", default=list(ROLLOUT_BACKENDS), choices=list(ROLLOUT_BACKENDS))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=100, help="decoder steps (50 per second of audio)")
    parser.add_argument("--guidance-scale", type=float, default=3.0)
    parser.add_argument("--top-k", type=int, default=250)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--hbm-gbps", type=float, default=None, help="HBM bandwidth for the bound (GB/s)")
    args = parser.parse_args()

    if args.model:
        models = [
            (
                args.model,
                MusicgenForConditionalGeneration.from_pretrained(args.model).eval(),
                MusicgenProcessor.from_pretrained(args.model),
            )
        ]
    else:
        models = [(name, *build_architecture(name)) for name in args.architectures]
    device_name = (
        torch.cuda.get_device_name(torch.device(args.device))
        if args.device.startswith("cuda")
        else (f"CPU, {torch.get_num_threads()} thread(s)")
    )
    print(
        f"device={device_name} dtype={args.dtype} batch={args.batch_size} steps={args.steps} "
        f"guidance={args.guidance_scale} top_k={args.top_k} repeats={args.repeats} torch={torch.__version__}"
    )
    print(
        "| architecture | variant | median s | x generate | CPU s | x generate (CPU) | first call s | steps/s "
        "| bound steps/s |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for label, model, processor in models:
        for row in bench(model, processor, label, args):
            bound = f"{row['bound_steps_per_s']:.0f}" if row["bound_steps_per_s"] else "-"
            print(
                f"| {row['architecture']} | {row['variant']} | {row['median_s']:.3f} | {row['ratio']:.2f} | "
                f"{row['cpu_s']:.3f} | {row['cpu_ratio']:.2f} | {row['first_call_s']:.1f} | "
                f"{row['steps_per_s']:.1f} | {bound} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
