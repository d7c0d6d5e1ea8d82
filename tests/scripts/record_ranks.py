"""Run two MusicPPOTrainer jobs on every rank of one torchrun launch and record what each rank did (prompts, seed,
final weights, logged metrics) to ``<record_dir>/<job>-rank<r>.json``, for tests/test_distributed.py:

    ACCELERATE_USE_CPU=true torchrun --standalone --nproc_per_node 2 tests/scripts/record_ranks.py \
        RECORD_DIR TRAINER_OUTPUT_DIR EXAMPLE_ARGS...

job ``trainer``: the library alone on the tiny model, saving to TRAINER_OUTPUT_DIR; then job ``example``:
examples/ppo_musicrl.py's main() with EXAMPLE_ARGS. One launch for both halves the start-up time of the test.
"""

import hashlib
import json
import os
import runpy
import sys
from pathlib import Path

import torch

from musicrl_trl import MusicPPOTrainer

RECORD_DIR, TRAINER_OUTPUT_DIR, *EXAMPLE_ARGS = sys.argv[1:]
EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "ppo_musicrl.py"
prompts_seen, seeds, job = [], [], ["trainer"]

prompt_batch, train = MusicPPOTrainer._prompt_batch, MusicPPOTrainer.train


def recording_prompt_batch(self, update):
    prompts = prompt_batch(self, update)
    prompts_seen.append(prompts)
    return prompts


def recording_train(self, *args, **kwargs):
    seeds.append(torch.initial_seed())  # TRL reseeds each rank with seed + 100003 * rank before training
    result = train(self, *args, **kwargs)
    digest = hashlib.sha256()
    state = self.accelerator.unwrap_model(self.model).state_dict()
    for name in sorted(state):
        digest.update(name.encode())
        digest.update(state[name].detach().float().cpu().numpy().tobytes())
    record = {
        "rank": self.accelerator.process_index,
        "num_processes": self.accelerator.num_processes,
        "distributed_type": str(self.accelerator.distributed_type),
        "seed": seeds[0],
        "prompts": prompts_seen,
        "weights_sha256": digest.hexdigest(),
        "scores": [entry["objective/scores"] for entry in self.state.log_history if "objective/scores" in entry],
    }
    with open(os.path.join(RECORD_DIR, f"{job[0]}-rank{record['rank']}.json"), "w") as f:
        json.dump(record, f)
    prompts_seen.clear(), seeds.clear()
    return result


MusicPPOTrainer._prompt_batch, MusicPPOTrainer.train = recording_prompt_batch, recording_train


def run_trainer(output_dir):
    from datasets import Dataset
    from peft import LoraConfig

    from musicrl_trl import MusicPPOConfig
    from musicrl_trl.testing import tiny_musicgen

    model, processor = tiny_musicgen()  # built once by rank 0, loaded by every rank

    def loudness(prompts, audio, sampling_rate, codes, **kwargs):
        return audio.pow(2).mean((1, 2)).sqrt()

    args = MusicPPOConfig(
        output_dir=output_dir,
        per_device_train_batch_size=2,
        total_episodes=8,
        response_length=8,
        learning_rate=1e-2,
        report_to=[],
        disable_tqdm=True,
        seed=0,
    )
    prompts = [f"prompt {i}" for i in range(8)]
    # LoRA here (the anchor is the adapter-disabled policy inside the DDP wrapper); the example job trains fully.
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"])
    trainer = MusicPPOTrainer(
        args,
        processor,
        model,
        reward_model=loudness,
        train_dataset=Dataset.from_dict({"prompt": prompts}),
        peft_config=lora,
    )
    trainer.train()
    trainer.save_model(output_dir)


run_trainer(TRAINER_OUTPUT_DIR)
job[0] = "example"
sys.argv = [str(EXAMPLE), *EXAMPLE_ARGS]
runpy.run_path(str(EXAMPLE), run_name="__main__")
