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
    "check_weights",
    "is_local_path",
    "load_pretrained",
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
    """True if ``name`` can only mean a local path: absolute, ``./``-relative, ``~``, or not a valid Hub repo id."""
    if os.path.isabs(name) or name.startswith(("./", "../", "~", ".\\", "..\\")) or name in (".", ".."):
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
