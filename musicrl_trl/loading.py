"""Where a model comes from, checked before anything heavy is loaded, with errors that name the problem and the fix.

Every place that takes a model as a path or Hub id (the policy, the KL anchor, the processor, every reward model,
the reward-model trainer's starting point) goes through :func:`resolve_pretrained` first. It answers one question,
"can ``from_pretrained`` load this now?", in well under a second, and otherwise raises :class:`ModelLoadingError`:

- a local path that does not exist (``./my-model``, ``/data/rm``, ``a/b/c``) names the path and the working
  directory (``from_pretrained`` would report it as an invalid repo id);
- a ``.safetensors`` file whose header or length is wrong names the file and says to re-download or re-save it
  (safetensors itself only says "header too large" or "incomplete metadata");
- with ``HF_HUB_OFFLINE=1`` a Hub id that is not in the local cache fails at once and says to unset it (transformers
  reports "couldn't connect" and, for some classes, a misleading "can't load feature extractor");
- a Hub id is checked with one metadata request: an unreachable Hub fails at once (``hf_hub_download`` retries each
  file five times with back-off, minutes for a model with several files) unless the model is cached, in which case
  the cached snapshot is used; an id the Hub does not know is reported as such.

``hint`` is appended to every message about a missing model: the command that makes it (e.g.
``python examples/train_reward_model.py ... --output_dir ast-music-mos``).

:func:`load_pretrained` also never runs a pickle unless asked: a model whose weights are only pickles
(``pytorch_model.bin``, ``adapter_model.bin``) is refused with :class:`ModelLoadingError` before anything is
downloaded, and model classes get ``use_safetensors=True``. ``allow_pickle_weights=True`` lifts both for a source the
user trusts.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from typing import Any, TypeVar

from huggingface_hub import HfApi, constants, snapshot_download
from huggingface_hub.errors import (
    GatedRepoError,
    HFValidationError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import validate_repo_id

__all__ = [
    "ModelLoadingError",
    "check_no_pickle_only_weights",
    "check_safetensors_file",
    "check_model_folder",
    "check_weights",
    "is_local_path",
    "load_pretrained",
    "load_prompts",
    "resolve_pretrained",
]

logger = logging.getLogger(__name__)
T = TypeVar("T")

#: Seconds to wait for the Hub's answer about one model before calling it unreachable.
HUB_TIMEOUT_S = 10.0
# safetensors refuses headers above 100 MB; a larger length field means the file is not (or no longer) safetensors.
MAX_SAFETENSORS_HEADER = 100_000_000


class ModelLoadingError(OSError):
    """A model or processor cannot be loaded from the given path or id; the message says why and what to do.

    An ``OSError`` like transformers' own loading errors, so existing ``except OSError`` handlers still apply.
    """


def _with_hint(message: str, hint: str | None) -> str:
    return f"{message} {hint}" if hint else message


def is_local_path(name: str) -> bool:
    """True if ``name`` can only mean a local path: absolute, starting with ``.`` or ``~``, holding a backslash or more
    than one ``/``, under an existing local folder (``outputs/run-1`` where ``outputs/`` exists), or not a valid Hub
    repo id.

    ``outputs/does-not-exist`` was taken for a Hub id and reported as "cannot reach the Hub": a user who types a path
    under a folder they have means that folder."""
    if os.path.isabs(name) or name.startswith((".", "~")) or "\\" in name or name.count("/") > 1:
        return True
    parent = name.split("/", 1)[0]
    if "/" in name and parent and os.path.isdir(parent):
        return True
    try:
        validate_repo_id(name)
    except HFValidationError:
        return True
    return False


def check_safetensors_file(path: str | os.PathLike, what: str = "model") -> None:
    """Raise :class:`ModelLoadingError` naming ``path`` if its safetensors header or length is inconsistent.

    Reads the 8-byte header length and the JSON header only (not the tensors): fast for any file size. Catches files
    cut short by an interrupted download or copy, files overwritten with something else (e.g. an HTML error page),
    and Git LFS pointer files checked out without ``git lfs pull``.
    """
    path = os.fspath(path)
    size = os.path.getsize(path)

    def corrupt(problem: str) -> ModelLoadingError:
        return ModelLoadingError(
            f"{what}: the weights file {path} is corrupt or truncated ({problem}). Re-download it (for a Hub model "
            "delete it from the Hugging Face cache or run `hf download <repo id> --force-download`) or re-save the "
            "model with `save_pretrained`."
        )

    with open(path, "rb") as handle:
        head = handle.read(8)
        if len(head) < 8:
            raise corrupt(f"the file has only {size} bytes")
        header_length = int.from_bytes(head, "little")
        if header_length > MAX_SAFETENSORS_HEADER or 8 + header_length > size:
            start = head.decode("ascii", errors="replace")
            detail = "; it looks like a Git LFS pointer: run `git lfs pull`" if start.startswith("version ") else ""
            raise corrupt(f"its header claims {header_length} bytes but the file has {size}{detail}")
        try:
            header = json.loads(handle.read(header_length))
        except ValueError:
            raise corrupt("its header is not valid JSON") from None
    if not isinstance(header, dict):
        raise corrupt("its header is not a JSON object")
    try:
        end = max((entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"), default=0)
    except (KeyError, TypeError, IndexError):
        raise corrupt("a tensor entry has no data_offsets") from None
    if 8 + header_length + end > size:
        raise corrupt(f"the tensors need {8 + header_length + end} bytes but the file has {size}")


def check_weights(folder: str | os.PathLike, what: str = "model") -> None:
    """:func:`check_safetensors_file` on every ``*.safetensors`` file directly in ``folder``."""
    folder = os.fspath(folder)
    for name in sorted(os.listdir(folder)):
        if name.endswith(".safetensors"):
            check_safetensors_file(os.path.join(folder, name), what)


def _cached_snapshot(repo_id: str, revision: str | None) -> str | None:
    try:
        return snapshot_download(repo_id, revision=revision, local_files_only=True)
    except (LocalEntryNotFoundError, FileNotFoundError, OSError, ValueError):
        return None


def resolve_pretrained(
    name_or_path: str | os.PathLike,
    what: str = "model",
    hint: str | None = None,
    revision: str | None = None,
) -> str:
    """A local folder or Hub id that ``from_pretrained`` can load now; otherwise :class:`ModelLoadingError`.

    Args:
        name_or_path: a local folder or a Hub model id.
        what: what the model is for, first in every message (``"policy"``, ``"reward 'quality'"``, ...).
        hint: appended to messages about a missing model (e.g. the command that trains it).
        revision: Hub revision (branch, tag or commit).

    Returns ``name_or_path`` itself for a local folder, a reachable Hub model or (with ``HF_HUB_OFFLINE=1``) a cached
    one, or the cached snapshot folder when the Hub cannot be reached but the model is cached (so that loading does
    not retry every file). Local folders (and cached snapshots) also get their
    safetensors files checked (:func:`check_weights`).
    """
    return _resolve(name_or_path, what, hint, revision)[0]


def _resolve(
    name_or_path: str | os.PathLike, what: str, hint: str | None, revision: str | None
) -> tuple[str, list[str] | None]:
    """:func:`resolve_pretrained`, and the repo's file names when it asked the Hub (``None`` otherwise)."""
    name = os.fspath(name_or_path)
    path = os.path.expanduser(name)
    if os.path.isdir(path):
        check_weights(path, what)
        return path, None
    if os.path.isfile(path):
        raise ModelLoadingError(
            f"{what}: {name!r} is a file; pass the folder that holds the model (its config.json and weights)."
        )
    if is_local_path(name):
        raise ModelLoadingError(
            _with_hint(f"{what}: the local path {name!r} does not exist (working directory: {os.getcwd()}).", hint)
        )

    cached = _cached_snapshot(name, revision)
    if constants.HF_HUB_OFFLINE:
        if cached is not None:
            check_weights(cached, what)
            return name, None  # offline, transformers reads the cache without retrying; the id stays the model's name
        raise ModelLoadingError(
            _with_hint(
                f"{what}: {name!r} is neither a local folder (working directory: {os.getcwd()}) nor in the Hugging "
                f"Face cache ({constants.HF_HUB_CACHE}), and HF_HUB_OFFLINE=1 forbids downloading it. Unset "
                "HF_HUB_OFFLINE (`unset HF_HUB_OFFLINE`) to download it from the Hub, or pass a local folder.",
                hint,
            )
        )
    try:
        info = HfApi().model_info(name, revision=revision, timeout=HUB_TIMEOUT_S)
    except (RepositoryNotFoundError, GatedRepoError, RevisionNotFoundError) as error:
        if isinstance(error, GatedRepoError):
            raise ModelLoadingError(
                f"{what}: {name!r} is gated on the Hub: accept its conditions on its page and log in (`hf auth "
                "login`)."
            ) from None
        missing = f"revision {revision!r} of {name!r}" if isinstance(error, RevisionNotFoundError) else repr(name)
        raise ModelLoadingError(
            _with_hint(
                f"{what}: there is no local folder {name!r} (working directory: {os.getcwd()}) and the Hub at "
                f"{constants.ENDPOINT} has no model {missing} (or it is private: log in with `hf auth login`).",
                hint,
            )
        ) from None
    except Exception as error:  # noqa: BLE001 - any transport failure (DNS, refused, timeout, 5xx) means "unreachable"
        if cached is not None:
            logger.warning("%s: the Hub is unreachable (%s); using the cached copy of %r.", what, error, name)
            check_weights(cached, what)
            return cached, None
        raise ModelLoadingError(
            _with_hint(
                f"{what}: cannot reach the Hub at {constants.ENDPOINT} to download {name!r} ({type(error).__name__}: "
                f"{error}), and it is not in the local cache. Check the connection (or HF_ENDPOINT), pass a local "
                "folder, or download it where there is a connection (`hf download <repo id>`) and run with "
                "HF_HUB_OFFLINE=1.",
                hint,
            )
        ) from None
    return name, [sibling.rfilename for sibling in info.siblings or ()]


