"""Rollouts: the recorded grid, codes, audio and log-probs are exactly what MusicGen's generate sampled."""

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import StoppingCriteria, StoppingCriteriaList

from musicrl_trl import codebooks
from musicrl_trl.rollout import SamplingConfig, generate_rollout, resolve_num_steps, teacher_forced_logprobs
from musicrl_trl.testing import tiny_musicgen

PROMPTS = ["bright shimmering bells", "deep dark bass drone with a slow pulse"]
SETTINGS = [
    SamplingConfig(guidance_scale=1.0, temperature=0.99, top_k=0),
    SamplingConfig(guidance_scale=3.0, temperature=0.99, top_k=0),
    SamplingConfig(guidance_scale=1.0, temperature=1.3, top_k=250),
    SamplingConfig(guidance_scale=3.0, temperature=0.7, top_k=250),
]


@pytest.fixture(scope="module")
def mono():
    return tiny_musicgen(num_codebooks=4, audio_channels=1, seed=0)


@pytest.fixture(scope="module")
def stereo():
    return tiny_musicgen(num_codebooks=8, audio_channels=2, seed=1)


@pytest.mark.parametrize("sampling", SETTINGS, ids=str)
@pytest.mark.parametrize("layout", ["mono", "stereo"])
def test_teacher_forced_logprobs_equal_sampled_logprobs(layout, sampling, request):
    model, processor = request.getfixturevalue(layout)
    channels = model.decoder.config.audio_channels
    torch.manual_seed(0)
    rollout = generate_rollout(model, processor, PROMPTS, num_steps=24, sampling=sampling, backend="generate")
    with torch.no_grad():
        recomputed = teacher_forced_logprobs(
            model, rollout.prompt_ids, rollout.prompt_mask, rollout.grid, sampling, channels
        )
    frames = 24 - codebooks.max_delay(model.decoder.num_codebooks, channels)
    assert recomputed.shape == rollout.codes.shape == (2, model.decoder.num_codebooks, frames)
    assert (recomputed - rollout.logprobs).abs().max() < 1e-5
    assert torch.isfinite(rollout.logprobs).all() and (rollout.logprobs <= 0).all()
    assert rollout.entropies.shape == (2, model.decoder.num_codebooks)
    if sampling.top_k:
        assert (rollout.entropies <= torch.log(torch.tensor(float(sampling.top_k))) + 1e-4).all()


class _KeepIds(StoppingCriteria):
    def __call__(self, input_ids, scores, **kwargs):
        self.input_ids = input_ids
        return torch.zeros(input_ids.shape[0], dtype=torch.bool)


@pytest.mark.parametrize("layout", ["mono", "stereo"])
def test_rollout_records_what_plain_generate_samples(layout, request):
    """Same seed, same samples: our records equal generate's own processed scores, codes and audio."""
    model, processor = request.getfixturevalue(layout)
    sampling = SamplingConfig(guidance_scale=3.0, temperature=0.99, top_k=250)
    torch.manual_seed(123)
    rollout = generate_rollout(model, processor, PROMPTS, num_steps=16, sampling=sampling, backend="generate")

    keep = _KeepIds()
    torch.manual_seed(123)
    out = model.generate(
        input_ids=rollout.prompt_ids, attention_mask=rollout.prompt_mask, do_sample=True, max_new_tokens=16,
        guidance_scale=3.0, temperature=0.99, top_k=250, return_dict_in_generate=True, output_scores=True,
        stopping_criteria=StoppingCriteriaList([keep]),
    )
    torch.testing.assert_close(rollout.audio, out.sequences, rtol=0, atol=0)
    batch, codebooks_count, grid_length = rollout.grid.shape
    raw = keep.input_ids[:, :grid_length].reshape(batch, codebooks_count, grid_length)
    channels = rollout.audio_channels
    assert torch.equal(codebooks.grid_to_codes(raw, channels), rollout.codes)
    # log-prob of each sampled token under generate's own processed scores
    scores = torch.stack(out.scores[:16], dim=1).reshape(batch, codebooks_count, 16, -1)
    generate_logprobs = codebooks.gather_logprobs(
        torch.log_softmax(codebooks.steps_to_codes(scores, channels), -1), rollout.codes
    )
    assert (generate_logprobs - rollout.logprobs).abs().max() < 1e-5
    # the codes are the audio: decoding them again gives the rollout's waveform
    musicgen_codes = rollout.codes[None]
    if channels == 1:
        decoded = model.audio_encoder.decode(musicgen_codes, [None]).audio_values
    else:
        left = model.audio_encoder.decode(musicgen_codes[:, :, ::2], [None]).audio_values
        right = model.audio_encoder.decode(musicgen_codes[:, :, 1::2], [None]).audio_values
        decoded = torch.cat([left, right], dim=1)
    torch.testing.assert_close(decoded, rollout.audio, atol=1e-5, rtol=0)
    assert rollout.sampling_rate == 32000
    assert rollout.audio.shape == (2, channels, rollout.codes.shape[-1] * 640)


def test_rollout_length_in_seconds_and_step_logprobs(mono):
    model, processor = mono
    rollout = generate_rollout(model, processor, PROMPTS[:1], duration_s=0.5)
    assert rollout.codes.shape[-1] == 25  # 50 Hz
    assert rollout.audio.shape[-1] == 25 * 640
    assert rollout.num_steps == 25 + 3
    torch.testing.assert_close(rollout.step_logprobs().sum(-1), rollout.logprobs.sum((1, 2)))


def test_lora_policy_rollout_matches_teacher_forcing(mono):
    model, processor = tiny_musicgen(seed=3)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"])
    policy = get_peft_model(model, lora)
    for name, param in policy.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.5)  # make the adapter matter
    sampling = SamplingConfig(guidance_scale=3.0, temperature=0.99)
    rollout = generate_rollout(policy, processor, PROMPTS, num_steps=12, sampling=sampling)
    with torch.no_grad():
        adapted = teacher_forced_logprobs(policy, rollout.prompt_ids, rollout.prompt_mask, rollout.grid, sampling)
        with policy.disable_adapter():
            base = teacher_forced_logprobs(policy, rollout.prompt_ids, rollout.prompt_mask, rollout.grid, sampling)
    assert (adapted - rollout.logprobs).abs().max() < 1e-5
    assert (base - rollout.logprobs).abs().max() > 1e-2


def test_bad_lengths_and_prompts_are_rejected(mono):
    model, processor = mono
    with pytest.raises(ValueError, match="too short"):
        generate_rollout(model, processor, PROMPTS, num_steps=5)
    with pytest.raises(ValueError, match="too short"):
        resolve_num_steps(tiny_musicgen(num_codebooks=8, audio_channels=2)[0], num_steps=5)
    with pytest.raises(ValueError, match="either"):
        resolve_num_steps(model)
    with pytest.raises(ValueError, match="exceeds"):
        resolve_num_steps(model, num_steps=5000)
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        generate_rollout(model, processor, ["ok", "   "], num_steps=8)
    with pytest.raises(ValueError, match="non-empty list"):
        generate_rollout(model, processor, [], num_steps=8)
    with pytest.raises(ValueError, match="max_prompt_length=16"):
        generate_rollout(model, processor, ["x" * 40], num_steps=8, max_prompt_length=16)
    with pytest.raises(ValueError, match="guidance_scale"):
        SamplingConfig(guidance_scale=0.5)
