"""Publishing to the Hugging Face Hub: model cards, licences, audio samples and safe uploads.

``push_to_hub()`` of ``MusicPPOTrainer``, ``MusicDPOTrainer`` and ``AudioRewardTrainer`` is built from the pieces here
(through :mod:`musicrl_trl.trainers.publishing`):

* **Where a model came from** (:func:`model_source`): the Hub id or the path the user gave, captured when the
  trainer is built (a model object only remembers ``name_or_path``, and a temporary folder may be gone later).
* **Licences** (:func:`find_license`, :func:`resolve_license`): a model trained from other models inherits their
  terms. The card carries the most restrictive licence among the base model, the KL anchor and every reward model,
  read from their model cards (``license:`` in the YAML header) or configs, says where each came from, and can be
  overridden (``hub_license``). A non-commercial ingredient (MusicGen's weights are CC-BY-NC 4.0) triggers a
  :class:`NonCommercialLicenseWarning` at push time.
* **Audio samples** (:func:`write_policy_samples`): the same few prompts, sampled with a fixed seed before training
  (:class:`BeforeTrainingSamplesCallback`) and at every card, uploaded as WAV files and embedded with audio tags.
* **Cards** (:func:`render_policy_card`, :func:`render_dpo_card`, :func:`render_reward_card`): Jinja templates in
  ``musicrl_trl/hub_cards``.
* **Uploads** (:func:`upload_files`): an explicit list of files, safetensors / JSON / text / WAV / PNG only, so
  pickles (``training_args.bin``, optimizer states) never leave the machine. ``create_commit`` skips files whose
  content the Hub already has, so a second push of an unchanged model uploads nothing and makes no commit.

Tokens are passed to ``huggingface_hub`` only; nothing here prints or stores them (the reproduce command in a card
masks every ``*token*`` argument).

Why this room is over ~600 lines: the five pieces above are one pipeline that three trainers (PPO, DPO, reward)
share, and the card renderers read the licence, sample and upload helpers directly. The natural split, when the
next card arrives, is licences (``model_source``, ``find_license``, ``resolve_license``) into a room of their own
and one renderer per trainer beside its template; until then a reader finds every published file's origin here.
"""

from __future__ import annotations

import fnmatch
import json
import logging
import os
import re
import shlex
import shutil
import sys
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

import torch
from transformers import PreTrainedModel, TrainerCallback

logger = logging.getLogger(__name__)

__all__ = [
    "BeforeTrainingSamplesCallback",
    "DEFAULT_SAMPLE_PROMPTS",
    "LicenseResolution",
    "LicenseSource",
    "NonCommercialLicenseWarning",
    "find_license",
    "hub_files",
    "ingredient_licenses",
    "model_source",
    "render_dpo_card",
    "render_policy_card",
    "render_reward_card",
    "resolve_license",
    "reward_license_sources",
    "upload_files",
    "write_policy_samples",
]

# The fixed prompts of the before/after samples in a policy card (overridable with `hub_sample_prompts`).
DEFAULT_SAMPLE_PROMPTS = (
    "an upbeat electronic dance track with a catchy synth lead",
    "slow sad piano ballad",
    "energetic rock guitar riff with live drums",
)
SAMPLES_DIR = "samples"
SAMPLE_SEED = 1234
CARD_NAME = "README.md"
CURVES_NAME = "training_curves.png"

# What may go up: weights as safetensors, configs as JSON, text (cards, merges, sentencepiece protobufs), samples
# and plots. Everything else stays local; pickle formats are refused even if asked for by name.
SAFE_SUFFIXES = (".safetensors", ".json", ".md", ".txt", ".model", ".wav", ".png", ".yaml", ".jinja")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".joblib", ".npy", ".npz", ".msgpack", ".h5")
# Files a push owns in a repo: a push deletes those of them it does not upload, so that switching the LoRA layout
# (adapter <-> merged) never leaves an adapter_config.json at the root that would make transformers load an adapter.
MANAGED_PATTERNS = (
    "adapter_config.json",
    "adapter_model.safetensors",
    "adapter/*",
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "model-*-of-*.safetensors",
    "model.safetensors.index.json",
    f"{SAMPLES_DIR}/*",
)
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")

MUSICRL_CITATION = """\
@article{cideron2024musicrl,
    title   = {{MusicRL: Aligning Music Generation to Human Preferences}},
    author  = {Geoffrey Cideron and Sertan Girgin and Mauro Verzetti and Damien Vincent and Matej Kastelic and
               Zal{\\'{a}}n Borsos and Brian McWilliams and Victor Ungureanu and Olivier Bachem and Olivier Pietquin
               and Matthieu Geist and L{\\'{e}}onard Hussenot and Neil Zeghidour and Andrea Agostinelli},
    year    = 2024,
    journal = {arXiv preprint arXiv:2402.04229}
}"""
TRL_CITATION = """\
@misc{vonwerra2022trl,
    title        = {{TRL: Transformer Reinforcement Learning}},
    author       = {Leandro von Werra and Younes Belkada and Lewis Tunstall and Edward Beeching and Tristan Thrush and
                    Nathan Lambert and Shengyi Huang and Kashif Rasul and Quentin Gallou{\\'e}dec},
    year         = 2020,
    journal      = {GitHub repository},
    publisher    = {GitHub},
    howpublished = {\\url{https://github.com/huggingface/trl}}
}"""


