"""Chunked teacher forcing (musicrl_trl.teacher_forcing) against the plain autograd computation it replaces:
decoder_logits over the whole clip, the sampling transform on [B, K, T, V], the exact KL with the anchor's whole
distribution. Log-probs, KL (full, k1, k3), entropy and their gradients agree for every chunk size, with guidance,
temperature, top-k and stereo; the chunked update keeps no tensor of the clip's full code distributions."""

import copy
import dataclasses

import pytest
import torch

from musicrl_trl import codebooks
from musicrl_trl.rollout import SamplingConfig, decoder_logits, generate_rollout, sampling_log_dist
from musicrl_trl.teacher_forcing import decoder_states, step_statistics
from musicrl_trl.testing import tiny_musicgen
from musicrl_trl.trainers.value_model import MusicPolicyAndValue

PROMPTS = ["bright shimmering bells", "deep dark bass"]


@pytest.fixture(scope="module")
def models():
    """Mono and stereo policies in float64, a little away from their anchors (so that KL and gradients are not 0),
    with one batch of clips sampled from each policy."""
    built = {}
    for layout, (num_codebooks, channels) in {"mono": (4, 1), "stereo": (8, 2)}.items():
        anchor, processor = tiny_musicgen(num_codebooks=num_codebooks, audio_channels=channels, seed=1)
        policy = copy.deepcopy(anchor)
        torch.manual_seed(0)
        with torch.no_grad():
            for head in policy.decoder.lm_heads:
                head.weight.add_(0.05 * torch.randn_like(head.weight))
            fc1 = policy.decoder.model.decoder.layers[0].fc1.weight
            fc1.add_(0.05 * torch.randn_like(fc1))
        # Sampled from the policy with top-k 40: every code is inside the top k of the distributions under test.
        rollout = generate_rollout(policy, processor, PROMPTS, num_steps=11, sampling=SamplingConfig(3.0, 0.9, 40))
        built[layout] = (policy.double().eval(), anchor.double().requires_grad_(False), rollout, channels)
    return built


def reference_statistics(policy, anchor, rollout, sampling, kl_estimator, channels):
    """Per-code log-probs, KL and entropy [B, K, T] the way MusicPPOTrainer computed them before chunking."""
    args = (rollout.prompt_ids, rollout.prompt_mask, rollout.grid, sampling.guided)
    output = decoder_logits(policy, *args)
    log_dist = sampling_log_dist(output, sampling, channels)
    codes = codebooks.grid_to_codes(rollout.grid, channels)
    logprobs = codebooks.gather_logprobs(log_dist, codes)
    kl_sampling = dataclasses.replace(sampling, top_k=0)
    kl_log_dist = sampling_log_dist(output, kl_sampling, channels)
    with torch.no_grad():
        ref_log_dist = sampling_log_dist(decoder_logits(anchor, *args), kl_sampling, channels)
    if kl_estimator == "full":
        kl = codebooks.full_kl(kl_log_dist, ref_log_dist)
    else:
        log_ratio = codebooks.gather_logprobs(ref_log_dist, codes) - codebooks.gather_logprobs(kl_log_dist, codes)
        kl = -log_ratio if kl_estimator == "k1" else log_ratio.exp() - 1 - log_ratio
    return logprobs, kl, codebooks.entropy(log_dist.detach())


def chunked_statistics(policy, anchor, rollout, sampling, kl_estimator, channels, chunk_size):
    args = (rollout.prompt_ids, rollout.prompt_mask, rollout.grid, sampling.guided)
    with torch.no_grad():
        ref_states = decoder_states(anchor, *args)
    statistics = step_statistics(
        decoder_states(policy, *args), rollout.grid, sampling, ref_states=ref_states, kl_estimator=kl_estimator,
        with_entropy=True, chunk_size=chunk_size, audio_channels=channels,
    )
    per_step = (statistics.logprobs, statistics.kl, statistics.entropy)
    return tuple(codebooks.steps_to_codes(x, channels) for x in per_step)


def gradients(policy, statistics, weights):
    params = [policy.decoder.lm_heads[1].weight, policy.decoder.model.decoder.layers[0].fc1.weight]
    loss = (weights[0] * statistics[0]).sum() + (weights[1] * statistics[1]).sum()
    return torch.autograd.grad(loss, params)


CASES = [
    # layout, guidance, temperature, top-k, KL estimator, chunk sizes (11 + D steps: 14 mono, 14 stereo)
    ("mono", 3.0, 0.9, 40, "full", [None, 1, 5, 14, 100]),
    ("mono", 1.0, 1.0, 0, "full", [None, 3]),
    ("mono", 3.0, 0.9, 0, "k1", [None, 4]),
    ("mono", 3.0, 0.9, 40, "k3", [None, 4]),
    ("stereo", 3.0, 0.9, 40, "full", [None, 1, 6, 100]),
]


