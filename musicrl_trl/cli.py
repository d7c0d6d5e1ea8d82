"""Command-line plumbing shared by the example scripts: which flags were given, recipe defaults, ``--help`` layout.

The scripts parse dataclasses with TRL's ``TrlParser`` (an ``argparse.ArgumentParser``). What this module adds:

- :func:`explicit_options`: the fields a user set on the command line (argparse itself only sees final values), so
  that a script can tell ``--save_steps 10`` from the default 500;
- :func:`apply_recipe_defaults`: a recipe's ``training:`` block (and its ``model_name_or_path``) become parser
  defaults, so that flags given on the command line override them (precedence: flag > ``--config`` file > recipe >
  dataclass default);
- :func:`layout_help`: ``--help`` lists the script's own options and the fields that matter for music first, and hides
  the text-only fields TRL's ``PPOConfig`` carries for language models (``--sft_model_path``, ``--stop_token``, ...);
- :func:`parse_name_values` and :func:`resolve_resume`: small parsers for ``NAME=VALUE`` lists and
  ``--resume_from_checkpoint PATH|true``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from transformers import TrainingArguments

from .trainers.ppo_config import COMPUTED_BATCH_FIELDS, UNUSED_TRL_PPO_FIELDS

__all__ = [
    "PPO_FIELDS_NOT_USED",
    "apply_recipe_defaults",
    "config_file_options",
    "configured_options",
    "explicit_options",
    "load_any_dataset",
    "layout_help",
    "option_value",
    "own_fields",
    "parse_name_values",
    "resolve_resume",
    "write_run_config",
]

#: TRL ``PPOConfig`` fields that ``MusicPPOTrainer`` never reads (settings of text generation and of TRL's own
#: reward/SFT loading, refused by ``MusicPPOConfig`` when set) and the sizes the trainer computes at start-up.
#: ``--help`` hides them.
PPO_FIELDS_NOT_USED = tuple(UNUSED_TRL_PPO_FIELDS) + COMPUTED_BATCH_FIELDS

#: Inherited TrainingArguments/PPOConfig fields that every music RL run sets, listed with the music fields.
PPO_FIELDS_THAT_MATTER = (
    "output_dir",
    "total_episodes",
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
    "num_mini_batches",
    "learning_rate",
    "lr_scheduler_type",
    "kl_coef",
    "cliprange",
    "vf_coef",
    "seed",
    "save_strategy",
    "save_steps",
    "resume_from_checkpoint",
    "push_to_hub",
    "hub_model_id",
    "report_to",
)


def explicit_options(parser: argparse.ArgumentParser, argv: Sequence[str]) -> set[str]:
    """The ``dest`` of every option present in ``argv`` (``--name``, ``--name=value``, dashed aliases, and the unique
    abbreviations argparse accepts)."""
    given = set()
    for token in argv:
        action = _resolve_option(parser, token.split("=", 1)[0])
        if action is not None:
            given.add(action.dest)
    return given


def option_value(argv: Sequence[str], option: str, parser: argparse.ArgumentParser | None = None) -> str | None:
    """The value of ``--option VALUE`` or ``--option=VALUE`` in ``argv`` (before the full parse), else ``None``.

    With ``parser``, the unique abbreviations argparse accepts count too (``--rec r.yaml`` for ``--recipe``), so that
    a value argparse will use is never missed here."""
    target = parser._option_string_actions.get(option) if parser is not None else None
    for index, token in enumerate(argv):
        name, sep, value = token.partition("=")
        if name != option and not (target is not None and _resolve_option(parser, name) is target):
            continue
        if sep:
            return value
        if index + 1 < len(argv):
            return argv[index + 1]
    return None


def _resolve_option(parser: argparse.ArgumentParser, option: str) -> argparse.Action | None:
    """The action argparse runs for ``option`` (exact, or a unique abbreviation), else ``None``."""
    if not option.startswith("--") or option == "--":
        return None
    by_option = parser._option_string_actions
    action = by_option.get(option)
    if action is None and parser.allow_abbrev:
        matches = {a for name, a in by_option.items() if name.startswith(option)}
        action = matches.pop() if len(matches) == 1 else None
    return action


def config_file_options(argv: Sequence[str]) -> set[str]:
    """The fields a ``--config`` YAML file in ``argv`` sets (TrlParser reads it; the exact flag only, as TRL)."""
    if "--config" not in argv or argv.index("--config") + 1 >= len(argv):
        return set()
    import yaml

    with open(argv[argv.index("--config") + 1], encoding="utf-8") as handle:
        config = yaml.safe_load(handle)
    return {key for key in config if key != "env"} if isinstance(config, dict) else set()


def configured_options(parser: argparse.ArgumentParser, argv: Sequence[str], recipe: Mapping | None) -> set[str]:
    """Every field a user chose, wherever: on the command line, in a ``--config`` file, or in the recipe (its
    ``training:`` block and ``model_name_or_path``). A script's own defaults apply to the other fields only."""
    chosen = explicit_options(parser, argv) | config_file_options(argv)
    if recipe is not None:
        chosen |= set(recipe.get("training") or {})
        if recipe.get("model_name_or_path"):
            chosen.add("model_name_or_path")
    return chosen


