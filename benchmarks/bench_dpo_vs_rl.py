"""DPO against the RL route on the same votes (issue 23): win rate on the raters' hidden taste, KL, wall time.

For every seed, the human-feedback loop's round 0 (``examples/human_feedback_loop.py``: the tiny MusicGen's pool, four
scripted raters who prefer the louder clip voting through the app's HTTP API, the export) is run once; then both
routes train on that same export:

- ``dpo``: ``MusicDPOTrainer`` on the votes (the loop's ``dpo_round``);
- ``rl``: a ``MusicRewardModel`` on the votes, then one MusicRL-U round of ``MusicPPOTrainer`` (the loop's
  ``train_preference_model`` and ``rl_round``);

and each trained policy is compared with the round-0 policy by ``examples/evaluate_musicrl.py`` (run as a
subprocess, its defaults: temperature 0.99, no guidance, no top-k) with ``--reward loudness`` on 24 prompts (the
loop's 8 training prompts and 16 it never saw) x 4 clips, seed 1000::

    nice -n 10 python benchmarks/bench_dpo_vs_rl.py --seeds 0 1 2 --output_dir outputs/bench_dpo_vs_rl

Training time is reported as wall time and as CPU time of the process (``train_cpu_s``; one intra-op thread), the
fairer measure on a machine shared with other jobs. Diagnostics: ``--dpo_overrides '{"beta": 0.5}'`` and
``--rl_overrides '{"kl_coef": 0.05}'`` change fields of ``MusicDPOConfig`` / ``MusicPPOConfig`` in the rounds,
``--pool_sampling`` the sampling of the voted pool, ``--tag`` names such a variant. Writes
``<output_dir>/results.jsonl`` (one line per seed and route) and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HELD_OUT_PROMPTS = [
    "warm jazz trio with brushed drums",
    "lo-fi hip hop beat for studying",
    "cheerful ukulele melody",
    "dark techno with a heavy kick",
    "gentle acoustic guitar lullaby",
    "cinematic strings building tension",
    "reggae rhythm with offbeat organ",
    "synthwave with retro arpeggios",
    "solo cello, melancholic and slow",
    "marching band with snare rolls",
    "tribal drums and chanting",
    "glitchy experimental electronics",
    "country song with fiddle and banjo",
    "smooth bossa nova with nylon guitar",
    "heavy metal with double bass drums",
    "children's music box tune",
]


def load_loop():
    spec = importlib.util.spec_from_file_location("human_feedback_loop", ROOT / "examples" / "human_feedback_loop.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def collect(loop, out: Path, seed: int, pool_sampling: dict):
    """Round 0 of the loop, once per seed: policy-0, its pool, the raters' votes, the export."""
    from musicrl_trl.app.export import export_dataset
    from musicrl_trl.app.pool import load_pool, make_pool
    from musicrl_trl.app.store import Store
    from musicrl_trl.testing import save_tiny_musicgen

    args = loop.LoopArguments(output_dir=str(out), seed=seed)
    if (out / "preferences-0").exists():
        return args
    out.mkdir(parents=True, exist_ok=True)
    policy_0 = Path(save_tiny_musicgen(out / "policy-0", seed=seed))
    make_pool([str(policy_0)], loop.PROMPTS, args.clips_per_prompt, out / "pool-0",
              response_length=args.response_length, seed=seed, **pool_sampling)  # fmt: skip
    store = Store(out / "votes.sqlite")
    tokens = [store.add_rater(f"rater-{index}") for index in range(args.num_raters)]
    votes = loop.collect_votes(out / "pool-0", out / "votes.sqlite", tokens, args, args.votes_per_rater, "collect")
    export_dataset(store, load_pool(out / "pool-0"), out / "preferences-0")
    print(f"seed {seed}: {votes} votes", flush=True)
    return args


