"""Evaluation report: how two systems fared against each other in side-by-side votes and 1-5 ratings.

Only votes cast in evaluation mode (``musicrl-app serve --mode evaluate``) count: collection-mode votes compare clips
to train a reward model (often of one system, but also across systems when a collection pool holds two) and are
only counted, as ``collection_votes``. For every pair of systems (X, Y), X before Y alphabetically, each evaluation
vote on an X-vs-Y pair is one paired comparison with outcome +1 (X's clip chosen), 0 (tie) or -1 (Y's). The report
gives

- ``wins``/``ties``/``losses`` of X, ``n`` votes;
- ``win_rate`` = wins / (wins + losses), the share of decisive votes X won, and ``win_rate_ties_half`` =
  (wins + ties / 2) / n;
- ``wilcoxon_p``: two-sided Wilcoxon signed-rank test of the outcomes against a median of 0 (ties dropped; scipy's
  default method: exact for small samples, else the normal approximation, which on +-1 outcomes is the sign test
  z = (wins - losses) / sqrt(wins + losses));
- with ratings (evaluation mode), each system's mean score per criterion and, per criterion, the Wilcoxon p-value of
  the paired differences score(X) - score(Y) over the pairs where both clips were rated.

The statistics are those of :func:`musicrl_trl.evaluation.paired_comparison` (the votes are its per-prompt score
differences), so a listening test and ``examples/evaluate_musicrl.py`` read the same way, conventions included: with
no decisive vote (all ties, or only ratings) the win rates are 0.5 and the p-value is 1, "no evidence either way";
the ``ties`` column tells that apart from an even split.
"""

from __future__ import annotations

import json
import math
import os
from collections import defaultdict
from pathlib import Path
from typing import Any

# Pure statistics on score arrays, shared with the evaluation package rather than copied (one convention for both).
from ..evaluation.statistics import paired_comparison, wilcoxon_signed_rank
from .store import RATING_CRITERIA, Store

__all__ = ["build_report", "write_report"]


def _outcome_summary(outcomes: list[int]) -> dict[str, Any]:
    """wins / ties / losses, win rate and Wilcoxon p of +1 / 0 / -1 vote outcomes, as paired_comparison gives them."""
    if not outcomes:  # a system pair with ratings but no vote
        return {"wins": 0, "ties": 0, "losses": 0, "win_rate": 0.5, "wilcoxon_p": 1.0}
    return paired_comparison([float(outcome) for outcome in outcomes], [0.0] * len(outcomes))


def build_report(store: Store | str | os.PathLike) -> dict[str, Any]:
    store = store if isinstance(store, Store) else Store(store)
    every_vote = store.votes()
    votes = [vote for vote in every_vote if vote["mode"] == "evaluate"]
    outcomes: dict[tuple[str, str], list[int]] = defaultdict(list)
    for vote in votes:
        system_a, system_b = vote["system_a"], vote["system_b"]
        if system_a == system_b:  # evaluation pools pair clips of two systems only; kept as a guard
            continue
        outcome = {"a": 1, "b": -1, "tie": 0}[vote["choice"]]
        if system_a > system_b:  # orient every comparison as (alphabetically first, second)
            system_a, system_b, outcome = system_b, system_a, -outcome
        outcomes[(system_a, system_b)].append(outcome)

    # Ratings: per system means, and per system pair the paired differences of the two clips of one pair.
    ratings = store.ratings()
    by_system: dict[str, dict[str, list[int]]] = defaultdict(lambda: defaultdict(list))
    by_pair: dict[str, dict[str, dict[str, Any]]] = defaultdict(dict)
    for rating in ratings:
        for criterion in RATING_CRITERIA:
            by_system[rating["system"]][criterion].append(rating[criterion])
        by_pair[rating["pair_id"]][rating["system"]] = rating
    paired: dict[tuple[str, str], dict[str, list[int]]] = defaultdict(lambda: defaultdict(list))
    for sides in by_pair.values():
        if len(sides) != 2:
            continue  # one clip rated, or both clips from one system
        first, second = sorted(sides)
        for criterion in RATING_CRITERIA:
            paired[(first, second)][criterion].append(sides[first][criterion] - sides[second][criterion])

    comparisons = []
    for first, second in sorted(set(outcomes) | set(paired)):
        values = outcomes.get((first, second), [])
        summary = _outcome_summary(values)
        entry: dict[str, Any] = {
            "system": first,
            "opponent": second,
            "n": len(values),
            "wins": summary["wins"],
            "ties": summary["ties"],
            "losses": summary["losses"],
            "win_rate": summary["win_rate"],
            "win_rate_ties_half": (summary["wins"] + summary["ties"] / 2) / len(values) if values else 0.5,
            "wilcoxon_p": summary["wilcoxon_p"],
        }
        if (first, second) in paired:
            entry["ratings"] = {
                criterion: {
                    "n": len(differences),
                    "mean_difference": sum(differences) / len(differences),
                    "wilcoxon_p": wilcoxon_signed_rank(differences),
                }
                for criterion, differences in paired[(first, second)].items()
            }
        comparisons.append(entry)
    return {
        "votes": len(votes),
        "raters": len({vote["rater"] for vote in votes}),
        "collection_votes": len(every_vote) - len(votes),
        "comparisons": comparisons,
        "mean_ratings": {
            system: {criterion: sum(values) / len(values) for criterion, values in scores.items()}
            for system, scores in sorted(by_system.items())
        },
    }


