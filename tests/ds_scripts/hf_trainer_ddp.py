"""Worker for tests/test_hf_trainer_ddp.py: HF Trainer with plain DDP (no DeepSpeed), our
optimizer passed in, its moment source attached by ``vrgd_ds.hf.attach_moments``.

    torchrun --nproc_per_node 2 tests/ds_scripts/hf_trainer_ddp.py --out DIR [--optimizer VRLAMB]
    python tests/ds_scripts/hf_trainer_ddp.py --out DIR      (one process: MicroStepMoments)

A tiny BERT sequence classifier built from a config (no download, no dropout), random token
data. Rank 0 saves the initial weights; every rank records the batches its forward passes
saw; rank 0 writes them with the final weights, for a reference that forms every group.
"""

import argparse
import json

import torch
import torch.distributed as dist
from transformers import BertConfig, BertForSequenceClassification, Trainer, TrainerCallback, TrainingArguments

from hf_trainer_tiny import Tokens  # this folder: the script's own, first on sys.path
from vrgd_ds import VRAdamW, VRLAMB
from vrgd_ds.hf import attach_moments


def tiny_bert():
    torch.manual_seed(0)
    return BertForSequenceClassification._from_config(BertConfig(
        vocab_size=60, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=16, num_labels=2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))


OPTIMIZERS = {"VRLAMB": (VRLAMB, dict(lr=0.02, weight_decay=0.01, gamma=0.1, beta3=0.9)),
              "VRAdamW": (VRAdamW, dict(lr=0.01, weight_decay=0.01, gamma=0.1, beta3=0.0, eps=1e-8))}


class GroupCounts(TrainerCallback):
    """k as each step reads it (after Trainer's clipping, before the optimizer step)."""

    def __init__(self):
        self.source, self.counts = None, []

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.counts.append(self.source.moments.group_count)


def recorded_model():
    """tiny_bert, its initial weights kept, and the list its forward passes append their
    batches to (this rank's, in order)."""
    model = tiny_bert()
    model.initial = [p.detach().clone() for p in model.parameters()]
    seen = []
    model.register_forward_pre_hook(
        lambda _m, _a, kw: seen.append((kw["input_ids"].clone(), kw["labels"].clone())), with_kwargs=True)
    return model, seen


def save_result(out, model, seen, **extra):
    """Rank 0 writes ``result.pt``: names, initial and final weights, every rank's batches."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    everyone = [seen]
    if world > 1:
        everyone = [None] * world
        dist.all_gather_object(everyone, seen)
    if not dist.is_initialized() or dist.get_rank() == 0:
        torch.save({"names": [n for n, _ in model.named_parameters()], "initial": model.initial,
                    "final": [p.detach().clone() for p in model.parameters()], "seen": everyone, **extra},
                   f"{out}/result.pt")
        json.dump({"ok": True}, open(f"{out}/done.json", "w"))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--optimizer", default="VRLAMB", choices=list(OPTIMIZERS))
    ap.add_argument("--mode", default="micro")
    ap.add_argument("--accumulation", type=int, default=2)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--max-grad-norm", type=float, default=0.05)
    ap.add_argument("--save-steps", type=int, default=0, help="save a Trainer checkpoint every N steps")
    ap.add_argument("--resume", default=None, help="resume from this Trainer checkpoint")
    ap.add_argument("--gradient-checkpointing", choices=["reentrant", "non-reentrant"], default=None)
    ap.add_argument("--torch-compile", action="store_true")
    ap.add_argument("--train-twice", action="store_true", help="call trainer.train() a second time")
    ap.add_argument("--own-moments", action="store_true", help="attach a MicroStepMoments first (refused)")
    args = ap.parse_args()
    targs = TrainingArguments(
        output_dir=args.out, per_device_train_batch_size=4, gradient_accumulation_steps=args.accumulation,
        max_steps=args.steps, max_grad_norm=args.max_grad_norm, lr_scheduler_type="constant",
        report_to=[], save_strategy="steps" if args.save_steps else "no", save_steps=args.save_steps or 500,
        use_cpu=True, logging_steps=1, seed=0,
        gradient_checkpointing=args.gradient_checkpointing is not None, torch_compile=args.torch_compile,
        gradient_checkpointing_kwargs={"use_reentrant": args.gradient_checkpointing == "reentrant"})
    assert targs.device.type == "cpu"
    model, seen = recorded_model()
    cls, hp = OPTIMIZERS[args.optimizer]
    moments = None
    if args.own_moments:
        from vrgd_ds.moments import MicroStepMoments

        moments = MicroStepMoments(model.parameters())
    opt = cls(model.parameters(), moments=moments, **hp)
    trainer = Trainer(model=model, args=targs, train_dataset=Tokens(seq=12, vocab=60), optimizers=(opt, None))
    counts = GroupCounts()
    counts.source = attach_moments(trainer, mode=args.mode)
    trainer.add_callback(counts)
    trainer.train(resume_from_checkpoint=args.resume)
    src = counts.source.moments
    history = list(trainer.state.log_history)
    if args.train_twice:  # the same DDP model: the callback keeps its source (DDP takes one hook)
        trainer.train()  # a new TrainerState: its log starts again
        assert counts.source.moments is src
        history += trainer.state.log_history
    save_result(args.out, model, seen, hp=hp, source=type(src).__name__,
                wrapped=type(trainer.model_wrapped).__name__, checkpointing=model.is_gradient_checkpointing,
                k=counts.counts, samples_per_group=src.samples_per_group, max_grad_norm=args.max_grad_norm,
                grad_norms=[h["grad_norm"] for h in history if "grad_norm" in h],
                losses=[h["loss"] for h in history if "loss" in h])
    if dist.is_initialized():
        dist.destroy_process_group()  # see hf_trainer_tiny.py: Trainer leaves the group alive


if __name__ == "__main__":
    main()
