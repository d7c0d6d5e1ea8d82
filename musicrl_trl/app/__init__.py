"""A pairwise listening app that collects preferences on a policy's own clips (on-policy) for the preference reward.

MusicRL's user-preference reward came from people comparing two clips for one prompt; its authors name repeated,
on-policy collection as the next step. This package closes that loop:

1. ``musicrl-app make-pool``: sample clips from the current policy (or two policies to compare) into a pool folder;
2. ``musicrl-app add-rater`` and ``musicrl-app serve``: raters listen to pairs in a Gradio page (or a script uses the
   JSON API) and vote; votes go to SQLite, committed before the answer;
3. ``musicrl-app export``: the votes as a ``prompt``/``chosen``/``rejected``/``tie`` dataset for
   :class:`~musicrl_trl.AudioRewardTrainer`; the trained model is a :class:`~musicrl_trl.PreferenceReward` for
   :class:`~musicrl_trl.MusicPPOTrainer` (recipe MusicRL-U), whose new policy makes the next pool;
4. ``musicrl-app report``: side-by-side results of two systems (win/tie/loss, win rate, Wilcoxon p).

The app is an optional extra (``pip install "musicrl-trl[app]"``): nothing in the library imports this package, and
importing it does not import Gradio (only the UI does). ``examples/human_feedback_loop.py`` runs the loop offline.

Modules: ``pool`` (clips and pool.jsonl), ``store`` (SQLite), ``server`` (FastAPI + API), ``ui`` (Gradio page),
``export`` (datasets), ``report`` (statistics), ``cli`` (the console script).
"""

from .pool import Pool, PoolClip, load_pool, make_pool
from .store import AppError, Rater, Store

__all__ = ["Pool", "PoolClip", "load_pool", "make_pool", "Store", "Rater", "AppError"]
