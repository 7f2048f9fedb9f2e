"""TRL trains rmconvert's reward models (``tox -e trl``, TRL pinned there): a converted checkpoint, loaded as
users load it, goes through ``RewardTrainer`` for a few steps and its loss falls. A guard that the main output
keeps working with the TRL release the suite pins. Without TRL installed the module is skipped."""

from __future__ import annotations

import pytest

pytest.importorskip("trl")

import torch
from transformers import AutoTokenizer

from rmconvert import convert, load_reward_model

#: Pairs a tiny model learns to rank within a few steps (the chosen texts share words the rejected lack).
CHOSEN = ["the answer is good and helpful", "good helpful answer", "yes it is good", "a helpful and honest reply"]
REJECTED = ["no", "bad", "no no no", "is the reward model honest?"]


@pytest.mark.parametrize("kind", ["llama3", "olmo2"])  # a native sequence classifier, one rmconvert builds
def test_reward_trainer_trains_a_converted_reward_model(build, tmp_path, kind):
    from datasets import Dataset
    from trl import RewardConfig, RewardTrainer

    dst = tmp_path / "rm"
    convert(build(kind), dst)
    torch.manual_seed(0)
    model = load_reward_model(dst)
    tokenizer = AutoTokenizer.from_pretrained(dst)
    data = Dataset.from_dict({"chosen": CHOSEN * 4, "rejected": REJECTED * 4})
    args = RewardConfig(
        output_dir=str(tmp_path / "out"),
        max_steps=8,
        per_device_train_batch_size=4,
        learning_rate=1e-3,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=0,
        dataloader_num_workers=0,
    )
    trainer = RewardTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer)
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 8
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3, losses