# --------------------------------------------------------------------------------------------------------------------
# Where a model came from
# --------------------------------------------------------------------------------------------------------------------

UNSAVED = "(in-memory model)"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def looks_like_hub_id(name: str | None) -> bool:
    """``org/name`` (or a bare ``name``) that is not a folder on this machine."""
    return bool(name) and _HUB_ID.match(name) is not None and not os.path.exists(name) and ".." not in name


def model_source(model: Any) -> str | None:
    """The Hub id or local path ``model`` was loaded from: the string itself, else ``model.name_or_path``.

    A local path that no longer exists (a temporary folder) gives ``None``: recording it would point the card and
    ``adapter_config.json`` at nothing. Call this when the trainer is built, before such folders can disappear.
    """
    if model is None:
        return None
    name = os.fspath(model) if isinstance(model, (str, os.PathLike)) else getattr(model, "name_or_path", None)
    if not name:
        return None
    if looks_like_hub_id(name) or os.path.exists(name):
        return name
    return None


# --------------------------------------------------------------------------------------------------------------------
# Licences
# --------------------------------------------------------------------------------------------------------------------

# Most to least restrictive groups; a licence outside the table ranks with "other". "unknown" (no licence found)
# outranks everything: nothing can be promised about a model built from an ingredient of unknown terms.
_PERMISSIVE = set(
    "apache-2.0 mit bsd bsd-2-clause bsd-3-clause bsd-3-clause-clear cc0-1.0 cc-by-2.0 cc-by-2.5 cc-by-3.0 cc-by-4.0 "
    "unlicense bsl-1.0 isc zlib pddl odc-by wtfpl postgresql ncsa ecl-2.0 afl-3.0 artistic-2.0 ms-pl c-uda".split()
)
_SHARE_ALIKE = set(
    "cc-by-sa-3.0 cc-by-sa-4.0 gpl gpl-2.0 gpl-3.0 lgpl lgpl-2.1 lgpl-3.0 lgpl-lr agpl-3.0 mpl-2.0 epl-1.0 epl-2.0 "
    "eupl-1.1 eupl-1.2 odbl osl-3.0 cc-by-nd-4.0 openrail openrail++ bigscience-openrail-m creativeml-openrail-m "
    "bigscience-bloom-rail-1.0 bigcode-openrail-m".split()
)
_NON_COMMERCIAL = {"cc-by-nc-2.0", "cc-by-nc-3.0", "cc-by-nc-4.0"}
_NON_COMMERCIAL_STRICT = {
    "cc-by-nc-sa-2.0",
    "cc-by-nc-sa-3.0",
    "cc-by-nc-sa-4.0",
    "cc-by-nc-nd-3.0",
    "cc-by-nc-nd-4.0",
}
# When a card cannot be read (offline, gated): licences the library knows (DESIGN.md: verified on the model pages).
KNOWN_LICENSES = {
    "facebook/musicgen-": "cc-by-nc-4.0",  # every MusicGen checkpoint: CC-BY-NC 4.0 weights
    "facebook/audiogen-": "cc-by-nc-4.0",
    "laion/larger_clap_music": "apache-2.0",
    "laion/clap-htsat-": "apache-2.0",
}


def license_rank(license_id: str | None) -> int:
    """0 permissive, 1 share-alike/copyleft, 2 non-commercial, 3 non-commercial share-alike/no-derivatives,
    4 other (custom terms), 5 unknown."""
    if license_id is None or license_id == "unknown":
        return 5
    license_id = license_id.lower()
    if license_id in _PERMISSIVE:
        return 0
    if license_id in _SHARE_ALIKE:
        return 1
    if license_id in _NON_COMMERCIAL:
        return 2
    if license_id in _NON_COMMERCIAL_STRICT:
        return 3
    return 4


def is_non_commercial(license_id: str | None) -> bool:
    return license_id is not None and "-nc" in license_id.lower()


class NonCommercialLicenseWarning(UserWarning):
    """A pushed model inherits a non-commercial licence from one of its ingredients."""


@dataclass
class LicenseSource:
    """The licence of one ingredient and where it was read."""

    role: str  # "base model", "KL anchor", "reward 'quality'", ...
    name: str | None  # Hub id or path; None when the ingredient has no weights of its own or its folder is gone
    license: str | None  # SPDX-like Hub licence id; None when not found
    origin: str  # "model card of org/name", "config.json of ./path", "built-in table", "not found", ...