def evaluate(policy: Path, base: Path, prompts_file: Path, out: Path) -> dict:
    command = [
        sys.executable, str(ROOT / "examples" / "evaluate_musicrl.py"), "--policy_a", str(policy), "--policy_b",
        str(base), "--prompts", str(prompts_file), "--reward", "loudness", "--num_samples_per_prompt", "4",
        "--response_length", "20", "--seed", "1000", "--output_dir", str(out), "--num_audio_examples", "0",
    ]  # fmt: skip
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, env={**os.environ, "PYTHONPATH": str(ROOT)})
    results = json.loads((out / "results.json").read_text())
    loudness = results["rewards"]["loudness"]
    gain_db = 60 * (loudness["mean_a"] - loudness["mean_b"])  # LoudnessReward: linear in dB, 1/60 per dB
    kl = results["kl_to_base"]["a"]
    return {
        "win_rate": loudness["win_rate"],
        "wins": loudness["wins"],
        "losses": loudness["losses"],
        "wilcoxon_p": loudness["wilcoxon_p"],
        "gain_db": gain_db,
        "kl_per_clip": kl,
        "db_per_nat": gain_db / kl if kl > 0 else float("nan"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--routes", nargs="+", default=["dpo", "rl"], choices=["dpo", "rl"])
    parser.add_argument("--output_dir", default="outputs/bench_dpo_vs_rl")
    parser.add_argument("--dpo_overrides", default="{}", help="JSON: MusicDPOConfig fields for the DPO round.")
    parser.add_argument("--rl_overrides", default="{}", help="JSON: MusicPPOConfig fields for the RL round.")
    parser.add_argument("--tag", default="", help="Name of this variant in results.jsonl.")
    parser.add_argument(
        "--pool_sampling", default="{}",
        help='JSON: make_pool sampling of the voted pool, e.g. \'{"guidance_scale": 1, "top_k": 0}\' (default: the '
        "loop's); seeds are then kept in <output_dir>/seed<N>-<tag>.",
    )  # fmt: skip
    args = parser.parse_args()
    overrides = json.loads(args.dpo_overrides)
    pool_sampling = json.loads(args.pool_sampling)
    rl_overrides = json.loads(args.rl_overrides)

    import torch

    torch.set_num_threads(1)
    loop = load_loop()
    if overrides:  # the loop's DPO round with some fields changed
        base_config = loop.MusicDPOConfig

        def config(**kwargs):
            return base_config(**{**kwargs, **overrides})

        loop.MusicDPOConfig = config
    if rl_overrides:  # the loop's RL round with some fields changed (e.g. kl_coef, for points at other KLs)
        base_rl_config = loop.MusicPPOConfig

        def rl_config(**kwargs):
            return base_rl_config(**{**kwargs, **rl_overrides})

        loop.MusicPPOConfig = rl_config
    history = {}
    base_trainer = loop.MusicDPOTrainer

    class RecordingTrainer(base_trainer):
        def train(self, *a, **k):
            result = super().train(*a, **k)
            history["logs"] = [e for e in self.state.log_history if "rewards/accuracies" in e]
            return result

    loop.MusicDPOTrainer = RecordingTrainer

    root = Path(args.output_dir)
    prompts_file = root / "eval_prompts.txt"
    root.mkdir(parents=True, exist_ok=True)
    prompts_file.write_text("\n".join(loop.PROMPTS + HELD_OUT_PROMPTS) + "\n")
    rows = []
    for seed in args.seeds:
        out = root / (f"seed{seed}-{args.tag}" if pool_sampling else f"seed{seed}")
        loop_args = collect(loop, out, seed, pool_sampling)
        policy_0 = out / "policy-0"
        for route in args.routes:
            name = f"{route}{'-' + args.tag if args.tag else ''}"
            policy = out / f"policy-{name}"
            start, start_cpu = time.time(), time.process_time()
            if route == "dpo":
                loop.dpo_round(policy_0, out / "preferences-0", policy, loop_args)
            else:
                loop.train_preference_model(out / "preferences-0", out / "preference-model-0", seed)
                loop.rl_round(policy_0, out / "preference-model-0", policy, loop_args)
            seconds, cpu_seconds = time.time() - start, time.process_time() - start_cpu
            row = {"seed": seed, "route": route, "tag": args.tag,
                   "overrides": overrides if route == "dpo" else rl_overrides, "pool_sampling": pool_sampling,
                   "train_s": seconds, "train_cpu_s": cpu_seconds}  # fmt: skip
            row.update(evaluate(policy, policy_0, prompts_file, out / f"eval-{name}"))
            if route == "dpo" and history.get("logs"):
                logs = history["logs"]
                row["train_accuracy"] = [logs[0]["rewards/accuracies"], logs[-1]["rewards/accuracies"]]
                row["train_margin_last"] = logs[-1]["rewards/margins"]
            rows.append(row)
            print(json.dumps(row), flush=True)
            with open(root / "results.jsonl", "a") as handle:
                handle.write(json.dumps(row) + "\n")
    print("| seed | route | win rate | W/L | Wilcoxon p | loudness gain (dB) | KL (nats/clip) | dB per nat | "
          "wall (s) |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['seed']} | {r['route']} {r['tag']} | {r['win_rate']:.2f} | {r['wins']}/{r['losses']} | "
              f"{r['wilcoxon_p']:.2g} | {r['gain_db']:+.2f} | {r['kl_per_clip']:.1f} | {r['db_per_nat']:.3f} | "
              f"{r['train_s']:.0f} |")  # fmt: skip


if __name__ == "__main__":
    main()
