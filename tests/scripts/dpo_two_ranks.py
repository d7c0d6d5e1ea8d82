"""Run under `ACCELERATE_USE_CPU=true torchrun --nproc_per_node 2`: MusicDPOTrainer on two gloo ranks.

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/scripts/dpo_two_ranks.py OUT

Both ranks build the same tiny model and pairs, train a few steps (each rank its own half of every batch), and write
OUT/rank{r}.json: the pairs the rank trained on (first prompt token per row is enough to tell them apart), a checksum
of every weight after training, and the logged metrics.
"""

import json
import sys
from pathlib import Path

import torch
from datasets import Dataset

from musicrl_trl import MusicDPOConfig, MusicDPOTrainer, generate_rollout
from musicrl_trl.testing import tiny_musicgen


def main(out: Path) -> None:
    model, processor = tiny_musicgen()
    torch.manual_seed(0)
    rollout = generate_rollout(model, processor, [f"prompt {index}" for index in range(16)], num_steps=10)
    codes = rollout.codes.tolist()
    pairs = Dataset.from_dict({"prompt": rollout.prompts[:8], "chosen_codes": codes[:8], "rejected_codes": codes[8:]})
    args = MusicDPOConfig(str(out / "run"), per_device_train_batch_size=2, max_steps=2, learning_rate=1e-3,
                          report_to=[], logging_steps=1, save_strategy="no", disable_tqdm=True)  # fmt: skip
    trainer = MusicDPOTrainer(model, args=args, train_dataset=pairs, processing_class=processor)
    seen = []
    collate = trainer.data_collator

    def recording_collator(rows):
        seen.extend(row["prompt"] for row in rows)
        return collate(rows)

    trainer.data_collator = recording_collator
    trainer.train()
    rank = trainer.accelerator.process_index
    policy = trainer.accelerator.unwrap_model(trainer.model)
    checksum = sum(float(parameter.detach().double().sum()) for parameter in policy.parameters())
    record = {"rank": rank, "world": trainer.accelerator.num_processes, "seen": seen, "checksum": checksum,
              "logs": [entry for entry in trainer.state.log_history if "loss" in entry]}  # fmt: skip
    (out / f"rank{rank}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
