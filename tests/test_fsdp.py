"""FSDP (version 2) for MusicPPOTrainer: two real CPU ranks (gloo) under torchrun against DDP, and the start-up errors
for settings the trainer cannot run, in one process.

The two-rank test launches tests/scripts/fsdp_ranks.py once (start-up is most of its time) and checks what each rank
recorded: weights after 2 SGD updates equal DDP's, parameters sharded, the rollout under FSDP equal to the unsharded
rollout, save_model's files loadable with from_pretrained, an exact resume from a sharded checkpoint, LoRA under FSDP
training only adapters.
"""

import json
import os
import types
from pathlib import Path
from unittest import mock

import pytest
import torch
from two_ranks import run_two_cpu_ranks

from musicrl_trl.trainers import fsdp

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "scripts" / "fsdp_ranks.py"


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp")
    run_two_cpu_ranks(SCRIPT, out, timeout=900)
    return out, [json.loads((out / f"rank{rank}.json").read_text()) for rank in (0, 1)]


@pytest.mark.slow
def test_fsdp_on_two_cpu_ranks_matches_ddp_and_saves_resumes_and_trains_lora(two_ranks):
    # One test over one launch: under pytest-xdist a module fixture shared by several tests would launch per worker.
    from safetensors.torch import load_file
    from transformers import MusicgenForConditionalGeneration

    out, (rank0, rank1) = two_ranks
    for rank in (rank0, rank1):
        assert rank["ddp_distributed_type"] == "DistributedType.MULTI_CPU"
        assert rank["fsdp_distributed_type"] == "DistributedType.FSDP" and rank["is_fsdp2"]
        # Sharded: every parameter of a decoder layer (policy and value trunk) holds half its elements per rank.
        assert rank["sizes"] and all(local * 2 == full for local, full in rank["sizes"].values())
        assert any(name.startswith("value_model.") for name in rank["sizes"])
        # The separate anchor's layers are sharded too, frozen (no optimizer state).
        local, full = rank["anchor_layer_sizes"]
        assert local * 2 == full and rank["anchor_trainable"] == 0
        # The rollout from the gathered weights is the rollout of the unsharded model, and the units reshard after.
        assert rank["rollout_codes_equal"] and rank["rollout_logprob_max_diff"] == 0.0
        assert rank["resharded_after_rollout"] and rank["gather"]["gather_bytes"] > 0
        # LoRA: only adapters train and change; the policy's base stays frozen (and sharded).
        assert rank["lora_sharded"] and rank["lora_trainable"]
        assert all(".lora_" in name for name in rank["lora_trainable"])
        assert rank["lora_eval_kl"] >= 0.0 and rank["lora_eval_kl"] == rank0["lora_eval_kl"]  # reduced over ranks
    # Full weights are gathered on rank 0 only: LoRA changed adapters only (the value network, also trained, is not
    # compared).
    assert rank0["lora_changed"] and set(rank0["lora_changed"]) <= set(rank0["lora_trainable"])
    # A resume from checkpoint-1 (sharded model and optimizer state) ends where the uninterrupted run ended.
    assert rank0["resume_keys_equal"] and rank0["resume_max_diff"] == 0.0
    assert (out / "fsdp" / "checkpoint-1" / fsdp.FSDP_STATE_DIR / ".metadata").is_file()

    # After 2 SGD updates from one seed the saved weights equal DDP's (two DDP runs differ by ~1e-8).
    ddp, sharded = load_file(out / "ddp" / "model.safetensors"), load_file(out / "fsdp" / "model.safetensors")
    assert sorted(ddp) == sorted(sharded)
    assert max((ddp[name] - sharded[name]).abs().max().item() for name in ddp) < 1e-4
    start = MusicgenForConditionalGeneration.from_pretrained(out / "fsdp" / "checkpoint-1").state_dict()
    assert any(not torch.equal(start[name], sharded[name]) for name in sharded)  # the updates did move it

    # save_model wrote full safetensors, once, that from_pretrained loads.
    model = MusicgenForConditionalGeneration.from_pretrained(out / "fsdp")
    for name, tensor in model.state_dict().items():
        if name in sharded:
            assert torch.equal(tensor, sharded[name])
    assert sorted(p.name for p in (out / "lora").glob("*.safetensors")) == ["adapter_model.safetensors"]


