"""Reward gain against KL for both KL forms: the paper's analytic KL loss term against TRL's per-step reward penalty.

Run by hand (not in CI), on the tiny offline MusicGen and a signal reward computed from the audio:

    python benchmarks/bench_kl_frontier.py                         # 3 seeds, 4 kl_coefs per form, ~60 updates each
    python benchmarks/bench_kl_frontier.py --seeds 0 1 2 3 4 --updates 100 --output_dir outputs/kl_frontier

For every KL form ("loss": ``kl_penalty="loss"``, the exact KL differentiated analytically; "reward":
``kl_penalty="reward"``, the exact KL as a per-step reward penalty), every ``kl_coef`` and every seed it trains a fresh
tiny policy with otherwise identical settings, and records the final reward gain (mean score of the last 10 % of
updates over the first 10 %, in %) and the final KL to the anchor (nats per clip, mean over the last 10 % of
updates). ``kl_coef=0`` is the unanchored baseline shared by both forms. It writes ``frontier.json``, ``frontier.md``
(mean +- sd over seeds) and ``frontier.png`` (gain against KL, one line per form) to ``--output_dir``.

Expected: at equal KL the loss form reaches at least the reward form's gain, since its KL gradient carries no
sampling noise; and the reward form barely restrains the KL at all at the learning rates that learn.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time

import torch
from datasets import Dataset
from transformers.trainer_callback import PrinterCallback

from musicrl_trl import MusicPPOConfig, MusicPPOTrainer
from musicrl_trl.testing import tiny_musicgen

PROMPTS = ["bright bells", "dark bass drone", "upbeat dance", "sad piano", "rock riff", "ambient rain",
           "funky groove", "orchestral fanfare"]


def rms_level(prompts, audio, sampling_rate, codes, **kwargs):
    """RMS amplitude of the clip: a smooth signal reward that none of the project's defaults were chosen on."""
    return audio.float().square().mean((1, 2)).sqrt()


rms_level.__name__ = "rms_level"


