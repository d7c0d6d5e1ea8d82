"""A sampling loop for MusicGen over a static KV cache: what ``model.generate`` samples, without its per-step cost.

Shape letters as in :mod:`musicrl_trl.codebooks`: B batch, L prompt tokens (padded to a bucket), K codebooks,
S = T + D + 1 grid columns, V codebook size, H decoder hidden size. R decoder rows: B, or 2B with classifier-free
guidance (conditional half first, as in ``generate``). E attention heads of width d = H / E.

Why not ``model.generate``: ``MusicgenForConditionalGeneration.generate`` builds a dynamic encoder-decoder cache
itself (every step concatenates keys and values, so shapes change from step to step), runs the full logits-processor
and stopping-criteria machinery per step, and so can neither use a static cache nor be captured by ``torch.compile``
(transformers' auto-compile never fires for it). Parler-TTS, a MusicGen-architecture model, got 3-5x from a static
cache plus compile (huggingface/parler-tts PR 89 and 93).

What this loop does instead, per rollout:

1. the text encoder runs once; with guidance the null condition is appended exactly as ``generate`` does (zero
   encoder states and an all-zero mask), and the cross-attention keys and values of every layer are computed once;
2. self-attention keys and values go into a cache preallocated for the whole rollout ([R, E, S - 1, d] per layer);
3. each decoder step runs the Hugging Face layers' own modules (layer norms, q/k/v/out projections, fc1/fc2, LM heads),
   so LoRA layers injected by peft act (and ``disable_adapter()`` switches them off), with attention written here
   over the static cache;
4. the logits go through :func:`musicrl_trl.codebooks.sampling_logits` (guidance, temperature, top-k, in
   ``generate``'s order) and a softmax, and one code per codebook is drawn from those probabilities by inverting
   their cumulative sum at one uniform number per row (see :func:`_draw`). That is the distribution ``generate``
   samples from, but not its random stream: ``torch.multinomial`` draws V exponential numbers per row, which on CPU
   cost more than the tiny decoder step itself, so the same seed gives other codes than ``generate`` (the tests
   compare the two distributions over many draws). The delay pattern then forces pads where
   :func:`musicrl_trl.codebooks.code_mask` says no code is sampled.

Backends: ``"static"`` runs the step eagerly and attends over the filled part of the cache only; ``"compiled"`` runs
one shape-static step (attention over the whole cache with a position mask, prompts padded to a power-of-two bucket)
through ``torch.compile`` (on CUDA with ``mode="reduce-overhead"``, i.e. CUDA graphs), compiled once per architecture,
shape and sampling setting and reused by later rollouts. The whole step, from the column just drawn to the next one
(decoder, sampling transform, draw, delay pattern, records), is one function without random ops (the uniforms come
in as an input), so it compiles into one graph. Dropout is never applied while sampling (modules run in eval mode).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from . import codebooks

__all__ = ["ROLLOUT_BACKENDS", "SampledGrid", "StaticCacheSampler", "static_cache_sampler"]

ROLLOUT_BACKENDS = ("generate", "static", "compiled")

# Prompts are padded (with masked positions) to a power of two of at least this many tokens before compiling, so
# that prompt batches of different lengths share a few compiled graphs (Parler-TTS pads prompts the same way).
MIN_PROMPT_BUCKET = 16


@dataclass
class SampledGrid:
    """What one sampled batch holds, per decoder step (step j predicts grid column j + 1)."""

    grid: torch.Tensor  # [B, K, S] delayed layout: start column, sampled codes, pads at forced cells
    step_logprobs: torch.Tensor  # [B, K, S - 1] log-prob of the token drawn at each step (junk at forced cells)
    step_entropies: torch.Tensor  # [B, K, S - 1] entropy (nats) of each step's sampling distribution


def _decoder_step(
    causal_lm, filled: int | None, tokens, position, self_keys, self_values, cross_keys, cross_values, cross_mask
):
    """One decoder step over a static cache, built from a ``MusicgenForCausalLM``'s own modules.

    Writes the step's self-attention keys/values [R, E, 1, d] at ``position`` (a one-element long tensor) and returns
    the logits [R, K, V] that predict the next grid column from ``tokens`` [R, K]. ``filled`` = position + 1 as a
    Python int reads only the filled slots (eager: no mask, no host sync); ``None`` selects the shape-static form
    that ``torch.compile`` captures (attend over all S - 1 cache slots, later ones masked). The model is an
    argument, not a closure, so that one compiled graph serves every model of the same architecture and the sampler
    holds no reference to the model.
    """
    decoder = causal_lm.model.decoder
    rows = tokens.shape[0]
    # Same sum, in the same order, as MusicgenDecoder.forward (no embedding scale there either).
    hidden = sum(decoder.embed_tokens[k](tokens[:, k : k + 1]) for k in range(tokens.shape[1]))  # [R, 1, H]
    hidden = hidden + decoder.embed_positions.weights.index_select(0, position)
    full_cache = filled is None
    if full_cache:
        slots = torch.arange(self_keys[0].shape[2], device=tokens.device)
        self_mask = torch.zeros(slots.shape, dtype=hidden.dtype, device=tokens.device)
        self_mask = self_mask.masked_fill(slots > position, float("-inf"))[None]  # [1, S - 1]: the one query
    for index, layer in enumerate(decoder.layers):
        attn = layer.self_attn
        normed = layer.self_attn_layer_norm(hidden)
        keys = _heads(attn.k_proj(normed), attn.head_dim)  # [R, E, 1, d]
        values = _heads(attn.v_proj(normed), attn.head_dim)
        if full_cache:
            self_keys[index].index_copy_(2, position, keys)
            self_values[index].index_copy_(2, position, values)
            context = _attend(attn, normed, self_keys[index], self_values[index], self_mask)
        else:
            self_keys[index][:, :, filled - 1 : filled] = keys
            self_values[index][:, :, filled - 1 : filled] = values
            context = _attend(attn, normed, self_keys[index][:, :, :filled], self_values[index][:, :, :filled])
        hidden = hidden + context
        normed = layer.encoder_attn_layer_norm(hidden)
        hidden = hidden + _attend(layer.encoder_attn, normed, cross_keys[index], cross_values[index], cross_mask)
        normed = layer.final_layer_norm(hidden)
        hidden = hidden + layer.fc2(layer.activation_fn(layer.fc1(normed)))
    hidden = decoder.layer_norm(hidden)
    logits = torch.stack([head(hidden) for head in causal_lm.lm_heads], dim=1)  # [R, K, 1, V]
    return logits.view(rows, len(causal_lm.lm_heads), -1)


def _heads(projected: torch.Tensor, head_dim: int) -> torch.Tensor:
    """[R, N, H] -> [R, E, N, d]."""
    rows, length, _ = projected.shape
    return projected.view(rows, length, -1, head_dim).transpose(1, 2)


def _attend(attn: nn.Module, normed: torch.Tensor, keys, values, mask=None) -> torch.Tensor:
    """The one query row [R, 1, H] of ``attn`` over ``keys``/``values`` [R, E, N, d], through ``attn.out_proj``."""
    rows = normed.shape[0]
    query = _heads(attn.q_proj(normed), attn.head_dim)
    context = F.scaled_dot_product_attention(query, keys, values, attn_mask=mask, scale=attn.scaling)
    return attn.out_proj(context.transpose(1, 2).reshape(rows, 1, -1))


def _draw(probs: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """Indices [N, 1] drawn from ``probs`` [N, V] by inverse transform sampling, given ``uniform`` [N, 1] in [0, 1).

    Code j is drawn when ``cdf[j - 1] <= u * cdf[V - 1] < cdf[j]``, an interval of width p_j (up to float rounding
    of the cumulative sum, about 1e-7): exactly ``torch.multinomial(probs, 1)``'s distribution, from one random number
    per row instead of V. Codes with p = 0 (cut by top-k) have an empty interval and are never drawn.
    """
    cdf = probs.cumsum(dim=-1)
    return (cdf < uniform * cdf[:, -1:]).sum(dim=-1, keepdim=True)


def _sampling_step(
    causal_lm,
    filled: int | None,
    grid,
    code_mask,
    step_logprobs,
    step_entropies,
    position,
    uniform,
    self_keys,
    self_values,
    cross_keys,
    cross_values,
    cross_mask,
    pad_token_id: int,
    guidance_scale: float,
    temperature: float,
    top_k: int,
) -> None:
    """Grid column ``position`` [1] -> column ``position + 1``: one decoder step, the sampling transform, one draw per
    codebook, the delay pattern, and the records, written in place into ``grid`` [B, K, S] and ``step_logprobs`` /
    ``step_entropies`` [B, K, S - 1]. ``filled``: see :func:`_decoder_step`.

    Log-probs and entropies come from the probabilities at hand, per row: ``log p(drawn)``,
    ``logsumexp(scores) = score(drawn) - log p(drawn)`` and ``H = logsumexp - sum p * score`` (cells cut by top-k
    have p = 0 and score -inf; ``nansum`` drops their 0 * -inf): two passes over [B*K, V] instead of the five of
    ``log_softmax`` plus :func:`musicrl_trl.codebooks.entropy`.
    """
    batch, num_codebooks = grid.shape[:2]
    guided = guidance_scale > 1
    tokens = grid.index_select(2, position).view(batch, num_codebooks)
    if guided:  # both halves feed the same tokens, as generate repeats decoder_input_ids
        tokens = torch.cat([tokens, tokens])
    logits = _decoder_step(
        causal_lm, filled, tokens, position, self_keys, self_values, cross_keys, cross_values, cross_mask
    ).float()
    scores = codebooks.sampling_logits(
        logits[:batch], logits[batch:] if guided else None, guidance_scale, temperature, top_k
    ).view(batch * num_codebooks, -1)  # [B*K, V]
    probs = F.softmax(scores, dim=-1)
    drawn = _draw(probs, uniform)  # [B*K, 1]
    logprobs = probs.gather(-1, drawn).log()
    log_normalizer = scores.gather(-1, drawn) - logprobs
    entropies = log_normalizer.squeeze(-1) - torch.nansum(probs * scores, dim=-1)
    next_column = position + 1
    sampled = code_mask.index_select(1, next_column).view(1, num_codebooks)
    column = torch.where(sampled, drawn.view(batch, num_codebooks), pad_token_id)
    grid.index_copy_(2, next_column, column.view(batch, num_codebooks, 1))
    step_logprobs.index_copy_(2, position, logprobs.view(batch, num_codebooks, 1))
    step_entropies.index_copy_(2, position, entropies.view(batch, num_codebooks, 1))


class EvalMode:
    """Run a module tree in eval mode (no dropout while sampling) and restore every module's flag afterwards."""

    def __init__(self, module: nn.Module):
        self.module = module

    def __enter__(self):
        self.modes = [(m, m.training) for m in self.module.modules()]
        self.module.eval()

    def __exit__(self, *exc):
        for module, training in self.modes:
            module.training = training