def _is_pickle_weights(filename: str) -> bool:
    # The names from_pretrained falls back to when no safetensors are there: transformers' pytorch_model.bin (and
    # its shards pytorch_model-00001-of-00002.bin), peft's adapter_model.bin. training_args.bin is no weights file.
    return filename.endswith(".bin") and filename.startswith(("pytorch_model", "adapter_model"))


def check_no_pickle_only_weights(
    source: str | os.PathLike,
    what: str = "model",
    subfolder: str | None = None,
    revision: str | None = None,
    repo_files: list[str] | None = None,
) -> None:
    """Raise :class:`ModelLoadingError` if the model at ``source`` has pickle weights and no safetensors.

    ``from_pretrained`` (transformers and peft alike) falls back to ``pytorch_model.bin`` / ``adapter_model.bin``
    when a model has no ``*.safetensors``, and loading a pickle can run code. This library never does so unless the
    user passes ``allow_pickle_weights=True``.

    Args:
        source: a local folder or a Hub id, as :func:`resolve_pretrained` returns it.
        what: what the model is for, first in the message.
        subfolder: the folder inside ``source`` that holds the weights (``subfolder=`` of ``from_pretrained``).
        revision: Hub revision.
        repo_files: the repo's file names if already known (from the Hub's model info); otherwise they are read from
            the folder, the Hub or, offline, the local cache.
    """
    source = os.fspath(source)
    if os.path.isdir(source):
        folder = os.path.join(source, subfolder or "")
        names = os.listdir(folder) if os.path.isdir(folder) else []
    else:
        if repo_files is None:
            cached = _cached_snapshot(source, revision) if constants.HF_HUB_OFFLINE else None
            if cached is not None:
                check_no_pickle_only_weights(cached, what, subfolder)
                return
            if constants.HF_HUB_OFFLINE:
                return  # nothing cached: from_pretrained fails on its own, and downloads nothing to run
            info = HfApi().model_info(source, revision=revision, timeout=HUB_TIMEOUT_S)
            repo_files = [sibling.rfilename for sibling in info.siblings or ()]
        prefix = f"{subfolder.strip('/')}/" if subfolder else ""
        names = [name[len(prefix) :] for name in repo_files if name.startswith(prefix)]
        names = [name for name in names if "/" not in name]
    pickles = sorted(name for name in names if _is_pickle_weights(name))
    if pickles and not any(name.endswith(".safetensors") for name in names):
        where = os.path.join(source, subfolder) if subfolder else source
        raise ModelLoadingError(
            f"{what}: {where!r} has only pickle weights ({', '.join(pickles)}) and no safetensors, and loading a "
            "pickle can run arbitrary code, so it is refused. Convert the weights to safetensors (load the model once "
            "where you trust it and `save_pretrained` it again, which writes model.safetensors), or pass "
            "allow_pickle_weights=True if you trust where the model comes from."
        )