# ------------------------------------------------------------------------------------------------ start-up errors
def fake_trainer(**plugin_fields):
    """What check_fsdp_setup reads: args and the accelerator's FSDP plugin."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    plugin = types.SimpleNamespace(
        fsdp_version=2, cpu_offload=None, transformer_cls_names_to_wrap=None, auto_wrap_policy=object(),
        mixed_precision_policy=MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.bfloat16),
    )
    vars(plugin).update(plugin_fields)
    args = types.SimpleNamespace(rollout_backend="static")
    accelerator = types.SimpleNamespace(state=types.SimpleNamespace(fsdp_plugin=plugin))
    return types.SimpleNamespace(args=args, accelerator=accelerator), plugin


def test_fsdp_defaults_to_musicgen_layers_and_mixed_precision_by_autocast():
    trainer, plugin = fake_trainer()
    fsdp.check_fsdp_setup(trainer, torch.nn.Linear(2, 2), None)
    layers = ["MusicgenDecoderLayer", "T5Block", "T5EncoderModel", "EncodecModel"]
    assert plugin.transformer_cls_names_to_wrap == layers
    # float32 weights gathered and gradients reduced in float32; bf16 comes from autocast around the forward
    assert plugin.mixed_precision_policy.param_dtype is None and plugin.mixed_precision_policy.reduce_dtype is None


def test_autocast_forward_runs_the_class_forward_under_autocast():
    class Probe(torch.nn.Module):
        def forward(self, x):
            return torch.is_autocast_enabled("cpu")

    probe = Probe()
    fsdp.autocast_forward(probe, types.SimpleNamespace(native_amp=False))
    assert probe(1) is False
    bf16 = types.SimpleNamespace(native_amp=True, autocast=lambda: torch.autocast("cpu", dtype=torch.bfloat16))
    fsdp.autocast_forward(probe, bf16)
    assert probe(1) is True


def test_fsdp_version_1_is_refused_at_start_up():
    trainer, _ = fake_trainer(fsdp_version=1)
    with pytest.raises(ValueError, match="fsdp_version=1.*'fsdp_version': 2"):
        fsdp.check_fsdp_setup(trainer, torch.nn.Linear(2, 2), None)


def test_fsdp_parameter_offloading_is_refused_at_start_up():
    from torch.distributed.fsdp import CPUOffloadPolicy

    trainer, _ = fake_trainer(cpu_offload=CPUOffloadPolicy())
    with pytest.raises(ValueError, match="offload"):
        fsdp.check_fsdp_setup(trainer, torch.nn.Linear(2, 2), None)


def test_weights_left_on_the_meta_device_are_refused_under_fsdp():
    trainer, _ = fake_trainer()
    with pytest.raises(ValueError, match="fsdp_cpu_ram_efficient_loading: false"):
        fsdp.check_fsdp_setup(trainer, torch.nn.Linear(2, 2), torch.nn.Linear(2, 2, device="meta"))


def test_compiled_rollouts_are_refused_under_fsdp_and_deepspeed():
    trainer, _ = fake_trainer()
    trainer.args.rollout_backend = "compiled"
    with pytest.raises(ValueError, match="rollout_backend='static'"):
        fsdp.check_fsdp_setup(trainer, torch.nn.Linear(2, 2), None)
    with pytest.raises(ValueError, match="rollout_backend='static'"):
        fsdp.check_deepspeed_setup(trainer)


def test_a_quantized_policy_is_refused_under_fsdp(monkeypatch):
    import musicrl_trl.quantization

    monkeypatch.setattr(musicrl_trl.quantization, "is_quantized", lambda module: True)
    trainer, _ = fake_trainer()
    with pytest.raises(ValueError, match="4/8-bit.*multi_gpu.yaml"):
        fsdp.check_fsdp_setup(trainer, torch.nn.Linear(2, 2), None)


def test_without_fsdp_units_the_gather_is_a_no_op():
    module = torch.nn.Linear(2, 2)
    with fsdp.gathered_weights(module) as gathered, fsdp.gathered_weights(None) as nothing:
        assert gathered is module and nothing is None
    assert not fsdp.is_sharded(module) and not fsdp.is_sharded(None)


def test_fsdp_in_one_process_fails_at_construction(tmp_path):
    from datasets import Dataset

    from musicrl_trl import MusicPPOConfig, MusicPPOTrainer
    from musicrl_trl.testing import tiny_musicgen

    model, processor = tiny_musicgen()
    args = MusicPPOConfig(
        output_dir=str(tmp_path), fsdp="full_shard auto_wrap", fsdp_config={"fsdp_version": 2}, report_to=[],
        response_length=8, use_cpu=True,
    )
    # accelerate exports ACCELERATE_USE_FSDP=true once it sees an FSDP plugin: keep it out of later tests' launches.
    with mock.patch.dict(os.environ), pytest.raises(ValueError, match="distributed"):
        MusicPPOTrainer(args, processor, model, reward_model=lambda **kw: torch.zeros(1),
                        train_dataset=Dataset.from_dict({"prompt": ["a"]}))  # fmt: skip


# ------------------------------------------------------------------------------------------------ DeepSpeed ZeRO-3
# No GPU here, so no ZeRO-3 engine runs (README, deepspeed_zero3.yaml): what is tested is everything the trainer does
# up to the engine. (test_distributed.py checks that a separate anchor is handed to TRL's prepare_deepspeed.)
def test_under_zero3_the_anchor_is_not_copied_from_sharded_weights(monkeypatch):
    import musicrl_trl.trainers.base as base

    monkeypatch.setattr(base, "is_deepspeed_zero3_enabled", lambda: True)
    with pytest.raises(ValueError, match="ZeRO-3.*pass it as ref_model"):
        base.OnlineMusicTrainer.build_anchor(torch.nn.Linear(2, 2), None)


def test_under_zero3_the_rollout_goes_through_trls_gathering_unwrap(monkeypatch):
    import contextlib

    import trl.models.utils

    calls = []

    @contextlib.contextmanager
    def recorder(model, accelerator, gather_deepspeed3_params=True):
        calls.append(gather_deepspeed3_params)
        yield model

    monkeypatch.setattr(trl.models.utils, "unwrap_model_for_generation", recorder)
    module = torch.nn.Linear(2, 2)
    for gather in (True, False):  # MusicPPOConfig.ds3_gather_for_generation
        with fsdp.generation_weights(module, accelerator=None, gather_deepspeed3_params=gather) as unwrapped:
            assert unwrapped is module
    assert calls == [True, False]
