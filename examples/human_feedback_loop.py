"""One turn of on-policy human feedback, offline: pool -> votes over HTTP -> preference model -> RL -> next pool
(or, with ``--method dpo``, pool -> votes -> DPO on the votes -> next pool).

MusicRL trained its user-preference reward once, on 300k votes collected on older models, and names repeated
on-policy collection as the next step. This script closes that loop with the listening app (``musicrl-app``) and
scripted raters standing in for people (a few minutes on a 2-core CPU, nothing downloaded)::

    pip install -e ".[app]" && python examples/human_feedback_loop.py

1. the round-0 policy (the tiny random MusicGen of ``musicrl_trl.testing``) samples a pool of clips;
2. the app server runs as a subprocess on 127.0.0.1 (port 0); scripted raters with a hidden taste (they prefer the
   louder clip, noisily, as a Bradley-Terry rater would) vote through its JSON API, concurrently;
3. the votes are exported as a preference dataset and a ``MusicRewardModel`` is trained on it with
   ``AudioRewardTrainer``;
4. one RL round with ``MusicPPOTrainer`` on that preference model alone (recipe MusicRL-U,
   ``examples/recipes/musicrl_u.yaml``, with the trained model in place of the recipe's);
   With ``--method dpo`` steps 3-4 are one: ``MusicDPOTrainer`` trains the policy on the exported votes directly,
   on the exact codes the pool sampled (no reward model, no rollouts);
5. the new policy makes the next pool, served in evaluation mode next to the old policy's clips: the same raters
   vote, ``musicrl-app report`` prints the new policy's win rate, and the new votes are the next round's data.

With people instead of scripts, the same steps are the console commands::

    musicrl-app make-pool --policy my-policy --prompts prompts.txt --clips_per_prompt 4 --out pool-0 \\
        --audio_duration_s 10
    musicrl-app add-rater --db votes.sqlite alice
    musicrl-app serve --pool pool-0 --db votes.sqlite --host 0.0.0.0 --port 7860
    musicrl-app export --db votes.sqlite --pool pool-0 --out prefs-0
    python examples/train_reward_model.py --dataset_name prefs-0 --model_name_or_path laion/larger_clap_music ...
    accelerate launch examples/ppo_musicrl.py --model_name_or_path my-policy \\
        --recipe examples/recipes/musicrl_u.yaml ...
    musicrl-app make-pool --policy my-policy --policy_b my-policy-rl --prompts prompts.txt ... --out pool-1
    musicrl-app serve --pool pool-1 --db votes.sqlite --mode evaluate
    musicrl-app report --db votes.sqlite --out report-1
"""

from __future__ import annotations

import io
import json
import math
import os
import random
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
from datasets import Dataset, load_from_disk
from transformers import MusicgenForConditionalGeneration, MusicgenProcessor, PrinterCallback
from trl import TrlParser

from musicrl_trl import (
    AudioRewardConfig,
    AudioRewardTrainer,
    MusicDPOConfig,
    MusicDPOTrainer,
    MusicPPOConfig,
    MusicPPOTrainer,
)
from musicrl_trl.app.client import ApiError, RaterClient, ServerProcess
from musicrl_trl.app.export import export_dataset
from musicrl_trl.app.pool import load_pool, make_pool
from musicrl_trl.app.report import to_markdown, write_report
from musicrl_trl.app.store import Store
from musicrl_trl.reward_models import MusicRewardConfig, MusicRewardModel
from musicrl_trl.reward_models.combination import load_recipe, rewards_from_recipe
from musicrl_trl.testing import save_tiny_musicgen

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = [
    "bright shimmering bells over a soft pad",
    "deep dark bass drone",
    "an upbeat electronic dance track",
    "slow sad piano ballad",
    "energetic rock guitar riff",
    "calm ambient soundscape with rain",
    "funky groove with slap bass",
    "epic orchestral fanfare",
]


