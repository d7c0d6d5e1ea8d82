"""MusicGen's codebook delay pattern, and log-probabilities of sampled codes. Pure tensor math.

This is the one module that knows how K parallel codebooks are laid out in the decoder's sequence. Everything else
(rollouts, the PPO trainer, token-space reward models) goes through it.

Shape letters: B batch, K codebooks, T frames (codes per codebook), D = max delay, S = T + D + 1 grid length,
V codebook size (2048 for MusicGen), H hidden size.

The layout
----------
MusicGen predicts the K codebooks of one audio frame with a delay: codebook k is sampled ``d_k`` decoder steps after
codebook 0. For mono models ``d_k = k``; stereo models interleave left/right codebooks (k = 0 L, 1 R, 2 L, ...) and
both channels of codebook pair ``c`` share the delay ``d_k = k // 2``. The decoder's sequence (the *grid*) starts
with one column of start tokens ``P`` (= pad = V), and code ``codes[:, k, t]`` sits at column ``1 + d_k + t``. The
remaining cells hold ``P``. For K = 4, T = 5 (D = 3, S = 9)::

    column     0   1   2   3   4   5   6   7   8
    k = 0      P  a0  a1  a2  a3  a4   P   P   P
    k = 1      P   P  b0  b1  b2  b3  b4   P   P
    k = 2      P   P   P  c0  c1  c2  c3  c4   P
    k = 3      P   P   P   P  d0  d1  d2  d3  d4

A decoder forward over columns ``0 .. S-2`` returns logits at *steps* ``j = 0 .. S-2``; step ``j`` predicts column
``j + 1`` of every codebook, so code ``(k, t)`` is sampled at step ``d_k + t``. ``generate`` runs S - 1 = T + D steps
("max_new_tokens"). A step is the RL action: K tokens drawn together, some of them forced to ``P`` by the pattern.

Sampling transform
------------------
``generate`` turns the decoder logits into the distribution it samples from in this order (see
``transformers.generation.utils._get_logits_processor`` and ``MusicgenForConditionalGeneration.generate``):
classifier-free guidance ``uncond + s * (cond - uncond)``, then temperature, then top-k. :func:`sampling_logprobs`
applies the same operations in the same order, so teacher-forced log-probs match the sampled ones to float precision.
"""

from __future__ import annotations

import torch

__all__ = [
    "codebook_delays",
    "max_delay",
    "min_decoder_steps",
    "grid_length",
    "num_frames",
    "code_mask",
    "codes_to_grid",
    "grid_to_codes",
    "steps_to_codes",
    "codes_to_steps",
    "sampling_logits",
    "sampling_logprobs",
    "gather_logprobs",
    "entropy",
    "full_kl",
]