@dataclass
class LicenseResolution:
    license: str  # what goes into the card's `license:` field
    sources: list[LicenseSource] = field(default_factory=list)
    overridden: bool = False

    @property
    def non_commercial(self) -> list[LicenseSource]:
        return [source for source in self.sources if is_non_commercial(source.license)]

    @property
    def unknown(self) -> list[LicenseSource]:
        return [source for source in self.sources if source.name is not None and source.license is None]

    def explanation(self) -> str:
        """One sentence saying where the licence came from (for the card and the log)."""
        if self.overridden:
            return f"set explicitly (`hub_license={self.license}`); the ingredients' licences are listed below"
        decisive = [source for source in self.sources if source.license == self.license]
        if self.license == "unknown":
            names = ", ".join(f"{source.role} `{source.name}`" for source in self.unknown)
            return f"unknown: no licence could be read for {names}; set `hub_license` once you have checked it"
        if decisive:
            return f"the most restrictive licence among the ingredients, from the {decisive[0].role}"
        return "no ingredient declares a licence"


def _front_matter(text: str) -> dict:
    import yaml

    match = re.match(r"^\s*---\s*\n(.*?)\n---\s*(\n|$)", text, re.DOTALL)
    if not match:
        return {}
    try:
        data = yaml.safe_load(match[1])
    except yaml.YAMLError:
        return {}
    return data if isinstance(data, dict) else {}


def _license_from_metadata(data: Mapping) -> str | None:
    value = data.get("license")
    if isinstance(value, list):
        value = value[0] if value else None
    if not isinstance(value, str) or not value:
        return None
    return value.lower()


def find_license(name: str | None, role: str = "model") -> LicenseSource:
    """Read the licence of a local folder or Hub repo: its card's ``license:`` field, then a ``license`` key in
    ``config.json``, then the built-in table of known models. Network errors (offline, gated) fall through."""
    if name is None:
        origin = "not recorded: the model was not loaded from a Hub id or a path that still exists"
        return LicenseSource(role, UNSAVED, None, origin)
    if os.path.isdir(name):
        for filename, reader in ((CARD_NAME, _front_matter), ("config.json", json.loads)):
            path = os.path.join(name, filename)
            if os.path.isfile(path):
                try:
                    with open(path, encoding="utf-8") as handle:
                        found = _license_from_metadata(reader(handle.read()))
                except (OSError, ValueError):
                    found = None
                if found:
                    return LicenseSource(role, name, found, f"{filename} of {name}")
        return LicenseSource(role, name, None, f"not found in {name} (no `license:` in README.md or config.json)")
    if looks_like_hub_id(name):
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import HfHubHTTPError

        for filename, reader in ((CARD_NAME, _front_matter), ("config.json", json.loads)):
            try:
                with open(hf_hub_download(name, filename), encoding="utf-8") as handle:
                    found = _license_from_metadata(reader(handle.read()))
            except (OSError, ValueError, HfHubHTTPError) as error:
                logger.debug("No %s for %s: %s", filename, name, type(error).__name__)
                continue
            if found:
                return LicenseSource(
                    role, name, found, f"model card of {name}" if filename == CARD_NAME else f"config.json of {name}"
                )
        for prefix, known in KNOWN_LICENSES.items():
            if name == prefix or (prefix.endswith("-") and name.startswith(prefix)):
                return LicenseSource(role, name, known, "musicrl_trl's table of known models (card not readable)")
    return LicenseSource(role, name, None, "not found")


def _modules_of(reward: Any) -> list[torch.nn.Module]:
    """The torch modules a reward callable keeps as attributes, directly or in a list, tuple or dict."""
    modules = []
    for value in getattr(reward, "__dict__", {}).values():  # a function or an instance; builtins hold no weights
        if isinstance(value, Mapping):
            value = list(value.values())
        for item in value if isinstance(value, (list, tuple)) else [value]:
            if isinstance(item, torch.nn.Module):
                modules.append(item)
    return modules


def reward_license_sources(reward: Any, role: str) -> list[LicenseSource]:
    """The licence of every model a reward callable holds; ``[signal-based source]`` when it holds none.

    A :class:`~musicrl_trl.reward_models.RewardCombination` gives the sources of its parts (nested ones too), each
    with the role ``reward '<part>'``. Any other callable is searched for the torch modules among its attributes: the
    built-in rewards keep theirs as ``.model``, a user's reward may keep a CLAP as ``.clap`` or hold two models. Each
    module (or sub-module) loaded with ``from_pretrained`` is looked up by its id or path (:func:`find_license`);
    weights whose origin nothing records (a plain ``nn.Module``, a folder that is gone) are listed with an unknown
    licence, never as signal-based, so the card cannot promise terms nobody checked.
    """
    from .reward_models.combination import RewardCombination

    if isinstance(reward, RewardCombination):
        return [
            source
            for name, part in reward.rewards.items()
            for source in reward_license_sources(part, f"reward '{name}'")
        ]
    sources: dict[str, LicenseSource] = {}  # by model name: a model held twice counts once
    for module in _modules_of(reward):
        from_pretrained = [sub for sub in module.modules() if isinstance(sub, PreTrainedModel)]
        names = [name for name in map(model_source, from_pretrained) if name is not None]
        for name in dict.fromkeys(names):
            sources.setdefault(name, find_license(name, role))
        if not names and any(True for _ in module.parameters()):
            what = f"({type(module).__name__} weights)"
            origin = "not recorded: the reward holds weights that were not loaded from a Hub id or a path that exists"
            sources.setdefault(what, LicenseSource(role, what, None, origin))
    return list(sources.values()) or [LicenseSource(role, None, None, "no model weights (computed from the signal)")]


