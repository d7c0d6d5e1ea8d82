"""Two real CPU processes (gloo) under torchrun: the trainer alone and examples/ppo_musicrl.py both finish, keep
identical weights on both ranks, sample different prompts with different seeds per rank, gather metrics and save
one model.

The launch line is the one documented in examples/accelerate_configs/multi_cpu.yaml: `accelerate launch
--num_processes 2 --cpu` starts a single process, `ACCELERATE_USE_CPU=true torchrun --nproc_per_node 2` starts two.
"""

import json
from pathlib import Path

import pytest
from two_ranks import run_two_cpu_ranks

ROOT = Path(__file__).resolve().parents[1]
RECORDER = ROOT / "tests" / "scripts" / "record_ranks.py"

pytestmark = pytest.mark.slow


def launch_two_ranks(tmp_path):
    """One torchrun launch of two CPU ranks that runs the trainer job, then the example job."""
    example_args = [
        "--total_episodes",
        "16",
        "--per_device_train_batch_size",
        "4",
        "--response_length",
        "8",
        "--output_dir",
        tmp_path / "example",
        "--report_to",
        "none",
        # The example job trains with a value-free baseline: each rank samples 2 prompts x 2 clips per update.
        "--baseline",
        "rloo",
        "--num_generations",
        "2",
    ]
    result = run_two_cpu_ranks(RECORDER, tmp_path, tmp_path / "trainer", *example_args)
    return tmp_path, result


def records(run_dir, job):
    return [json.loads((run_dir / f"{job}-rank{rank}.json").read_text()) for rank in (0, 1)]


def check_ranks(records, updates, distinct_prompts):
    rank0, rank1 = records
    assert rank0["num_processes"] == rank1["num_processes"] == 2
    assert rank0["distributed_type"] == "DistributedType.MULTI_CPU"
    assert rank0["weights_sha256"] == rank1["weights_sha256"]  # gradients all-reduced: identical weights
    assert len(rank0["prompts"]) == len(rank1["prompts"]) == updates
    for prompts0, prompts1 in zip(rank0["prompts"], rank1["prompts"]):
        assert prompts0 != prompts1  # each rank its own share of the batch
        if distinct_prompts:
            assert not set(prompts0) & set(prompts1)
    assert rank0["seed"] != rank1["seed"]  # and its own sampling seed
    assert rank0["scores"] == rank1["scores"]  # metrics are gathered over both ranks before logging


def saved_weights(output_dir):
    return sorted(p.relative_to(output_dir).as_posix() for p in Path(output_dir).rglob("*.safetensors"))


def test_trainer_and_example_on_two_cpu_processes(tmp_path):
    # One test, not two sharing a fixture: under pytest-xdist a shared module fixture would launch once per worker.
    run_dir, result = launch_two_ranks(tmp_path)
    check_ranks(records(run_dir, "trainer"), updates=2, distinct_prompts=True)
    assert saved_weights(run_dir / "trainer") == ["adapter_model.safetensors", "merged/model.safetensors"]
    # The demo's prompt list repeats its 8 prompts, so ranks may draw equal texts from different rows.
    check_ranks(records(run_dir, "example"), updates=2, distinct_prompts=False)
    for rank in records(run_dir, "example"):  # whole groups per rank: 2 prompts, each sampled twice on that rank
        assert [len(prompts) for prompts in rank["prompts"]] == [2, 2]
    assert saved_weights(run_dir / "example") == ["model.safetensors"]  # saved once, by rank 0
    assert result.stdout.count("mean reward, last") == 1  # the summary is printed by the main process only


CONFIGS = ROOT / "examples" / "accelerate_configs"


@pytest.mark.parametrize(
    "name, distributed_type",
    [
        ("multi_cpu", "MULTI_CPU"),
        ("single_gpu", "NO"),
        ("multi_gpu", "MULTI_GPU"),
        ("deepspeed_zero2", "DEEPSPEED"),
        ("deepspeed_zero3", "DEEPSPEED"),
        ("fsdp", "FSDP"),
    ],
)
def test_accelerate_configs_load_and_say_when_to_use_them(name, distributed_type):
    from accelerate.commands.config.config_args import load_config_from_file

    path = CONFIGS / f"{name}.yaml"
    config = load_config_from_file(str(path))
    assert config.distributed_type == distributed_type
    comments = [line for line in path.read_text().splitlines() if line.startswith("#")]
    assert len(comments) >= 4  # when to use it, and how to launch it
    assert any("launch" in line or "torchrun" in line for line in comments)


def test_under_deepspeed_rewards_stay_whole_and_the_anchor_goes_to_trl(monkeypatch):
    # DeepSpeed is not installed here: TRL's prepare_deepspeed is replaced by a recorder. What is tested is which
    # modules MusicPPOTrainer hands to it (the anchor) and which it keeps whole on the device (the rewards).
    import types

    import torch
    import trl.models.utils
    from accelerate import Accelerator

    from musicrl_trl.trainers.base import OnlineMusicTrainer
    from musicrl_trl.trainers.ppo_trainer import RewardModules

    handed_to_deepspeed = []

    def recorder(model, accelerator):
        handed_to_deepspeed.append(model)
        return model

    monkeypatch.setattr(trl.models.utils, "prepare_deepspeed", recorder)
    rewards, anchor = RewardModules([torch.nn.Linear(2, 1)]), torch.nn.Linear(2, 2)
    trainer = types.SimpleNamespace(accelerator=Accelerator(cpu=True), is_deepspeed_enabled=True, ref_model=anchor)
    OnlineMusicTrainer.place_anchor_and_rewards(trainer, rewards)
    assert trainer.reward_model is rewards and not rewards.training and handed_to_deepspeed == [anchor]
    assert not any(p.requires_grad for p in anchor.parameters())