@dataclass
class LoopArguments:
    """Sizes of the offline loop (the defaults take a few minutes on 2 CPU cores)."""

    output_dir: str = field(default="outputs/human_feedback_loop", metadata={"help": "Where every round's files go."})
    clips_per_prompt: int = field(default=6, metadata={"help": "Clips per prompt in the collection pool."})
    response_length: int = field(default=20, metadata={"help": "Decoder steps per clip (20: 0.34 s at 50 Hz)."})
    num_raters: int = field(default=4, metadata={"help": "Scripted raters voting at the same time."})
    votes_per_rater: int = field(default=40, metadata={"help": "Votes each rater casts on the collection pool."})
    # The tiny policy's clips differ in loudness by about 0.4 dB (std): raters this sensitive agree with their taste
    # on about 85 % of the pairs one standard deviation apart.
    taste_db: float = field(
        default=0.25, metadata={"help": "Rater noise: P(A wins) = sigmoid((loudness_A - loudness_B) / taste_db)."}
    )
    tie_db: float = field(default=0.02, metadata={"help": "Raters call clips closer than this in loudness a tie."})
    method: str = field(
        default="rl",
        metadata={"help": "'rl': preference model + RL round (MusicRL-U); 'dpo': MusicDPOTrainer on the votes."},
    )
    rl_updates: int = field(default=40, metadata={"help": "Policy updates in the RL round (batches of 8 clips)."})
    dpo_epochs: float = field(default=4, metadata={"help": "Passes over the votes in the DPO round."})
    eval_clips_per_prompt: int = field(default=2, metadata={"help": "Clips per prompt and policy when evaluating."})
    seed: int = field(default=0, metadata={"help": "Seeds the policy, sampling, raters and training."})


def loudness_db(wav_bytes: bytes) -> float:
    audio, _ = sf.read(io.BytesIO(wav_bytes), dtype="float32")
    return float(10 * np.log10(np.mean(audio**2) + 1e-12))


class ScriptedRater:
    """A rater whose hidden taste is loudness: A wins with probability sigmoid((dB_A - dB_B) / taste_db)."""

    def __init__(self, client: RaterClient, taste_db: float, tie_db: float, seed: int):
        self.client = client
        self.taste_db = taste_db
        self.tie_db = tie_db
        self.rng = random.Random(seed)

    def choose(self, prompt: str, audio_a: bytes, audio_b: bytes) -> str:
        difference = loudness_db(audio_a) - loudness_db(audio_b)
        if abs(difference) < self.tie_db:
            return "tie"
        return "a" if self.rng.random() < 1 / (1 + math.exp(-difference / self.taste_db)) else "b"

    def vote(self, count: int) -> int:
        """Vote ``count`` times or until the pool has no pair left for this rater; returns the votes cast."""
        for cast in range(count):
            try:
                self.client.listen_and_vote(self.choose)
            except ApiError as error:
                if error.code == "no_pairs_left":
                    return cast
                raise
        return count