def reward_license(reward: Any, role: str) -> LicenseSource:
    """The strictest of :func:`reward_license_sources` (see :func:`license_rank`): one line per reward."""
    return max(reward_license_sources(reward, role), key=lambda source: license_rank(source.license))


def ingredient_licenses(
    base_model: str | None, anchor_model: str | None, rewards: Mapping[str, Any]
) -> list[LicenseSource]:
    """The licence of every ingredient of a trained policy: the base model, the KL anchor (when it is another
    model) and every model of every reward (``{name: reward callable}``; combinations give their parts)."""
    sources = [find_license(base_model, "base model")]
    if anchor_model != base_model:
        sources.append(find_license(anchor_model, "KL anchor"))
    for name, reward in rewards.items():
        sources.extend(reward_license_sources(reward, f"reward '{name}'"))
    return sources


def resolve_license(sources: Sequence[LicenseSource], override: str | None = None) -> LicenseResolution:
    """The most restrictive licence among ``sources`` (see :func:`license_rank`), or ``override``."""
    sources = list(sources)
    if override:
        return LicenseResolution(override.lower(), sources, overridden=True)
    with_weights = [source for source in sources if source.name is not None]
    if not with_weights:
        return LicenseResolution("unknown", sources)
    strictest = max(with_weights, key=lambda source: license_rank(source.license))
    return LicenseResolution(strictest.license or "unknown", sources)


_WARNED: set[tuple[str, str]] = set()


def warn_license(resolution: LicenseResolution, repo_id: str) -> None:
    """Warn (``NonCommercialLicenseWarning``) when a pushed model has a non-commercial ingredient, and log unknowns."""
    for source in resolution.unknown:
        logger.warning(
            "No licence found for the %s %s: the card of %s says `license: %s`. Check its terms and pass "
            "`hub_license=` to set the licence yourself.",
            source.role,
            source.name,
            repo_id,
            resolution.license,
        )
    if resolution.non_commercial and (repo_id, resolution.license) not in _WARNED:
        _WARNED.add((repo_id, resolution.license))  # once per repo and process: a run may push several times
        names = ", ".join(f"{source.role} {source.name} ({source.license})" for source in resolution.non_commercial)
        warnings.warn(
            f"{repo_id} is built from non-commercial ingredients: {names}. The model inherits their terms: it may not "
            f"be used commercially. The card says `license: {resolution.license}`.",
            NonCommercialLicenseWarning,
            stacklevel=3,
        )


# --------------------------------------------------------------------------------------------------------------------
# Audio samples
# --------------------------------------------------------------------------------------------------------------------


def sample_prompts(args: Any) -> list[str]:
    """The prompts of the card's samples (``MusicPPOConfig.hub_sample_prompts``; None: the built-in three)."""
    return list(DEFAULT_SAMPLE_PROMPTS if args.hub_sample_prompts is None else args.hub_sample_prompts)


def sample_name(stage: str, index: int) -> str:
    return f"{SAMPLES_DIR}/{stage}_{index}.wav"


def write_policy_samples(trainer: Any, directory: str, stage: str) -> list[str]:
    """Sample the policy once for each fixed prompt (seeded, without touching the global RNG) and write
    ``<directory>/samples/<stage>_<i>.wav`` (16-bit PCM: same weights, same bytes). Returns the file names."""
    import soundfile

    from .rollout import generate_rollout

    prompts = sample_prompts(trainer.args)
    if not prompts:
        return []
    policy = trainer.accelerator.unwrap_model(trainer.model).policy
    device = next(policy.parameters()).device
    cuda_devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda_devices), torch.no_grad():
        torch.manual_seed(SAMPLE_SEED)
        rollout = generate_rollout(
            policy,
            trainer.processing_class,
            prompts,
            num_steps=trainer.args.response_length,
            sampling=trainer.sampling,
            max_prompt_length=trainer.args.max_prompt_length,
        )
    os.makedirs(os.path.join(directory, SAMPLES_DIR), exist_ok=True)
    names = []
    for index, clip in enumerate(rollout.audio.float().cpu()):  # clip [C, N]
        name = sample_name(stage, index)
        soundfile.write(
            os.path.join(directory, name),
            clip.clamp(-1, 1).T.numpy(),
            rollout.sampling_rate,
            subtype="PCM_16",
            format="WAV",
        )
        names.append(name)
    return names


class BeforeTrainingSamplesCallback(TrainerCallback):
    """Writes the "before training" samples of the policy card when training starts (not when resuming)."""

    def __init__(self, trainer: Any):
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):
        trainer = self.trainer
        if state.global_step == 0 and trainer.is_world_process_zero() and sample_prompts(args):
            write_policy_samples(trainer, args.output_dir, "before")