def apply_recipe_defaults(parser: Any, recipe: Mapping[str, Any]) -> None:
    """Make a recipe's ``training:`` values and ``model_name_or_path`` the parser's defaults (flags still override).

    ``parser`` is a ``TrlParser``. An unknown ``training:`` key is an error naming it (rather than being ignored).
    """
    training = dict(recipe.get("training") or {})
    unknown = parser.set_defaults_with_config(**training)
    known = {action.dest for action in parser._actions}
    unknown = sorted({key for key in training if key not in known} | set(unknown or []))
    if unknown:
        raise ValueError(
            f"recipe {recipe.get('name', '')!r}: training keys {unknown} are not MusicPPOConfig fields; fix or remove "
            "them (`python examples/ppo_musicrl.py --help` lists the fields)."
        )
    if recipe.get("model_name_or_path"):
        parser.set_defaults_with_config(model_name_or_path=recipe["model_name_or_path"])


def own_fields(dataclass_type: type) -> list[str]:
    """Fields declared (or re-declared with new defaults) in ``dataclass_type``'s own body, in order."""
    names = {f.name for f in dataclasses.fields(dataclass_type)}
    return [name for name in vars(dataclass_type).get("__annotations__", {}) if name in names]


def layout_help(
    parser: argparse.ArgumentParser,
    groups: Sequence[tuple[str, Iterable[str]]],
    hidden: Iterable[str] = PPO_FIELDS_NOT_USED,
    rest_title: str = "other Trainer options (transformers.TrainingArguments, TRL PPOConfig)",
    help_texts: Mapping[str, str] | None = None,
) -> None:
    """Regroup ``parser``'s options for ``--help``: ``groups`` (title, field names) first, in that order, then
    everything else under ``rest_title``; options in ``hidden`` are left out of the help (they still parse).
    ``help_texts`` replaces the help of some fields (inherited ones whose text does not fit the script)."""
    hidden = set(hidden)
    actions: dict[str, list[argparse.Action]] = {}  # a bool field defaulting to True has --x and --no_x
    for action in parser._actions:
        if not isinstance(action, argparse._HelpAction):
            actions.setdefault(action.dest, []).append(action)
    for name, text in (help_texts or {}).items():
        for action in actions.get(name, []):
            action.help = text
    for name in hidden:
        for action in actions.get(name, []):
            action.help = argparse.SUPPRESS
    placed: set[str] = set()
    new_groups = []
    for title, names in groups:
        group = argparse._ArgumentGroup(parser, title)
        for name in names:
            if name in actions and name not in placed and name not in hidden:
                group._group_actions.extend(actions[name])
                placed.add(name)
        new_groups.append(group)
    rest = argparse._ArgumentGroup(parser, rest_title)
    rest._group_actions.extend(
        action
        for name, group_actions in actions.items()
        if name not in placed and name not in hidden
        for action in group_actions
    )
    for group in parser._action_groups:  # what is left in argparse's own groups: -h
        group._group_actions[:] = [a for a in group._group_actions if isinstance(a, argparse._HelpAction)]
    parser._action_groups[:] = [*new_groups, rest, *[g for g in parser._action_groups if g._group_actions]]


def parse_name_values(items: Sequence[str] | None, flag: str) -> dict[str, str]:
    """``["quality=./mos", "preference=org/rm"]`` -> ``{"quality": "./mos", "preference": "org/rm"}``."""
    parsed = {}
    for item in items or []:
        name, sep, value = item.partition("=")
        if not sep or not name or not value:
            raise ValueError(f"{flag} takes NAME=VALUE pairs (e.g. {flag} quality=./my-mos-model), got {item!r}.")
        parsed[name] = value
    return parsed


