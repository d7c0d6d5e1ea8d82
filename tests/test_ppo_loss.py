"""The loss of one PPO micro-batch (musicrl_trl.trainers.ppo_loss) against a slow, obviously correct loop."""

import math

import pytest
import torch

from musicrl_trl.trainers.ppo_loss import PPOLossConfig, PPOMicroBatch, ppo_loss


def slow_loss(batch: PPOMicroBatch, config: PPOLossConfig) -> dict[str, float]:
    """Step by step in Python floats, straight from the formulas."""
    pg, vf, kl, approx, clipped, vclipped, ratios, kept = 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0
    for i in range(batch.logprobs.shape[0]):
        for t in range(batch.logprobs.shape[1]):
            if not batch.mask[i, t]:
                continue
            kept += 1
            log_ratio = float(batch.logprobs[i, t] - batch.old_logprobs[i, t])
            ratio = math.exp(log_ratio)
            advantage = float(batch.advantages[i, t])
            plain = -advantage * ratio
            clip = -advantage * min(max(ratio, 1 - config.cliprange), 1 + config.cliprange)
            pg += max(plain, clip)
            clipped += clip > plain
            value, old, target = float(batch.values[i, t]), float(batch.old_values[i, t]), float(batch.returns[i, t])
            value_clipped = min(max(value, old - config.cliprange_value), old + config.cliprange_value)
            vf += max((value - target) ** 2, (value_clipped - target) ** 2)
            vclipped += (value_clipped - target) ** 2 > (value - target) ** 2
            kl += float(batch.kl[i, t])
            approx += 0.5 * log_ratio**2
            ratios += ratio
    n = max(kept, 1)
    loss = pg / n + config.vf_coef * 0.5 * vf / n + (config.kl_coef * kl / n if config.kl_penalty == "loss" else 0.0)
    return {"loss": loss, "pg_loss": pg / n, "vf_loss": 0.5 * vf / n, "kl_loss": kl / n, "approxkl": approx / n,
            "clipfrac": clipped / n, "vf_clipfrac": vclipped / n, "ratio": ratios / n}  # fmt: skip


def random_batch(seed, b=3, steps=7, drop=(1,)):
    generator = torch.Generator().manual_seed(seed)

    def randn(scale=1.0):
        return torch.randn(b, steps, generator=generator, dtype=torch.float64) * scale

    mask = torch.ones(b, steps, dtype=torch.bool)
    for i in drop:
        mask[i] = False
    old = randn()
    return PPOMicroBatch(
        logprobs=(old + randn(0.4)).requires_grad_(), old_logprobs=old, advantages=randn(),
        values=randn().requires_grad_(), old_values=randn(), returns=randn(), kl=randn(0.5).abs().requires_grad_(),
        mask=mask,
    )  # fmt: skip


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("kl_penalty", ["loss", "reward"])
def test_loss_and_stats_match_the_slow_loop(seed, kl_penalty):
    config = PPOLossConfig(cliprange=0.2, cliprange_value=0.3, vf_coef=0.7, kl_coef=0.3, kl_penalty=kl_penalty)
    batch = random_batch(seed)
    loss, stats = ppo_loss(batch, config)
    expected = slow_loss(batch, config)
    assert loss.item() == pytest.approx(expected["loss"], rel=1e-12, abs=1e-12)
    for name, value in stats.items():
        assert not value.requires_grad
        if name in expected:
            assert value.item() == pytest.approx(expected[name], rel=1e-12, abs=1e-12), name
    assert 0 < stats["clipfrac"] < 1  # the batch exercises both branches of the clip


def test_dropped_rollouts_get_no_gradient_and_the_kl_only_with_the_loss_form():
    batch = random_batch(0, drop=(0, 2))
    loss, _ = ppo_loss(batch, PPOLossConfig(kl_penalty="loss"))
    loss.backward()
    for grad in (batch.logprobs.grad, batch.values.grad, batch.kl.grad):
        assert torch.all(grad[0] == 0) and torch.all(grad[2] == 0) and torch.any(grad[1] != 0)
    batch = random_batch(0)
    loss, _ = ppo_loss(batch, PPOLossConfig(kl_penalty="reward"))
    loss.backward()
    assert batch.kl.grad is None  # the KL is not in the loss


def test_a_micro_batch_with_nothing_kept_has_zero_loss_and_finite_gradients():
    batch = random_batch(1, drop=(0, 1, 2))
    batch.advantages[:] = float("nan")  # what a dropped (non-finite) reward leaves behind is masked, never used
    batch.returns[:] = float("nan")
    loss, stats = ppo_loss(batch, PPOLossConfig())
    assert loss.item() == 0
    loss.backward()
    assert all(torch.all(g == 0) for g in (batch.logprobs.grad, batch.values.grad, batch.kl.grad))
    assert all(torch.isfinite(v) for v in stats.values())