def _loads_weights(load: Callable[..., Any]) -> bool:
    # Only model classes take use_safetensors: a processor or tokenizer would keep it and write it into its
    # tokenizer_config.json. A bound classmethod (`Cls.from_pretrained`) says which class it loads.
    from transformers import PreTrainedModel
    from transformers.models.auto.auto_factory import _BaseAutoModelClass

    owner = getattr(load, "__self__", None)
    return isinstance(owner, type) and issubclass(owner, (PreTrainedModel, _BaseAutoModelClass))


def load_pretrained(
    load: Callable[..., T],
    name_or_path: str | os.PathLike,
    what: str = "model",
    hint: str | None = None,
    allow_pickle_weights: bool = False,
    **kwargs: Any,
) -> T:
    """``load(resolve_pretrained(name_or_path, ...), **kwargs)``, with unreadable weights reported by name.

    ``load`` is a ``from_pretrained``-style callable, e.g. ``MusicgenForConditionalGeneration.from_pretrained``.
    A model whose weights are pickles only is refused (:func:`check_no_pickle_only_weights`), whatever ``load``
    reads from it, and model classes get ``use_safetensors=True``; ``allow_pickle_weights=True`` loads pickles, for
    a source you trust.
    """
    from safetensors import SafetensorError

    source, repo_files = _resolve(name_or_path, what, hint, kwargs.get("revision"))
    if not allow_pickle_weights:
        check_no_pickle_only_weights(source, what, kwargs.get("subfolder"), kwargs.get("revision"), repo_files)
        if _loads_weights(load):
            kwargs.setdefault("use_safetensors", True)
    try:
        return load(source, **kwargs)
    except SafetensorError as error:
        # Only files downloaded during `load` get here (local ones were checked): say which model they belong to.
        raise ModelLoadingError(
            f"{what}: the weights of {os.fspath(name_or_path)!r} could not be read ({error}); a download was probably "
            "cut short. Delete the model from the Hugging Face cache or run `hf download <repo id> --force-download`."
        ) from None


