"""A tiny MusicPPOTrainer (or ``--reward``: AudioRewardTrainer) run that saves after every update, for the crash
tests in test_checkpointing.py.

    python tests/checkpoint_crash_run.py OUT --updates 12 --save-delay 0.15 [--resume [PATH]] [--save-total-limit 2]

``--save-delay`` sleeps between the files of every save (weights, optimizer, RNG, value model), so that a SIGKILL
sent at a random moment often lands in the middle of one. At the end the run writes ``final_log.json``: the logged
metrics of every update, 1 to N, as restored from its checkpoints and extended by this process. Under torchrun,
``--record-saves`` makes every rank note, right after each save returns, whether ``checkpoint-N`` was there.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch
from datasets import Dataset
from transformers import TrainerCallback

from musicrl_trl.distributed import end_distributed_run
from musicrl_trl.reward_models import MusicRewardConfig, MusicRewardModel
from musicrl_trl.testing import tiny_musicgen
from musicrl_trl.trainers import AudioRewardConfig, AudioRewardTrainer, MusicPPOConfig, MusicPPOTrainer
from musicrl_trl.trainers.checkpointing import checkpoint_problems

PROMPTS = ["bright shimmering bells", "deep dark bass", "happy upbeat tune", "slow sad piano", "fast drums"]


def loudness(prompts, audio, sampling_rate, codes, **kwargs):
    return audio.pow(2).mean((1, 2)).sqrt()


class SlowSaves:
    """Sleeps after each group of files a checkpoint save writes (the test's way to make saves slow)."""

    save_delay_s = 0.0

    def save_model(self, output_dir=None, _internal_call=False):
        super().save_model(output_dir, _internal_call)
        time.sleep(self.save_delay_s)

    def _save_optimizer_and_scheduler(self, output_dir):
        super()._save_optimizer_and_scheduler(output_dir)
        time.sleep(self.save_delay_s)

    def _save_rng_state(self, output_dir):
        super()._save_rng_state(output_dir)
        time.sleep(self.save_delay_s)


class SlowSavingTrainer(SlowSaves, MusicPPOTrainer):
    pass


class SlowSavingRewardTrainer(SlowSaves, AudioRewardTrainer):
    pass


class RecordSaves(TrainerCallback):
    """On every rank, right after a save: is ``checkpoint-N`` already complete (the rename happened)?"""

    def __init__(self, output_dir: str, rank: int, extra_files: list[str]):
        self.output_dir, self.rank, self.extra_files, self.seen = output_dir, rank, extra_files, []

    def on_save(self, args, state, control, **kwargs):
        path = os.path.join(self.output_dir, f"checkpoint-{state.global_step}")
        self.seen.append(
            {"step": state.global_step, "problems": checkpoint_problems(path, extra_files=self.extra_files)}
        )
        with open(os.path.join(self.output_dir, f"saves_seen_rank{self.rank}.json"), "w") as f:
            json.dump(self.seen, f)


def parse_args(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("output_dir")
    parser.add_argument("--updates", type=int, default=12)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--save-delay", type=float, default=0.0)
    parser.add_argument("--save-total-limit", type=int, default=None)
    parser.add_argument("--resume", nargs="?", const=True, default=None, help="a checkpoint path; alone: True")
    parser.add_argument("--record-saves", action="store_true")
    parser.add_argument("--reward", action="store_true", help="train a tiny reward model instead")
    parser.add_argument(
        "--load-best", action="store_true", help="--reward: evaluate every step, load the best model at the end"
    )
    return parser.parse_args(argv)


def reward_trainer(options) -> SlowSavingRewardTrainer:
    torch.manual_seed(0)
    model = MusicRewardModel(MusicRewardConfig(conv_channels=[4], hidden_size=8, sampling_rate=16_000))
    generator = torch.Generator().manual_seed(0)
    clips = [
        {"array": (torch.rand(1600, generator=generator) * 0.2).numpy(), "sampling_rate": 16_000} for _ in range(16)
    ]
    args = AudioRewardConfig(
        output_dir=options.output_dir,
        per_device_train_batch_size=options.batch_size,
        max_steps=options.updates,
        learning_rate=1e-2,
        logging_steps=1,
        save_strategy="steps",
        save_steps=1,
        save_total_limit=options.save_total_limit,
        report_to="none",
        disable_tqdm=True,
        seed=0,
        **(
            dict(eval_strategy="steps", eval_steps=1, load_best_model_at_end=True, metric_for_best_model="loss")
            if options.load_best
            else {}
        ),
    )
    dataset = Dataset.from_dict({"audio": clips, "mos": [1.0 + (i % 5) for i in range(16)]})
    return SlowSavingRewardTrainer(
        model=model, args=args, train_dataset=dataset, eval_dataset=dataset if options.load_best else None
    )


def main(argv=None, trainer_class: type[SlowSavingTrainer] = SlowSavingTrainer) -> MusicPPOTrainer:
    options = parse_args(argv)
    if options.reward:
        trainer = reward_trainer(options)
        return run(trainer, options, extra_files=[], metric="loss")
    model, processor = tiny_musicgen()
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    args = MusicPPOConfig(
        output_dir=options.output_dir,
        per_device_train_batch_size=options.batch_size,
        total_episodes=options.batch_size * world_size * options.updates,
        response_length=8,
        learning_rate=5e-3,
        save_strategy="steps",
        save_steps=1,
        save_total_limit=options.save_total_limit,
        plot_training_curves=False,
        report_to=[],
        disable_tqdm=True,
        seed=0,
    )
    trainer = trainer_class(
        args, processor, model, reward_model=loudness, train_dataset=Dataset.from_dict({"prompt": PROMPTS})
    )
    return run(trainer, options, extra_files=["value_model.safetensors"], metric="objective/scores")


def run(trainer, options, extra_files: list[str], metric: str):
    trainer.save_delay_s = options.save_delay
    if options.record_saves:
        trainer.add_callback(RecordSaves(options.output_dir, trainer.accelerator.process_index, extra_files))
    trainer.train(resume_from_checkpoint=options.resume)
    if options.load_best:  # what every rank ended with: the best checkpoint's path, and its own final weights
        weights = trainer.accelerator.unwrap_model(trainer.model).state_dict()
        record = {
            "best_model_checkpoint": trainer.state.best_model_checkpoint,
            "weights": {name: tensor.tolist() for name, tensor in weights.items()},
        }
        with open(os.path.join(options.output_dir, f"best_rank{trainer.accelerator.process_index}.json"), "w") as f:
            json.dump(record, f)
    if trainer.accelerator.is_main_process:
        logs = [entry for entry in trainer.state.log_history if metric in entry]
        with open(os.path.join(options.output_dir, "final_log.json"), "w") as f:
            json.dump(logs, f)
    return trainer


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
    end_distributed_run()  # main's trainer is already unreferenced here