def codebook_delays(num_codebooks: int, audio_channels: int = 1) -> list[int]:
    """Delay d_k (in decoder steps) of every codebook: ``k`` for mono, ``k // 2`` for interleaved stereo.

    >>> codebook_delays(4), codebook_delays(8, audio_channels=2)
    ([0, 1, 2, 3], [0, 0, 1, 1, 2, 2, 3, 3])
    """
    if audio_channels not in (1, 2):
        raise ValueError(f"audio_channels must be 1 (mono) or 2 (stereo), got {audio_channels}.")
    if audio_channels == 2 and num_codebooks % 2:
        raise ValueError(f"stereo MusicGen interleaves codebooks: num_codebooks must be even, got {num_codebooks}.")
    return [k // audio_channels for k in range(num_codebooks)]


def max_delay(num_codebooks: int, audio_channels: int = 1) -> int:
    """D: the delay of the last codebook."""
    return codebook_delays(num_codebooks, audio_channels)[-1]


def min_decoder_steps(num_codebooks: int, audio_channels: int = 1) -> int:
    """Fewest decoder steps ``generate`` can run with the delay pattern intact.

    ``build_delay_pattern_mask`` silently skips the pattern when ``max_length < 2 K_c - 1`` (K_c codebooks per
    channel; ``max_length`` counts the start column), so fewer than ``2 K_c - 2`` new tokens give wrong lengths.
    At least one full frame (D + 1 steps) is needed as well.
    """
    channel_codebooks = max_delay(num_codebooks, audio_channels) + 1
    return max(2 * channel_codebooks - 2, channel_codebooks)


def grid_length(num_frames: int, num_codebooks: int, audio_channels: int = 1) -> int:
    """S = T + D + 1 (with the start column)."""
    return num_frames + max_delay(num_codebooks, audio_channels) + 1


def num_frames(grid_length: int, num_codebooks: int, audio_channels: int = 1) -> int:
    """T = S - D - 1."""
    frames = grid_length - max_delay(num_codebooks, audio_channels) - 1
    if frames < 1:
        raise ValueError(f"a grid of length {grid_length} holds no complete frame for {num_codebooks} codebooks")
    return frames


def _code_columns(num_codebooks: int, frames: int, audio_channels: int, device: torch.device | None) -> torch.Tensor:
    """Grid column of every code: [K, T] with entry 1 + d_k + t."""
    delays = torch.tensor(codebook_delays(num_codebooks, audio_channels), device=device)
    return 1 + delays[:, None] + torch.arange(frames, device=device)[None, :]


def code_mask(
    num_codebooks: int, grid_length: int, audio_channels: int = 1, device: torch.device | None = None
) -> torch.Tensor:
    """Bool [K, S]: True at the grid cells that hold a sampled code, False at start/pad cells.

    Drop the first column (``mask[:, 1:]``) to get the mask of sampled tokens per decoder step, [K, S - 1].
    """
    frames = num_frames(grid_length, num_codebooks, audio_channels)
    mask = torch.zeros(num_codebooks, grid_length, dtype=torch.bool, device=device)
    mask.scatter_(1, _code_columns(num_codebooks, frames, audio_channels, device), True)
    return mask


def codes_to_grid(codes: torch.Tensor, pad_token_id: int, audio_channels: int = 1) -> torch.Tensor:
    """Codes [B, K, T] -> grid [B, K, S] in the delayed layout, start column and pads filled with ``pad_token_id``."""
    batch, codebooks, frames = codes.shape
    grid = codes.new_full((batch, codebooks, grid_length(frames, codebooks, audio_channels)), pad_token_id)
    columns = _code_columns(codebooks, frames, audio_channels, codes.device)
    return grid.scatter_(2, columns.expand(batch, -1, -1), codes)


def grid_to_codes(grid: torch.Tensor, audio_channels: int = 1) -> torch.Tensor:
    """Grid [B, K, S, *] -> codes [B, K, T, *]: the inverse of :func:`codes_to_grid`.

    Trailing dimensions are carried along, so the same call extracts per-column values (for example logits
    already shifted to columns).
    """
    batch, codebooks, length = grid.shape[:3]
    frames = num_frames(length, codebooks, audio_channels)
    columns = _code_columns(codebooks, frames, audio_channels, grid.device)
    index = columns.view(1, codebooks, frames, *([1] * (grid.dim() - 3)))
    return grid.gather(2, index.expand(batch, codebooks, frames, *grid.shape[3:]))


def steps_to_codes(step_values: torch.Tensor, audio_channels: int = 1) -> torch.Tensor:
    """Per-step values [B, K, S - 1, *] (step j predicts column j + 1) -> per-code values [B, K, T, *].

    Use it on decoder logits from a teacher-forced forward over the grid's first S - 1 columns.
    """
    start_column = step_values[:, :, :1]
    return grid_to_codes(torch.cat([start_column, step_values], dim=2), audio_channels)


def codes_to_steps(code_values: torch.Tensor, audio_channels: int = 1) -> torch.Tensor:
    """Per-code values [B, K, T] -> per-step sums [B, S - 1]: the value of decoder step j is the sum over the codes
    sampled at that step (the step's action is the K tokens drawn together). Steps with no code get 0."""
    batch, codebooks, frames = code_values.shape
    steps = code_values.new_zeros(batch, codebooks, grid_length(frames, codebooks, audio_channels) - 1)
    columns = _code_columns(codebooks, frames, audio_channels, code_values.device) - 1
    return steps.scatter_(2, columns.expand(batch, -1, -1), code_values).sum(dim=1)


def sampling_logits(
    cond_logits: torch.Tensor,
    uncond_logits: torch.Tensor | None = None,
    guidance_scale: float = 1.0,
    temperature: float = 1.0,
    top_k: int = 0,
) -> torch.Tensor:
    """The scores [..., V] ``generate`` samples from (its ``softmax`` then ``multinomial``), from decoder logits.

    Applies, in ``generate``'s order: classifier-free guidance ``uncond + s * (cond - uncond)`` (only when
    ``guidance_scale > 1``, which is when ``generate`` runs the unconditional half), temperature, top-k (``0``
    keeps the whole codebook). Tokens removed by top-k get ``-inf``. At least float32, whatever the logits' dtype.
    """
    # At least float32 (half-precision logits are upcast as generate's processors see them); float64 stays float64.
    dtype = torch.promote_types(cond_logits.dtype, torch.float32)
    logits = cond_logits.to(dtype)
    if guidance_scale is not None and guidance_scale > 1:
        if uncond_logits is None:
            raise ValueError(f"guidance_scale={guidance_scale} needs the unconditional logits too.")
        uncond = uncond_logits.to(dtype)
        # Same expression as ClassifierFreeGuidanceLogitsProcessor, for bitwise-identical results.
        logits = uncond + (logits - uncond) * guidance_scale
    if temperature is not None and temperature != 1.0:
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}.")
        logits = logits / temperature
    if top_k:
        top_k = min(top_k, logits.shape[-1])
        # The k-th largest value, as TopKLogitsWarper takes it; unsorted top-k finds the same value faster.
        kth_value = torch.topk(logits, top_k, dim=-1, sorted=False).values.amin(dim=-1, keepdim=True)
        logits = logits.masked_fill(logits < kth_value, float("-inf"))
    return logits


