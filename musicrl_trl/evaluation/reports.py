"""Reports: ``results.json``, the Markdown table, plots of one evaluation, and the paper's training plots (reward
against KL and against step) for several runs."""

from __future__ import annotations

import json
import math
import os
import warnings
from collections.abc import Sequence
from typing import Any

__all__ = ["plot_results", "plot_training_runs", "results_markdown", "run_label", "write_results"]


def results_markdown(results: dict[str, Any]) -> str:
    """The Markdown table of ``results.md``: one row per reward, then drift and diversity."""

    def interval(ci):
        return f"[{ci[0]:.4g}, {ci[1]:.4g}]"

    lines = [
        f"# {results['policy_a']} (A) vs {results['policy_b']} (B)",
        "",
        f"{results['num_prompts']} prompts x {results['num_samples_per_prompt']} clips of "
        f"{results['audio_duration_s']:.2f} s per policy, seed {results['seed']}; KL to {results['base_model']}.",
        "",
        "| reward | mean A [95% CI] | mean B [95% CI] | A wins / ties / losses | win rate A | Wilcoxon p |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in results["rewards"].items():
        lines.append(
            f"| {name} | {r['mean_a']:.4g} {interval(r['ci95_a'])} | {r['mean_b']:.4g} {interval(r['ci95_b'])} | "
            f"{r['wins']} / {r['ties']} / {r['losses']} | {r['win_rate']:.2f} | {r['wilcoxon_p']:.3g} |"
        )
    if any(r["wins"] + r["losses"] == 0 for r in results["rewards"].values()):
        lines += ["", "A reward with no decisive prompt (all ties) has win rate 0.50 and p = 1 by convention."]
    lines += ["", "| drift and diversity | A | B |", "|---|---|---|"]
    kl = results["kl_to_base"]
    if kl:
        before_cut = " before the top-k cut" if results.get("sampling", {}).get("top_k") else ""
        lines.append(
            f"| KL to base (nats per clip{before_cut}) | {kl['a']:.4g} {interval(kl['ci95_a'])} | "
            f"{kl['b']:.4g} {interval(kl['ci95_b'])} |"
        )
    div_a, div_b = results["diversity"]["a"], results["diversity"]["b"]
    lines.append(
        f"| mean pairwise distance ({div_a['embedding']}) | {div_a['mean_pairwise_distance']:.4g} | "
        f"{div_b['mean_pairwise_distance']:.4g} |"
    )
    lines.append(f"| Vendi score ({div_a['embedding']}) | {div_a['vendi_score']:.3f} | {div_b['vendi_score']:.3f} |")
    entropy_a = ", ".join(f"{v:.2f}" for v in div_a["entropy_per_codebook"])
    entropy_b = ", ".join(f"{v:.2f}" for v in div_b["entropy_per_codebook"])
    lines.append(f"| token entropy per codebook (nats) | {entropy_a} | {entropy_b} |")
    return "\n".join(lines) + "\n"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_results(results: dict[str, Any], output_dir: str) -> list[str]:
    """``rewards.png`` (mean reward of A and B with 95 % intervals, and per-prompt A against B) and, with a base,
    ``reward_vs_kl.png`` (each policy as a point: reward against KL to the base, the paper's trade-off)."""
    plt = _pyplot()
    names = list(results["rewards"])
    paths = []
    figure, axes = plt.subplots(2, len(names), figsize=(4 * len(names), 7), squeeze=False)
    for column, name in enumerate(names):
        r = results["rewards"][name]
        means = axes[0, column]
        for x, side, color in ((0, "a", "tab:orange"), (1, "b", "tab:blue")):
            mean, (low, high) = r[f"mean_{side}"], r[f"ci95_{side}"]
            # Points, not bars: the axis is zoomed to the intervals, where bar lengths would mislead.
            means.errorbar(x, mean, yerr=[[mean - low], [high - mean]], fmt="o", color=color, markersize=8, capsize=6)
        means.set(
            xlim=(-0.5, 1.5),
            xticks=[0, 1],
            xticklabels=["A", "B"],
            title=f"{name}: win rate A {r['win_rate']:.2f}, p={r['wilcoxon_p']:.2g}",
        )
        low = min(r["ci95_a"][0], r["ci95_b"][0])
        high = max(r["ci95_a"][1], r["ci95_b"][1])
        margin = 0.5 * (high - low) + 1e-6
        means.set_ylim(low - margin, high + margin)
        scatter = axes[1, column]
        a = [row[name]["a"] for row in results["per_prompt"]]
        b = [row[name]["b"] for row in results["per_prompt"]]
        scatter.scatter(b, a, s=14)
        limits = [min(a + b), max(a + b)]
        scatter.plot(limits, limits, color="gray", linewidth=1)
        scatter.set(xlabel=f"B ({name}, mean per prompt)", ylabel="A", title="per prompt (above the line: A wins)")
    figure.suptitle(f"A = {results['policy_a']}   B = {results['policy_b']}", fontsize=9)
    figure.tight_layout()
    paths.append(os.path.join(output_dir, "rewards.png"))
    figure.savefig(paths[-1], dpi=100)
    plt.close(figure)
    if results["kl_to_base"]:
        figure, axes = plt.subplots(1, len(names), figsize=(4 * len(names), 3.5), squeeze=False)
        kl = results["kl_to_base"]
        for column, name in enumerate(names):
            ax, r = axes[0, column], results["rewards"][name]
            for side, label, color in (("a", "A", "tab:orange"), ("b", "B", "tab:blue")):
                ax.errorbar(
                    kl[side],
                    r[f"mean_{side}"],
                    xerr=[[kl[side] - kl[f"ci95_{side}"][0]], [kl[f"ci95_{side}"][1] - kl[side]]],
                    yerr=[[r[f"mean_{side}"] - r[f"ci95_{side}"][0]], [r[f"ci95_{side}"][1] - r[f"mean_{side}"]]],
                    fmt="o",
                    color=color,
                    label=label,
                    capsize=4,
                )
            ax.set(xlabel="KL to base (nats per clip)", ylabel=name, title=f"{name} vs KL")
            ax.legend()
        figure.tight_layout()
        paths.append(os.path.join(output_dir, "reward_vs_kl.png"))
        figure.savefig(paths[-1], dpi=100)
        plt.close(figure)
    return paths


def _finite_or_null(value: Any, path: str, replaced: list[str]) -> Any:
    """``value`` with every NaN or infinite float replaced by None (JSON ``null``); their paths go to ``replaced``."""
    if isinstance(value, float) and not math.isfinite(value):
        replaced.append(path)
        return None
    if isinstance(value, dict):
        return {
            key: _finite_or_null(item, f"{path}.{key}" if path else str(key), replaced) for key, item in value.items()
        }
    if isinstance(value, (list, tuple)):
        return [_finite_or_null(item, f"{path}[{index}]", replaced) for index, item in enumerate(value)]
    return value


def write_results(results: dict[str, Any], output_dir: str) -> dict[str, str]:
    """Write ``results.json``, ``results.md`` and the plots of :func:`plot_results` to ``output_dir``; returns
    their paths by kind.

    ``results.json`` is strict JSON (``NaN`` and ``Infinity`` are not JSON, and most parsers refuse them): a
    non-finite number is written as ``null`` and its path listed under ``"non_finite"``, with a warning.
    """
    os.makedirs(output_dir, exist_ok=True)
    replaced: list[str] = []
    serialisable = _finite_or_null(
        {key: value for key, value in results.items() if not key.startswith("_")}, "", replaced
    )
    if replaced:
        serialisable["non_finite"] = replaced
        warnings.warn(f"results hold non-finite values, written as null: {', '.join(replaced)}", stacklevel=2)
    paths = {"json": os.path.join(output_dir, "results.json"), "markdown": os.path.join(output_dir, "results.md")}
    with open(paths["json"], "w") as f:
        json.dump(serialisable, f, indent=2, allow_nan=False)
    with open(paths["markdown"], "w") as f:
        f.write(results_markdown(results))
    for path in plot_results(results, output_dir):
        paths[os.path.splitext(os.path.basename(path))[0]] = path
    return paths


def _load_log_history(run: str) -> list[dict[str, Any]]:
    """A run's log history from its directory (``log_history.json``, or a checkpoint's ``trainer_state.json``) or
    from one of those files."""
    candidates = (
        [run]
        if os.path.isfile(run)
        else [os.path.join(run, "log_history.json"), os.path.join(run, "trainer_state.json")]
    )
    for path in candidates:
        if os.path.isfile(path):
            with open(path) as f:
                data = json.load(f)
            history = data["log_history"] if isinstance(data, dict) else data
            if not isinstance(history, list):
                raise ValueError(f"{path} holds no list of log entries.")
            return history
    raise ValueError(
        f"run {run!r} has no log_history.json or trainer_state.json: pass the output_dir of a MusicPPOTrainer run "
        "(written at the end of training with plot_training_curves=True) or the JSON file itself."
    )


def run_label(run: str) -> str:
    """A run's name for legends and tables: its folder, with the baseline and the KL budget or coefficient it trained
    with when its ``run_config.json`` (written by ``examples/ppo_musicrl.py``) says, e.g. ``"rl-r (rloo x4, KL
    target 10)"``."""
    folder = run if os.path.isdir(run) else os.path.dirname(os.path.abspath(run))
    name = os.path.basename(os.path.normpath(folder))
    try:
        with open(os.path.join(folder, "run_config.json")) as f:
            training = json.load(f)["training"]
    except (OSError, ValueError, KeyError, TypeError):
        return name
    baseline = training.get("baseline", "value")
    if baseline != "value":
        baseline = f"{baseline} x{training.get('num_generations')}"
    if training.get("kl_target") is not None:
        kl = f"KL target {training['kl_target']:g}"
    elif training.get("kl_coef") is not None:
        kl = f"kl_coef {training['kl_coef']:g}"
    else:
        kl = None
    return f"{name} ({', '.join(part for part in (baseline, kl) if part)})"


def plot_training_runs(
    runs: Sequence[str],
    output_path: str,
    labels: Sequence[str] | None = None,
    reward_keys: Sequence[str] | None = None,
    kl_key: str = "objective/kl",
) -> str:
    """The paper's training plots for several runs on one figure: each reward against the KL to the anchor (left
    column) and against the update step (right column), one line per run.

    ``reward_keys`` default: every ``rewards/<name>/mean`` the runs logged, after ``objective/scores`` (the weighted
    combination) when there are several (one row each).
    Evaluation entries (``eval/*``, logged every ``eval_steps``) are drawn as markers when present.
    """
    if not runs:
        raise ValueError("give at least one run directory.")
    histories = [_load_log_history(run) for run in runs]
    labels = list(labels) if labels else [run_label(run) for run in runs]
    if len(labels) != len(runs):
        raise ValueError(f"{len(labels)} labels for {len(runs)} runs.")
    if reward_keys is None:
        found = []
        for history in histories:
            for entry in history:
                for key in entry:
                    if key.startswith("rewards/") and key.endswith("/mean") and key not in found:
                        found.append(key)
        # One reward: objective/scores is that reward again. Several: the combination first, then each.
        reward_keys = found if len(found) == 1 else ["objective/scores", *found]
    reward_keys = [key for key in reward_keys if any(key in entry for history in histories for entry in history)]
    if not reward_keys:
        raise ValueError(f"none of the runs logged a reward ({', '.join(runs)}); nothing to plot.")
    plt = _pyplot()
    figure, axes = plt.subplots(len(reward_keys), 2, figsize=(11, 3.6 * len(reward_keys)), squeeze=False)
    for history, label, color in zip(histories, labels, plt.rcParams["axes.prop_cycle"].by_key()["color"] * 10):
        for row, key in enumerate(reward_keys):
            entries = [e for e in history if key in e and kl_key in e]
            steps = [e["step"] for e in history if key in e]
            values = [e[key] for e in history if key in e]
            axes[row, 0].plot(
                [e[kl_key] for e in entries],
                [e[key] for e in entries],
                marker="o",
                markersize=2,
                color=color,
                label=label,
            )
            axes[row, 1].plot(steps, values, color=color, label=label)
            eval_key = "eval/scores" if key == "objective/scores" else f"eval/{key}"  # MusicPPOTrainer.evaluate
            evals = [e for e in history if eval_key in e]
            if evals:
                axes[row, 1].plot(
                    [e["step"] for e in evals],
                    [e[eval_key] for e in evals],
                    "s--",
                    color=color,
                    markersize=4,
                    label=f"{label} (eval)",
                )
                with_kl = [e for e in evals if "eval/kl" in e]
                axes[row, 0].plot(
                    [e["eval/kl"] for e in with_kl],
                    [e[eval_key] for e in with_kl],
                    "s--",
                    color=color,
                    markersize=4,
                    label=f"{label} (eval)",
                )
    for row, key in enumerate(reward_keys):
        axes[row, 0].set(xlabel="KL to the anchor (nats per clip)", ylabel=key, title=f"{key} vs KL")
        axes[row, 1].set(xlabel="update", ylabel=key, title=f"{key} vs step")
        axes[row, 0].legend(fontsize=8)
        axes[row, 1].legend(fontsize=8)
    figure.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(output_path)), exist_ok=True)
    figure.savefig(output_path, dpi=100)
    plt.close(figure)
    return output_path
