"""Generation overhead of `generate_rollout` against plain `model.generate`, same model, batch, length and sampling.

Run by hand (not in CI):

    python benchmarks/bench_rollout.py                      # tiny offline MusicGen
    python benchmarks/bench_rollout.py --architecture small # musicgen-small's architecture, random weights
    python benchmarks/bench_rollout.py --model facebook/musicgen-small --device cuda

Both variants are timed interleaved in the same process (median of `--repeats` runs after one warm-up each), and
the result is reported as a ratio: rollout time / generate time. The issue's bar is 1.10.
"""

import argparse
import statistics
import time

import torch
from transformers import MusicgenForConditionalGeneration, MusicgenProcessor

from musicrl_trl.rollout import SamplingConfig, generate_rollout, tokenize_prompts
from musicrl_trl.testing import tiny_musicgen, tiny_musicgen_config


def musicgen_small_architecture():
    """facebook/musicgen-small's layer sizes (T5-base encoder, 24 x 1024 decoder, 32 kHz EnCodec), random weights:
    the per-step compute of the real model, which is what the recording overhead is relative to."""
    config = tiny_musicgen_config()
    config.text_encoder.update(dict(d_model=768, d_kv=64, d_ff=3072, num_layers=12, num_heads=12))
    config.decoder.update(dict(hidden_size=1024, ffn_dim=4096, num_hidden_layers=24, num_attention_heads=16))
    config.audio_encoder.update(dict(hidden_size=128, codebook_dim=128, num_filters=64, num_lstm_layers=2))
    _, processor = tiny_musicgen()
    model = MusicgenForConditionalGeneration(config).eval()
    model.generation_config = tiny_musicgen()[0].generation_config
    return model, processor


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="model id or path; default: the tiny offline MusicGen")
    parser.add_argument(
        "--architecture", choices=["tiny", "small"], default="tiny",
        help="without --model: the tiny test model, or facebook/musicgen-small's sizes with random weights (offline)",
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=250, help="decoder steps (50 per second of audio)")
    parser.add_argument("--guidance-scale", type=float, default=3.0)
    parser.add_argument("--top-k", type=int, default=250)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    if args.model:
        model = MusicgenForConditionalGeneration.from_pretrained(args.model).eval()
        processor = MusicgenProcessor.from_pretrained(args.model)
    elif args.architecture == "small":
        model, processor = musicgen_small_architecture()
    else:
        model, processor = tiny_musicgen()
    model.to(args.device)
    prompts = [f"prompt number {i}: an upbeat electronic track" for i in range(args.batch_size)]
    sampling = SamplingConfig(guidance_scale=args.guidance_scale, temperature=0.99, top_k=args.top_k)
    ids, mask = tokenize_prompts(processor, prompts, args.device)

    def plain():
        with torch.no_grad():
            model.generate(
                input_ids=ids, attention_mask=mask, do_sample=True, max_new_tokens=args.steps,
                guidance_scale=sampling.guidance_scale, temperature=sampling.temperature, top_k=sampling.top_k,
            )

    def rollout():
        generate_rollout(model, processor, prompts, num_steps=args.steps, sampling=sampling)

    def timed(fn):
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        return time.perf_counter() - start

    plain(), rollout()  # warm-up
    times = {"generate": [], "rollout": []}
    for _ in range(args.repeats):
        times["generate"].append(timed(plain))
        times["rollout"].append(timed(rollout))
    generate_s, rollout_s = statistics.median(times["generate"]), statistics.median(times["rollout"])
    print(f"model={args.model or args.architecture} device={args.device} batch={args.batch_size} steps={args.steps} "
          f"guidance={args.guidance_scale} top_k={args.top_k} threads={torch.get_num_threads()}")
    print(f"plain generate   median {generate_s:.3f} s  (runs: {', '.join(f'{t:.3f}' for t in times['generate'])})")
    print(f"generate_rollout median {rollout_s:.3f} s  (runs: {', '.join(f'{t:.3f}' for t in times['rollout'])})")
    print(f"overhead ratio rollout / generate = {rollout_s / generate_s:.3f}")


if __name__ == "__main__":
    main()