def sampling_logprobs(
    cond_logits: torch.Tensor,
    uncond_logits: torch.Tensor | None = None,
    guidance_scale: float = 1.0,
    temperature: float = 1.0,
    top_k: int = 0,
) -> torch.Tensor:
    """Log-probabilities [..., V] of the distribution ``generate`` samples from, given decoder logits [..., V]:
    ``log_softmax`` of :func:`sampling_logits` (guidance, temperature, top-k in ``generate``'s order)."""
    return torch.log_softmax(sampling_logits(cond_logits, uncond_logits, guidance_scale, temperature, top_k), dim=-1)


def gather_logprobs(logprobs: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Log-probability [...] of ``tokens`` [...] under ``logprobs`` [..., V]."""
    return logprobs.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def entropy(logprobs: torch.Tensor) -> torch.Tensor:
    """Entropy [...] in nats of the distributions ``logprobs`` [..., V] (``-inf`` entries contribute 0)."""
    probs = logprobs.exp()
    return -torch.where(probs > 0, probs * logprobs, torch.zeros_like(logprobs)).sum(-1)


def full_kl(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """Exact KL(p || q) [...] summed over the whole codebook, from log-probabilities [..., V] of p and q.

    This is MusicRL's KL term: the expectation over all V codes, not a one-sample estimate. Codes outside p's
    support (top-k) contribute 0; a code in p's support that q gives probability 0 makes the KL infinite.
    """
    probs = logprobs.exp()
    # Mask the log-ratio, not the product: at codes outside p's support the ratio is -inf (or nan), and
    # 0 * inf in the product's backward would turn the gradient of the KL-in-the-loss into nan.
    log_ratio = torch.where(probs > 0, logprobs - ref_logprobs, torch.zeros_like(logprobs))
    return (probs * log_ratio).sum(-1)
