"""MusicPPOTrainer under FSDP (version 2) against DDP on two CPU ranks, for tests/test_fsdp.py:

    ACCELERATE_USE_CPU=true torchrun --standalone --nproc_per_node 2 tests/scripts/fsdp_ranks.py OUT_DIR

One launch runs every job (start-up is most of a small run's time) and writes what each rank saw to
``OUT_DIR/rank<r>.json``; the test reads those and the saved models:

- ``ddp``: a full fine-tune, 2 SGD updates from seed 0, saved to OUT_DIR/ddp;
- ``fsdp``: the same run with ``fsdp="full_shard auto_wrap"``; a checkpoint after every update; saved to
  OUT_DIR/fsdp. Before training: the local and full sizes of the parameters, and a rollout under FSDP against one of
  an unsharded copy of the same weights with the same seed;
- ``resume``: a fresh FSDP trainer resumed from OUT_DIR/fsdp/checkpoint-1, trained to the end: its final weights
  against those of the ``fsdp`` run;
- ``lora``: LoRA under FSDP, 2 updates: which parameters changed; then an evaluation (KL to the anchor).
"""

import copy
import json
import os
import sys

import torch
from datasets import Dataset
from peft import LoraConfig

from musicrl_trl import MusicPPOConfig, MusicPPOTrainer
from musicrl_trl.distributed import end_distributed_run
from musicrl_trl.rollout import generate_rollout
from musicrl_trl.testing import tiny_musicgen
from musicrl_trl.trainers import fsdp

OUT_DIR = sys.argv[1]
FSDP = dict(fsdp="full_shard auto_wrap", fsdp_config={"fsdp_version": 2})
PROMPTS = [f"prompt {i}" for i in range(8)]
FIRST_LAYERS = ("policy.decoder.model.decoder.layers.0.", "value_model.backbone.decoder.model.decoder.layers.0.")


def loudness(prompts, audio, sampling_rate, codes, **kwargs):
    return audio.pow(2).mean((1, 2)).sqrt()


def make_trainer(name, model, processor, peft_config=None, **overrides):
    args = MusicPPOConfig(
        output_dir=os.path.join(OUT_DIR, name),
        per_device_train_batch_size=2,
        total_episodes=8,  # 2 ranks x 2 rollouts per update: 2 updates
        response_length=8,
        learning_rate=1e-2,
        optim="sgd",  # Adam's first step is ~lr x sign(gradient): float-level differences would flip signs
        lr_scheduler_type="constant",
        report_to=[],
        disable_tqdm=True,
        plot_training_curves=False,
        save_merged_lora=False,
        seed=0,
        **overrides,
    )
    return MusicPPOTrainer(
        args, processor, model, reward_model=loudness, train_dataset=Dataset.from_dict({"prompt": PROMPTS}),
        peft_config=peft_config,
    )


def full_weights(trainer):
    return fsdp.full_state_dict(trainer.model) if fsdp.is_sharded(trainer.model) else {
        k: v.detach().clone() for k, v in trainer.accelerator.unwrap_model(trainer.model).state_dict().items()
    }


def seeded_rollout(trainer, module, processor):
    """A rollout of two prompts with seed 1234: from the FSDP-sharded training module (gathered) when ``module`` is
    None, else from ``module``; the first also returns the gather's timing."""
    torch.manual_seed(1234)
    if module is not None:
        return generate_rollout(module, processor, PROMPTS[:2], num_steps=8)
    gather = {}
    with fsdp.generation_weights(trainer.model, trainer.accelerator, timing=gather) as gathered:
        return gather, generate_rollout(gathered.policy, processor, PROMPTS[:2], num_steps=8)


def main():
    record = {"rank": int(os.environ["RANK"])}

    # DDP
    model, processor = tiny_musicgen()
    trainer = make_trainer("ddp", model, processor)
    record["ddp_distributed_type"] = str(trainer.accelerator.distributed_type)
    trainer.train()
    trainer.save_model()
    del trainer

    # FSDP, with a checkpoint after every update
    model, processor = tiny_musicgen()
    plain = copy.deepcopy(model)
    trainer = make_trainer("fsdp", model, processor, save_strategy="steps", save_steps=1, **FSDP)
    record["fsdp_distributed_type"] = str(trainer.accelerator.distributed_type)
    wrapper = trainer.accelerator.unwrap_model(trainer.model)
    record["sizes"] = {
        name: [param.to_local().numel(), param.numel()]
        for name, param in wrapper.named_parameters()
        if name.startswith(FIRST_LAYERS)
    }
    anchor_layer = trainer.ref_model.decoder.model.decoder.layers[0].fc1.weight
    record["anchor_layer_sizes"] = [anchor_layer.to_local().numel(), anchor_layer.numel()]
    record["anchor_trainable"] = sum(p.requires_grad for p in trainer.ref_model.parameters())
    # The rollout under FSDP against an unsharded copy of the same weights, one seed.
    rollouts = []
    with torch.random.fork_rng(devices=[]):  # the training run below draws from the untouched stream
        for module in (None, plain):
            rollouts.append(seeded_rollout(trainer, module, processor))
    gather, rollouts[0] = rollouts[0]
    record["rollout_codes_equal"] = torch.equal(rollouts[0].codes, rollouts[1].codes)
    record["rollout_logprob_max_diff"] = (rollouts[0].logprobs - rollouts[1].logprobs).abs().max().item()
    record["gather"] = gather
    record["is_fsdp2"] = trainer.accelerator.is_fsdp2
    record["resharded_after_rollout"] = all(type(p).__name__ == "DTensor" for p in wrapper.parameters())
    trainer.train()
    trainer.save_model()
    final = full_weights(trainer)
    record["fsdp_log_kl"] = [e["objective/kl"] for e in trainer.state.log_history if "objective/kl" in e]
    del trainer

    # Resume from checkpoint-1 in a fresh trainer: the same final weights.
    model, processor = tiny_musicgen()
    trainer = make_trainer("resume", model, processor, **FSDP)
    trainer.train(resume_from_checkpoint=os.path.join(OUT_DIR, "fsdp", "checkpoint-1"))
    resumed = full_weights(trainer)
    if final:  # full weights are gathered on rank 0 only
        record["resume_max_diff"] = max((resumed[k] - final[k]).abs().max().item() for k in final)
        record["resume_keys_equal"] = sorted(resumed) == sorted(final)
    del trainer

    # LoRA under FSDP: only the adapters (and the value network, which trains fully) change.
    model, processor = tiny_musicgen()
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"])
    trainer = make_trainer("lora", model, processor, peft_config=lora, **FSDP)
    before = full_weights(trainer)
    trainer.train()
    after = full_weights(trainer)
    wrapper = trainer.accelerator.unwrap_model(trainer.model)
    record["lora_trainable"] = sorted(
        n for n, p in wrapper.named_parameters() if p.requires_grad and n.startswith("policy.")
    )
    record["lora_changed"] = sorted(
        n for n in before if n.startswith("policy.") and not torch.equal(before[n], after[n])
    )
    record["lora_sharded"] = fsdp.is_sharded(wrapper.policy)
    # Evaluation samples and scores with the gathered policy (and its adapter-disabled self as the anchor).
    metrics = trainer.evaluate(Dataset.from_dict({"prompt": PROMPTS[:2]}))
    record["lora_eval_kl"] = metrics["eval/kl"]
    trainer.save_model()
    del trainer, wrapper

    with open(os.path.join(OUT_DIR, f"rank{record['rank']}.json"), "w") as f:
        json.dump(record, f)


if __name__ == "__main__":
    main()
    end_distributed_run()
