"""Sampling rollouts from a MusicGen policy, and recomputing their log-probabilities by teacher forcing.

Shape letters as in :mod:`musicrl_trl.codebooks`: B batch, L prompt tokens, K codebooks, T frames,
S = T + D + 1 grid columns, V codebook size, H decoder hidden size, C audio channels, N audio samples.

:func:`generate_rollout` samples a batch and records the token grid and the log-probability of every sampled code
under the distribution it was drawn from. Its ``backend`` picks how: ``"generate"`` runs the model's own ``generate``
(exactly what users get from ``model.generate`` and ``pipeline("text-to-audio")``) and records it step by step;
``"static"`` and ``"compiled"`` run :class:`musicrl_trl.sampler.StaticCacheSampler`, which samples the same
distribution over a static KV cache in a fraction of the time (the default, :data:`DEFAULT_ROLLOUT_BACKEND`).
:func:`decoder_logits` and :func:`teacher_forced_logprobs` recompute the same quantities with one forward pass. Both
go through :func:`musicrl_trl.codebooks.sampling_logits`, so they agree to float precision. ``decoder_logits``
materialises the whole clip's logits [B, K, S - 1, V] (the plain reference computation, kept for tests and small
clips); training and evaluation go through :mod:`musicrl_trl.teacher_forcing`, which applies the LM heads a chunk of
decoder steps at a time, as ``teacher_forced_logprobs`` does.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers import LogitsProcessor, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList
from transformers.modeling_outputs import BaseModelOutput

from . import codebooks
from .sampler import ROLLOUT_BACKENDS, EvalMode, static_cache_sampler
from .teacher_forcing import DEFAULT_CHUNK_SIZE, decoder_states, step_statistics

__all__ = [
    "SamplingConfig",
    "MusicRollout",
    "DecoderOutput",
    "unwrap_musicgen",
    "resolve_num_steps",
    "tokenize_prompts",
    "DEFAULT_ROLLOUT_BACKEND",
    "generate_rollout",
    "decode_codes",
    "decoder_logits",
    "sampling_log_dist",
    "teacher_forced_logprobs",
]

# The fastest backend that needs no compiling, measured on CPU (benchmarks/RESULTS.md, "Rollout backends").
# "compiled" is faster once compiled but compiles first for every new shape and sampling setting (tens of seconds on
# CPU), so it is opt-in (MusicPPOConfig.rollout_backend).
DEFAULT_ROLLOUT_BACKEND = "static"

# Prompts longer than this many tokens are rejected unless the tokenizer declares its own smaller limit. T5 has
# relative positions and no hard limit, but MusicGen was trained on short descriptions.
DEFAULT_MAX_PROMPT_LENGTH = 512


@dataclass(frozen=True)
class SamplingConfig:
    """How codes are sampled: the transform ``generate`` applies to the decoder logits, in this order.

    Args:
        guidance_scale: classifier-free guidance ``uncond + s * (cond - uncond)``; 1 disables it (and halves the
            cost). MusicGen's released checkpoints use 3.
        temperature: divides the guided logits. MusicRL samples at 0.99.
        top_k: keep only the k most likely codes; 0 keeps the whole codebook (MusicGen's checkpoints ship 250).
    """

    guidance_scale: float = 1.0
    temperature: float = 1.0
    top_k: int = 0

    def __post_init__(self):
        if self.guidance_scale < 1:
            raise ValueError(f"guidance_scale must be >= 1 (1 disables guidance), got {self.guidance_scale}.")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}.")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 keeps the whole codebook), got {self.top_k}.")

    @property
    def guided(self) -> bool:
        return self.guidance_scale > 1


@dataclass
class MusicRollout:
    """A batch of sampled music: what the policy saw, what it drew, and how likely it was.

    ``logprobs`` are log pi(code | prompt, previous steps) under the *sampling* distribution (guidance, temperature
    and top-k applied), the quantity that on-policy importance ratios and the KL anchor need.
    """

    prompts: list[str]
    prompt_ids: torch.Tensor  # [B, L] text-encoder tokens
    prompt_mask: torch.Tensor  # [B, L] 1 for real tokens
    grid: torch.Tensor  # [B, K, S] decoder sequence in the delayed layout (start column, pads)
    codes: torch.Tensor  # [B, K, T] codec codes, the action sequence
    audio: torch.Tensor  # [B, C, N] decoded waveform in [-1, 1]
    sampling_rate: int
    logprobs: torch.Tensor  # [B, K, T] log-prob of each sampled code
    entropies: torch.Tensor  # [B, K] mean entropy (nats) of the sampling distribution per codebook
    sampling: SamplingConfig = field(default_factory=SamplingConfig)

    @property
    def audio_channels(self) -> int:
        """C; stereo decoders interleave left/right codebooks in the grid."""
        return self.audio.shape[1]

    @property
    def num_steps(self) -> int:
        """Decoder steps S - 1 (the RL horizon)."""
        return self.grid.shape[-1] - 1

    def step_logprobs(self) -> torch.Tensor:
        """[B, S - 1]: log-prob of each decoder step's action (sum over the codes drawn at that step)."""
        return codebooks.codes_to_steps(self.logprobs, self.audio_channels)


@dataclass
class DecoderOutput:
    """Teacher-forced decoder outputs over a grid's first S - 1 columns, one entry per decoder step."""

    logits: torch.Tensor  # [B, K, S - 1, V] conditional logits
    uncond_logits: torch.Tensor | None  # [B, K, S - 1, V] null-condition logits when guided, else None
    hidden_states: torch.Tensor | None  # [B, S - 1, H] last decoder layer (after final norm), conditional half


def unwrap_musicgen(model: torch.nn.Module) -> torch.nn.Module:
    """The ``MusicgenForConditionalGeneration`` inside a DDP or DeepSpeed wrapper (``.module``) and/or a peft wrapper
    (LoRA layers stay injected and active)."""
    if hasattr(model, "module"):
        model = model.module
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    if not hasattr(model, "decoder") or not hasattr(model.decoder, "num_codebooks"):
        raise TypeError(f"expected a MusicgenForConditionalGeneration (optionally peft-wrapped), got {type(model)}.")
    return model


def resolve_num_steps(model: torch.nn.Module, num_steps: int | None = None, duration_s: float | None = None) -> int:
    """Decoder steps for a rollout given in steps or in seconds of audio (``duration_s * frame_rate`` frames).

    Raises ``ValueError`` for lengths that break the delay pattern.
    """
    musicgen = unwrap_musicgen(model)
    num_codebooks = musicgen.decoder.num_codebooks
    audio_channels = musicgen.decoder.config.audio_channels
    if (num_steps is None) == (duration_s is None):
        raise ValueError("give the rollout length either as num_steps (decoder steps) or as duration_s (seconds).")
    if duration_s is not None:
        if duration_s <= 0:
            raise ValueError(f"duration_s must be > 0, got {duration_s}.")
        frames = round(duration_s * musicgen.config.audio_encoder.frame_rate)
        num_steps = frames + codebooks.max_delay(num_codebooks, audio_channels)
    minimum = codebooks.min_decoder_steps(num_codebooks, audio_channels)
    if num_steps < minimum:
        raise ValueError(
            f"a rollout of {num_steps} decoder steps is too short for {num_codebooks} codebooks with the delay "
            f"pattern: MusicGen needs at least {minimum} steps (2K-2 for K codebooks per channel); use a longer "
            f"response_length / num_steps or duration_s."
        )
    max_positions = musicgen.decoder.config.max_position_embeddings
    if num_steps + 1 > max_positions:
        raise ValueError(
            f"a rollout of {num_steps} decoder steps exceeds the decoder's {max_positions} positions; "
            f"use at most {max_positions - 1} steps."
        )
    return num_steps


def tokenize_prompts(
    processor, prompts: list[str], device: torch.device | str | None = None, max_prompt_length: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompt ids and mask [B, L] from a MusicGen processor (or its tokenizer), rejecting empty and over-long
    prompts instead of silently truncating them."""
    if isinstance(prompts, str) or not isinstance(prompts, (list, tuple)) or len(prompts) == 0:
        raise ValueError(f"prompts must be a non-empty list of strings, got {type(prompts).__name__}.")
    for index, prompt in enumerate(prompts):
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError(f"prompt {index} is empty ({prompt!r}): every prompt needs a text description.")
    tokenizer = getattr(processor, "tokenizer", processor)
    if max_prompt_length is None:
        model_max = getattr(tokenizer, "model_max_length", None) or DEFAULT_MAX_PROMPT_LENGTH
        max_prompt_length = min(model_max, DEFAULT_MAX_PROMPT_LENGTH)
    encoded = tokenizer(list(prompts), padding=True, return_tensors="pt")
    lengths = encoded["attention_mask"].sum(-1)
    too_long = (lengths > max_prompt_length).nonzero().flatten().tolist()
    if too_long:
        index = too_long[0]
        raise ValueError(
            f"prompt {index} is {lengths[index].item()} tokens long, more than max_prompt_length={max_prompt_length}:"
            f" shorten it or raise max_prompt_length."
        )
    return encoded["input_ids"].to(device), encoded["attention_mask"].to(device)


class _StashDecoderLogits(LogitsProcessor):
    """First logits processor of the rollout: keeps the raw decoder logits of the current step.

    ``generate`` merges custom processors ahead of classifier-free guidance (which it appends to the custom list)
    and of its temperature/top-k warpers, so this sees the logits before any transform: [B*K, V], or [2*B*K, V]
    (conditional half first) when guided.
    """

    def __init__(self):
        self.logits = None

    def __call__(self, input_ids, scores):
        self.logits = scores
        return scores


class _RecordSampledCodes(StoppingCriteria):
    """Never stops generation; after every step it stores the sampled tokens' log-probs and the entropies under the
    sampling distribution, recomputed from the stashed raw logits with the same function teacher forcing uses."""

    def __init__(self, stash: _StashDecoderLogits, sampling: SamplingConfig):
        self.stash = stash
        self.sampling = sampling
        self.input_ids = None
        self.step_logprobs: list[torch.Tensor] = []
        self.step_entropies: list[torch.Tensor] = []

    def __call__(self, input_ids, scores, **kwargs):
        rows = input_ids.shape[0]
        logits = self.stash.logits
        uncond = logits[rows:] if self.sampling.guided else None
        logprobs = codebooks.sampling_logprobs(
            logits[:rows], uncond, self.sampling.guidance_scale, self.sampling.temperature, self.sampling.top_k
        )
        self.step_logprobs.append(codebooks.gather_logprobs(logprobs, input_ids[:, -1]))
        self.step_entropies.append(codebooks.entropy(logprobs))
        self.input_ids = input_ids
        return torch.zeros(rows, dtype=torch.bool, device=input_ids.device)


@torch.no_grad()
def generate_rollout(
    model: torch.nn.Module,
    processor,
    prompts: list[str],
    num_steps: int | None = None,
    duration_s: float | None = None,
    sampling: SamplingConfig | None = None,
    max_prompt_length: int | None = None,
    backend: str = DEFAULT_ROLLOUT_BACKEND,
    num_generations: int = 1,
) -> MusicRollout:
    """Sample music for ``prompts`` and record everything RL needs.

    Args:
        model: ``MusicgenForConditionalGeneration``, optionally peft-wrapped and/or quantized.
        processor: its ``MusicgenProcessor`` (or the tokenizer alone).
        prompts: B text descriptions.
        num_steps / duration_s: rollout length in decoder steps, or in seconds of audio (exactly one).
        sampling: guidance, temperature and top-k (the model's generation_config is overridden with these, and
            other warpers such as top-p are switched off, so the recorded log-probs describe what was sampled).
        max_prompt_length: longest prompt accepted, in tokens.
        backend: ``"generate"`` drives ``model.generate`` itself; ``"static"`` and ``"compiled"`` run
            :class:`musicrl_trl.sampler.StaticCacheSampler` (static KV cache, eagerly or through ``torch.compile``),
            which draws from the same distribution in a fraction of the time (with other random numbers: one seed
            gives other codes than ``generate``).
        num_generations: clips per prompt (G). The rollout holds B = len(prompts) x G clips, each prompt's G clips
            consecutive; the static backends encode each prompt's text once for its G clips.
    """
    if backend not in ROLLOUT_BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(map(repr, ROLLOUT_BACKENDS))}, got {backend!r}.")
    sampling = sampling or SamplingConfig()
    musicgen = unwrap_musicgen(model)
    num_codebooks = musicgen.decoder.num_codebooks
    audio_channels = musicgen.decoder.config.audio_channels
    pad_token_id = musicgen.generation_config.pad_token_id
    num_steps = resolve_num_steps(musicgen, num_steps, duration_s)
    if not isinstance(num_generations, int) or num_generations < 1:
        raise ValueError(f"num_generations must be an integer >= 1, got {num_generations!r}.")
    prompt_ids, prompt_mask = tokenize_prompts(processor, prompts, musicgen.device, max_prompt_length)
    if backend != "generate":
        return _static_cache_rollout(
            musicgen, prompts, prompt_ids, prompt_mask, num_steps, sampling, compiled=backend == "compiled",
            num_generations=num_generations,
        )
    if num_generations > 1:  # generate encodes every row's prompt itself
        prompts = [prompt for prompt in prompts for _ in range(num_generations)]
        prompt_ids = prompt_ids.repeat_interleave(num_generations, dim=0)
        prompt_mask = prompt_mask.repeat_interleave(num_generations, dim=0)
    batch = prompt_ids.shape[0]

    stash = _StashDecoderLogits()
    recorder = _RecordSampledCodes(stash, sampling)
    # Sampling runs in eval mode: with gradient checkpointing on, train-mode decoder layers drop the KV cache
    # (transformers' GradientCheckpointingLayer), which would make generate attend to the last token only.
    with EvalMode(model):
        audio = model.generate(
            input_ids=prompt_ids,
            attention_mask=prompt_mask,
            do_sample=True,
            max_new_tokens=num_steps,
            min_new_tokens=None,
            guidance_scale=sampling.guidance_scale,
            temperature=sampling.temperature,
            top_k=sampling.top_k,
            top_p=1.0,
            min_p=None,
            typical_p=1.0,
            repetition_penalty=1.0,
            logits_processor=LogitsProcessorList([stash]),
            stopping_criteria=StoppingCriteriaList([recorder]),
        )

    # generate may run its stopping check one step late and undo it; keep exactly num_steps steps.
    grid_length = num_steps + 1
    raw_grid = recorder.input_ids[:, :grid_length].reshape(batch, num_codebooks, grid_length)
    mask = codebooks.code_mask(num_codebooks, grid_length, audio_channels, raw_grid.device)
    # Ids at delay-forced cells are whatever was drawn there; generate overwrites them with the pad token too.
    grid = torch.where(mask, raw_grid, torch.full_like(raw_grid, pad_token_id))

    def per_code(step_values: list[torch.Tensor]) -> torch.Tensor:
        stacked = torch.stack(step_values[:num_steps], dim=-1).reshape(batch, num_codebooks, num_steps)
        return codebooks.steps_to_codes(stacked, audio_channels)

    logprobs = per_code(recorder.step_logprobs)
    if not torch.isfinite(logprobs).all():
        raise RuntimeError(
            "generate sampled a code that the recorded sampling transform gives probability 0: the model's "
            "generation_config applies a logits processor that SamplingConfig does not describe."
        )
    return MusicRollout(
        prompts=list(prompts),
        prompt_ids=prompt_ids,
        prompt_mask=prompt_mask,
        grid=grid,
        codes=codebooks.grid_to_codes(grid, audio_channels),
        audio=audio.float(),
        sampling_rate=musicgen.config.audio_encoder.sampling_rate,
        logprobs=logprobs,
        entropies=per_code(recorder.step_entropies).mean(-1),
        sampling=sampling,
    )


def _static_cache_rollout(
    musicgen, prompts, prompt_ids, prompt_mask, num_steps: int, sampling: SamplingConfig, compiled: bool,
    num_generations: int = 1,
) -> MusicRollout:
    audio_channels = musicgen.decoder.config.audio_channels
    sampled = static_cache_sampler(musicgen, compiled=compiled).sample(
        prompt_ids, prompt_mask, num_steps, sampling.guidance_scale, sampling.temperature, sampling.top_k,
        num_generations=num_generations,
    )
    if num_generations > 1:  # the teacher-forced passes of training read one row per clip
        prompts = [prompt for prompt in prompts for _ in range(num_generations)]
        prompt_ids = prompt_ids.repeat_interleave(num_generations, dim=0)
        prompt_mask = prompt_mask.repeat_interleave(num_generations, dim=0)
    logprobs = codebooks.steps_to_codes(sampled.step_logprobs, audio_channels)
    codes = codebooks.grid_to_codes(sampled.grid, audio_channels)
    return MusicRollout(
        prompts=list(prompts),
        prompt_ids=prompt_ids,
        prompt_mask=prompt_mask,
        grid=sampled.grid,
        codes=codes,
        audio=decode_codes(musicgen, codes).float(),
        sampling_rate=musicgen.config.audio_encoder.sampling_rate,
        logprobs=logprobs,
        entropies=codebooks.steps_to_codes(sampled.step_entropies, audio_channels).mean(-1),
        sampling=sampling,
    )


@torch.no_grad()
def decode_codes(model: torch.nn.Module, codes: torch.Tensor) -> torch.Tensor:
    """Waveforms [B, C, N] of codes [B, K, T], decoded by the model's codec exactly as ``generate`` does (stereo:
    even codebooks are the left channel, odd ones the right)."""
    musicgen = unwrap_musicgen(model)
    frames = codes[None]  # the codec's leading chunk dimension
    scales = [None] * codes.shape[0]
    if musicgen.decoder.config.audio_channels == 1:
        return musicgen.audio_encoder.decode(frames, audio_scales=scales).audio_values
    left = musicgen.audio_encoder.decode(frames[:, :, ::2], audio_scales=scales).audio_values
    right = musicgen.audio_encoder.decode(frames[:, :, 1::2], audio_scales=scales).audio_values
    return torch.cat([left, right], dim=1)


def decoder_logits(
    model: torch.nn.Module,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    grid: torch.Tensor,
    guided: bool = False,
    output_hidden_states: bool = False,
) -> DecoderOutput:
    """One teacher-forced forward of the decoder over ``grid[:, :, :-1]``.

    With ``guided=True`` the batch is doubled with the null condition exactly as ``generate`` does for
    classifier-free guidance (zero encoder states and an all-zero encoder mask), and both halves are returned.
    Gradients flow unless the caller disables them. ``model`` may be peft- or DDP-wrapped.
    """
    # Under DeepSpeed, TRL hands the reference model over as an engine whose `.module` is the model.
    musicgen = unwrap_musicgen(model)
    batch, num_codebooks, length = grid.shape
    encoder_states = musicgen.text_encoder(input_ids=prompt_ids, attention_mask=prompt_mask).last_hidden_state
    decoder_input_ids = grid[:, :, :-1].reshape(batch * num_codebooks, length - 1)
    attention_mask = prompt_mask
    if guided:
        encoder_states = torch.cat([encoder_states, torch.zeros_like(encoder_states)])
        attention_mask = torch.cat([prompt_mask, torch.zeros_like(prompt_mask)])
        decoder_input_ids = decoder_input_ids.repeat(2, 1)
    outputs = model(
        attention_mask=attention_mask,
        encoder_outputs=BaseModelOutput(last_hidden_state=encoder_states),
        decoder_input_ids=decoder_input_ids,
        output_hidden_states=output_hidden_states,
        use_cache=False,
    )
    logits = outputs.logits.reshape(-1, num_codebooks, length - 1, outputs.logits.shape[-1])
    hidden = outputs.decoder_hidden_states[-1][:batch] if output_hidden_states else None
    return DecoderOutput(
        logits=logits[:batch], uncond_logits=logits[batch:] if guided else None, hidden_states=hidden
    )


def sampling_log_dist(output: DecoderOutput, sampling: SamplingConfig, audio_channels: int = 1) -> torch.Tensor:
    """The sampling distribution [B, K, T, V] of every code, from teacher-forced decoder outputs: the logits moved
    from decoder steps to codes, then guidance, temperature and top-k exactly as ``generate`` applies them."""
    uncond = codebooks.steps_to_codes(output.uncond_logits, audio_channels) if sampling.guided else None
    return codebooks.sampling_logprobs(
        codebooks.steps_to_codes(output.logits, audio_channels),
        uncond,
        sampling.guidance_scale,
        sampling.temperature,
        sampling.top_k,
    )


def teacher_forced_logprobs(
    model: torch.nn.Module,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    grid: torch.Tensor,
    sampling: SamplingConfig,
    audio_channels: int = 1,
    chunk_size: int | None = DEFAULT_CHUNK_SIZE,
) -> torch.Tensor:
    """Log-probs [B, K, T] of the codes in ``grid`` under ``model``'s sampling distribution, by one forward pass of the
    decoder trunk and its LM heads ``chunk_size`` decoder steps at a time (None: the whole clip; see
    :mod:`musicrl_trl.teacher_forcing`).

    For a rollout from the same model this reproduces ``rollout.logprobs``.
    """
    states = decoder_states(model, prompt_ids, prompt_mask, grid, guided=sampling.guided)
    statistics = step_statistics(
        states, grid, sampling, chunk_size=chunk_size, audio_channels=audio_channels
    )
    return codebooks.steps_to_codes(statistics.logprobs, audio_channels)