# --------------------------------------------------------------------------------------------------------------------
# Cards
# --------------------------------------------------------------------------------------------------------------------


def _template(name: str):
    import jinja2

    text = resources.files("musicrl_trl.hub_cards").joinpath(name).read_text(encoding="utf-8")
    environment = jinja2.Environment(keep_trailing_newline=True, trim_blocks=True, lstrip_blocks=True)
    return environment.from_string(text)


def mask_secrets(argv: Sequence[str]) -> list[str]:
    """Command-line arguments with the value of every ``--*token*`` / ``--*password*`` flag replaced."""
    masked, hide_next = [], False
    for arg in argv:
        if hide_next:
            masked.append("<redacted>")
            hide_next = False
            continue
        flag, eq, _ = arg.partition("=")
        secret = flag.startswith("-") and re.search(r"token|password|secret|api_key", flag, re.IGNORECASE)
        if secret and eq:
            masked.append(f"{flag}=<redacted>")
        else:
            masked.append(arg)
            hide_next = bool(secret)
    return masked


def launch_command(argv: Sequence[str] | None = None) -> str:
    """The command this process was started with, as a user would retype it (tokens masked)."""
    argv = list(sys.argv if argv is None else argv)
    if not argv or not argv[0].endswith(".py"):
        return ""
    script = argv[0]  # as typed
    launched = "ACCELERATE_DYNAMO_BACKEND" in os.environ or "LOCAL_RANK" in os.environ  # set by accelerate/torchrun
    launcher = "accelerate launch" if launched else "python"
    return " ".join([launcher, shlex.quote(script), *map(shlex.quote, mask_secrets(argv[1:]))])


def _metadata_yaml(**fields: Any) -> str:
    from huggingface_hub import ModelCardData

    return ModelCardData(**{key: value for key, value in fields.items() if value not in (None, [], "")}).to_yaml()


def _eval_results(output_dir: str, log_history: Sequence[Mapping]) -> dict[str, float]:
    """Evaluation numbers: ``eval_results.json`` (``Trainer.save_metrics``) and the last ``eval*`` values logged."""
    results: dict[str, float] = {}
    for entry in log_history:
        for key, value in entry.items():
            timing = key.endswith(("runtime", "_per_second"))
            if key.startswith("eval") and isinstance(value, (int, float)) and not timing:
                results[key] = float(value)
    path = os.path.join(output_dir, "eval_results.json")
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as handle:
            for key, value in json.load(handle).items():
                if isinstance(value, (int, float)):
                    results[key] = float(value)
    return results


def _format(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, (list, tuple)):
        return ", ".join(_format(item) for item in value)
    return str(value)


POLICY_HYPERPARAMETERS = (
    "learning_rate",
    "lr_scheduler_type",
    "total_episodes",
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
    "batch_size",
    "num_mini_batches",
    "num_ppo_epochs",
    "response_length",
    "temperature",
    "top_k",
    "guidance_scale",
    "kl_coef",
    "kl_target",
    "kl_estimator",
    "kl_penalty",
    "baseline",
    "num_generations",
    "gamma",
    "lam",
    "cliprange",
    "cliprange_value",
    "vf_coef",
    "whiten_advantages",
    "share_value_backbone",
    "train_text_encoder",
    "bf16",
    "fp16",
    "gradient_checkpointing",
    "seed",
)


