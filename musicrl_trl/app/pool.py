"""A pool of clips to compare: audio files in a folder, described by ``pool.jsonl``.

Each line of ``pool.jsonl`` is one clip::

    {"clip_id": "policy-3f9a1c2e-00000", "prompt": "calm solo piano", "file": "clips/policy-3f9a1c2e-00000.wav",
     "system": "policy", "duration_s": 10.0, "sampling_rate": 32000,
     "codes": "clips/policy-3f9a1c2e-00000.codes.safetensors"}

``codes`` (optional) holds the codec codes the policy sampled for the clip ([K, T], tensor ``codes`` in a safetensors
file): the export carries them as ``chosen_codes`` / ``rejected_codes``, so that ``MusicDPOTrainer`` (and token-space
reward models) train on the exact tokens that were voted on, not on a re-encoding of the decoded audio.

``file`` is relative to the pool folder. Loading checks every line once: the app serves clips by id, looked up in
this table, and never joins a request's text into a path; a line whose file would resolve outside the folder (``..``,
an absolute path, a symlink leading out) is rejected when the pool is loaded.

:func:`make_pool` samples a pool from one or two policies with :func:`musicrl_trl.rollout.generate_rollout`, the
sampler the RL trainer uses, so a pool made from the policy being trained is on-policy data.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import secrets
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from functools import cached_property
from pathlib import Path

import soundfile as sf

__all__ = ["PoolClip", "Pool", "load_pool", "read_prompts", "make_pool", "POOL_FILE"]

POOL_FILE = "pool.jsonl"
CLIP_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
AUDIO_SUFFIXES = (".wav", ".flac", ".ogg", ".mp3")


@dataclass(frozen=True)
class PoolClip:
    clip_id: str
    prompt: str
    file: str  # relative to the pool folder
    system: str  # which policy made it
    duration_s: float
    sampling_rate: int
    codes: str | None = None  # the sampled codes [K, T] (safetensors), relative to the pool folder; None: unknown


@dataclass
class Pool:
    """The clips of a pool folder, by id. ``path_of`` is the only way from a clip to a file."""

    root: Path
    clips: dict[str, PoolClip]

    def path_of(self, clip_id: str) -> Path:
        return self.root / self.clips[clip_id].file

    def codes_of(self, clip_id: str):
        """The codes [K, T] (LongTensor) the clip was sampled as, or ``None`` when the pool did not keep them."""
        if self.clips[clip_id].codes is None:
            return None
        from safetensors.torch import load_file

        return load_file(str(self.root / self.clips[clip_id].codes))["codes"]

    @property
    def systems(self) -> list[str]:
        return sorted({clip.system for clip in self.clips.values()})

    @cached_property
    def _pairs(self) -> dict[str, list[tuple[str, str]]]:
        by_prompt: dict[str, list[PoolClip]] = {}
        for clip in self.clips.values():
            by_prompt.setdefault(clip.prompt, []).append(clip)
        collect, evaluate = [], []
        for clips in by_prompt.values():
            for first, second in itertools.combinations(sorted(clips, key=lambda clip: clip.clip_id), 2):
                pair = (first.clip_id, second.clip_id)
                collect.append(pair)
                if first.system != second.system:
                    evaluate.append(pair)
        return {"collect": collect, "evaluate": evaluate}

    def pairs(self, mode: str) -> list[tuple[str, str]]:
        """Unordered clip pairs (sorted ids) that can be compared: two clips of the same prompt; in ``evaluate`` mode
        from two different systems."""
        return self._pairs[mode]


def load_pool(directory: str | os.PathLike) -> Pool:
    """Read and check ``DIR/pool.jsonl``. Raises ``ValueError`` naming the line and what to fix."""
    root = Path(directory).resolve()
    index = root / POOL_FILE
    if not index.is_file():
        raise FileNotFoundError(
            f"{index} does not exist: make a pool with `musicrl-app make-pool --out {directory}` or point --pool at "
            "a folder holding pool.jsonl."
        )
    clips: dict[str, PoolClip] = {}
    with open(index, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            where = f"{index}, line {number}"
            try:
                entry = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{where} is not JSON ({error}).") from None
            missing = [key for key in ("clip_id", "prompt", "file", "system") if not isinstance(entry.get(key), str)]
            if missing:
                raise ValueError(f"{where} lacks the string field(s) {missing}.")
            clip_id = entry["clip_id"]
            if not CLIP_ID.match(clip_id):
                raise ValueError(f"{where}: clip_id {clip_id!r} may hold only letters, digits and '_.-' (max 128).")
            if clip_id in clips:
                raise ValueError(f"{where}: clip_id {clip_id!r} appears twice.")
            relative = Path(entry["file"])
            path = (root / relative).resolve()
            if relative.is_absolute() or ".." in relative.parts or not path.is_relative_to(root):
                raise ValueError(
                    f"{where}: file {entry['file']!r} is outside the pool folder {root}: store clips inside it and "
                    "give their paths relative to it."
                )
            if not path.is_file():
                raise ValueError(f"{where}: file {entry['file']!r} does not exist in {root}.")
            if path.suffix.lower() not in AUDIO_SUFFIXES:
                raise ValueError(f"{where}: file {entry['file']!r} is not audio ({', '.join(AUDIO_SUFFIXES)}).")
            codes = entry.get("codes")
            if codes is not None:
                codes_relative = Path(str(codes))
                codes_path = (root / codes_relative).resolve()
                inside = not codes_relative.is_absolute() and ".." not in codes_relative.parts
                if not (inside and codes_path.is_relative_to(root) and codes_path.is_file()):
                    raise ValueError(
                        f"{where}: codes {codes!r} is not a file inside the pool folder {root}: keep the clip's codes "
                        "beside it, or drop the 'codes' field."
                    )
                if codes_path.suffix != ".safetensors":
                    raise ValueError(f"{where}: codes {codes!r} must be a .safetensors file (no pickles).")
                codes = codes_relative.as_posix()
            info = sf.info(str(path))
            clips[clip_id] = PoolClip(
                clip_id=clip_id,
                prompt=entry["prompt"],
                file=relative.as_posix(),
                system=entry["system"],
                duration_s=float(info.duration),
                sampling_rate=int(info.samplerate),
                codes=codes,
            )
    if not clips:
        raise ValueError(f"{index} lists no clips.")
    return Pool(root=root, clips=clips)


def read_prompts(path: str | os.PathLike) -> list[str]:
    """Prompts for ``--prompts``: :func:`musicrl_trl.loading.load_prompts`, the loader the scripts and the evaluation
    use too (a text file with one prompt a line, a ``.jsonl``/``.csv``/... file or dataset with a ``prompt`` column;
    blank lines and empty rows refused with their number)."""
    from ..loading import load_prompts

    return load_prompts(path, what="--prompts")


def _system_name(policy: str) -> str:
    name = os.path.basename(os.path.normpath(policy)) or "policy"
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-.") or "policy"


_POLICY_HINT = (
    "Pass --{flag} a MusicGen checkpoint: a folder saved with save_pretrained (a full model or a LoRA adapter), or a "
    "Hub id."
)


def make_pool(
    policies: Sequence[str],
    prompts: Sequence[str],
    clips_per_prompt: int,
    out: str | os.PathLike,
    response_length: int | None = None,
    audio_duration_s: float | None = None,
    systems: Sequence[str] | None = None,
    guidance_scale: float | None = None,
    temperature: float | None = None,
    top_k: int | None = None,
    batch_size: int = 8,
    seed: int = 0,
    device: str | None = None,
) -> Pool:
    """Sample ``clips_per_prompt`` clips per prompt from each policy into ``out`` and write ``out/pool.jsonl``.

    Args:
        policies: one or two MusicGen checkpoints (folders or Hub ids), e.g. the policy being trained (collection)
            or a baseline and a fine-tuned policy (evaluation).
        response_length / audio_duration_s: clip length in decoder steps or in seconds (exactly one; default 10 s).
        systems: names recorded per policy (default: the folder or repository name).
        guidance_scale, temperature, top_k: sampling; default: each policy's own ``generation_config`` (what
            ``model.generate`` does with it; a policy saved by ``MusicPPOTrainer`` carries its training sampling).

    Raises :class:`~musicrl_trl.loading.ModelLoadingError` naming ``policy`` / ``policy_b``, the problem and the fix
    for a policy that cannot be loaded (missing path, corrupt weights, no config.json, offline and not cached), before
    anything is written.
    """
    import torch
    from safetensors.torch import save_file

    from ..audio import save_audio
    from ..evaluation.loading import load_policy
    from ..loading import check_model_folder
    from ..rollout import SamplingConfig, generate_rollout

    if not 1 <= len(policies) <= 2:
        raise ValueError(f"give one or two policies, got {len(policies)}.")
    if clips_per_prompt < 1:
        raise ValueError(f"clips_per_prompt must be >= 1, got {clips_per_prompt}.")
    if response_length is not None and audio_duration_s is not None:
        raise ValueError("give the clip length as --response_length or as --audio_duration_s, not both.")
    if response_length is None and audio_duration_s is None:
        audio_duration_s = 10.0
    systems = list(systems) if systems else [_system_name(policy) for policy in policies]
    if len(systems) != len(policies):
        raise ValueError(f"{len(policies)} policies but {len(systems)} system names.")
    if len(set(systems)) != len(systems):
        raise ValueError(f"the two policies need different system names, got {systems}: pass --system/--system_b.")
    root = Path(out)
    if (root / POOL_FILE).exists():
        raise FileExistsError(f"{root / POOL_FILE} exists: make each pool in a new folder.")
    # Every policy is checked before anything is written or sampled, by the check the training script and the
    # evaluation use (musicrl_trl.loading.check_model_folder): a missing path, corrupt weights, an offline Hub id, a
    # folder without config.json or processor. A LoRA adapter is loaded on its base model, as in the evaluation.
    flags = ["policy", "policy_b"]
    for policy, flag in zip(policies, flags):
        check_model_folder(policy, "policy", flag, _POLICY_HINT.format(flag=flag), adapters=True)
    (root / "clips").mkdir(parents=True, exist_ok=True)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")

    lines = []
    for policy, system in zip(policies, systems):
        model, processor = load_policy(policy, device=device)  # full models and LoRA adapters alike
        config = model.generation_config
        sampling = SamplingConfig(
            guidance_scale=guidance_scale if guidance_scale is not None else (config.guidance_scale or 1.0),
            temperature=temperature if temperature is not None else (config.temperature or 1.0),
            top_k=top_k if top_k is not None else (config.top_k or 0),
        )
        torch.manual_seed(seed)
        tag = secrets.token_hex(4)  # clip ids stay unique across pools that share one database
        requests = [prompt for prompt in prompts for _ in range(clips_per_prompt)]
        for start in range(0, len(requests), batch_size):
            batch = requests[start : start + batch_size]
            rollout = generate_rollout(
                model, processor, batch, num_steps=response_length, duration_s=audio_duration_s, sampling=sampling
            )
            for offset, prompt in enumerate(batch):
                clip_id = f"{_system_name(system)[:64]}-{tag}-{start + offset:05d}"
                file = f"clips/{clip_id}.wav"
                save_audio(root / file, rollout.audio[offset].clamp(-1, 1), rollout.sampling_rate, subtype="PCM_16")
                # The exact tokens behind the audio: votes on this clip can train a policy on them (MusicDPOTrainer).
                codes = f"clips/{clip_id}.codes.safetensors"
                save_file({"codes": rollout.codes[offset].cpu().contiguous()}, str(root / codes))
                clip = PoolClip(
                    clip_id=clip_id,
                    prompt=prompt,
                    file=file,
                    system=system,
                    duration_s=rollout.audio.shape[-1] / rollout.sampling_rate,
                    sampling_rate=rollout.sampling_rate,
                    codes=codes,
                )
                lines.append({**asdict(clip), "policy": policy})
        del model
    with open(root / POOL_FILE, "w", encoding="utf-8") as handle:
        for line in lines:
            handle.write(json.dumps(line, ensure_ascii=False) + "\n")
    return load_pool(root)
