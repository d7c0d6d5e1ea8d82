"""Is the tuned policy better than the base, and at what cost? A side-by-side evaluation of two MusicGen policies.

MusicRL's statistics for policy A against policy B on the same prompts, N clips per prompt from each with fixed seeds:
per reward, the mean with a bootstrap 95 % interval, wins / ties / losses of A per prompt, the win rate
wins / (wins + losses) and a Wilcoxon signed-rank p-value; the exact KL of each policy to the base in nats per clip;
diversity (token entropy per codebook, mean pairwise distance of clip embeddings, Vendi score).

    python examples/evaluate_musicrl.py \
        --policy_a my-org/musicgen-small-musicrl-r --policy_b facebook/musicgen-small \
        --prompts prompts.txt --reward adherence=laion/larger_clap_music --reward loudness \
        --num_samples_per_prompt 4 --audio_duration_s 10 --guidance_scale 3 --output_dir outputs/eval-musicrl-r

Policies and the base are local paths or Hub ids, full models or LoRA adapters (a directory with
adapter_config.json loads on its base model). `--prompts` is a text file with one prompt a line (any file that is not
a data file), or a dataset (Hub id, `save_to_disk` directory or .json/.jsonl/.csv/.parquet/.arrow file) with a `prompt`
column. Rewards: `loudness`,
`brightness`, `silence` (signal rewards), `adherence=PATH_OR_ID` (CLAP), `quality=PATH_OR_ID`,
`preference=PATH_OR_ID` (MusicRewardModel heads). The KL reference `--base_model` defaults to policy B.

Writes `results.json`, `results.md` (a Markdown table), `rewards.png`, `reward_vs_kl.png` and a few clips of each
policy (`audio/`) to `--output_dir`. Everything is loaded and checked before the first clip is sampled.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

import torch
from transformers import HfArgumentParser

from musicrl_trl.audio import save_audio
from musicrl_trl.evaluation import evaluate_policies, load_prompts, results_markdown, write_results
from musicrl_trl.loading import ModelLoadingError
from musicrl_trl.rollout import SamplingConfig


@dataclass
class EvaluationArguments:
    """Which policies, on which prompts, under which rewards."""

    policy_a: str = field(metadata={"help": "Policy A (the tuned one): path or Hub id, full model or LoRA adapter."})
    policy_b: str = field(
        metadata={"help": "Policy B (usually the base): path or Hub id, full model or LoRA adapter."}
    )
    prompts: str = field(
        metadata={"help": "Text file with one prompt a line, or a dataset id/path with a 'prompt' column."}
    )
    reward: list[str] = field(
        default_factory=list,
        metadata={
            "help": "Reward to compare on (repeatable): loudness, brightness, silence, adherence=PATH_OR_ID, "
            "quality=PATH_OR_ID, preference=PATH_OR_ID.",
            "action": "append",
        },
    )
    base_model: str | None = field(
        default=None, metadata={"help": "KL reference: path or Hub id (default: policy_b)."}
    )
    num_samples_per_prompt: int = field(default=4, metadata={"help": "Clips per prompt and policy."})
    response_length: int | None = field(
        default=None, metadata={"help": "Clip length in decoder steps (frames + K - 1; 50 frames = 1 s)."}
    )
    audio_duration_s: float | None = field(
        default=None, metadata={"help": "Clip length in seconds instead of response_length (default 10 s)."}
    )
    seed: int = field(default=0, metadata={"help": "Prompt i is sampled with seed + i, for both policies."})
    output_dir: str = field(
        default=os.path.join("outputs", "evaluation"), metadata={"help": "Where results.json/.md and plots go."}
    )
    prompt_column: str = field(default="prompt", metadata={"help": "Text column of a prompt dataset."})
    dataset_split: str = field(default="train", metadata={"help": "Split of a prompt dataset."})
    guidance_scale: float = field(default=1.0, metadata={"help": "Classifier-free guidance when sampling and in KL."})
    temperature: float = field(default=0.99, metadata={"help": "Sampling temperature (MusicRL: 0.99)."})
    top_k: int = field(default=0, metadata={"help": "Top-k filtering, 0 for the whole codebook."})
    embedding: str = field(
        default="log_mel",
        metadata={
            "help": "Clip embedding for diversity: log_mel (model-free), or the name of a loaded model reward "
            "(adherence, quality, preference) whose audio encoder embeds the clips."
        },
    )
    bandwidth_db: float = field(
        default=3.0, metadata={"help": "log_mel embedding: kernel scale in dB for the Vendi score's similarities."}
    )
    tie_tolerance: float = field(default=0.0, metadata={"help": "Per-prompt differences up to this are ties."})
    num_resamples: int = field(default=10_000, metadata={"help": "Bootstrap resamples for the 95%% intervals."})
    batch_size: int | None = field(
        default=None, metadata={"help": "Clips per generate call (default: all of a prompt)."}
    )
    device: str | None = field(default=None, metadata={"help": "cuda / cpu (default: cuda when available)."})
    num_audio_examples: int = field(
        default=2, metadata={"help": "Write the clips of this many prompts per policy to output_dir/audio."}
    )


def main():
    (args,) = HfArgumentParser((EvaluationArguments,)).parse_args_into_dataclasses()
    rewards = [spec for group in args.reward for spec in (group if isinstance(group, list) else [group])]
    if not rewards:
        raise SystemExit("error: give at least one --reward (loudness, brightness, silence, adherence=..., ...).")
    positive = {
        "--num_samples_per_prompt": args.num_samples_per_prompt,
        "--response_length": args.response_length,
        "--audio_duration_s": args.audio_duration_s,
        "--batch_size": args.batch_size,
        "--num_resamples": args.num_resamples,
    }
    for flag, value in positive.items():
        if value is not None and not 0 < value < float("inf"):
            raise SystemExit(f"error: {flag} must be a number > 0, got {value}.")
    if args.response_length is None and args.audio_duration_s is None:
        args.audio_duration_s = 10.0
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")

    start = time.time()
    try:
        prompts = load_prompts(args.prompts, split=args.dataset_split, column=args.prompt_column)
        results = evaluate_policies(
            policy_a=args.policy_a,
            policy_b=args.policy_b,
            prompts=prompts,
            rewards=rewards,
            base_model=args.base_model,
            num_samples_per_prompt=args.num_samples_per_prompt,
            response_length=args.response_length,
            audio_duration_s=args.audio_duration_s,
            sampling=SamplingConfig(args.guidance_scale, args.temperature, args.top_k),
            seed=args.seed,
            embedding=args.embedding,
            bandwidth_db=args.bandwidth_db,
            tie_tolerance=args.tie_tolerance,
            num_resamples=args.num_resamples,
            batch_size=args.batch_size,
            device=device,
            keep_audio=args.num_audio_examples,
            progress=lambda label, done, total: print(f"{label}: {done}/{total} prompts", flush=True),
        )
    except (ValueError, ModelLoadingError) as error:  # bad input found before sampling: what and how to fix it
        raise SystemExit(f"error: {error}") from error
    paths = write_results(results, args.output_dir)
    if args.num_audio_examples > 0:
        for side, samples in results["_samples"].items():
            for index, clips in enumerate(samples.audio):
                for sample, clip in enumerate(clips):
                    path = os.path.join(args.output_dir, "audio", f"{side}_prompt{index}_sample{sample}.wav")
                    os.makedirs(os.path.dirname(path), exist_ok=True)
                    save_audio(path, clip, samples.sampling_rate)

    print(results_markdown(results))
    print(
        f"{results['num_prompts']} prompts x {results['num_samples_per_prompt']} clips x 2 policies in "
        f"{time.time() - start:.0f} s"
    )
    for kind, path in paths.items():
        print(f"{kind}: {os.path.abspath(path)}")


if __name__ == "__main__":
    main()