def render_policy_card(
    trainer: Any,
    layout: str,
    license: LicenseResolution,
    repo_id: str | None,
    output_dir: str,
    dataset_name: str | None = None,
    sample_url_prefix: str = "",
    tags: Iterable[str] = (),
) -> str:
    """The policy card (``hub_cards/policy_card.md.jinja``) for a trainer's current state.

    ``layout`` is what the folder or repo holds: ``"full"`` (a fine-tuned MusicGen), ``"adapter"`` (LoRA adapter
    only), ``"merged"`` (LoRA merged into the weights) or ``"both"`` (merged weights at the root, the adapter in
    ``adapter/``). ``sample_url_prefix`` makes audio links absolute (``<endpoint>/<repo>/resolve/main/``) for the Hub.
    """
    args = trainer.args
    base_model = trainer.hub_base_model
    reward_names = list(trainer.reward_names)
    weights = list(args.reward_weights) if args.reward_weights is not None else [1.0] * len(reward_names)
    sources = {source.role: source for source in license.sources}
    rewards = []
    for name, weight, reward in zip(reward_names, weights, trainer.reward_funcs):
        source = sources.get(f"reward '{name}'")
        rewards.append(
            {
                "name": name,
                "weight": _format(float(weight)),
                "kind": type(reward).__name__,
                "model": source.name if source is not None and source.name else None,
            }
        )
    log_history = trainer.state.log_history
    train_logs = [entry for entry in log_history if "objective/scores" in entry]
    config = args.to_dict()  # TrainingArguments.to_dict masks every *_token field
    hyperparameters = {key: _format(config[key]) for key in POLICY_HYPERPARAMETERS if key in config}
    lora = None
    if trainer.is_peft_model:
        policy = trainer.accelerator.unwrap_model(trainer.model).policy
        peft_config = policy.peft_config[policy.active_adapter]
        lora = {
            "r": peft_config.r,
            "alpha": peft_config.lora_alpha,
            "dropout": peft_config.lora_dropout,
            "target_modules": ", ".join(sorted(peft_config.target_modules or [])),
        }
    prompts = sample_prompts(args)
    samples = []
    for index, prompt in enumerate(prompts):
        before, after = sample_name("before", index), sample_name("after", index)
        samples.append(
            {
                "prompt": prompt,
                "before": sample_url_prefix + before if os.path.isfile(os.path.join(output_dir, before)) else None,
                "after": sample_url_prefix + after if os.path.isfile(os.path.join(output_dir, after)) else None,
            }
        )
    library_name = "peft" if layout == "adapter" else "transformers"
    all_tags = list(dict.fromkeys(["musicrl", "trl", *trainer._tag_names, *(["lora", "peft"] if lora else []), *tags]))
    datasets = [dataset_name] if dataset_name and looks_like_hub_id(dataset_name) else None
    metadata = _metadata_yaml(
        base_model=base_model if looks_like_hub_id(base_model) else None,
        library_name=library_name,
        pipeline_tag="text-to-audio",
        license=license.license,
        tags=all_tags,
        datasets=datasets,
    )
    context = {
        "metadata": metadata,
        "repo_id": repo_id or os.path.basename(os.path.abspath(output_dir)),
        "base_model": base_model,
        "base_model_is_hub_id": looks_like_hub_id(base_model),
        "anchor": trainer.hub_anchor_model,
        "layout": layout,
        "dataset_name": dataset_name,
        "rewards": rewards,
        "kl_coef": _format(float(args.kl_coef)),
        "kl_estimator": args.kl_estimator,
        "kl_penalty": args.kl_penalty,
        "kl_target": None if args.kl_target is None else _format(float(args.kl_target)),
        "final_kl_coef": _format(float(trainer.kl_coef)),
        "baseline": args.baseline,
        "num_generations": args.num_generations,
        "scale_group_rewards": args.scale_group_rewards,
        "steps": trainer.state.global_step,
        "episodes": trainer.state.global_step * args.batch_size,
        "clip_seconds": _clip_seconds(trainer),
        "first_reward": _format(train_logs[0]["objective/scores"]) if train_logs else None,
        "last_reward": _format(train_logs[-1]["objective/scores"]) if train_logs else None,
        "last_kl": _format(train_logs[-1]["objective/kl"]) if train_logs else None,
        "curves": CURVES_NAME if os.path.isfile(os.path.join(output_dir, CURVES_NAME)) else None,
        "curves_url": sample_url_prefix + CURVES_NAME,
        "samples": samples,
        "sample_seed": SAMPLE_SEED,
        "command": trainer.hub_command,
        "hyperparameters": hyperparameters,
        "lora": lora,
        "eval_results": {key: _format(value) for key, value in _eval_results(output_dir, log_history).items()},
        "license": license,
        "license_explanation": license.explanation(),
        "non_commercial": bool(license.non_commercial),
        "musicrl_citation": MUSICRL_CITATION,
        "trl_citation": TRL_CITATION,
    }
    return _template("policy_card.md.jinja").render(**context)


