"""The static-cache sampler: what it records is what teacher forcing computes, and it samples generate's distribution.

Exactness tests run the tiny models in float64: the sampler and teacher forcing then agree to rounding of the final
float32 sampling transform, so any error in the cache, the attention, the guidance halves, the delay pattern or the
records shows up far above the 1e-5 bound. (In float32 both the sampler and ``generate`` differ from one
teacher-forced forward by a few 1e-6 in the logits, which guidance 3 at temperature 0.7 amplifies about 7x.)
"""

import math

import pytest
import torch
from peft import LoraConfig, get_peft_model
from scipy import stats
from transformers import MusicgenForConditionalGeneration

from musicrl_trl import codebooks
from musicrl_trl.rollout import (
    SamplingConfig,
    decoder_logits,
    generate_rollout,
    sampling_log_dist,
    teacher_forced_logprobs,
)
from musicrl_trl.sampler import _draw
from musicrl_trl.testing import tiny_musicgen, tiny_musicgen_config

PROMPTS = ["bright shimmering bells", "deep dark bass drone with a slow pulse"]
SETTINGS = [
    SamplingConfig(guidance_scale=1.0, temperature=0.99, top_k=0),
    SamplingConfig(guidance_scale=3.0, temperature=0.99, top_k=0),
    SamplingConfig(guidance_scale=1.0, temperature=1.3, top_k=250),
    SamplingConfig(guidance_scale=3.0, temperature=0.7, top_k=250),
]
LORA = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"])


@pytest.fixture(scope="module")
def mono():
    model, processor = tiny_musicgen(num_codebooks=4, audio_channels=1, seed=0)
    return model.double(), processor


@pytest.fixture(scope="module")
def stereo():
    model, processor = tiny_musicgen(num_codebooks=8, audio_channels=2, seed=1)
    return model.double(), processor


def lora_policy(seed=3):
    model, processor = tiny_musicgen(seed=seed)
    policy = get_peft_model(model.double(), LORA)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in policy.named_parameters():
            if "lora_B" in name:  # make the adapter matter
                param.copy_(torch.randn(param.shape, generator=generator, dtype=param.dtype) * 0.5)
    return policy, processor


def check_against_teacher_forcing(model, rollout, sampling):
    """Recorded log-probs and entropies equal one teacher-forced forward's; the grid is the codes' delayed layout."""
    channels = rollout.audio_channels
    with torch.no_grad():
        output = decoder_logits(model, rollout.prompt_ids, rollout.prompt_mask, rollout.grid, guided=sampling.guided)
    log_dist = sampling_log_dist(output, sampling, channels)
    recomputed = codebooks.gather_logprobs(log_dist, rollout.codes)
    assert recomputed.shape == rollout.logprobs.shape
    assert (recomputed - rollout.logprobs).abs().max() < 1e-5
    assert torch.isfinite(rollout.logprobs).all()
    entropies = codebooks.entropy(log_dist).mean(-1)
    assert (entropies - rollout.entropies).abs().max() < 1e-4
    pad = codebooks.codes_to_grid(rollout.codes, model.generation_config.pad_token_id, channels)
    assert torch.equal(pad, rollout.grid)
    if sampling.top_k:  # top-k is applied when sampling: every drawn code is among the k most likely
        assert (rollout.logprobs > -float("inf")).all()


@pytest.mark.parametrize("sampling", SETTINGS, ids=str)
@pytest.mark.parametrize("layout", ["mono", "stereo"])
def test_static_records_teacher_forced_logprobs(layout, sampling, request):
    model, processor = request.getfixturevalue(layout)
    torch.manual_seed(0)
    rollout = generate_rollout(model, processor, PROMPTS, num_steps=20, sampling=sampling, backend="static")
    frames = 20 - codebooks.max_delay(model.decoder.num_codebooks, model.decoder.config.audio_channels)
    assert rollout.codes.shape == (2, model.decoder.num_codebooks, frames)
    check_against_teacher_forcing(model, rollout, sampling)
    # the audio is the codec's decoding of the codes, as generate returns it
    assert rollout.audio.shape == (2, model.decoder.config.audio_channels, frames * 640)
    assert rollout.audio.abs().max() > 0


def test_static_with_lora_and_with_the_adapter_disabled():
    policy, processor = lora_policy()
    sampling = SamplingConfig(guidance_scale=3.0, temperature=0.99, top_k=250)
    torch.manual_seed(0)
    adapted = generate_rollout(policy, processor, PROMPTS, num_steps=12, sampling=sampling, backend="static")
    check_against_teacher_forcing(policy, adapted, sampling)
    with policy.disable_adapter():  # the LoRA policy's anchor: the base model, no second copy
        torch.manual_seed(0)
        anchor = generate_rollout(policy, processor, PROMPTS, num_steps=12, sampling=sampling, backend="static")
        check_against_teacher_forcing(policy, anchor, sampling)
    # the adapter was active in the first rollout and off in the second
    with torch.no_grad():
        adapted_under_base = teacher_forced_logprobs(
            policy.get_base_model(), anchor.prompt_ids, anchor.prompt_mask, anchor.grid, sampling
        )  # get_base_model() keeps the LoRA layers in place and active
        with policy.disable_adapter():
            base_of_adapted = teacher_forced_logprobs(
                policy, adapted.prompt_ids, adapted.prompt_mask, adapted.grid, sampling
            )
    assert (adapted_under_base - anchor.logprobs).abs().max() > 1e-2
    assert (base_of_adapted - adapted.logprobs).abs().max() > 1e-2


