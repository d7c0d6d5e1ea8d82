"""Evaluation metrics as Hugging Face ``evaluate`` modules, shipped with the package and loadable offline.

Each module is a directory holding one script, as ``evaluate.load`` expects for local modules::

    import evaluate
    from musicrl_trl.metrics import WIN_RATE, CLAP_SCORE

    win_rate = evaluate.load(WIN_RATE)
    win_rate.compute(scores_a=[0.7, 0.6, 0.9], scores_b=[0.5, 0.6, 0.4])
    # {'wins': 2, 'ties': 1, 'losses': 0, 'win_rate': 1.0, 'wilcoxon_p': 0.5}

They compute exactly what :mod:`musicrl_trl.evaluation` computes (``paired_comparison``, ``clap_score``), so scores
from the library, the evaluation script and an ``evaluate`` pipeline agree.
"""

import os

__all__ = ["CLAP_SCORE", "WIN_RATE"]

_HERE = os.path.dirname(os.path.abspath(__file__))

#: Path of the win-rate module: wins / ties / losses of A against B per prompt, win rate and Wilcoxon p-value.
WIN_RATE = os.path.join(_HERE, "win_rate")
#: Path of the CLAP-score module: mean CLAP text-audio cosine (the text-adherence reward) of clips and prompts.
CLAP_SCORE = os.path.join(_HERE, "clap_score")