def resolve_resume(value: str | bool | None, output_dir: str) -> str | bool | None:
    """``--resume_from_checkpoint`` as ``MusicPPOTrainer.train`` takes it: ``True`` (the latest ``checkpoint-*`` in
    ``output_dir``), a checkpoint folder, or ``None``. Checked here, so that a typo fails before models load."""
    if value is None or value is False or str(value).lower() in ("", "false", "no", "none"):
        return None
    if value is True or str(value).lower() in ("true", "yes", "latest"):
        from transformers.trainer_utils import get_last_checkpoint

        if not os.path.isdir(output_dir) or get_last_checkpoint(output_dir) is None:
            raise ValueError(
                f"--resume_from_checkpoint true: {output_dir!r} holds no checkpoint-* folder to resume from; pass the "
                "--output_dir of the interrupted run (saved with --save_steps N) or a checkpoint folder."
            )
        return True
    if not os.path.isdir(value):
        raise ValueError(
            f"--resume_from_checkpoint: the checkpoint folder {value!r} does not exist (working directory: "
            f"{os.getcwd()}); pass a checkpoint-N folder written with --save_steps N, or `true` for the latest one in "
            "--output_dir."
        )
    return value


def write_run_config(output_dir: str, **configs: Any) -> str:
    """Write the effective settings of a run (after recipe, config file, flags and script defaults) to
    ``<output_dir>/run_config.json`` as ``{name: {field: value}}``; returns the file's path.

    ``configs`` are dataclass instances by name (``script=..., training=..., model=...``); ``TrainingArguments``
    are written with their own ``to_dict`` (enums as strings, tokens redacted).
    """
    os.makedirs(output_dir, exist_ok=True)
    payload = {
        name: config.to_dict() if isinstance(config, TrainingArguments) else dataclasses.asdict(config)
        for name, config in configs.items()
    }
    path = os.path.join(output_dir, "run_config.json")
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(payload, handle, indent=2, default=str)
    return path


DATA_FILE_BUILDERS = {"json": "json", "jsonl": "json", "csv": "csv", "parquet": "parquet", "txt": "text"}


def load_any_dataset(name: str, config: str | None = None, what: str = "--dataset_name") -> Any:
    """A ``DatasetDict`` from a Hub dataset id, a saved dataset folder (``save_to_disk``, or one ``Dataset`` as
    ``musicrl-app export`` writes it), any other folder (``audiofolder``, data files) or a single
    ``.json``/``.jsonl``/``.csv``/``.parquet``/``.txt`` file (a text file: one row a line, column ``text``).

    A missing local path, or an id that cannot be fetched (offline, unreachable, unknown), is a ``ValueError``
    that names ``what`` and the fix, raised before anything is downloaded or built."""
    from datasets import DatasetDict, load_dataset, load_from_disk

    from .loading import is_local_path

    extension = os.path.splitext(name)[1].lstrip(".").lower()
    if not os.path.exists(name) and (extension in DATA_FILE_BUILDERS or is_local_path(name)):
        raise ValueError(f"{what}: the local path {name!r} does not exist (working directory: {os.getcwd()}).")
    if os.path.isfile(name):
        if extension not in DATA_FILE_BUILDERS:
            raise ValueError(
                f"{what}: cannot read {name!r}: a single data file must end in "
                f"{', '.join('.' + e for e in DATA_FILE_BUILDERS)} (or pass a dataset folder or a Hub id)."
            )
        return load_dataset(DATA_FILE_BUILDERS[extension], data_files={"train": name})
    if os.path.isdir(name) and os.path.exists(os.path.join(name, "dataset_dict.json")):
        return load_from_disk(name)
    if os.path.isdir(name) and os.path.exists(os.path.join(name, "state.json")):
        return DatasetDict({"train": load_from_disk(name)})
    from datasets.exceptions import DatasetNotFoundError

    if os.path.isdir(name):
        return load_dataset(name, config)  # a folder of data files or audio (audiofolder): datasets' own errors
    try:
        return load_dataset(name, config)
    except DatasetNotFoundError as error:
        raise ValueError(
            f"{what}: there is no local path {name!r} (working directory: {os.getcwd()}) and the Hub has no dataset "
            f"of that name ({error}). Check the id, or log in for a private one (`hf auth login`)."
        ) from None
    except (ConnectionError, OSError) as error:  # datasets' offline and unreachable errors are ConnectionErrors
        offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")
        fix = (
            "HF_HUB_OFFLINE=1 forbids downloading it: unset HF_HUB_OFFLINE, or pass a local file or folder"
            if offline
            else "check the connection (or HF_ENDPOINT), or pass a local file or folder"
        )
        raise ValueError(
            f"{what}: {name!r} is not a local path (working directory: {os.getcwd()}) and the dataset cannot be "
            f"loaded from the Hub ({type(error).__name__}: {error}); {fix}."
        ) from None