#: Files that make a folder a MusicGen processor: (feature extractor, tokenizer); transformers 5 writes
#: processor_config.json, older versions preprocessor_config.json.
PROCESSOR_FILES = {
    "feature extractor": ("processor_config.json", "preprocessor_config.json"),
    "tokenizer": ("tokenizer_config.json", "tokenizer.json"),
}
MODEL_ROLES = ("policy", "anchor", "reward")


def _missing_processor_parts(folder: str) -> list[str]:
    return [
        f"{part} ({' or '.join(names)})"
        for part, names in PROCESSOR_FILES.items()
        if not any(os.path.isfile(os.path.join(folder, name)) for name in names)
    ]


def check_model_folder(
    name_or_path: str | os.PathLike,
    role: str,
    what: str | None = None,
    hint: str | None = None,
    adapters: bool = False,
    revision: str | None = None,
) -> str:
    """The one check of "can this model be loaded in this role", before anything is loaded; returns the source to load
    (as :func:`resolve_pretrained`) or raises :class:`ModelLoadingError` naming ``what`` (default: ``role``), the
    problem and the fix.

    Args:
        role: ``"policy"`` (a MusicGen whose processor must be there too), ``"anchor"`` (a MusicGen, no processor
            needed) or ``"reward"`` (any saved model).
        adapters: whether a LoRA adapter folder (``adapter_config.json``) is accepted in place of a full model: the
            evaluation and the app load an adapter on its base model; training starts from full weights only.

    Besides what :func:`resolve_pretrained` finds (missing local path, a file, corrupt safetensors, offline Hub id), a
    local folder must hold ``config.json`` (or, with ``adapters``, ``adapter_config.json`` whose base model exists),
    and a policy's folder its processor (an adapter may leave the processor to its base). Hub ids are not inspected.
    """
    if role not in MODEL_ROLES:
        raise ValueError(f"role must be one of {MODEL_ROLES}, got {role!r}.")
    what = what or role
    name = os.fspath(name_or_path)
    source = resolve_pretrained(name, what, hint, revision)
    if not os.path.isdir(source) or source != os.path.expanduser(name):
        return source  # a Hub id (or its cached snapshot): its files are the publisher's
    if os.path.isfile(os.path.join(source, "adapter_config.json")):
        if not adapters:
            merged = os.path.join(name, "merged")
            kind = "model" if role == "reward" else "MusicGen"
            raise ModelLoadingError(
                f"{what}: {name!r} holds a LoRA adapter (adapter_config.json), not a full {kind}. Start from its "
                f"merged weights ({merged!r}, written by a --use_peft run with --save_merged_lora, the default), or "
                "from the adapter's base model."
            )
        with open(os.path.join(source, "adapter_config.json"), encoding="utf-8") as handle:
            base = json.load(handle).get("base_model_name_or_path")
        if not base:
            raise ModelLoadingError(
                f"{what}: the adapter {name!r} names no base model (base_model_name_or_path in adapter_config.json); "
                "set it to the MusicGen the adapter was trained on."
            )
        resolve_pretrained(base, f"{what} (the base model of the adapter {name!r})", hint)
        return source
    if not os.path.isfile(os.path.join(source, "config.json")):
        kinds = "neither config.json nor adapter_config.json" if adapters else "no config.json"
        raise ModelLoadingError(
            _with_hint(
                f"{what}: the folder {name!r} holds {kinds}, so it is not a saved model (an interrupted save, or "
                "the wrong folder?).",
                hint,
            )
        )
    missing = _missing_processor_parts(source) if role == "policy" else []
    if missing:
        raise ModelLoadingError(
            f"{what}: {name!r} has no MusicGen processor (no {', no '.join(missing)}), which a policy needs for its "
            "prompts and audio. Save one beside the model: `MusicgenProcessor.from_pretrained("
            f"'facebook/musicgen-small').save_pretrained({name!r})` (or the processor it was trained with)."
        )
    return source