def test_sampler_restores_training_mode_and_rejects_unknown_backends(mono):
    model, processor = mono
    model.train()
    try:
        generate_rollout(model, processor, PROMPTS, num_steps=8, backend="static")
        assert model.training and model.decoder.model.decoder.layers[0].training
    finally:
        model.eval()
    with pytest.raises(ValueError, match="backend must be one of"):
        generate_rollout(model, processor, PROMPTS, num_steps=8, backend="vllm")


def test_compiled_backend_records_teacher_forced_logprobs_and_draws_like_static():
    """One compile: stereo, LoRA active, guidance 3, top-k 250 (each new shape or setting compiles again)."""
    model, processor = tiny_musicgen(num_codebooks=8, audio_channels=2, seed=1)
    policy = get_peft_model(model.double(), LORA)
    sampling = SamplingConfig(guidance_scale=3.0, temperature=0.7, top_k=250)
    rollouts = {}
    for backend in ("compiled", "compiled", "static"):  # the second compiled call reuses the graph and buffers
        torch.manual_seed(7)
        rollouts[backend] = generate_rollout(
            policy, processor, PROMPTS, num_steps=10, sampling=sampling, backend=backend
        )
    check_against_teacher_forcing(policy, rollouts["compiled"], sampling)
    # same uniforms, same probabilities up to rounding: the same codes
    assert torch.equal(rollouts["compiled"].grid, rollouts["static"].grid)
    assert (rollouts["compiled"].logprobs - rollouts["static"].logprobs).abs().max() < 1e-5


def test_draw_inverts_the_cumulative_distribution():
    """Uniforms on a fine grid land on each code in proportion to its probability; p = 0 is never drawn."""
    probs = torch.tensor([[0.1, 0.0, 0.6, 0.3], [0.0, 0.0, 1.0, 0.0], [0.25, 0.25, 0.25, 0.25]])
    n = 10_000
    uniform = ((torch.arange(n) + 0.5) / n).repeat_interleave(3).view(n * 3, 1)
    drawn = _draw(probs.repeat(n, 1), uniform).view(n, 3)
    for row in range(3):
        frequencies = torch.bincount(drawn[:, row], minlength=4).double() / n
        torch.testing.assert_close(frequencies, probs[row].double(), atol=2 / n, rtol=0)


def small_vocab_musicgen(vocab_size=8, seed=0):
    """A tiny MusicGen whose decoder draws from 8 codes with peaked, prompt-dependent distributions (LM heads
    scaled up), so that a few thousand samples resolve its distribution."""
    model, processor = tiny_musicgen(seed=seed)
    config = tiny_musicgen_config()
    config.decoder.update(
        dict(
            vocab_size=vocab_size, pad_token_id=vocab_size, bos_token_id=vocab_size, decoder_start_token_id=vocab_size
        )
    )
    torch.manual_seed(seed)
    small = MusicgenForConditionalGeneration(config).eval()
    small.text_encoder.load_state_dict(model.text_encoder.state_dict())
    small.audio_encoder.load_state_dict(model.audio_encoder.state_dict())
    with torch.no_grad():
        for head in small.decoder.lm_heads:
            head.weight.normal_(0, 0.6)
    small.generation_config = model.generation_config
    small.generation_config.update(pad_token_id=vocab_size, bos_token_id=vocab_size, decoder_start_token_id=vocab_size)
    return small, processor