def _clip_seconds(trainer: Any) -> str:
    policy = trainer.accelerator.unwrap_model(trainer.model).policy
    config = getattr(policy, "config", None)
    frame_rate = getattr(getattr(config, "audio_encoder", None), "frame_rate", None)
    num_codebooks = getattr(getattr(config, "decoder", None), "num_codebooks", 1)
    if not frame_rate:
        return "?"
    channels = getattr(config.decoder, "audio_channels", 1)
    frames = trainer.args.response_length - (num_codebooks // channels) + 1
    return _format(round(frames / frame_rate, 2))


REWARD_HYPERPARAMETERS = (
    "learning_rate",
    "lr_scheduler_type",
    "num_train_epochs",
    "max_steps",
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
    "weight_decay",
    "mode",
    "tie_loss",
    "center_rewards_coefficient",
    "max_length",
    "sampling_rate",
    "seed",
)


def render_reward_card(
    trainer: Any, license: LicenseResolution, repo_id: str | None, output_dir: str, dataset_name: str | None = None
) -> str:
    """The reward-model card (``hub_cards/reward_card.md.jinja``) for an :class:`AudioRewardTrainer`."""
    args = trainer.args
    model = trainer.accelerator.unwrap_model(trainer.model) if hasattr(trainer, "accelerator") else trainer.model
    base_model = trainer.hub_base_model
    config = args.to_dict()
    hyperparameters = {key: _format(config[key]) for key in REWARD_HYPERPARAMETERS if key in config}
    hyperparameters["mode"] = trainer.mode
    hyperparameters["sampling_rate"] = trainer.sampling_rate
    scores_codes = getattr(type(model), "scores_codes", False)
    datasets = [dataset_name] if dataset_name and looks_like_hub_id(dataset_name) else None
    metadata = _metadata_yaml(
        base_model=base_model if looks_like_hub_id(base_model) else None,
        library_name="transformers",
        pipeline_tag="text-classification" if scores_codes else "audio-classification",
        license=license.license,
        tags=list(dict.fromkeys(["musicrl", "trl", "reward-model", *trainer._tag_names])),
        datasets=datasets,
    )
    context = {
        "metadata": metadata,
        "repo_id": repo_id or os.path.basename(os.path.abspath(output_dir)),
        "base_model": base_model,
        "base_model_is_hub_id": looks_like_hub_id(base_model),
        "model_class": type(model).__name__,
        "model_type": model.config.model_type,
        "scores_codes": scores_codes,
        "text_conditioned": bool(getattr(model.config, "text_vocab_size", 0)),
        "mode": trainer.mode,
        "dataset_name": dataset_name,
        "steps": trainer.state.global_step,
        "hyperparameters": {key: _format(value) for key, value in hyperparameters.items()},
        "eval_results": {
            key: _format(value) for key, value in _eval_results(output_dir, trainer.state.log_history).items()
        },
        "command": trainer.hub_command,
        "license": license,
        "license_explanation": license.explanation(),
        "non_commercial": bool(license.non_commercial),
        "musicrl_citation": MUSICRL_CITATION,
        "trl_citation": TRL_CITATION,
    }
    return _template("reward_card.md.jinja").render(**context)


DPO_HYPERPARAMETERS = (
    "learning_rate",
    "lr_scheduler_type",
    "num_train_epochs",
    "max_steps",
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
    "beta",
    "loss_type",
    "label_smoothing",
    "precompute_ref_log_probs",
    "guidance_scale",
    "temperature",
    "top_k",
    "max_completion_length",
    "train_text_encoder",
    "bf16",
    "seed",
)


def render_dpo_card(
    trainer: Any,
    layout: str,
    license: LicenseResolution,
    repo_id: str | None,
    output_dir: str,
    dataset_name: str | None = None,
    tags: Iterable[str] = (),
) -> str:
    """The card of a policy trained by :class:`~musicrl_trl.MusicDPOTrainer` (``hub_cards/dpo_card.md.jinja``):
    the loss and beta, the reference, the preference data (pairs, ties skipped), the last logged preference metrics,
    licence and use. ``layout`` as in :func:`render_policy_card`."""
    args = trainer.args
    base_model = trainer.hub_base_model
    config = args.to_dict()  # TrainingArguments.to_dict masks every *_token field
    hyperparameters = {key: _format(config[key]) for key in DPO_HYPERPARAMETERS if key in config}
    train_logs = [entry for entry in trainer.state.log_history if "rewards/accuracies" in entry]
    last = train_logs[-1] if train_logs else {}
    lora = None
    if trainer.is_peft_model:
        policy = trainer.accelerator.unwrap_model(trainer.model)
        peft_config = policy.peft_config[policy.active_adapter]
        lora = {"r": peft_config.r, "alpha": peft_config.lora_alpha,
                "target_modules": ", ".join(sorted(peft_config.target_modules or []))}  # fmt: skip
    all_tags = list(dict.fromkeys(["musicrl", "trl", *trainer._tag_names, *(["lora", "peft"] if lora else []), *tags]))
    metadata = _metadata_yaml(
        base_model=base_model if looks_like_hub_id(base_model) else None,
        library_name="peft" if layout == "adapter" else "transformers",
        pipeline_tag="text-to-audio",
        license=license.license,
        tags=all_tags,
        datasets=[dataset_name] if dataset_name and looks_like_hub_id(dataset_name) else None,
    )
    if trainer.hub_anchor_model != base_model:
        reference = f"`{trainer.hub_anchor_model}`"
    elif trainer.is_peft_model:
        reference = "the base model (the policy with its LoRA adapter disabled)"
    else:
        reference = "the starting model"
    context = {
        "metadata": metadata,
        "repo_id": repo_id or os.path.basename(os.path.abspath(output_dir)),
        "base_model": base_model,
        "base_model_is_hub_id": looks_like_hub_id(base_model),
        "layout": layout,
        "loss_type": args.loss_type,
        "beta": _format(float(args.beta)),
        "label_smoothing": _format(float(args.label_smoothing)),
        "reference": reference,
        "dataset_name": dataset_name,
        "num_pairs": trainer.num_pairs,
        "num_ties_skipped": trainer.num_ties_skipped,
        "num_skipped_rows": trainer.num_skipped_rows,
        "input_kind": trainer.input_kind,
        "guidance_scale": _format(float(args.guidance_scale)),
        "temperature": _format(float(args.temperature)),
        "steps": trainer.state.global_step,
        "metrics": {key: _format(last[key]) for key in ("rewards/accuracies", "rewards/margins") if key in last},
        "command": trainer.hub_command,
        "hyperparameters": hyperparameters,
        "lora": lora,
        "eval_results": {
            key: _format(value) for key, value in _eval_results(output_dir, trainer.state.log_history).items()
        },
        "license": license,
        "license_explanation": license.explanation(),
        "non_commercial": bool(license.non_commercial),
        "dpo_citation": trainer._paper["citation"],
        "trl_citation": TRL_CITATION,
    }
    return _template("dpo_card.md.jinja").render(**context)


# --------------------------------------------------------------------------------------------------------------------
# Files and uploads
# --------------------------------------------------------------------------------------------------------------------


def is_safe_file(path_in_repo: str) -> bool:
    return path_in_repo.endswith(SAFE_SUFFIXES) and not path_in_repo.endswith(PICKLE_SUFFIXES)


def hub_files(folder: str, prefix: str = "", subfolders: Iterable[str] = (SAMPLES_DIR,)) -> dict[str, str]:
    """``path_in_repo -> local path`` for the uploadable files at the top of ``folder`` and in ``subfolders``.

    Only safetensors / JSON / text / WAV / PNG files: ``training_args.bin``, optimizer and RNG states (pickles),
    ``checkpoint-*`` and other folders stay local.
    """
    files = {}
    if not os.path.isdir(folder):
        return files
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        if os.path.isfile(path) and is_safe_file(name):
            files[prefix + name] = path
    for sub in subfolders:
        directory = os.path.join(folder, sub)
        if os.path.isdir(directory):
            for name in sorted(os.listdir(directory)):
                path = os.path.join(directory, name)
                if os.path.isfile(path) and is_safe_file(name):
                    files[f"{prefix}{sub}/{name}"] = path
    return files


def is_card_file(path_in_repo: str) -> bool:
    """The card and what it shows: README.md, the training curves and log, the audio samples."""
    return path_in_repo in (CARD_NAME, CURVES_NAME, "log_history.json") or path_in_repo.startswith(f"{SAMPLES_DIR}/")


def copy_card_files(source: str, destination: str) -> None:
    """Copy the card, the samples and the curves of ``source`` into ``destination`` (a checkpoint folder)."""
    os.makedirs(destination, exist_ok=True)
    for name in (CARD_NAME, CURVES_NAME):
        if os.path.isfile(os.path.join(source, name)):
            shutil.copyfile(os.path.join(source, name), os.path.join(destination, name))
    samples = os.path.join(source, SAMPLES_DIR)
    if os.path.isdir(samples):
        shutil.copytree(samples, os.path.join(destination, SAMPLES_DIR), dirs_exist_ok=True)


def upload_files(
    repo_id: str,
    files: Mapping[str, str],
    commit_message: str,
    token: str | None = None,
    revision: str | None = None,
    run_as_future: bool = False,
):
    """Commit exactly ``files`` (``path_in_repo -> local path``) to ``repo_id``.

    Refuses pickle formats. Deletes files of :data:`MANAGED_PATTERNS` that the repo holds and this push does not
    (a stale root ``adapter_config.json`` would turn a merged model into an adapter for transformers). Files whose
    content the Hub already has are skipped by ``create_commit`` (the preupload answer carries their oid); when
    nothing changed, no blob is uploaded and no commit is made.
    """
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi
    from huggingface_hub.errors import RevisionNotFoundError

    unsafe = sorted(path for path in files if not is_safe_file(path))
    if unsafe:
        raise ValueError(
            f"Refusing to upload {unsafe} to {repo_id}: only safetensors, JSON, text, WAV and PNG files are pushed "
            "(pickles such as training_args.bin or optimizer.pt stay local)."
        )
    api = HfApi()
    try:
        remote = set(api.list_repo_files(repo_id, revision=revision, token=token))
    except RevisionNotFoundError:
        remote = set()
    stale = sorted(
        path
        for path in remote
        if path not in files and any(fnmatch.fnmatchcase(path, pattern) for pattern in MANAGED_PATTERNS)
    )
    operations = [CommitOperationAdd(path_in_repo=path, path_or_fileobj=files[path]) for path in sorted(files)]
    operations += [CommitOperationDelete(path_in_repo=path) for path in stale]
    logger.info(
        "Pushing %d files to %s (%s)%s",
        len(files),
        repo_id,
        ", ".join(sorted(files)),
        f"; removing stale {stale}" if stale else "",
    )
    return api.create_commit(
        repo_id,
        operations,
        commit_message=commit_message,
        token=token,
        revision=revision,
        run_as_future=run_as_future,
    )


def create_repo(repo_id: str, token: str | None = None, private: bool | None = None) -> str:
    """Create ``repo_id`` if needed; returns the full ``namespace/name``."""
    from huggingface_hub import HfApi

    return HfApi().create_repo(repo_id, token=token, private=private, exist_ok=True).repo_id


def resolve_url_prefix(repo_id: str, revision: str | None = None) -> str:
    """``<endpoint>/<repo_id>/resolve/<revision>/``: absolute links for audio and images in a card on the Hub."""
    from huggingface_hub import constants

    return f"{constants.ENDPOINT.rstrip('/')}/{repo_id}/resolve/{revision or 'main'}/"