#: Data-file extensions read with ``datasets`` (and the builder that reads them); any other file is one prompt a line.
PROMPT_DATA_FILES = {"json": "json", "jsonl": "json", "csv": "csv", "parquet": "parquet", "arrow": "arrow"}
PROMPT_SOURCES = (
    "a text file with one prompt a line, a dataset folder saved with save_to_disk, a .json/.jsonl/.csv/.parquet/"
    ".arrow file, or a Hub dataset id"
)


def load_prompts(source: Any, split: str = "train", column: str = "prompt", what: str = "prompts") -> list[str]:
    """The one prompt loader: a text file (any existing file that is not a data file: one prompt a line), a dataset
    folder (``save_to_disk``), a data file (.json/.jsonl/.csv/.parquet/.arrow, any case), a Hub dataset id, a
    ``datasets.Dataset`` or a list of strings. Prompts are stripped of surrounding spaces.

    Raises ``ValueError`` starting with ``what`` (e.g. ``"--dataset_name"``) that names the source, the problem and
    the fix: an empty file or dataset; a blank line or an empty row (named by number: a blank line between prompts is
    a mistake more often than spacing, and an empty prompt would be trained on; blank lines at the end of a file are
    ignored); a missing ``column`` or ``split``; a path that does not exist; something ``datasets`` cannot read
    (offline and not cached, no such dataset, a malformed file: the cause attached).
    """
    if isinstance(source, (list, tuple)):
        return _checked_rows(list(source), "the prompt list", "item", what)
    if hasattr(source, "column_names"):  # a datasets.Dataset already loaded
        if column not in source.column_names:
            raise ValueError(f"{what}: the dataset has no {column!r} column (columns: {source.column_names}).")
        return _checked_rows(source[column], "the dataset", "row", what)
    if not isinstance(source, (str, os.PathLike)):
        raise ValueError(
            f"{what}: prompts must be {PROMPT_SOURCES}, a datasets.Dataset or a list; got {type(source).__name__}."
        )
    source = os.fspath(source)
    extension = os.path.splitext(source)[1].lstrip(".").lower()
    if os.path.isfile(source) and extension not in PROMPT_DATA_FILES:
        return _prompts_from_text_file(source, what)
    return _prompts_from_dataset(source, extension, split, column, what)