def run_once(form: str, kl_coef: float, seed: int, args) -> dict:
    model, processor = tiny_musicgen(seed=0)
    with tempfile.TemporaryDirectory() as output_dir:
        config = MusicPPOConfig(
            output_dir=output_dir, per_device_train_batch_size=args.batch_size,
            total_episodes=args.batch_size * args.updates, response_length=args.steps,
            learning_rate=args.learning_rate, kl_coef=kl_coef, kl_penalty=form, seed=seed,
            report_to=[], disable_tqdm=True, plot_training_curves=False,
        )
        trainer = MusicPPOTrainer(
            config, processor, model, reward_model=rms_level,
            train_dataset=Dataset.from_dict({"prompt": PROMPTS * 4}),
        )
        trainer.remove_callback(PrinterCallback)  # the per-update metric dicts; the summary below is enough
        torch.manual_seed(seed)
        trainer.train()
    logs = [entry for entry in trainer.state.log_history if "objective/scores" in entry]
    window = max(1, len(logs) // 10)
    first = statistics.mean(entry["objective/scores"] for entry in logs[:window])
    last = statistics.mean(entry["objective/scores"] for entry in logs[-window:])
    return {
        "form": form, "kl_coef": kl_coef, "seed": seed,
        "reward_first": first, "reward_last": last,
        "gain_pct": 100 * (last - first) / first,
        "final_kl": statistics.mean(entry["objective/kl"] for entry in logs[-window:]),
        "update_s": statistics.mean(entry["timing/update_s"] + entry["timing/rollout_s"] for entry in logs),
    }


def summarise(runs: list[dict]) -> list[dict]:
    rows = []
    for key in sorted({(r["form"], r["kl_coef"]) for r in runs}):
        group = [r for r in runs if (r["form"], r["kl_coef"]) == key]
        gains, kls = [r["gain_pct"] for r in group], [r["final_kl"] for r in group]
        rows.append({
            "form": key[0], "kl_coef": key[1], "seeds": len(group),
            "gain_pct_mean": statistics.mean(gains), "gain_pct_sd": statistics.stdev(gains) if len(gains) > 1 else 0,
            "final_kl_mean": statistics.mean(kls), "final_kl_sd": statistics.stdev(kls) if len(kls) > 1 else 0,
        })
    return rows


def write_outputs(runs, rows, args):
    os.makedirs(args.output_dir, exist_ok=True)
    settings = {k: v for k, v in vars(args).items() if k != "output_dir"}
    with open(os.path.join(args.output_dir, "frontier.json"), "w") as f:
        json.dump({"settings": settings, "summary": rows, "runs": runs}, f, indent=2)
    lines = [
        f"tiny MusicGen, reward rms_level, {args.updates} updates of {args.batch_size} clips x {args.steps} steps, "
        f"lr {args.learning_rate} (constant), seeds {args.seeds}; mean +- sd over seeds",
        "",
        "| KL form | kl_coef | reward gain (%) | final KL (nats / clip) |",
        "|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['form']} | {row['kl_coef']:g} | {row['gain_pct_mean']:.1f} +- {row['gain_pct_sd']:.1f} | "
            f"{row['final_kl_mean']:.1f} +- {row['final_kl_sd']:.1f} |"
        )
    table = "\n".join(lines)
    with open(os.path.join(args.output_dir, "frontier.md"), "w") as f:
        f.write(table + "\n")
    print(table)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 4))
    for form, marker in (("loss", "o"), ("reward", "s")):
        # The unanchored runs (kl_coef 0) belong to both curves.
        points = sorted((r for r in rows if r["form"] == form or r["kl_coef"] == 0), key=lambda r: r["kl_coef"])
        axis.errorbar(
            [r["final_kl_mean"] for r in points], [r["gain_pct_mean"] for r in points],
            xerr=[r["final_kl_sd"] for r in points], yerr=[r["gain_pct_sd"] for r in points],
            marker=marker, capsize=3, label=f"kl_penalty={form!r}",
        )
        for r in points:
            axis.annotate(f"{r['kl_coef']:g}", (r["final_kl_mean"], r["gain_pct_mean"]), fontsize=7,
                          textcoords="offset points", xytext=(4, 4))
    axis.set(xlabel="final KL to the anchor (nats per clip)", ylabel="reward gain (%)",
             title="reward vs KL frontier (labels: kl_coef)")
    axis.set_xscale("symlog", linthresh=1.0)
    axis.legend()
    figure.tight_layout()
    figure.savefig(os.path.join(args.output_dir, "frontier.png"), dpi=100)
    print(f"wrote {os.path.abspath(args.output_dir)}/frontier.{{json,md,png}}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--kl_coefs", type=float, nargs="+", default=[0.01, 0.03, 0.1, 0.3])
    parser.add_argument("--updates", type=int, default=40)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=16, help="decoder steps per clip")
    parser.add_argument("--learning_rate", type=float, default=1e-2)
    parser.add_argument("--output_dir", default="outputs/kl_frontier")
    parser.add_argument(
        "--merge", nargs="+", default=None,
        help="instead of training, combine the runs of earlier invocations' output dirs (e.g. one per seed, run in "
        "parallel) into --output_dir",
    )
    args = parser.parse_args()

    if args.merge:
        runs = []
        for folder in args.merge:
            with open(os.path.join(folder, "frontier.json")) as f:
                runs.extend(json.load(f)["runs"])
        args.seeds = sorted({r["seed"] for r in runs})
        write_outputs(runs, summarise(runs), args)
        return
    start, runs = time.time(), []
    configurations = [("loss", 0.0)] + [(form, c) for form in ("loss", "reward") for c in args.kl_coefs]
    for form, kl_coef in configurations:
        for seed in args.seeds:
            result = run_once(form, kl_coef, seed, args)
            runs.append(result)
            print(f"[{time.time() - start:6.0f} s] form={form:6s} kl_coef={kl_coef:<5g} seed={seed} "
                  f"gain={result['gain_pct']:6.1f} %  final KL={result['final_kl']:7.1f}", flush=True)
    write_outputs(runs, summarise(runs), args)


if __name__ == "__main__":
    main()
