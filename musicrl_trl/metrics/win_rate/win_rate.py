"""Side-by-side win rate of policy A against policy B with a Wilcoxon signed-rank test (MusicRL's statistics)."""

import datasets
import evaluate

from musicrl_trl.evaluation import paired_comparison

_DESCRIPTION = """\
Win rate of system A against system B on the same prompts, as MusicRL (Cideron et al., 2024) reported its side-by-side
evaluations: per prompt, A wins when its score is higher (mean over the prompt's clips when several are given), ties
are left out, win_rate = wins / (wins + losses) (0.5 when every prompt ties). The two-sided Wilcoxon signed-rank test
of the per-prompt differences (ties dropped) gives wilcoxon_p.
"""

_KWARGS_DESCRIPTION = """\
Args:
    scores_a: one score per prompt for system A (a float), or the scores of its clips (a list of floats).
    scores_b: the same for system B, same prompts in the same order.
    tie_tolerance: prompts whose mean scores differ by at most this much count as ties (default 0).
Returns:
    wins, ties, losses: counts of prompts, from A's side.
    win_rate: wins / (wins + losses).
    wilcoxon_p: two-sided p-value of the Wilcoxon signed-rank test.
Examples:
    >>> win_rate = evaluate.load("musicrl_trl/metrics/win_rate")
    >>> win_rate.compute(scores_a=[1, 2, 3, 4, 5, 6], scores_b=[0, 0, 0, 0, 0, 0])["wilcoxon_p"]
    0.03125
"""

_CITATION = """\
@article{cideron2024musicrl,
    title   = {{MusicRL: Aligning Music Generation to Human Preferences}},
    author  = {Cideron, Geoffrey and Girgin, Sertan and Verzetti, Mauro and others},
    year    = 2024,
    eprint  = {arXiv:2402.04229}
}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class WinRate(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=[
                datasets.Features({"scores_a": datasets.Value("float64"), "scores_b": datasets.Value("float64")}),
                datasets.Features(
                    {
                        "scores_a": datasets.Sequence(datasets.Value("float64")),
                        "scores_b": datasets.Sequence(datasets.Value("float64")),
                    }
                ),
            ],
            reference_urls=["https://arxiv.org/abs/2402.04229"],
        )

    def _compute(self, scores_a, scores_b, tie_tolerance=0.0):
        if scores_a and isinstance(scores_a[0], (list, tuple)):
            # Clips per prompt: each prompt scores the mean of its clips (prompts may have different clip counts).
            scores_a = [sum(clips) / len(clips) for clips in scores_a]
            scores_b = [sum(clips) / len(clips) for clips in scores_b]
        return paired_comparison(scores_a, scores_b, tie_tolerance)
