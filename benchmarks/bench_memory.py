"""Peak memory of MusicPPOTrainer set-ups, as ratios measured in one run, and time per episode on 1 vs 2 processes.

Run by hand (not in CI). Every configuration trains in a fresh subprocess from the same saved random weights:

    python benchmarks/bench_memory.py                          # musicgen-small's sizes (24-layer decoder)
    python benchmarks/bench_memory.py --depth-divisor 4        # a quarter of the layers: fits a small CPU box
    python benchmarks/bench_memory.py --batch-size 16 --response-length 503   # on a GPU: batch 16, 10 s clips
    python benchmarks/bench_memory.py --depth-divisor 4 --fsdp-vs-ddp   # full fine-tune on 2 ranks: FSDP vs DDP

Configurations (all with the default separate value network unless named otherwise):
  full             full fine-tuning of the decoder, with its frozen reference copy
  lora             LoRA on the decoder (r 16), anchor = the adapter-disabled policy; value trunk trained fully
  lora_lora_value  LoRA, and the separate value trunk trained through LoRA too (lora_value_trunk)
  lora_shared      LoRA with the value head on the policy's trunk (share_value_backbone)
  qlora            LoRA on a 4-bit (NF4) decoder; the value trunk is a LoRA'd 4-bit copy
  lora_rloo        LoRA with the value-free RLOO baseline (2 clips per prompt): no value network at all
Ratios: lora / full (goal <= 0.6), qlora / lora (goal <= 0.5), lora_lora_value / full, lora_shared / lora,
lora_rloo / lora (goal <= 0.5). Then
the lora configuration under torchrun on 1 and on 2 processes (CPU: `ACCELERATE_USE_CPU=true torchrun`; GPU: one
GPU per process), as seconds per episode.

Memory: on CUDA, ``torch.cuda.max_memory_allocated`` from just after the model is loaded to the end of training; on
CPU, the peak anonymous resident memory (RssAnon, sampled every 5 ms; weights copied out of the checkpoint's memory
map first) minus that after the imports, i.e. what the models, optimizer and activations add to the process.
Weights are random, from musicgen-small's config (T5-base text encoder, 24 x 1024 decoder with 4 codebooks of 2048,
32 kHz EnCodec): memory does not depend on their values. Results are printed and written as JSON (``--output``).
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time

CONFIGURATIONS = {
    "full": dict(peft=False, bits=None, share_value_backbone=False),
    "lora": dict(peft=True, bits=None, share_value_backbone=False),
    "lora_lora_value": dict(peft=True, bits=None, share_value_backbone=False, lora_value_trunk=True),
    "lora_shared": dict(peft=True, bits=None, share_value_backbone=True),
    "qlora": dict(peft=True, bits=4, share_value_backbone=False),
    "lora_rloo": dict(peft=True, bits=None, share_value_backbone=False, baseline="rloo"),
}
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]


def musicgen_small_config(depth_divisor: int = 1):
    """facebook/musicgen-small's sizes (as in bench_rollout.py, with T5's real 32k vocabulary), optionally with
    ``depth_divisor`` times fewer text-encoder and decoder layers (widths unchanged)."""
    from musicrl_trl.testing import tiny_musicgen_config

    config = tiny_musicgen_config()
    config.text_encoder.update(
        dict(d_model=768, d_kv=64, d_ff=3072, num_layers=12 // depth_divisor, num_heads=12, vocab_size=32128)
    )
    config.decoder.update(
        dict(hidden_size=1024, ffn_dim=4096, num_hidden_layers=24 // depth_divisor, num_attention_heads=16)
    )
    config.audio_encoder.update(dict(hidden_size=128, codebook_dim=128, num_filters=64, num_lstm_layers=2))
    return config


def save_random_model(directory: str, depth_divisor: int) -> None:
    import torch
    from transformers import MusicgenForConditionalGeneration

    from musicrl_trl.testing import tiny_musicgen

    torch.manual_seed(0)
    model = MusicgenForConditionalGeneration(musicgen_small_config(depth_divisor))
    tiny, processor = tiny_musicgen()
    model.generation_config = tiny.generation_config
    model.save_pretrained(directory)
    processor.save_pretrained(directory)


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _release_freed_memory() -> None:
    try:  # glibc keeps freed heap pages; hand them back so that they do not count as the next phase's memory
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


class _PeakSampler:
    """Highest RssAnon seen by a thread reading /proc/self/status every 5 ms (Linux has no high-water mark for
    anonymous memory alone; a peak shorter than 5 ms can be missed)."""

    def __init__(self, interval_s: float = 0.005):
        self.interval_s = interval_s
        self.peak_kib = _rss_kib("RssAnon")
        self._running = True
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while self._running:
            self.peak_kib = max(self.peak_kib, _rss_kib("RssAnon"))
            time.sleep(self.interval_s)

    def stop(self) -> int:
        self._running = False
        self._thread.join()
        return max(self.peak_kib, _rss_kib("RssAnon"))


def worker(settings: dict) -> dict:
    """Load, build the trainer, train; return memory and time. Runs in its own process (one per configuration)."""
    import bitsandbytes  # noqa: F401  (imported by every configuration; its import is not the run's memory)
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import MusicgenForConditionalGeneration, MusicgenProcessor

    from musicrl_trl import MusicPPOConfig, MusicPPOTrainer
    from musicrl_trl.quantization import musicgen_quantization_config

    gc.collect()
    _release_freed_memory()
    baseline_kib = _rss_kib("RssAnon")  # after the imports

    configuration = CONFIGURATIONS[settings["configuration"]]
    cuda = torch.cuda.is_available() and not settings["cpu"]
    bits = configuration["bits"]
    quantization = musicgen_quantization_config(load_in_4bit=bits == 4, load_in_8bit=bits == 8)
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    model = MusicgenForConditionalGeneration.from_pretrained(
        settings["model_dir"],
        quantization_config=quantization,
        device_map={"": local_rank} if quantization is not None and cuda else None,
    )
    processor = MusicgenProcessor.from_pretrained(settings["model_dir"])
    # from_pretrained leaves weights as views of the memory-mapped checkpoint, and the file stays mapped: pages read
    # while quantizing (or copying) count as file-backed RSS, whatever the model holds. The measure is therefore
    # anonymous memory (RssAnon), with the weights copied out of the mapping so that they count as what they are.
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            tensor.data = tensor.data.clone()
    gc.collect()
    _release_freed_memory()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    after_load_kib = _rss_kib("RssAnon")
    sampler = _PeakSampler()

    def loudness(prompts, audio, sampling_rate, codes, **kwargs):
        return audio.pow(2).mean((1, 2)).sqrt()

    args = MusicPPOConfig(
        output_dir=tempfile.mkdtemp(prefix="bench-memory-"),
        per_device_train_batch_size=settings["batch_size"],
        total_episodes=settings["batch_size"] * settings["updates"] * int(os.environ.get("WORLD_SIZE", 1)),
        response_length=settings["response_length"],
        guidance_scale=settings["guidance_scale"],
        share_value_backbone=configuration["share_value_backbone"],
        lora_value_trunk=configuration.get("lora_value_trunk"),
        baseline=configuration.get("baseline", "value"),
        num_generations=2 if configuration.get("baseline", "value") != "value" else 1,
        gradient_checkpointing=settings["checkpointing"],
        bf16=settings["bf16"],
        use_cpu=not cuda,
        learning_rate=1e-5,
        report_to=[],
        disable_tqdm=True,
        plot_training_curves=False,
        save_merged_lora=False,
        seed=0,
        # FSDP version 2 over the ranks (the --fsdp-vs-ddp comparison): policy and value network sharded per layer.
        **(dict(fsdp="full_shard auto_wrap", fsdp_config={"fsdp_version": 2}) if settings.get("fsdp") else {}),
    )
    peft_config = LoraConfig(r=16, lora_alpha=32, target_modules=LORA_TARGETS) if configuration["peft"] else None
    prompts = [f"an upbeat electronic track number {i}" for i in range(64)]
    trainer = MusicPPOTrainer(
        args,
        processor,
        model,
        reward_model=loudness,
        train_dataset=Dataset.from_dict({"prompt": prompts}),
        peft_config=peft_config,
    )
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    peak_kib = sampler.stop()
    shutil.rmtree(args.output_dir, ignore_errors=True)
    wrapper = trainer.accelerator.unwrap_model(trainer.model)
    result = {
        "configuration": settings["configuration"],
        "processes": trainer.accelerator.num_processes,
        "device": "cuda:" + torch.cuda.get_device_name() if cuda else "cpu",
        "trainable_parameters": sum(p.numel() for p in wrapper.parameters() if p.requires_grad),
        "seconds": seconds,
        "seconds_per_episode": seconds / trainer.state.episode,  # episodes of all processes together
        "episodes": trainer.state.episode,
    }
    for phase in ("rollout", "gather", "update"):  # seconds per update (gather: FSDP's all-gather for the rollout)
        seconds_logged = [log[f"timing/{phase}_s"] for log in trainer.state.log_history if f"timing/{phase}_s" in log]
        if seconds_logged:
            result[f"{phase}_s"] = sum(seconds_logged) / len(seconds_logged)
    if cuda:
        result["peak_bytes"] = torch.cuda.max_memory_allocated()
        result["measure"] = "torch.cuda.max_memory_allocated"
    else:
        result["peak_bytes"] = (peak_kib - baseline_kib) * 1024
        result["after_load_bytes"] = (after_load_kib - baseline_kib) * 1024
        result["measure"] = "peak anonymous RSS (RssAnon, sampled every 5 ms) minus RssAnon after imports"
    return result


def run_worker(settings: dict, processes: int | None = None) -> dict:
    """One configuration in a fresh process (``processes``: under torchrun with that many ranks)."""
    with tempfile.TemporaryDirectory(prefix="bench-memory-result-") as tmp:
        settings = {**settings, "result_dir": tmp}
        script = [os.path.abspath(__file__), "--worker", json.dumps(settings)]
        env = {**os.environ, "TRL_EXPERIMENTAL_SILENCE": "1"}
        if processes is None:
            command = [sys.executable, *script]
        else:
            command = [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--standalone",
                "--nproc_per_node",
                str(processes),
                *script,
            ]
            if settings["cpu"]:
                env.update(ACCELERATE_USE_CPU="true", OMP_NUM_THREADS=str(settings["threads_per_process"]))
                if settings.get("fsdp") is not None:
                    # --fsdp-vs-ddp: glibc keeps freed heap pages below its (growing) mmap threshold, so RSS would
                    # show memory FSDP has freed (the full weights before sharding); a fixed threshold returns them.
                    env["MALLOC_MMAP_THRESHOLD_"] = str(128 * 1024)
        completed = subprocess.run(command, env=env, capture_output=True, text=True)
        if completed.returncode != 0:
            raise RuntimeError(f"{settings['configuration']} failed:\n{completed.stderr[-3000:]}")
        ranks = []
        for rank in range(processes or 1):
            with open(os.path.join(tmp, f"rank{rank}.json")) as f:
                ranks.append(json.load(f))
        # Per-rank peak: the highest over the ranks (rank 0 also writes the saved model and card).
        return {**ranks[0], "peak_bytes": max(r["peak_bytes"] for r in ranks)}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--depth-divisor", type=int, default=1, help="divide musicgen-small's layer counts by this")
    parser.add_argument("--batch-size", type=int, default=2, help="rollouts per process per update")
    parser.add_argument("--response-length", type=int, default=20, help="decoder steps (50 per second of audio)")
    parser.add_argument("--guidance-scale", type=float, default=1.0)
    parser.add_argument("--updates", type=int, default=2)
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast in every configuration")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--cpu", action="store_true", help="stay on CPU even when a GPU is visible")
    parser.add_argument("--threads-per-process", type=int, default=1, help="CPU threads per process (1 vs 2 runs)")
    parser.add_argument("--configurations", nargs="+", default=list(CONFIGURATIONS), choices=list(CONFIGURATIONS))
    parser.add_argument("--skip-processes", action="store_true", help="skip the 1 vs 2 process timing")
    parser.add_argument(
        "--fsdp-vs-ddp", action="store_true",
        help="only: the full configuration on 2 processes, DDP against FSDP (per-rank peak; goal FSDP <= 0.65 x DDP)",
    )
    parser.add_argument("--output", default="bench_memory.json")
    args = parser.parse_args()

    if args.worker:
        settings = json.loads(args.worker)
        result = worker(settings)
        rank = int(os.environ.get("RANK", 0))
        with open(os.path.join(settings["result_dir"], f"rank{rank}.json"), "w") as f:
            json.dump(result, f)
        return

    import torch

    cpu = args.cpu or not torch.cuda.is_available()
    with tempfile.TemporaryDirectory(prefix="bench-memory-model-") as model_dir:
        save_random_model(model_dir, args.depth_divisor)
        settings = dict(
            model_dir=model_dir,
            batch_size=args.batch_size,
            response_length=args.response_length,
            guidance_scale=args.guidance_scale,
            updates=args.updates,
            bf16=args.bf16,
            checkpointing=args.gradient_checkpointing,
            cpu=cpu,
            threads_per_process=args.threads_per_process,
        )
        results = {}
        if args.fsdp_vs_ddp:
            for mode in ("ddp", "fsdp"):
                results[mode] = run_worker({**settings, "configuration": "full", "fsdp": mode == "fsdp"}, processes=2)
                print(
                    f"full, 2 processes, {mode}: per-rank peak {results[mode]['peak_bytes'] / 2**30:7.3f} GiB  "
                    f"{results[mode]['seconds_per_episode']:.3f} s/episode",
                    flush=True,
                )
            ratio = results["fsdp"]["peak_bytes"] / results["ddp"]["peak_bytes"]
            print(f"fsdp / ddp per-rank peak: {ratio:.3f} (goal <= 0.65: {'met' if ratio <= 0.65 else 'NOT met'})")
            with open(args.output, "w") as f:
                json.dump({"settings": vars(args), "results": results, "ratios": {"fsdp / ddp": ratio}}, f, indent=2)
            return
        for name in args.configurations:
            results[name] = run_worker({**settings, "configuration": name})
            print(
                f"{name:16s} peak {results[name]['peak_bytes'] / 2**30:7.3f} GiB  "
                f"trainable {results[name]['trainable_parameters'] / 1e6:8.1f} M  "
                f"{results[name]['seconds_per_episode']:.3f} s/episode",
                flush=True,
            )
        processes = {}
        if not args.skip_processes and (cpu or torch.cuda.device_count() >= 2):
            for count in (1, 2):
                processes[count] = run_worker({**settings, "configuration": "lora"}, processes=count)
                print(
                    f"lora on {count} process(es): {processes[count]['seconds_per_episode']:.3f} s/episode "
                    f"({processes[count]['episodes']} episodes in {processes[count]['seconds']:.1f} s)",
                    flush=True,
                )

    def ratio(a, b):
        return results[a]["peak_bytes"] / results[b]["peak_bytes"] if a in results and b in results else None

    ratios = {
        "lora / full": ratio("lora", "full"),
        "lora_lora_value / full": ratio("lora_lora_value", "full"),
        "qlora / lora": ratio("qlora", "lora"),
        "lora_shared / lora": ratio("lora_shared", "lora"),
        "lora_rloo / lora": ratio("lora_rloo", "lora"),
    }
    if processes:
        ratios["seconds per episode, 2 / 1 processes"] = (
            processes[2]["seconds_per_episode"] / processes[1]["seconds_per_episode"]
        )
    goals = {"lora / full": 0.6, "qlora / lora": 0.5, "lora_rloo / lora": 0.5}
    print(
        f"\nmusicgen-small sizes / {args.depth_divisor} in depth, batch {args.batch_size}, "
        f"{args.response_length} steps, device {'cpu' if cpu else torch.cuda.get_device_name()}"
    )
    for name, value in ratios.items():
        if value is not None:
            verdict = "met" if name in goals and value <= goals[name] else "NOT met"
            goal = f"  (goal <= {goals[name]}: {verdict})" if name in goals else ""
            print(f"{name:40s} {value:.3f}{goal}")
    report = {
        "settings": {k: v for k, v in settings.items() if k != "model_dir"} | vars(args),
        "results": results,
        "processes": processes,
        "ratios": ratios,
    }
    with open(args.output, "w") as f:
        json.dump(report, f, indent=2)
    print(f"written to {os.path.abspath(args.output)}")


if __name__ == "__main__":
    main()