@pytest.mark.parametrize("layout,scale,temperature,top_k,kl_estimator,chunk_sizes", CASES)
def test_chunked_statistics_and_gradients_equal_the_plain_computation(
    models, layout, scale, temperature, top_k, kl_estimator, chunk_sizes
):
    policy, anchor, rollout, channels = models[layout]
    sampling = SamplingConfig(scale, temperature, top_k)
    expected = reference_statistics(policy, anchor, rollout, sampling, kl_estimator, channels)
    assert expected[1].abs().sum() > 1e-3  # the policy is away from its anchor: the KL has a gradient
    assert expected[0].isfinite().all()  # every code inside the top k of the moved policy (else no gradient)
    generator = torch.Generator().manual_seed(0)
    weights = [torch.randn(expected[0].shape, generator=generator, dtype=torch.float64) for _ in range(2)]
    expected_grads = gradients(policy, expected, weights)
    for chunk_size in chunk_sizes:
        actual = chunked_statistics(policy, anchor, rollout, sampling, kl_estimator, channels, chunk_size)
        for name, a, e in zip(("logprobs", "kl", "entropy"), actual, expected):
            torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-12, msg=f"{name}, chunk {chunk_size}")
        for a, e in zip(gradients(policy, actual, weights), expected_grads):
            torch.testing.assert_close(a, e, rtol=1e-9, atol=1e-12, msg=f"gradient, chunk {chunk_size}")


def test_kl_outside_the_graph_and_without_a_reference(models):
    policy, anchor, rollout, channels = models["mono"]
    sampling = rollout.sampling
    args = (rollout.prompt_ids, rollout.prompt_mask, rollout.grid, True)
    states = decoder_states(policy, *args)
    with torch.no_grad():
        ref_states = decoder_states(anchor, *args)
    shaped = step_statistics(
        states, rollout.grid, sampling, ref_states=ref_states, differentiate_kl=False, chunk_size=4
    )
    assert shaped.logprobs.requires_grad and not shaped.kl.requires_grad  # kl_penalty="reward": no graph for it
    plain = step_statistics(states, rollout.grid, sampling, chunk_size=4)
    assert plain.kl is None and plain.entropy is None
    torch.testing.assert_close(plain.logprobs, shaped.logprobs)
    # Pad cells of the delay pattern hold 0; the per-step sums are the rollout's per-step log-probs.
    valid = codebooks.code_mask(4, rollout.grid.shape[-1])[None, :, 1:]
    assert (plain.logprobs.masked_select(~valid.expand_as(plain.logprobs)) == 0).all()
    torch.testing.assert_close(
        plain.logprobs.detach().float().sum(1), rollout.step_logprobs(), rtol=1e-4, atol=1e-4
    )


def test_bad_arguments_are_named(models):
    policy, anchor, rollout, _ = models["mono"]
    states = decoder_states(policy, rollout.prompt_ids, rollout.prompt_mask, rollout.grid, guided=False)
    with pytest.raises(ValueError, match="chunk_size"):
        step_statistics(states, rollout.grid, SamplingConfig(), chunk_size=0)
    with pytest.raises(ValueError, match="kl_estimator"):
        step_statistics(states, rollout.grid, SamplingConfig(), kl_estimator="k2")
    with pytest.raises(ValueError, match="guided"):
        step_statistics(states, rollout.grid, SamplingConfig(3.0))


def test_chunked_update_saves_no_tensor_of_the_whole_clips_distributions(models):
    """Under autograd, record every tensor saved for the backward: chunked, none is larger than one chunk's
    distributions; unchunked, the whole clip's [B, K, A, V] are saved (this is what the chunking removes)."""
    policy, anchor, rollout, channels = models["mono"]
    float_policy, float_anchor = copy.deepcopy(policy).float(), copy.deepcopy(anchor).float()
    sampling = SamplingConfig(3.0, 0.9, 0)
    batch, num_codebooks, length = rollout.grid.shape
    vocab = float_policy.decoder.config.vocab_size
    with torch.no_grad():
        ref_states = decoder_states(float_anchor, rollout.prompt_ids, rollout.prompt_mask, rollout.grid, True)
    module = MusicPolicyAndValue(float_policy, None)

    def largest_saved_distribution(chunk_size):
        """Elements of the largest tensor saved for the backward that holds code distributions (last dim V)."""
        sizes = [0]

        def pack(tensor):
            if tensor.dim() > 1 and tensor.shape[-1] == vocab:
                sizes.append(tensor.numel())
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            statistics, _ = module(
                rollout.prompt_ids, rollout.prompt_mask, rollout.grid, sampling, ref_states=ref_states,
                chunk_size=chunk_size,
            )
        (statistics.logprobs.sum() + statistics.kl.sum()).backward()
        return max(sizes)

    whole_clip = batch * num_codebooks * (length - 1) * vocab
    assert largest_saved_distribution(None) >= whole_clip
    assert largest_saved_distribution(2) <= batch * num_codebooks * 2 * vocab


def test_token_preference_model_trains_without_code_distributions():
    """The token-space preference reward model reads codes through MusicGen's decoder trunk and pools its hidden
    states into one score: it has no LM heads, so its training step keeps no [.., V] tensor at any clip length
    (nothing there to chunk; its memory per decoder step is the trunk's, as in the policy's chunked update)."""
    from musicrl_trl.reward_models.token_preference import MusicTokenPreferenceModel

    generator, processor = tiny_musicgen()
    reward_model = MusicTokenPreferenceModel.from_musicgen(generator).train()
    vocab = generator.decoder.config.vocab_size
    codes = torch.randint(0, vocab, (2, 4, 40))
    prompt = processor(text=PROMPTS, padding=True, return_tensors="pt")
    shapes = []

    def pack(tensor):
        shapes.append(tuple(tensor.shape))
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        scores = reward_model(input_ids=prompt.input_ids, attention_mask=prompt.attention_mask, codes=codes).logits
    scores.sum().backward()
    assert shapes and not any(vocab in shape for shape in shapes)