class StaticCacheSampler:
    """Samples MusicGen token grids over a preallocated KV cache (see the module docstring).

    One sampler serves one ``MusicgenForConditionalGeneration`` (peft-wrapped or not: pass the unwrapped model; the
    LoRA layers live inside its modules). It keeps its cache buffers and, with ``compiled=True``, its compiled step
    between calls, so build it once (:func:`static_cache_sampler` does) and call :meth:`sample` for every rollout.

    Compiled graphs are keyed by architecture, batch, rollout length, prompt-length bucket and sampling setting
    (LoRA on or off is a different graph too). Past ``torch._dynamo.config.recompile_limit`` (8) distinct keys,
    dynamo runs new ones eagerly, which stays exact but loses the speed: raise the limit for runs that sample many
    different shapes.
    """

    def __init__(self, musicgen: nn.Module, compiled: bool = False):
        self._musicgen = weakref.ref(musicgen)  # the sampler lives beside the model, not keeping it alive
        self.compiled = compiled
        self.step = _sampling_step
        if compiled:
            cuda = next(musicgen.parameters()).device.type == "cuda"
            # CUDA graphs replay the whole step as one launch; on CPU the default mode fuses the element-wise work.
            self.step = torch.compile(_sampling_step, mode="reduce-overhead" if cuda else None, dynamic=False)
        self._buffers_key = None
        self._buffers = None
        self._cross_key = None
        self._cross = None

    @property
    def musicgen(self) -> nn.Module:
        musicgen = self._musicgen()
        if musicgen is None:
            raise RuntimeError("the model this sampler was built for no longer exists.")
        return musicgen

    def _buffers_for(self, batch: int, rows: int, num_steps: int, dtype: torch.dtype, device: torch.device):
        """The rollout's preallocated state, reused while the shapes repeat (compiled steps and CUDA graphs then see
        the same tensors): self-attention keys and values [R, E, S - 1, d] per layer (zero-filled once: masked slots
        must hold finite values), the grid [B, K, S] and the per-step records [B, K, S - 1]."""
        layers = self.musicgen.decoder.model.decoder.layers
        num_codebooks = self.musicgen.decoder.num_codebooks
        key = (batch, rows, num_steps, dtype, device)
        if self._buffers_key != key:
            self._buffers = None  # free the old ones before allocating
            attn = layers[0].self_attn
            shape = (rows, attn.num_heads, num_steps, attn.head_dim)
            buffers = dict(
                self_keys=[torch.zeros(shape, dtype=dtype, device=device) for _ in layers],
                self_values=[torch.zeros(shape, dtype=dtype, device=device) for _ in layers],
                grid=torch.empty(batch, num_codebooks, num_steps + 1, dtype=torch.long, device=device),
                step_logprobs=torch.zeros(batch, num_codebooks, num_steps, device=device),
                step_entropies=torch.zeros(batch, num_codebooks, num_steps, device=device),
            )
            if self.compiled and device.type == "cuda":
                # Mutated in place by the graph: CUDA graphs need fixed addresses (as transformers' StaticCache).
                for tensor in [*buffers["self_keys"], *buffers["self_values"], *list(buffers.values())[2:]]:
                    torch._dynamo.mark_static_address(tensor)
            self._buffers, self._buffers_key = buffers, key
        return self._buffers

    def _static_cross(self, keys: list, values: list, mask: torch.Tensor):
        """The cross-attention keys, values and mask copied into tensors at fixed addresses. A CUDA graph copies every
        other input into its own memory at each replay: for the cross-attention cache that would be megabytes per
        decoder step. Reused while the (bucketed) shapes repeat."""
        key = (mask.shape, keys[0].shape, keys[0].dtype)
        if self._cross_key != key:
            self._cross = None
            self._cross = (
                [torch.empty_like(k) for k in keys],
                [torch.empty_like(v) for v in values],
                torch.empty_like(mask),
            )
            for tensor in [*self._cross[0], *self._cross[1], self._cross[2]]:
                torch._dynamo.mark_static_address(tensor)
            self._cross_key = key
        for target, source in zip([*self._cross[0], *self._cross[1], self._cross[2]], [*keys, *values, mask]):
            target.copy_(source)
        return self._cross

    def _encoder_states(
        self, prompt_ids, prompt_mask, guided: bool, num_generations: int = 1
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Encoder states [R, L, H] and mask [R, L] exactly as ``generate`` and ``forward`` prepare them; each prompt
        is encoded once and its states repeated for its ``num_generations`` rows."""
        musicgen = self.musicgen
        states = musicgen.text_encoder(input_ids=prompt_ids, attention_mask=prompt_mask).last_hidden_state
        mask = prompt_mask
        if num_generations > 1:
            states = states.repeat_interleave(num_generations, dim=0)
            mask = mask.repeat_interleave(num_generations, dim=0)
        if guided:  # generate's null condition (MusicgenForConditionalGeneration._prepare_text_encoder_kwargs...)
            states = torch.cat([states, torch.zeros_like(states)])
            mask = torch.cat([mask, torch.zeros_like(mask)])
        if (
            musicgen.text_encoder.config.hidden_size != musicgen.decoder.config.hidden_size
            and musicgen.decoder.config.cross_attention_hidden_size is None
        ):
            states = musicgen.enc_to_dec_proj(states)
        states = states * mask[..., None]
        if self.compiled:  # pad to a length bucket with masked positions: fewer distinct shapes to compile
            length = states.shape[1]
            bucket = max(MIN_PROMPT_BUCKET, 1 << (length - 1).bit_length())
            states = F.pad(states, (0, 0, 0, bucket - length))
            mask = F.pad(mask, (0, bucket - length))
        return states, mask

    def _cross_cache(self, states: torch.Tensor, mask: torch.Tensor):
        """Cross-attention keys/values [R, E, L, d] of every layer, and the additive mask [R, 1, 1, L]."""
        layers = self.musicgen.decoder.model.decoder.layers
        keys = [_heads(layer.encoder_attn.k_proj(states), layer.encoder_attn.head_dim) for layer in layers]
        values = [_heads(layer.encoder_attn.v_proj(states), layer.encoder_attn.head_dim) for layer in layers]
        # A finite minimum rather than -inf, as transformers' masks use: the null condition masks every position,
        # and then attends uniformly over zero values (output 0) instead of producing NaN.
        additive = torch.zeros(mask.shape, dtype=states.dtype, device=states.device)
        additive = additive.masked_fill(mask == 0, torch.finfo(states.dtype).min)
        return keys, values, additive[:, None, None, :]

    @torch.no_grad()
    def sample(
        self,
        prompt_ids: torch.Tensor,
        prompt_mask: torch.Tensor,
        num_steps: int,
        guidance_scale: float = 1.0,
        temperature: float = 1.0,
        top_k: int = 0,
        num_generations: int = 1,
    ) -> SampledGrid:
        """Sample ``num_steps`` decoder steps for prompts [P, L], ``num_generations`` rows per prompt (B = P x
        num_generations, each prompt's rows consecutive, its text encoded once): the grid and each step's log-probs
        and entropies under the sampling distribution (guidance, then temperature, then top-k)."""
        musicgen = self.musicgen
        num_codebooks = musicgen.decoder.num_codebooks
        audio_channels = musicgen.decoder.config.audio_channels
        pad_token_id = musicgen.generation_config.pad_token_id
        start_token_id = musicgen.generation_config.decoder_start_token_id
        if start_token_id is None:
            start_token_id = pad_token_id
        guided = guidance_scale is not None and guidance_scale > 1
        batch, device = prompt_ids.shape[0] * num_generations, prompt_ids.device
        dtype = musicgen.decoder.lm_heads[0].weight.dtype
        if not dtype.is_floating_point:  # quantized weights keep a packed dtype; take the compute dtype
            dtype = next(p.dtype for p in musicgen.decoder.parameters() if p.is_floating_point())

        with EvalMode(musicgen):
            states, mask = self._encoder_states(prompt_ids, prompt_mask, guided, num_generations)
            cross_keys, cross_values, cross_mask = self._cross_cache(states, mask)
            buffers = self._buffers_for(batch, 2 * batch if guided else batch, num_steps, dtype, device)
            if self.compiled and device.type == "cuda":
                cross_keys, cross_values, cross_mask = self._static_cross(cross_keys, cross_values, cross_mask)
            grid = buffers["grid"]
            grid.fill_(pad_token_id)
            grid[:, :, 0] = start_token_id
            code_mask = codebooks.code_mask(num_codebooks, num_steps + 1, audio_channels, device)  # [K, S]
            positions = [torch.full((1,), step, dtype=torch.long, device=device) for step in range(num_steps)]
            for step, position in enumerate(positions):
                self.step(
                    musicgen.decoder,
                    None if self.compiled else step + 1,
                    grid,
                    code_mask,
                    buffers["step_logprobs"],
                    buffers["step_entropies"],
                    position,
                    torch.rand(batch * num_codebooks, 1, device=device),
                    buffers["self_keys"],
                    buffers["self_values"],
                    cross_keys,
                    cross_values,
                    cross_mask,
                    int(pad_token_id),
                    float(guidance_scale),
                    float(temperature),
                    int(top_k),
                )
        return SampledGrid(
            grid=grid.clone(),
            step_logprobs=buffers["step_logprobs"].clone(),
            step_entropies=buffers["step_entropies"].clone(),
        )


_SAMPLERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def static_cache_sampler(musicgen: nn.Module, compiled: bool = False) -> StaticCacheSampler:
    """The sampler of ``musicgen`` (one per model and backend, kept while the model lives), so that compiled steps
    and cache buffers survive from one rollout to the next."""
    per_model = _SAMPLERS.setdefault(musicgen, {})
    if compiled not in per_model:
        per_model[compiled] = StaticCacheSampler(musicgen, compiled=compiled)
    return per_model[compiled]
