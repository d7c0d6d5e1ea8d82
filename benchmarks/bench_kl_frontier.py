"""Reward gain against KL: for each baseline (a learned value network, RLOO, group mean), at fixed KL coefficients
and at KL targets, on signal rewards none of the project's defaults were chosen on.

Run by hand (not in CI), on the tiny offline MusicGen:

    python benchmarks/bench_kl_frontier.py                          # 3 baselines x (2 kl_coefs + 2 targets) x 3 seeds
    python benchmarks/bench_kl_frontier.py --rewards rms_level quietness --seeds 0 1 2 --output_dir outputs/kl
    python benchmarks/bench_kl_frontier.py --forms loss reward --baselines value    # the KL forms, as before

Every run trains a fresh tiny policy with otherwise identical settings: ``--batch_size`` clips per update (for RLOO
and group mean, ``--batch_size / --num_generations`` prompts with ``--num_generations`` clips each; the same number
of clips, so the same compute, as the value baseline's), and records the final reward gain (mean score of the last
10 % of updates over the first 10 %, in %, sign-corrected so that improving is positive for rewards below zero) and
the final KL to the anchor (nats per clip, mean over the last 10 % of updates). ``kl_coef=0`` is the unanchored run
of each baseline. It writes ``frontier.json``, ``frontier.md`` (mean +- sd over seeds) and ``frontier.png`` (gain
against KL, one panel per reward, one line per baseline).

Expected: at equal KL, rloo reaches about the value baseline's gain without a value network; a KL target holds the
final KL near it (within [0.5, 1.5] x target) while the reward still improves.
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
    """RMS amplitude of the clip: a smooth signal reward."""
    return audio.float().square().mean((1, 2)).sqrt()


def quietness(prompts, audio, sampling_rate, codes, **kwargs):
    """Minus the mean absolute amplitude: the opposite direction of rms_level."""
    return -audio.float().abs().mean((1, 2))


REWARDS = {"rms_level": rms_level, "quietness": quietness}


def run_once(reward: str, baseline: str, form: str, kl_coef: float, kl_target: float | None, seed: int, args) -> dict:
    model, processor = tiny_musicgen(seed=0)
    groups = dict(baseline=baseline, num_generations=args.num_generations) if baseline != "value" else {}
    with tempfile.TemporaryDirectory() as output_dir:
        config = MusicPPOConfig(
            output_dir=output_dir, per_device_train_batch_size=args.batch_size,
            total_episodes=args.batch_size * args.updates, response_length=args.steps,
            learning_rate=args.learning_rate, kl_coef=kl_coef, kl_penalty=form, kl_target=kl_target,
            kl_horizon=args.kl_horizon, seed=seed, report_to=[], disable_tqdm=True, plot_training_curves=False,
            **groups,
        )
        trainer = MusicPPOTrainer(
            config, processor, model, reward_model=REWARDS[reward],
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
        "reward": reward, "baseline": baseline, "form": form, "kl_coef": kl_coef, "kl_target": kl_target,
        "seed": seed, "reward_first": first, "reward_last": last,
        "gain_pct": 100 * (last - first) / abs(first),
        "final_kl": statistics.mean(entry["objective/kl"] for entry in logs[-window:]),
        "final_kl_coef": logs[-1]["objective/kl_coef"],
        "update_s": statistics.mean(entry["timing/update_s"] + entry["timing/rollout_s"] for entry in logs),
    }


def _key(run: dict) -> tuple:
    return run["reward"], run["baseline"], run["form"], run["kl_target"] or 0.0, run["kl_coef"]


def summarise(runs: list[dict]) -> list[dict]:
    rows = []
    for key in sorted({_key(r) for r in runs}):
        group = [r for r in runs if _key(r) == key]
        gains, kls = [r["gain_pct"] for r in group], [r["final_kl"] for r in group]
        rows.append({
            "reward": key[0], "baseline": key[1], "form": key[2], "kl_target": group[0]["kl_target"],
            "kl_coef": key[4], "seeds": len(group),
            "gain_pct_mean": statistics.mean(gains), "gain_pct_sd": statistics.stdev(gains) if len(gains) > 1 else 0,
            "final_kl_mean": statistics.mean(kls), "final_kl_sd": statistics.stdev(kls) if len(kls) > 1 else 0,
            "final_kl_coef_mean": statistics.mean(r["final_kl_coef"] for r in group),
        })
    return rows


def write_outputs(runs, rows, args):
    os.makedirs(args.output_dir, exist_ok=True)
    settings = {k: v for k, v in vars(args).items() if k != "output_dir"}
    with open(os.path.join(args.output_dir, "frontier.json"), "w") as f:
        json.dump({"settings": settings, "summary": rows, "runs": runs}, f, indent=2)
    lines = [
        f"tiny MusicGen, {args.updates} updates of {args.batch_size} clips x {args.steps} steps (rloo/group_mean: "
        f"{args.batch_size // args.num_generations} prompts x {args.num_generations} clips), lr {args.learning_rate} "
        f"(constant), seeds {args.seeds}; mean +- sd over seeds",
        "",
        "| reward | baseline | KL form | kl_coef (start) | kl_target | reward gain (%) | final KL (nats / clip) | "
        "final kl_coef |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        target = "-" if row["kl_target"] is None else f"{row['kl_target']:g}"
        lines.append(
            f"| {row['reward']} | {row['baseline']} | {row['form']} | {row['kl_coef']:g} | {target} | "
            f"{row['gain_pct_mean']:.1f} +- {row['gain_pct_sd']:.1f} | "
            f"{row['final_kl_mean']:.1f} +- {row['final_kl_sd']:.1f} | {row['final_kl_coef_mean']:.3g} |"
        )
    table = "\n".join(lines)
    with open(os.path.join(args.output_dir, "frontier.md"), "w") as f:
        f.write(table + "\n")
    print(table)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rewards = sorted({row["reward"] for row in rows})
    figure, axes = plt.subplots(1, len(rewards), figsize=(6 * len(rewards), 4), squeeze=False)
    for axis, reward in zip(axes[0], rewards):
        for (baseline, form), marker in zip(sorted({(r["baseline"], r["form"]) for r in rows}), "osd^v<>"):
            points = [r for r in rows if (r["reward"], r["baseline"], r["form"]) == (reward, baseline, form)]
            fixed = sorted((r for r in points if r["kl_target"] is None), key=lambda r: r["kl_coef"])
            label = baseline if form == "loss" else f"{baseline}, kl_penalty={form!r}"
            line = axis.errorbar(
                [r["final_kl_mean"] for r in fixed], [r["gain_pct_mean"] for r in fixed],
                xerr=[r["final_kl_sd"] for r in fixed], yerr=[r["gain_pct_sd"] for r in fixed],
                marker=marker, capsize=3, label=label,
            )
            for r in fixed:
                axis.annotate(f"{r['kl_coef']:g}", (r["final_kl_mean"], r["gain_pct_mean"]), fontsize=7,
                              textcoords="offset points", xytext=(4, 4))
            for r in (r for r in points if r["kl_target"] is not None):
                axis.errorbar(r["final_kl_mean"], r["gain_pct_mean"], xerr=r["final_kl_sd"], yerr=r["gain_pct_sd"],
                              marker="*", markersize=10, capsize=3, color=line[0].get_color(), linestyle="none")
                axis.annotate(f"target {r['kl_target']:g}", (r["final_kl_mean"], r["gain_pct_mean"]), fontsize=7,
                              textcoords="offset points", xytext=(4, -10))
        axis.set(xlabel="final KL to the anchor (nats per clip)", ylabel="reward gain (%)",
                 title=f"{reward}: reward vs KL (labels: kl_coef; stars: kl_target)")
        axis.set_xscale("symlog", linthresh=1.0)
        axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(os.path.join(args.output_dir, "frontier.png"), dpi=100)
    print(f"wrote {os.path.abspath(args.output_dir)}/frontier.{{json,md,png}}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--rewards", nargs="+", default=["quietness"], choices=sorted(REWARDS))
    parser.add_argument("--baselines", nargs="+", default=["value", "rloo", "group_mean"])
    parser.add_argument("--forms", nargs="+", default=["loss"], help="kl_penalty values")
    parser.add_argument("--kl_coefs", type=float, nargs="*", default=[0.0, 0.01, 0.1])
    parser.add_argument("--kl_targets", type=float, nargs="*", default=[10.0, 50.0])
    parser.add_argument("--kl_start", type=float, default=0.05, help="starting kl_coef of the kl_target runs")
    parser.add_argument("--kl_horizon", type=int, default=None)
    parser.add_argument("--num_generations", type=int, default=4, help="clips per prompt for rloo and group_mean")
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
    configurations = [
        (reward, baseline, form, kl_coef, None)
        for reward in args.rewards for baseline in args.baselines for form in args.forms for kl_coef in args.kl_coefs
    ] + [
        (reward, baseline, "loss", args.kl_start, target)
        for reward in args.rewards for baseline in args.baselines for target in args.kl_targets
    ]  # fmt: skip
    for reward, baseline, form, kl_coef, target in configurations:
        for seed in args.seeds:
            result = run_once(reward, baseline, form, kl_coef, target, seed, args)
            runs.append(result)
            print(f"[{time.time() - start:6.0f} s] {reward} {baseline:10s} form={form:6s} kl_coef={kl_coef:<5g} "
                  f"target={target} seed={seed} gain={result['gain_pct']:6.1f} %  final KL={result['final_kl']:7.1f} "
                  f"final kl_coef={result['final_kl_coef']:.3g}", flush=True)
    write_outputs(runs, summarise(runs), args)


if __name__ == "__main__":
    main()