def _checked_rows(rows: list, origin: str, unit: str, what: str) -> list[str]:
    prompts = []
    for index, row in enumerate(rows):
        text = row.strip() if isinstance(row, str) else ""
        if not text:
            raise ValueError(
                f"{what}: {unit} {index} of {origin} is empty ({row!r}); every {unit} must hold a prompt: fill it in "
                "or remove it."
            )
        prompts.append(text)
    if not prompts:
        raise ValueError(f"{what}: no prompts in {origin}: give at least one non-empty prompt.")
    return prompts


def _prompts_from_text_file(path: str, what: str) -> list[str]:
    try:
        with open(path, encoding="utf-8") as handle:
            lines = handle.read().splitlines()
    except UnicodeDecodeError as error:
        raise ValueError(
            f"{what}: the prompt file {path!r} is not UTF-8 text ({error}): save it as UTF-8, one prompt a line."
        ) from error
    while lines and not lines[-1].strip():
        lines.pop()  # trailing blank lines: an editor's, not a mistake
    if not lines:
        raise ValueError(f"{what}: no prompts in {path!r}: the file is empty or blank; write one prompt a line.")
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            raise ValueError(
                f"{what}: line {number} of {path!r} is blank; write one prompt a line, without blank lines."
            )
    return [line.strip() for line in lines]


def _prompts_from_dataset(source: str, extension: str, split: str, column: str, what: str) -> list[str]:
    import datasets

    exists = os.path.exists(source)
    if not exists and (is_local_path(source) or extension in (*PROMPT_DATA_FILES, "txt")):
        raise ValueError(
            f"{what}: there is no file or folder {source!r} (working directory: {os.getcwd()}): pass {PROMPT_SOURCES}."
        )
    saved = any(os.path.isfile(os.path.join(source, name)) for name in ("state.json", "dataset_dict.json"))
    if os.path.isfile(source) and os.path.getsize(source) == 0:
        raise ValueError(f"{what}: no prompts in {source!r}: the file is empty; give it a {column!r} column.")
    try:
        if os.path.isdir(source) and saved:
            dataset = datasets.load_from_disk(source)
        elif os.path.isfile(source):
            dataset = datasets.load_dataset(PROMPT_DATA_FILES[extension], data_files=source, split="train")
        else:
            dataset = datasets.load_dataset(source, split=split)
    except ValueError as error:
        if os.path.isfile(source) and "corresponds to no data" in str(error):  # datasets' words for a header only
            raise ValueError(
                f"{what}: no prompts in {source!r}: the file holds no rows; give it a {column!r} column of prompts."
            ) from error
        if "split" in str(error).lower():  # datasets: 'Unknown split "test". Should be one of ['train'].'
            raise ValueError(
                f"{what}: {source!r} has no split {split!r} ({error}); pick one with --dataset_split."
            ) from error
        raise _unreadable_prompts(source, exists, error, what) from error
    except Exception as error:  # offline, no such dataset, a malformed file: all reported the same way, cause attached
        raise _unreadable_prompts(source, exists, error, what) from error
    if isinstance(dataset, datasets.DatasetDict):
        if split not in dataset:
            raise ValueError(f"{what}: {source!r} has no split {split!r} (splits: {list(dataset)}).")
        dataset = dataset[split]
    if column not in dataset.column_names:
        raise ValueError(
            f"{what}: {source!r} has no {column!r} column (columns: {dataset.column_names}); name the text column "
            "with --prompt_column."
        )
    return _checked_rows(dataset[column], repr(source), "row", what)


def _unreadable_prompts(source: str, exists: bool, error: Exception, what: str) -> ValueError:
    cause = f"{type(error).__name__}: {error}"
    if exists:
        fix = f"check that it is {PROMPT_SOURCES}"
    elif constants.HF_HUB_OFFLINE:
        fix = (
            "it is not a local file or folder and HF_HUB_OFFLINE=1 forbids downloading it: unset HF_HUB_OFFLINE to "
            "read it from the Hub, or pass a local text file with one prompt a line"
        )
    else:
        fix = (
            f"it is not a local file or folder (working directory: {os.getcwd()}) and could not be read as a Hub "
            f"dataset id: check the id and your connection, or pass {PROMPT_SOURCES}"
        )
    return ValueError(f"{what}: could not read prompts from {source!r} ({cause}): {fix}.")
