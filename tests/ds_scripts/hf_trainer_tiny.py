"""Worker for tests/test_deepspeed_*.py: HF Trainer with --deepspeed selecting our optimizer.

    deepspeed --num_gpus 2 tests/ds_scripts/hf_trainer_tiny.py --config CFG.json --out DIR

A tiny BERT sequence classifier built from a config (no download), random token data.
"""

import argparse
import json

import torch

import vrgd_ds  # noqa: F401  (registers the optimizers with DeepSpeed)
from transformers import BertConfig, BertForSequenceClassification, Trainer, TrainingArguments


class Tokens(torch.utils.data.Dataset):
    def __init__(self, n=64, seq=16, vocab=100):
        gen = torch.Generator().manual_seed(0)
        self.ids = torch.randint(0, vocab, (n, seq), generator=gen)
        self.labels = (self.ids[:, 0] % 2).long()

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.labels[i]}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--local_rank", type=int, default=0)
    args = ap.parse_args()
    torch.manual_seed(0)
    targs = TrainingArguments(
        output_dir=args.out, per_device_train_batch_size=8, gradient_accumulation_steps=2,
        max_steps=3, learning_rate=0.01, weight_decay=0.01, max_grad_norm=1.0,
        deepspeed=args.config, report_to=[], save_strategy="no", use_cpu=True, logging_steps=1)
    # built after the TrainingArguments (whose device sets up torch.distributed), as
    # from_pretrained would be: under ZeRO-3 HF builds it inside deepspeed.zero.Init (each
    # rank allocates only its partition of every parameter)
    assert targs.device.type == "cpu" and torch.distributed.is_initialized()
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")  # DeepSpeed's comm on that group (HF's CPU path skips it)
    model = BertForSequenceClassification._from_config(BertConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=32, num_labels=2))
    zero_init = hasattr(next(model.parameters()), "ds_id")
    trainer = Trainer(model=model, args=targs, train_dataset=Tokens())
    trainer.train()
    opt = trainer.optimizer
    inner = getattr(opt, "optimizer", opt)
    inner = getattr(inner, "optimizer", inner)
    from vrgd_ds.deepspeed.telemetry import named_telemetry

    if trainer.args.process_index == 0:
        json.dump({"optimizer": type(inner).__name__, "layout": type(getattr(inner, "layout", None)).__name__,
                   "losses": [h["loss"] for h in trainer.state.log_history if "loss" in h],
                   "telemetry": named_telemetry(trainer.model_wrapped), "zero_init": zero_init},
                  open(f"{args.out}/result.json", "w"))
    # HF Trainer leaves the process group alive; a gloo rank that exits without destroying it
    # can abort in interpreter teardown ("terminate called without an active exception", rc 250;
    # pytorch/pytorch issue 190489). Seen in CI: 2 of 2 Trainer launches in one run.
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
