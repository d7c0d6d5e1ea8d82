"""Teacher-forced log-probs, exact KL and entropy of every decoder step, computed in chunks of decoder steps.

Shape letters as in :mod:`musicrl_trl.codebooks`: B batch, K codebooks, S grid length, A = S - 1 decoder steps,
H decoder hidden size, V codebook size, n decoder steps in one chunk.

Why chunks: the code distributions of a clip are [B, K, A, V] per tensor, and the update of MusicPPOTrainer needs
several of them at once (guided and unguided logits, their guided mix, the log-softmax, the anchor's distribution,
the KL's probabilities and log-ratio, and the gradients of each). At MusicRL's 30 s (A = 1,500) that is ~4 GB at
batch 8 on top of the model, growing with batch x length. The decoder trunk's own output, the last hidden states
[B, A, H], is a small fraction of that (H = 1024 against K x V = 8,192 for musicgen-small). So the trunk runs once
over the whole clip (:func:`decoder_states`) and everything past it, from the LM heads to the per-step numbers, runs
``chunk_size`` decoder steps at a time (:func:`step_statistics`). Under autograd each chunk is checkpointed
(``torch.utils.checkpoint``, non-reentrant): its forward keeps only the hidden states it read and the [B, K, n]
numbers it returned, and the backward recomputes the chunk's logits once to differentiate them. The anchor's
distribution is never stored for the update: its hidden states are (:class:`DecoderStates`, [B, A, H]), and its LM
heads are applied per chunk under ``no_grad``. The cost is one more pass of the LM heads and the sampling transform
per training forward (benchmarks/RESULTS.md, "Long clips").

Everything is indexed by decoder step, as the decoder produces it: entry ``[b, k, j]`` belongs to the code that
codebook k draws at step j (grid column j + 1), and is 0 at the cells the delay pattern fills with pads
(``codebooks.code_mask``). Summing over K gives the per-step value the RL trainer uses (the K codes of a step are one
action); :func:`musicrl_trl.codebooks.steps_to_codes` gives per-code values.

The numbers equal those of :func:`musicrl_trl.rollout.decoder_logits` followed by
:func:`musicrl_trl.rollout.sampling_log_dist` (the unchunked path, ``chunk_size=None``) to float round-off, with and
without gradients, for any chunk size: tests/test_teacher_forcing.py compares them.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from . import codebooks

__all__ = ["DEFAULT_CHUNK_SIZE", "DecoderStates", "StepStatistics", "decoder_states", "step_statistics"]

KL_ESTIMATORS = ("full", "k1", "k3")

# Decoder steps per chunk by default (MusicPPOConfig.logits_chunk_size, evaluation.kl_per_clip): at batch 8 with
# MusicGen's 4 x 2048 codes a chunk's largest tensors are 8 MB each, and the time per update stays within a few percent
# of the unchunked one (benchmarks/RESULTS.md, "Long clips").
DEFAULT_CHUNK_SIZE = 32


@dataclass
class DecoderStates:
    """A model's last decoder hidden states over a grid (after the final layer norm), and its LM heads.

    ``context`` is entered around every use of the heads: the adapter-disabled view of a LoRA policy
    (``trainers.base.AdapterDisabledView``) disables the adapters there, so that heads that carry LoRA layers
    are read as the anchor's.
    """

    hidden: torch.Tensor  # [B, A, H] conditional
    uncond_hidden: torch.Tensor | None  # [B, A, H] null condition (classifier-free guidance), else None
    lm_heads: nn.ModuleList  # K heads H -> V
    context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext

    def select(self, rows: torch.Tensor | slice) -> DecoderStates:
        """The states of a subset of the batch (a micro-batch)."""
        uncond = None if self.uncond_hidden is None else self.uncond_hidden[rows]
        return dataclasses.replace(self, hidden=self.hidden[rows], uncond_hidden=uncond)

    def stacked_head_weights(self) -> torch.Tensor | None:
        """The K heads' weights as one [K * V, H] matrix, when the heads are plain bias-free ``nn.Linear`` layers
        (MusicGen's) whose weights are materialised: one matrix product per chunk instead of K products and a stack
        (a copy of the chunk's logits). None for anything else (LoRA'd or quantized heads, ZeRO-3-partitioned
        weights), which goes through the modules."""
        heads = list(self.lm_heads)
        plain = all(type(head) is nn.Linear and head.bias is None for head in heads)
        if not plain or any(hasattr(head.weight, "ds_id") for head in heads):  # ds_id: a DeepSpeed ZeRO-3 parameter
            return None
        return torch.cat([head.weight for head in heads])

    def step_logits(
        self, hidden: torch.Tensor, uncond_hidden: torch.Tensor | None, head_weights: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits [B, n, K, V] (and the null condition's) of hidden states [B, n, H], as MusicGen's heads compute them
        (``head_weights``: :meth:`stacked_head_weights`, or None to call the head modules)."""
        num_codebooks = len(self.lm_heads)

        def logits(states):
            if head_weights is not None:
                return nn.functional.linear(states, head_weights).unflatten(-1, (num_codebooks, -1))
            return torch.stack([head(states) for head in self.lm_heads], dim=2)

        with self.context():
            return logits(hidden), None if uncond_hidden is None else logits(uncond_hidden)


def decoder_states(
    model: nn.Module, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, grid: torch.Tensor, guided: bool = False
) -> DecoderStates:
    """One teacher-forced pass of the text encoder and the decoder trunk over ``grid[:, :, :-1]``, without the LM
    heads: MusicgenForConditionalGeneration's forward up to its decoder's ``last_hidden_state``.

    With ``guided=True`` the batch is doubled with the null condition exactly as ``generate`` does for
    classifier-free guidance (zero encoder states under an all-zero mask). Gradients flow unless the caller disables
    them. ``model`` may be peft-, DDP- or DeepSpeed-wrapped, or an adapter-disabled view (its ``forward_context`` is
    entered here and kept for the heads).
    """
    from .rollout import unwrap_musicgen  # rollout imports this module

    context = getattr(model, "forward_context", contextlib.nullcontext)
    musicgen = unwrap_musicgen(model)
    batch, num_codebooks, length = grid.shape
    decoder_input_ids = grid[:, :, :-1].reshape(batch * num_codebooks, length - 1)
    with context():
        encoder_states = musicgen.text_encoder(input_ids=prompt_ids, attention_mask=prompt_mask).last_hidden_state
        attention_mask = prompt_mask
        if guided:
            encoder_states = torch.cat([encoder_states, torch.zeros_like(encoder_states)])
            attention_mask = torch.cat([prompt_mask, torch.zeros_like(prompt_mask)])
            decoder_input_ids = decoder_input_ids.repeat(2, 1)
        # As MusicgenForConditionalGeneration.forward: project T5's states when the widths differ, then zero the
        # states of padded prompt tokens (and all of the null condition's).
        if (
            musicgen.text_encoder.config.hidden_size != musicgen.decoder.config.hidden_size
            and musicgen.decoder.config.cross_attention_hidden_size is None
        ):
            encoder_states = musicgen.enc_to_dec_proj(encoder_states)
        encoder_states = encoder_states * attention_mask[..., None]
        hidden = musicgen.decoder.model(
            input_ids=decoder_input_ids,
            encoder_hidden_states=encoder_states,
            encoder_attention_mask=attention_mask,
            use_cache=False,
        ).last_hidden_state
    return DecoderStates(
        hidden=hidden[:batch],
        uncond_hidden=hidden[batch:] if guided else None,
        lm_heads=musicgen.decoder.lm_heads,
        context=context,
    )


@dataclass
class StepStatistics:
    """Per-codebook, per-step numbers [B, K, A] of a teacher-forced pass (0 at pad cells). ``.sum(1)`` of any of
    them is the per-step value [B, A]."""

    logprobs: torch.Tensor  # drawn code's log-prob under the sampling distribution (guidance, temperature, top-k)
    kl: torch.Tensor | None = None  # KL(model || reference) per code, before any top-k cut (with a reference)
    entropy: torch.Tensor | None = None  # entropy (nats) of the sampling distribution, detached (when asked for)


class _CodeStatistics(torch.autograd.Function):
    """Log-prob of the drawn code, KL to the reference and entropy per (row, codebook, step), from the LM heads'
    logits, with the gradient written out instead of traced through ~10 elementwise ops over the codebook.

    Forward, with ``g = sampling_logits(cond, uncond)`` (guidance, temperature, top-k) and ``g'`` the same before the
    top-k cut, ``p = softmax(g)``, ``p' = softmax(g')``, ``q`` the reference's distribution (no gradient)::

        logprob = log p[a]        kl = sum_v p'_v (log p'_v - log q_v)  (or k1 / k3 at the drawn code a)

    Backward, the standard results for a log-softmax::

        d logprob / d g  = onehot(a) - p
        d kl / d g'      = p' * (log p' - log q - kl)            (full)
                         = onehot(a) - p'                        (k1)
                         = (1 - q[a] / p'[a]) (onehot(a) - p')    (k3)

    then ``g`` and ``g'`` are linear in the logits: ``d / d cond = s / T``, ``d / d uncond = (1 - s) / T`` (guidance
    ``s``, temperature ``T``); top-k cells are constant ``-inf`` in ``g``, where ``p = 0`` and the code is never drawn.
    One fused op saves two to three [.., V] tensors for its backward where autograd's trace of the same ops saved about
    ten (benchmarks/RESULTS.md, "Long clips"), and its backward is a handful of elementwise passes; under
    :func:`torch.utils.checkpoint.checkpoint` (chunked) even those are recomputed rather than kept.
    tests/test_teacher_forcing.py checks values and gradients against autograd through the plain ops.
    """

    @staticmethod
    def forward(
        ctx, cond, uncond, ref_log_dist, targets, valid, sampling, kl_estimator, differentiate_kl, with_entropy
    ):
        scale, temperature, top_k = sampling.guidance_scale, sampling.temperature, sampling.top_k
        log_dist = torch.log_softmax(codebooks.sampling_logits(cond, uncond, scale, temperature, top_k), dim=-1)
        # Pad cells hold the pad id V, outside the codebook: read any code there, the value is masked out.
        targets = targets.clamp(max=log_dist.shape[-1] - 1)
        logprobs = codebooks.gather_logprobs(log_dist, targets).masked_fill(~valid, 0.0)
        entropy = codebooks.entropy(log_dist).masked_fill(~valid, 0.0) if with_entropy else None
        kl, kl_log_dist = None, log_dist
        if ref_log_dist is not None:
            # The KL compares the distributions before any top-k cut (see MusicPPOConfig.kl_estimator).
            if top_k:
                kl_log_dist = torch.log_softmax(codebooks.sampling_logits(cond, uncond, scale, temperature), dim=-1)
            if kl_estimator == "full":
                kl = codebooks.full_kl(kl_log_dist, ref_log_dist)
            else:
                log_ratio = codebooks.gather_logprobs(ref_log_dist, targets) - codebooks.gather_logprobs(
                    kl_log_dist, targets
                )
                kl = -log_ratio if kl_estimator == "k1" else log_ratio.exp() - 1 - log_ratio
            kl = kl.masked_fill(~valid, 0.0)
        ctx.settings = (scale, temperature, top_k, kl_estimator, uncond is not None, cond.dtype)
        ctx.kl_in_graph = kl is not None and differentiate_kl
        saved = [log_dist, targets, valid]
        if ctx.kl_in_graph:
            saved += [kl_log_dist if top_k else None, ref_log_dist, kl]
        ctx.save_for_backward(*saved)
        for output in (entropy, None if ctx.kl_in_graph else kl):
            if output is not None:
                ctx.mark_non_differentiable(output)
        return logprobs, kl, entropy

    @staticmethod
    def backward(ctx, grad_logprobs, grad_kl, grad_entropy):
        scale, temperature, top_k, kl_estimator, guided, dtype = ctx.settings
        saved = ctx.saved_tensors  # read once: under checkpoint every read unpacks (recomputes) again
        log_dist, targets, valid = saved[:3]
        onehot = torch.zeros_like(log_dist).scatter_(-1, targets.unsqueeze(-1), 1.0)
        grad_logprobs = grad_logprobs.masked_fill(~valid, 0.0).unsqueeze(-1)
        # onehot - p is 0 at top-k-cut cells (p = 0 there, and a drawn code is never cut).
        grad = grad_logprobs * (onehot - log_dist.exp())
        if ctx.kl_in_graph and grad_kl is not None:
            kl_log_dist, ref_log_dist, kl = saved[3:]
            if kl_log_dist is None:
                kl_log_dist = log_dist
            kl_probs = kl_log_dist.exp()
            if kl_estimator == "full":
                # Where p' = 0 the term is 0 (as in full_kl, which masks the log-ratio there).
                log_ratio_excess = kl_log_dist - ref_log_dist - kl.unsqueeze(-1)
                grad_kl_dist = torch.where(kl_probs > 0, kl_probs * log_ratio_excess, 0.0)
            else:
                grad_kl_dist = onehot - kl_probs
                if kl_estimator == "k3":
                    log_ratio = codebooks.gather_logprobs(ref_log_dist, targets) - codebooks.gather_logprobs(
                        kl_log_dist, targets
                    )
                    grad_kl_dist = grad_kl_dist * (1 - log_ratio.exp()).unsqueeze(-1)
            grad = grad + grad_kl.masked_fill(~valid, 0.0).unsqueeze(-1) * grad_kl_dist
        if temperature is not None and temperature != 1.0:
            grad = grad / temperature
        if guided and scale is not None and scale > 1:
            return (grad * scale).to(dtype), (grad * (1 - scale)).to(dtype), *([None] * 7)
        return grad.to(dtype), None, *([None] * 7)


def _chunk_statistics(
    hidden: torch.Tensor,
    uncond_hidden: torch.Tensor | None,
    head_weights: torch.Tensor | None,
    ref_hidden: torch.Tensor | None,
    ref_uncond_hidden: torch.Tensor | None,
    ref_head_weights: torch.Tensor | None,
    targets: torch.Tensor,
    valid: torch.Tensor,
    *,
    states: DecoderStates,
    ref_states: DecoderStates | None,
    sampling,
    kl_estimator: str,
    differentiate_kl: bool,
    with_entropy: bool,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """The numbers of one chunk of n decoder steps: [B, n, K] each (``targets`` and ``valid`` in that layout too). A
    pure function of its tensor arguments (as ``checkpoint`` needs to recompute it)."""
    cond, uncond = states.step_logits(hidden, uncond_hidden, head_weights)
    ref_log_dist = None
    if ref_states is not None:
        with torch.no_grad():  # the reference's distribution before any top-k cut, in the current autocast
            ref_cond, ref_uncond = ref_states.step_logits(ref_hidden, ref_uncond_hidden, ref_head_weights)
            ref_log_dist = codebooks.sampling_logprobs(
                ref_cond, ref_uncond, sampling.guidance_scale, sampling.temperature
            ).to(cond.device)
    # The entropy is a detached statistic: a checkpointed chunk's recomputation (for its backward) skips it.
    with_entropy = with_entropy and not _Recomputing.active
    return _CodeStatistics.apply(
        cond, uncond, ref_log_dist, targets, valid, sampling, kl_estimator, differentiate_kl, with_entropy
    )


class _Recomputing:
    """``active`` while ``checkpoint`` recomputes a chunk for its backward (its ``context_fn``'s second context; one
    process-wide flag: chunks are recomputed one at a time by autograd's engine on the backward's thread)."""

    active = False

    def __enter__(self):
        type(self).active = True

    def __exit__(self, *exc):
        type(self).active = False



def _checkpoint_contexts():
    return contextlib.nullcontext(), _Recomputing()


def step_statistics(
    states: DecoderStates,
    grid: torch.Tensor,
    sampling,
    ref_states: DecoderStates | None = None,
    kl_estimator: str = "full",
    differentiate_kl: bool = True,
    with_entropy: bool = False,
    chunk_size: int | None = None,
    audio_channels: int = 1,
) -> StepStatistics:
    """Log-probs of the codes in ``grid`` [B, K, S] under ``states``' sampling distribution (``sampling``, a
    :class:`~musicrl_trl.rollout.SamplingConfig`), and with ``ref_states`` the KL to that reference per code.

    Args:
        states: the model's decoder states over ``grid`` (:func:`decoder_states`, with ``guided`` as ``sampling``).
        ref_states: the reference's decoder states over the same grid, or None (no KL). Its distribution is read
            under ``no_grad``, in the current autocast, through the same guidance and temperature but no top-k.
        kl_estimator: ``"full"``, the exact KL over the whole codebook (MusicRL's); ``"k1"`` / ``"k3"``, TRL's
            one-sample estimates at the drawn code.
        differentiate_kl: False computes the KL under ``no_grad`` (a KL that only shapes rewards needs no graph).
        with_entropy: also return the sampling entropy per code (detached).
        chunk_size: decoder steps per chunk; ``None`` computes the whole clip at once (every [B, K, A, V] tensor
            materialised, and kept for the backward under autograd). With a chunk size, no tensor larger than
            [B, K, chunk_size, V] exists at a time, forward or backward.
    """
    if kl_estimator not in KL_ESTIMATORS:
        raise ValueError(f"kl_estimator must be one of {KL_ESTIMATORS}, got {kl_estimator!r}.")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive number of decoder steps or None, got {chunk_size}.")
    if (states.uncond_hidden is not None) != sampling.guided:
        raise ValueError("decoder states computed with guided != sampling.guided: pass guided=sampling.guided.")
    num_codebooks, length = grid.shape[1:]
    steps = length - 1
    # Computed in the layout the heads produce, [B, steps, K, V]; the results go back to [B, K, steps] at the end.
    targets = grid[:, :, 1:].transpose(1, 2)  # step j predicts column j + 1
    valid = codebooks.code_mask(num_codebooks, length, audio_channels, grid.device)[None, :, 1:].transpose(1, 2)
    options = dict(
        states=states, ref_states=ref_states, sampling=sampling, kl_estimator=kl_estimator,
        differentiate_kl=differentiate_kl, with_entropy=with_entropy,
    )
    size = steps if chunk_size is None else chunk_size
    # One split per tensor (not one slice per chunk): its backward assembles the chunks' gradients in one copy.
    head_weights = states.stacked_head_weights()
    ref_head_weights = None
    if ref_states is not None:
        with torch.no_grad():
            ref_head_weights = ref_states.stacked_head_weights()

    def split(tensor):
        return [None] * len(range(0, steps, size)) if tensor is None else tensor.split(size, dim=1)

    columns = zip(
        split(states.hidden), split(states.uncond_hidden),
        split(None if ref_states is None else ref_states.hidden),
        split(None if ref_states is None else ref_states.uncond_hidden),
        targets.split(size, dim=1), valid.split(size, dim=1),
    )
    # Checkpoint only chunked, and only when something will be differentiated (without autograd a chunk keeps
    # nothing anyway).
    checkpointed = chunk_size is not None and torch.is_grad_enabled() and states.hidden.requires_grad
    parts = []
    for hidden, uncond_hidden, ref_hidden, ref_uncond_hidden, chunk_targets, chunk_valid in columns:
        args = (
            hidden, uncond_hidden, head_weights, ref_hidden, ref_uncond_hidden, ref_head_weights, chunk_targets,
            chunk_valid,
        )
        if checkpointed:
            parts.append(
                checkpoint(
                    _chunk_statistics, *args, use_reentrant=False, preserve_rng_state=False,
                    context_fn=_checkpoint_contexts, **options,
                )
            )
        else:
            parts.append(_chunk_statistics(*args, **options))
    logprobs, kl, entropy = (
        None if part[0] is None else torch.cat(part, dim=1).transpose(1, 2) for part in zip(*parts)
    )
    return StepStatistics(logprobs=logprobs, kl=kl, entropy=entropy)
