"""codebooks.py against slow, obviously correct loops, and against MusicGen's own delay-pattern code."""

import pytest
import torch
from transformers import MusicgenDecoderConfig, MusicgenForCausalLM

from musicrl_trl import codebooks

PAD = 2048
LAYOUTS = [(1, 1), (2, 1), (4, 1), (8, 1), (4, 2), (8, 2)]  # (K, audio_channels)


def reference_grid(codes, pad, audio_channels):
    batch, codebooks_, frames = codes.shape
    delays = [k // audio_channels for k in range(codebooks_)]
    grid = torch.full((batch, codebooks_, frames + max(delays) + 1), pad, dtype=codes.dtype)
    for b in range(batch):
        for k in range(codebooks_):
            for t in range(frames):
                grid[b, k, 1 + delays[k] + t] = codes[b, k, t]
    return grid


@pytest.mark.parametrize("num_codebooks,audio_channels", LAYOUTS)
@pytest.mark.parametrize("frames", [1, 2, 7, 20])
def test_grid_round_trip_matches_reference_loop(num_codebooks, audio_channels, frames):
    codes = torch.randint(0, PAD, (3, num_codebooks, frames), generator=torch.Generator().manual_seed(frames))
    grid = codebooks.codes_to_grid(codes, PAD, audio_channels)
    assert torch.equal(grid, reference_grid(codes, PAD, audio_channels))
    assert torch.equal(codebooks.grid_to_codes(grid, audio_channels), codes)
    mask = codebooks.code_mask(num_codebooks, grid.shape[-1], audio_channels)
    assert torch.equal(mask, reference_grid(torch.zeros_like(codes), 1, audio_channels)[0] == 0)
    assert mask.sum() == num_codebooks * frames


@pytest.mark.parametrize("num_codebooks,audio_channels", [(1, 1), (2, 1), (4, 1), (8, 1), (8, 2)])
@pytest.mark.parametrize("new_tokens", [14, 30])
def test_code_mask_matches_musicgen_build_delay_pattern_mask(num_codebooks, audio_channels, new_tokens):
    config = MusicgenDecoderConfig(
        vocab_size=PAD, hidden_size=8, ffn_dim=8, num_hidden_layers=1, num_attention_heads=1,
        num_codebooks=num_codebooks, audio_channels=audio_channels,
    )
    decoder = MusicgenForCausalLM(config)
    start = torch.full((num_codebooks, 1), PAD)
    _, pattern = decoder.build_delay_pattern_mask(start, pad_token_id=PAD, max_length=1 + new_tokens)
    # MusicGen marks positions to be sampled with -1; the start column is the given prompt.
    sampled = pattern.view(num_codebooks, -1) == -1
    mask = codebooks.code_mask(num_codebooks, 1 + new_tokens, audio_channels)
    assert torch.equal(mask, sampled)


@pytest.mark.parametrize("num_codebooks,audio_channels", LAYOUTS)
def test_steps_and_codes_layouts_match_reference_loops(num_codebooks, audio_channels):
    batch, frames, vocab = 2, 6, 5
    delays = codebooks.codebook_delays(num_codebooks, audio_channels)
    steps = frames + max(delays)
    step_values = torch.randn(batch, num_codebooks, steps, vocab)
    per_code = codebooks.steps_to_codes(step_values, audio_channels)
    code_values = torch.randn(batch, num_codebooks, frames)
    per_step = codebooks.codes_to_steps(code_values, audio_channels)
    expected_code = torch.empty(batch, num_codebooks, frames, vocab)
    expected_step = torch.zeros(batch, steps)
    for b in range(batch):
        for k in range(num_codebooks):
            for t in range(frames):
                expected_code[b, k, t] = step_values[b, k, delays[k] + t]  # code (k, t) is sampled at step d_k + t
                expected_step[b, delays[k] + t] += code_values[b, k, t]
    assert torch.equal(per_code, expected_code)
    torch.testing.assert_close(per_step, expected_step)


def reference_sampling_logprobs(cond, uncond, scale, temperature, top_k):
    out = torch.empty_like(cond)
    for i in range(cond.shape[0]):
        logits = [uncond[i, v] + (cond[i, v] - uncond[i, v]) * scale if scale > 1 else cond[i, v]
                  for v in range(cond.shape[1])]
        logits = torch.stack(logits) / temperature
        if top_k:
            threshold = sorted(logits.tolist(), reverse=True)[top_k - 1]
            logits = torch.tensor([x if x >= threshold else float("-inf") for x in logits.tolist()])
        finite = logits[torch.isfinite(logits)]
        log_normaliser = torch.log(torch.exp(finite - finite.max()).sum()) + finite.max()
        out[i] = logits - log_normaliser
    return out


@pytest.mark.parametrize("scale,temperature,top_k", [(1.0, 1.0, 0), (3.0, 0.7, 0), (3.0, 1.3, 4), (1.0, 0.99, 7)])
def test_sampling_logprobs_matches_reference(scale, temperature, top_k):
    generator = torch.Generator().manual_seed(0)
    cond, uncond = torch.randn(6, 11, generator=generator), torch.randn(6, 11, generator=generator)
    logprobs = codebooks.sampling_logprobs(cond, uncond, scale, temperature, top_k)
    expected = reference_sampling_logprobs(cond, uncond, scale, temperature, top_k)
    assert torch.equal(torch.isinf(logprobs), torch.isinf(expected))
    finite = torch.isfinite(expected)
    torch.testing.assert_close(logprobs[finite], expected[finite])
    if top_k:
        assert (torch.isfinite(logprobs).sum(-1) == top_k).all()


def test_sampling_logprobs_matches_generate_processors():
    from transformers.generation.logits_process import (
        ClassifierFreeGuidanceLogitsProcessor,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
    )

    logits = torch.randn(8, 2048)
    processed = ClassifierFreeGuidanceLogitsProcessor(3.0)(torch.zeros(4, 1, dtype=torch.long), logits)
    processed = TopKLogitsWarper(250)(None, TemperatureLogitsWarper(0.99)(None, processed))
    expected = torch.log_softmax(processed, dim=-1)
    ours = codebooks.sampling_logprobs(logits[:4], logits[4:], 3.0, 0.99, 250)
    assert torch.equal(ours, expected)


def test_entropy_and_full_kl_match_reference():
    p_logits, q_logits = torch.randn(5, 9), torch.randn(5, 9)
    logp, logq = torch.log_softmax(p_logits, -1), torch.log_softmax(q_logits, -1)
    for i in range(5):
        p = logp[i].exp().tolist()
        kl = sum(p[v] * (logp[i, v].item() - logq[i, v].item()) for v in range(9))
        ent = -sum(p[v] * logp[i, v].item() for v in range(9))
        assert codebooks.full_kl(logp, logq)[i].item() == pytest.approx(kl, abs=1e-5)
        assert codebooks.entropy(logp)[i].item() == pytest.approx(ent, abs=1e-5)
    assert torch.all(codebooks.full_kl(logp, logp) == 0)
    top2 = codebooks.sampling_logprobs(p_logits, top_k=2)
    assert torch.isfinite(codebooks.entropy(top2)).all()
    assert torch.isfinite(codebooks.full_kl(top2, logq)).all()
    assert torch.isinf(codebooks.full_kl(logq, top2)).all()


def test_too_short_grids_and_odd_stereo_are_rejected():
    with pytest.raises(ValueError, match="no complete frame"):
        codebooks.num_frames(4, num_codebooks=4)
    with pytest.raises(ValueError, match="even"):
        codebooks.codebook_delays(3, audio_channels=2)
    assert codebooks.min_decoder_steps(4) == 6
    assert codebooks.min_decoder_steps(8, audio_channels=2) == 6
    assert codebooks.min_decoder_steps(1) == 1
