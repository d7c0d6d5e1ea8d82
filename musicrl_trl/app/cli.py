"""``musicrl-app``: make a pool of clips, add raters, serve the listening app, export the votes, report.

musicrl-app make-pool --policy PATH_OR_ID [--policy_b PATH_OR_ID] --prompts FILE --clips_per_prompt N --out DIR
                      [--response_length S | --audio_duration_s X]
musicrl-app add-rater --db DB NAME [--admin]          # prints the token as the last line (shown once)
musicrl-app serve --pool DIR --db DB [--host 127.0.0.1] [--port P] [--mode collect|evaluate]
musicrl-app export --db DB --pool DIR --out DIR2 [--push_to_hub REPO]
musicrl-app report --db DB --out DIR
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

__all__ = ["main", "build_parser"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="musicrl-app",
        description="Pairwise listening app: collect preferences on clips of a policy, export them as a preference "
        "dataset for AudioRewardTrainer, report side-by-side evaluations.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    pool = commands.add_parser("make-pool", help="sample clips from one or two policies into a pool folder")
    pool.add_argument("--policy", required=True, help="MusicGen checkpoint (folder or Hub id)")
    pool.add_argument("--policy_b", help="a second checkpoint to compare against (evaluation mode)")
    pool.add_argument("--prompts", required=True, help="text file, one prompt per line (or .jsonl with 'prompt')")
    pool.add_argument("--clips_per_prompt", type=int, required=True, help="clips per prompt and policy")
    pool.add_argument("--out", required=True, help="new folder for the clips and pool.jsonl")
    length = pool.add_mutually_exclusive_group()
    length.add_argument("--response_length", type=int, help="clip length in decoder steps (frames + K - 1)")
    length.add_argument("--audio_duration_s", type=float, help="clip length in seconds (default 10)")
    pool.add_argument("--system", help="name of --policy's clips (default: its folder or repo name)")
    pool.add_argument("--system_b", help="name of --policy_b's clips")
    pool.add_argument("--guidance_scale", type=float, help="default: the policy's generation_config")
    pool.add_argument("--temperature", type=float, help="default: the policy's generation_config")
    pool.add_argument("--top_k", type=int, help="default: the policy's generation_config")
    pool.add_argument("--batch_size", type=int, default=8, help="clips generated at once")
    pool.add_argument("--seed", type=int, default=0)
    pool.add_argument("--device", help="default: cuda if available, else cpu")

    rater = commands.add_parser("add-rater", help="create a rater and print their token")
    rater.add_argument("--db", required=True, help="SQLite database (created if missing)")
    rater.add_argument("name", help="rater name (letters, digits, ' _.@-')")
    rater.add_argument("--admin", action="store_true", help="may export over HTTP")

    serve = commands.add_parser("serve", help="run the web app (UI at /ui/, JSON API at /api/)")
    serve.add_argument("--pool", required=True, help="pool folder (with pool.jsonl)")
    serve.add_argument("--db", required=True, help="SQLite database (created if missing)")
    serve.add_argument("--host", default="127.0.0.1", help="0.0.0.0 to listen on every interface")
    serve.add_argument("--port", type=int, default=7860, help="0 picks a free port")
    serve.add_argument("--mode", choices=("collect", "evaluate"), default="collect")
    serve.add_argument(
        "--min_listen_fraction",
        type=float,
        default=0.0,
        help="refuse 'played' reports until this fraction of the clip's length has passed since the pair was given "
        "out (0 trusts the page; 0.9 makes API shortcuts wait like listeners)",
    )

    export = commands.add_parser("export", help="votes -> datasets folder (save_to_disk)")
    export.add_argument("--db", required=True, help="SQLite database of the votes (must exist)")
    export.add_argument("--pool", required=True, help="the pool whose clips were voted on")
    export.add_argument("--out", required=True, help="new folder for the dataset")
    export.add_argument("--push_to_hub", metavar="REPO", help="also push the dataset to this Hub repo")
    export.add_argument("--public", action="store_true", help="with --push_to_hub: a public repo (default private)")

    report = commands.add_parser("report", help="win/tie/loss, win rate and Wilcoxon p per system pair")
    report.add_argument("--db", required=True, help="SQLite database of the votes (must exist)")
    report.add_argument("--out", required=True, help="folder for report.json and report.md")
    return parser


def check_arguments(args: argparse.Namespace) -> None:
    """Refuse what can be told wrong from the arguments alone, before anything is loaded, sampled or written
    (``ValueError`` naming the flag, the problem and the fix)."""
    import os

    if args.command in ("export", "report") and not os.path.isfile(args.db):
        # Opening a mistyped --db would create a new, empty database and report "0 votes" as if that were true.
        raise ValueError(
            f"--db: the database {args.db!r} does not exist (working directory: {os.getcwd()}); pass the --db that "
            "`musicrl-app serve` collected the votes in (only serve and add-rater create one)."
        )
    if args.command in ("export", "serve") and not os.path.isdir(args.pool):
        raise ValueError(
            f"--pool: the folder {args.pool!r} does not exist (working directory: {os.getcwd()}); make one with "
            "`musicrl-app make-pool ... --out DIR` and pass that DIR."
        )
    if args.command == "make-pool":
        minimums = {"--clips_per_prompt": (args.clips_per_prompt, 1), "--batch_size": (args.batch_size, 1)}
        minimums["--response_length"] = (args.response_length, 1)
        minimums["--top_k"] = (args.top_k, 0)
        minimums["--guidance_scale"] = (args.guidance_scale, 1)
        for flag, (value, low) in minimums.items():
            if value is not None and not value >= low:
                raise ValueError(f"{flag} must be >= {low}, got {value}.")
        for flag, value in (("--audio_duration_s", args.audio_duration_s), ("--temperature", args.temperature)):
            if value is not None and not 0 < value < float("inf"):
                raise ValueError(f"{flag} must be a number > 0, got {value}.")
    if args.command == "serve":
        if not 0 <= args.port <= 65535:
            raise ValueError(f"--port must lie in 0..65535 (0 picks a free port), got {args.port}.")
        if not 0 <= args.min_listen_fraction <= 1:
            raise ValueError(f"--min_listen_fraction must lie in [0, 1], got {args.min_listen_fraction}.")


def main(argv: Sequence[str] | None = None) -> int:
    from ..loading import ModelLoadingError  # an OSError: a policy that cannot be loaded, with the fix in its message

    args = build_parser().parse_args(argv)
    try:
        check_arguments(args)
        if args.command == "make-pool":
            from .pool import make_pool, read_prompts

            policies = [args.policy] + ([args.policy_b] if args.policy_b else [])
            systems = None
            if args.system or args.system_b:
                from .pool import _system_name

                systems = [args.system or _system_name(args.policy)]
                if args.policy_b:
                    systems.append(args.system_b or _system_name(args.policy_b))
            pool = make_pool(
                policies,
                read_prompts(args.prompts),
                args.clips_per_prompt,
                args.out,
                response_length=args.response_length,
                audio_duration_s=args.audio_duration_s,
                systems=systems,
                guidance_scale=args.guidance_scale,
                temperature=args.temperature,
                top_k=args.top_k,
                batch_size=args.batch_size,
                seed=args.seed,
                device=args.device,
            )
            print(f"wrote {len(pool.clips)} clips of {', '.join(pool.systems)} to {pool.root}")
        elif args.command == "add-rater":
            from .store import Store

            token = Store(args.db).add_rater(args.name, admin=args.admin)
            role = "admin" if args.admin else "rater"
            print(f"added {role} {args.name!r} to {args.db}; their token (shown once, stored hashed):")
            print(token)
        elif args.command == "serve":
            from .server import serve

            serve(
                args.pool,
                args.db,
                host=args.host,
                port=args.port,
                mode=args.mode,
                min_listen_fraction=args.min_listen_fraction,
            )
        elif args.command == "export":
            from .export import export_dataset
            from .pool import load_pool
            from .store import Store

            dataset = export_dataset(
                Store(args.db), load_pool(args.pool), args.out, push_to_hub=args.push_to_hub, private=not args.public
            )
            print(f"wrote {len(dataset)} preference pairs ({sum(dataset['tie'])} ties) to {args.out}")
        elif args.command == "report":
            from .report import write_report

            report = write_report(args.db, args.out)
            pairs = len(report["comparisons"])
            print(f"{report['votes']} evaluation votes, {pairs} system pairs: {args.out}/report.md")
    except (ValueError, FileNotFoundError, FileExistsError, ModelLoadingError) as error:
        print(f"error: musicrl-app {args.command}: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