def _number(value: float | None, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    # Scientific notation only for small non-zero values (p-values): a win rate of 0 reads 0.000, not 0.00e+00.
    return f"{value:.{digits}f}" if value == 0 or abs(value) >= 10**-digits else f"{value:.2e}"


def to_markdown(report: dict[str, Any]) -> str:
    lines = [
        "# Listening test report",
        "",
        f"{report['votes']} evaluation votes by {report['raters']} raters"
        + (
            f"; {report['collection_votes']} collection-mode votes (for training a reward model) are not counted."
            if report["collection_votes"]
            else "."
        ),
        "",
    ]
    if report["comparisons"]:
        lines += [
            "| system | opponent | votes | wins | ties | losses | win rate | win rate (ties = 1/2) | Wilcoxon p |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for entry in report["comparisons"]:
            lines.append(
                f"| {entry['system']} | {entry['opponent']} | {entry['n']} | {entry['wins']} | {entry['ties']} | "
                f"{entry['losses']} | {_number(entry['win_rate'])} | {_number(entry['win_rate_ties_half'])} | "
                f"{_number(entry['wilcoxon_p'])} |"
            )
        lines += [
            "",
            "Win rate: share of the decisive votes that the system won (0.5 when no vote was decisive: see the ties). "
            "Wilcoxon p: two-sided signed-rank test of the vote outcomes (+1 / 0 / -1, ties dropped) against no "
            "preference (1 when no vote was decisive).",
        ]
    else:
        lines.append("No votes compare two systems: serve a two-system pool with `--mode evaluate`.")
    rated = [entry for entry in report["comparisons"] if "ratings" in entry]
    if rated:
        lines += ["", "## Ratings (1-5)", "", "| system | " + " | ".join(RATING_CRITERIA) + " |"]
        lines.append("|---|" + "---:|" * len(RATING_CRITERIA))
        for system, means in report["mean_ratings"].items():
            lines.append(f"| {system} | " + " | ".join(_number(means.get(c)) for c in RATING_CRITERIA) + " |")
        lines += [
            "",
            "| system | opponent | criterion | pairs | mean difference | Wilcoxon p |",
            "|---|---|---|---:|---:|---:|",
        ]
        for entry in rated:
            for criterion, values in entry["ratings"].items():
                lines.append(
                    f"| {entry['system']} | {entry['opponent']} | {criterion} | {values['n']} | "
                    f"{values['mean_difference']:+.3f} | {_number(values['wilcoxon_p'])} |"
                )
    return "\n".join(lines) + "\n"


def write_report(store: Store | str | os.PathLike, out: str | os.PathLike) -> dict[str, Any]:
    """Write ``out/report.json`` and ``out/report.md``; return the report."""
    report = build_report(store)
    directory = Path(out)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "report.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    (directory / "report.md").write_text(to_markdown(report), encoding="utf-8")
    return report