def test_samples_follow_generates_distribution():
    """Two-sample chi-square tests between the static sampler and model.generate on the joint law of the first
    codes (which covers the conditioning on earlier steps), and a goodness-of-fit test of the first code against the
    exact probabilities. The same test tells a sampler at another temperature apart."""
    model, processor = small_vocab_musicgen()
    sampling = SamplingConfig(guidance_scale=3.0, temperature=0.8, top_k=5)
    prompts = ["calm piano"] * 2000
    draws = {}
    for backend, temperature in (("generate", 0.8), ("static", 0.8), ("static_hot", 1.6)):
        torch.manual_seed(11)
        setting = SamplingConfig(sampling.guidance_scale, temperature, sampling.top_k)
        rollout = generate_rollout(
            model, processor, prompts, num_steps=6, sampling=setting, backend=backend.removesuffix("_hot")
        )
        codes = rollout.codes  # [N, 4, 3]
        draws[backend] = (codes[:, 0, 0] * 64 + codes[:, 0, 1] * 8 + codes[:, 1, 0], codes[:, 0, 0])

    def two_sample_pvalue(a, b):
        counts = torch.stack([torch.bincount(a, minlength=512), torch.bincount(b, minlength=512)])
        counts = counts[:, counts.sum(0) > 0].numpy()
        return stats.chi2_contingency(counts).pvalue

    assert two_sample_pvalue(draws["generate"][0], draws["static"][0]) > 1e-3
    assert two_sample_pvalue(draws["generate"][0], draws["static_hot"][0]) < 1e-6  # the test has power

    # the first code of codebook 0 against its exact sampling probabilities
    ids, mask = rollout.prompt_ids[:1], rollout.prompt_mask[:1]
    grid = torch.full((1, 4, 7), model.generation_config.pad_token_id)
    with torch.no_grad():
        output = decoder_logits(model, ids, mask, grid, guided=True)
    log_dist = codebooks.sampling_logprobs(output.logits[0, 0, 0], output.uncond_logits[0, 0, 0], 3.0, 0.8, 5)
    expected = log_dist.exp().double() * len(prompts)
    observed = torch.bincount(draws["static"][1], minlength=8).double()
    support = expected > 0
    assert observed[~support].sum() == 0  # top-k: nothing outside the 5 most likely codes
    chi2 = ((observed[support] - expected[support]) ** 2 / expected[support]).sum().item()
    assert stats.chi2.sf(chi2, df=int(support.sum()) - 1) > 1e-3
    assert not math.isnan(chi2)


def loudness(prompts, audio, sampling_rate, codes, **kwargs):
    return audio.pow(2).mean((1, 2)).sqrt()


@pytest.mark.parametrize("guidance_scale", [1.0, 3.0])
def test_training_run_on_the_static_backend_is_on_policy(tmp_path, guidance_scale):
    """A whole short MusicPPOTrainer run with rollouts from the static sampler (LoRA policy, the adapter-disabled
    anchor): every update starts on-policy (ratio 1), the KL starts at 0 and grows, and every adapter trains."""
    from datasets import Dataset

    from musicrl_trl.trainers import MusicPPOConfig, MusicPPOTrainer

    model, processor = tiny_musicgen()
    args = MusicPPOConfig(
        output_dir=str(tmp_path / "run"),
        per_device_train_batch_size=4,
        total_episodes=12,
        response_length=10,
        learning_rate=1e-3,
        report_to=[],
        disable_tqdm=True,
        seed=0,
        guidance_scale=guidance_scale,
        # Not top-k: once the policy moves, its top k holds codes outside the anchor's and the exact KL of the
        # current trainer is infinite from the second update on, with the "generate" backend just the same.
        top_k=0,
        rollout_backend="static",
    )
    prompts = ["bright shimmering bells", "deep dark bass", "happy upbeat tune", "slow sad piano"]
    trainer = MusicPPOTrainer(
        args,
        processor,
        model,
        reward_model=loudness,
        train_dataset=Dataset.from_dict({"prompt": prompts * 2}),
        peft_config=LORA,
    )
    policy = trainer.accelerator.unwrap_model(trainer.model).policy
    before = {name: p.detach().clone() for name, p in policy.named_parameters() if p.requires_grad}
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "objective/kl" in entry]
    assert len(logs) == 3
    for entry in logs:
        assert entry["policy/first_ratio_max_error"] < 1e-4
        assert abs(entry["val/ratio"] - 1) < 1e-4
    assert abs(logs[0]["objective/kl"]) < 1e-6 and logs[-1]["objective/kl"] > 0
    unchanged = [name for name, p in policy.named_parameters() if name in before and torch.equal(p, before[name])]
    assert not unchanged and all("lora_" in name for name in before)


def test_static_with_a_projected_text_encoder():
    """Text encoder and decoder of different widths (as in every released MusicGen: T5 768 -> 1024): the encoder
    states go through enc_to_dec_proj, whose bias must not leak into the null condition."""
    tiny, processor = tiny_musicgen()
    config = tiny_musicgen_config()
    config.decoder.update(dict(hidden_size=48, ffn_dim=96, num_attention_heads=3))
    torch.manual_seed(0)
    model = MusicgenForConditionalGeneration(config).eval().double()
    model.generation_config = tiny.generation_config
    with torch.no_grad():
        model.enc_to_dec_proj.bias.normal_(0, 1.0)
    assert model.text_encoder.config.hidden_size != model.decoder.config.hidden_size
    sampling = SamplingConfig(guidance_scale=3.0, temperature=0.99, top_k=250)
    torch.manual_seed(0)
    rollout = generate_rollout(model, processor, PROMPTS, num_steps=10, sampling=sampling, backend="static")
    check_against_teacher_forcing(model, rollout, sampling)