def collect_votes(pool_dir: Path, db: Path, tokens: list[str], args: LoopArguments, count: int, mode: str) -> int:
    """Serve the pool and let every rater vote ``count`` times at once, through HTTP."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    with ServerProcess(pool_dir, db, mode=mode, env=env) as server:
        print(f"  serving {pool_dir.name} ({mode}) at {server.url}/ui/")
        raters = [
            ScriptedRater(RaterClient(server.url, token), args.taste_db, args.tie_db, seed=args.seed + index)
            for index, token in enumerate(tokens)
        ]
        counts = [0] * len(raters)

        def run(index: int) -> None:
            counts[index] = raters[index].vote(count)

        threads = [threading.Thread(target=run, args=(index,)) for index in range(len(raters))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    return sum(counts)


def train_preference_model(dataset_dir: Path, output_dir: Path, seed: int) -> float:
    """A small audio-only Bradley-Terry model on the exported votes; returns its held-out accuracy."""
    dataset = load_from_disk(str(dataset_dir)).train_test_split(test_size=0.25, seed=seed)
    torch.manual_seed(seed)
    model = MusicRewardModel(
        MusicRewardConfig(conv_channels=[8, 16, 32], hidden_size=64, sampling_rate=16_000, initializer_range=0.2)
    )
    args = AudioRewardConfig(
        output_dir=str(output_dir),
        per_device_train_batch_size=8,
        learning_rate=3e-3,
        num_train_epochs=8,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        seed=seed,
    )
    trainer = AudioRewardTrainer(model=model, args=args, train_dataset=dataset["train"], eval_dataset=dataset["test"])
    # With disable_tqdm, transformers' PrinterCallback prints every logged metric dict to stdout; the loop prints its
    # own summary and the metrics stay in trainer.state.log_history.
    trainer.remove_callback(PrinterCallback)
    trainer.train()
    trainer.save_model(str(output_dir))
    return trainer.evaluate()["eval_accuracy"]


def rl_round(policy_dir: Path, reward_dir: Path, output_dir: Path, args: LoopArguments) -> None:
    """MusicRL-U: the recipe's preference reward (running normalisation), with the model trained above."""
    recipe = load_recipe(ROOT / "examples" / "recipes" / "musicrl_u.yaml")
    preference = rewards_from_recipe(recipe, preference={"model": str(reward_dir), "tokenizer": None})
    training = {key: value for key, value in recipe["training"].items() if key != "audio_duration_s"}
    config = MusicPPOConfig(
        output_dir=str(output_dir),
        total_episodes=8 * args.rl_updates,
        per_device_train_batch_size=8,
        response_length=args.response_length,
        learning_rate=1e-3,
        lr_scheduler_type="constant",
        kl_coef=0.005,
        logging_steps=5,
        disable_tqdm=True,
        report_to="none",
        seed=args.seed,
        **training,
    )
    model = MusicgenForConditionalGeneration.from_pretrained(policy_dir)
    processor = MusicgenProcessor.from_pretrained(policy_dir)
    trainer = MusicPPOTrainer(
        args=config,
        processing_class=processor,
        model=model,
        reward_model=[preference],
        train_dataset=Dataset.from_dict({"prompt": PROMPTS * 4}),
    )
    trainer.remove_callback(PrinterCallback)  # as above
    trainer.train()
    trainer.save_model(str(output_dir))
    scores = [entry["objective/scores"] for entry in trainer.state.log_history if "objective/scores" in entry]
    quarter = max(1, len(scores) // 4)
    print(
        f"  preference reward (normalised), first quarter of the round: {np.mean(scores[:quarter]):+.3f}, "
        f"last quarter: {np.mean(scores[-quarter:]):+.3f}"
    )


def dpo_round(policy_dir: Path, dataset_dir: Path, output_dir: Path, args: LoopArguments) -> None:
    """DPO on the exported votes directly: the pool kept each clip's codes, so the policy trains on the exact tokens
    the raters heard (ties skipped)."""
    config = MusicDPOConfig(
        output_dir=str(output_dir),
        per_device_train_batch_size=8,
        num_train_epochs=args.dpo_epochs,
        learning_rate=1e-3,
        lr_scheduler_type="constant",
        beta=0.1,
        response_length=args.response_length,
        logging_steps=5,
        save_strategy="no",
        disable_tqdm=True,
        report_to="none",
        seed=args.seed,
    )
    model = MusicgenForConditionalGeneration.from_pretrained(policy_dir)
    processor = MusicgenProcessor.from_pretrained(policy_dir)
    trainer = MusicDPOTrainer(model, args=config, train_dataset=load_from_disk(str(dataset_dir)),
                              processing_class=processor)  # fmt: skip
    trainer.remove_callback(PrinterCallback)  # as in train_preference_model
    trainer.train()
    trainer.save_model(str(output_dir))
    logs = [entry for entry in trainer.state.log_history if "rewards/accuracies" in entry]
    print(
        f"  {trainer.num_pairs} pairs ({trainer.num_ties_skipped} ties skipped, {trainer.input_kind} as voted); "
        f"rewards/accuracies {logs[0]['rewards/accuracies']:.2f} -> {logs[-1]['rewards/accuracies']:.2f}, "
        f"rewards/margins {logs[-1]['rewards/margins']:+.3f}"
    )


def mean_loudness(pool_dir: Path, system: str | None = None) -> float:
    pool = load_pool(pool_dir)
    return float(
        np.mean(
            [
                loudness_db(pool.path_of(clip_id).read_bytes())
                for clip_id, clip in pool.clips.items()
                if system is None or clip.system == system
            ]
        )
    )


def policy_1_result(report: dict) -> tuple[float | None, str]:
    """policy-1's share of the decisive evaluation votes against policy-0, and the sentence that reports it.

    None when no vote decided anything (no evaluation vote, or only ties): the report's convention is then a win
    rate of 0.5, which here would read as "policy-1 won half", so the sentence says what happened instead.
    """
    entry = next((c for c in report["comparisons"] if (c["system"], c["opponent"]) == ("policy-0", "policy-1")), None)
    if entry is None or entry["n"] == 0:
        return None, "no evaluation vote compares policy-1 with policy-0: the raters voted on no pair of pool-1."
    decisive = entry["wins"] + entry["losses"]  # oriented alphabetically: wins are policy-0's
    if decisive == 0:
        return None, (
            f"no decisive vote: all {entry['ties']} evaluation votes were ties, so policy-1 and policy-0 cannot be "
            "told apart; rate more pairs (--eval_clips_per_prompt, --num_raters) or lower --tie_db."
        )
    share = entry["losses"] / decisive
    return share, (
        f"policy-1 won {share:.0%} of the decisive votes against policy-0 ({entry['losses']} of {decisive}, "
        f"Wilcoxon p = {entry['wilcoxon_p']:.3g})"
    )


def main(args: LoopArguments) -> dict:
    if args.method not in ("rl", "dpo"):
        raise ValueError(f"--method must be 'rl' or 'dpo', got {args.method!r}.")
    torch.set_num_threads(1)  # tiny models: threads only add synchronisation on a busy 2-core machine
    out = Path(args.output_dir)
    if out.exists() and any(out.iterdir()):
        if not (out / "summary.json").exists() and not (out / "prompts.txt").exists():
            raise FileExistsError(f"{out} exists and is not an earlier run of this script: pick another --output_dir.")
        shutil.rmtree(out)  # an earlier run of this script: start the loop afresh
    out.mkdir(parents=True, exist_ok=True)
    start = time.time()
    prompts_file = out / "prompts.txt"
    prompts_file.write_text("\n".join(PROMPTS) + "\n")

    print("1. round-0 policy and its pool")
    policy_0 = Path(save_tiny_musicgen(out / "policy-0", seed=args.seed))
    make_pool(
        [str(policy_0)],
        PROMPTS,
        args.clips_per_prompt,
        out / "pool-0",
        response_length=args.response_length,
        seed=args.seed,
    )

    print("2. scripted raters vote through the app's HTTP API")
    db = out / "votes.sqlite"
    store = Store(db)
    tokens = [store.add_rater(f"rater-{index}") for index in range(args.num_raters)]
    votes = collect_votes(out / "pool-0", db, tokens, args, args.votes_per_rater, "collect")
    print(f"  {votes} votes")

    accuracy = None
    if args.method == "dpo":
        print("3-4. export, and DPO on the votes (MusicDPOTrainer)")
        export_dataset(store, load_pool(out / "pool-0"), out / "preferences-0")
        dpo_round(policy_0, out / "preferences-0", out / "policy-1", args)
    else:
        print("3. export and train the preference model")
        dataset = export_dataset(store, load_pool(out / "pool-0"), out / "preferences-0")
        accuracy = train_preference_model(out / "preferences-0", out / "preference-model-0", args.seed)
        print(f"  {len(dataset)} pairs ({sum(dataset['tie'])} ties); held-out accuracy {accuracy:.2f}")

        print("4. one RL round on the preference model (recipe MusicRL-U)")
        rl_round(policy_0, out / "preference-model-0", out / "policy-1", args)

    print("5. the new policy's pool, rated side by side with the old policy's")
    make_pool(
        [str(policy_0), str(out / "policy-1")],
        PROMPTS,
        args.eval_clips_per_prompt,
        out / "pool-1",
        response_length=args.response_length,
        systems=["policy-0", "policy-1"],
        seed=args.seed + 1,
    )
    pairs_per_rater = len(load_pool(out / "pool-1").pairs("evaluate"))
    collect_votes(out / "pool-1", db, tokens, args, pairs_per_rater, "evaluate")
    report = write_report(store, out / "report-1")
    print(to_markdown(report))
    win_rate, result = policy_1_result(report)
    summary = {
        "method": args.method,
        "collection_votes": votes,
        "evaluation_votes": report["votes"],
        "policy_1_win_rate": win_rate,
        "wilcoxon_p": report["comparisons"][0]["wilcoxon_p"] if report["comparisons"] else None,
        "preference_model_accuracy": accuracy,
        "loudness_db_policy_0": mean_loudness(out / "pool-1", "policy-0"),
        "loudness_db_policy_1": mean_loudness(out / "pool-1", "policy-1"),
        "seconds": time.time() - start,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(result)
    print(
        f"hidden taste (loudness): policy-0 {summary['loudness_db_policy_0']:.1f} dBFS, policy-1 "
        f"{summary['loudness_db_policy_1']:.1f} dBFS; {time.time() - start:.0f} s in all; files in {out}"
    )
    return summary


if __name__ == "__main__":
    (loop_args,) = TrlParser((LoopArguments,)).parse_args_and_config()
    main(loop_args)
