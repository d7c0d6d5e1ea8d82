"""The paper's training plots for several runs on one figure: each reward against KL and against update step.

    python examples/plot_runs.py outputs/musicrl-r outputs/musicrl-u outputs/musicrl-ru --output outputs/runs.png

Each run is the output_dir of a MusicPPOTrainer run (its log_history.json, written at the end of training) or a
checkpoint directory (trainer_state.json), or the JSON file itself. One row per reward: `objective/scores` and every
`rewards/<name>/mean` the runs logged (or `--reward_keys`); left, reward against the KL to the anchor
(`objective/kl`, nats per clip), as MusicRL plotted its over-optimisation; right, reward against update. Evaluations
logged every `eval_steps` (`eval/*`) are drawn as dashed markers.
"""

from __future__ import annotations

import argparse
import os

from musicrl_trl.evaluation import plot_training_runs


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", help="run directories (or log_history.json / trainer_state.json files)")
    parser.add_argument("--labels", nargs="+", help="legend label per run (default: the directory names)")
    parser.add_argument("--reward_keys", nargs="+", help="logged reward keys to plot (default: all rewards)")
    parser.add_argument("--kl_key", default="objective/kl", help="logged KL key (default: objective/kl)")
    parser.add_argument(
        "--output", default=os.path.join("outputs", "runs.png"), help="where to write the figure (PNG)"
    )
    args = parser.parse_args()
    try:
        missing = [run for run in args.runs if not os.path.exists(run)]
        if missing:
            raise ValueError(
                f"runs: {missing} do not exist (working directory: {os.getcwd()}); pass the --output_dir of finished "
                "runs (or their log_history.json)."
            )
        os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
        path = plot_training_runs(args.runs, args.output, args.labels, args.reward_keys, args.kl_key)
    except ValueError as error:
        raise SystemExit(f"error: {error}") from error
    print(f"plot: {os.path.abspath(path)}")


if __name__ == "__main__":
    main()
