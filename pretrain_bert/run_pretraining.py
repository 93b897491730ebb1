"""BERT pretraining, one phase per run, on DeepSpeed with the vrgd-ds optimizers.

    deepspeed --num_gpus 2 pretrain_bert/run_pretraining.py --config configs/bert_tiny_phase1_vrlamb.json \\
        --data runs/data128 --output-dir runs/demo/phase1
    deepspeed --num_gpus 2 pretrain_bert/run_pretraining.py --config configs/bert_tiny_phase2_vrlamb.json \\
        --data runs/data512 --output-dir runs/demo/phase2 --init-checkpoint runs/demo/phase1/hf

The config is a DeepSpeed JSON with one extra block, ``"pretraining"`` (removed before
DeepSpeed sees the config; read as a typed :class:`pretrain_bert.run_config.PhaseConfig`): model size, phase,
max_steps, warm-up proportion, poly power, eval/checkpoint intervals. The global batch,
micro-batch and accumulation are DeepSpeed's own keys, so a phase-2 config with another
``train_batch_size`` is the "mixed batch" of the paper. Phase 2 starts from phase 1's
weights (``--init-checkpoint``, a ``save_pretrained`` folder) with its own batch, sequence
length and LR schedule; ``--carry-optimizer-state`` also carries phase 1's optimizer state.

Data order: one seeded permutation per epoch over the prepared instances; global step s
takes the next ``train_batch_size`` of them, split into ranks x micro-steps exactly as
the tests' reference does (micro-batch j of rank r is chunk j * W + r). The position is a
pure function of the step, and the dropout RNG is seeded from (seed, step, rank), so
``--resume`` continues with the same data and the same loss curve (:mod:`pretrain_bert.runtime`
holds the batches, the seed formulas and the process-group set-up, shared with SQuAD).

Writes into ``--output-dir``: ``metrics.jsonl`` (train/eval records; the plot command
reads it), DeepSpeed monitor output if the config enables it, ``checkpoints/`` (DeepSpeed
checkpoints ``step<N>`` every ``checkpoint_every`` steps and at the end, the newest
``keep_checkpoints`` kept, plus ``complete.json`` naming them, written atomically after all
ranks saved and synced their files; :mod:`pretrain_bert.checkpointing`), and ``hf/``
(``BertForPreTraining`` weights in fp32 + tokenizer: ``from_pretrained`` loads it).
A folder that already holds a run is refused unless ``--resume`` is given; ``--resume`` starts
from the newest complete checkpoint (step 0 if the run was killed before its first), refuses
a folder without a run (a wrong path), and of a finished run only writes ``hf/`` again.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

import torch

import vrgd_ds  # noqa: F401  (registers the optimizers with DeepSpeed)
import deepspeed
import torch.distributed as dist

from pretrain_bert import checkpointing, run_config
from pretrain_bert.faults import fault, install_torch_save_fault, torn_append
from pretrain_bert.modeling import BertForPreTrainingMasked, bert_config
from pretrain_bert.pretraining_dataset import collate, load_meta, load_pretraining_data
from pretrain_bert.batch_schedule import BatchSchedule, SampleStream, lr_multiplier
from pretrain_bert.runtime import (
    Batches, deepspeed_run, dropout_seed, fsync_dir, fsync_tree, on_device, param_groups, progress_bar,
    sum_over_ranks, write_json_atomic,
)
from pretrain_bert.schedule import poly_warmup_scheduler
from vrgd_ds.deepspeed.telemetry import named_telemetry, noise_scale_source


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", required=True, help="DeepSpeed JSON with a 'pretraining' block")
    ap.add_argument("--data", required=True, help="folder written by python -m pretrain_bert.data")
    ap.add_argument("--output-dir", required=True)
    ap.add_argument("--init-checkpoint", default=None, help="save_pretrained folder to start from (phase 2)")
    ap.add_argument("--carry-optimizer-state", action="store_true",
                    help="with --init-checkpoint: also load that run's final optimizer state")
    ap.add_argument("--resume", action="store_true",
                    help="continue the run in --output-dir from its newest complete checkpoint (step 0 if none)")
    ap.add_argument("--max-steps", type=int, default=None, help="override pretraining.max_steps")
    ap.add_argument("--eval-every", type=int, default=None)
    ap.add_argument("--checkpoint-every", type=int, default=None)
    ap.add_argument("--keep-checkpoints", type=int, default=None, help="override pretraining.keep_checkpoints")
    ap.add_argument("--log-every", type=int, default=None)
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--local_rank", type=int, default=int(os.environ.get("LOCAL_RANK", 0)))
    return ap.parse_args(argv)


def build_model(run, meta, init_checkpoint):
    if init_checkpoint:
        path = Path(init_checkpoint)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"--init-checkpoint {str(path)!r} is not a save_pretrained folder "
                                    "(no config.json); pass the hf/ folder of a finished phase")
        return BertForPreTrainingMasked.from_pretrained(path)
    torch.manual_seed(run.seed)
    cfg = bert_config(run.model, vocab_size=meta["vocab"]["size"],
                      max_position_embeddings=run.max_position_embeddings)
    return BertForPreTrainingMasked(cfg)


@torch.no_grad()
def evaluate_heldout(engine, heldout, micro, max_batches):
    """Held-out MLM loss/accuracy and NSP accuracy over all ranks (sums, then one all-reduce)."""
    engine.eval()
    w, r = dist.get_world_size(), dist.get_rank()
    n = len(heldout) if not max_batches else min(len(heldout), max_batches * micro * w)
    sums = torch.zeros(6, dtype=torch.float64)  # mlm loss sum, mlm correct, mlm total, nsp loss sum, nsp correct, rows
    for start in range(r * micro, n, w * micro):
        batch = on_device(collate([heldout[i] for i in range(start, min(start + micro, n))]), engine.device)
        out = engine(**batch)
        rows = batch["input_ids"].shape[0]
        sums += torch.tensor([out.mlm_loss.item() * out.mlm_total.item(), out.mlm_correct.item(),
                              out.mlm_total.item(), out.nsp_loss.item() * rows, out.nsp_correct.item(), rows],
                             dtype=torch.float64)
        fault("eval")
    sums = sum_over_ranks(sums, engine.device)
    engine.train()
    if sums[2] == 0:
        raise RuntimeError(f"held-out evaluation saw {int(sums[5])} rows and no masked tokens; the held-out "
                           "split is empty or unmasked (check the data's meta.json), or set eval_every 0")
    mlm_loss, nsp_loss = sums[0] / max(sums[2], 1), sums[3] / max(sums[5], 1)
    return {"eval_mlm_loss": float(mlm_loss), "eval_mlm_acc": float(sums[1] / max(sums[2], 1)),
            "eval_nsp_loss": float(nsp_loss), "eval_nsp_acc": float(sums[4] / max(sums[5], 1)),
            "eval_loss": float(mlm_loss + nsp_loss), "eval_rows": int(sums[5])}


def save_hf(engine, ckpt_dir, tag, out_dir, meta):
    """fp32 master weights of a saved checkpoint -> a BertForPreTraining folder (rank 0).

    Written to ``hf.tmp``, synced, then swapped in by two renames; a kill at any point leaves
    either the old folder or none (never a torn one), and ``--resume`` writes it again."""
    import shutil

    from transformers import BertForPreTraining

    from pretrain_bert.tokenization import load_tokenizer
    from vrgd_ds.deepspeed.checkpoint import consolidate

    zero_stage = engine.zero_optimization_stage()
    if zero_stage in (1, 2, 3):
        weights = consolidate(Path(ckpt_dir) / tag)["weights"]
    else:
        weights = {n: p.detach().float() for n, p in engine.module.named_parameters()}
    fault("consolidated")
    model = BertForPreTraining(engine.module.config)
    missing = model.load_state_dict(weights, strict=False)  # the decoder is tied to the embeddings
    if missing.unexpected_keys or [k for k in missing.missing_keys if "predictions.decoder." not in k]:
        raise RuntimeError(f"weights do not match BertForPreTraining: {missing}")
    out_dir = Path(out_dir)
    tmp, old = out_dir.with_name(out_dir.name + ".tmp"), out_dir.with_name(out_dir.name + ".old")
    shutil.rmtree(tmp, ignore_errors=True)  # debris of a killed export
    model.save_pretrained(tmp)
    load_tokenizer(meta["vocab"]["path"]).save_pretrained(tmp)
    fsync_tree(tmp)
    fault("hf-written")
    if out_dir.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(out_dir, old)
    fault("hf-swap")
    os.replace(tmp, out_dir)
    fsync_dir(out_dir.parent)
    shutil.rmtree(old, ignore_errors=True)


def train_step(engine, micro_batches, dropout_seed):
    """One optimizer step over this rank's micro-batches; the boundary is set explicitly, so the
    number of micro-batches may change from step to step. Returns the summed losses (all ranks)."""
    losses = torch.zeros(3, dtype=torch.float64, device=engine.device)
    torch.manual_seed(dropout_seed)  # dropout: resumable, per rank
    for j, b in enumerate(micro_batches):
        engine.set_gradient_accumulation_boundary(j == len(micro_batches) - 1)
        o = engine(**on_device(b, engine.device))
        engine.backward(o.loss)
        engine.step()
        # summed on the device: no host sync per micro-step
        losses += torch.stack([o.loss.detach(), o.mlm_loss.detach(), o.nsp_loss.detach()]).double()
        fault("micro")
    return sum_over_ranks(losses, engine.device)


def set_lr(engine, scheduler, multiplier):
    """Every param group's LR = its base LR x ``multiplier`` (the LambdaLR returns the same)."""
    for group, base in zip(engine.optimizer.param_groups, scheduler.base_lrs):
        group["lr"] = base * multiplier
    scheduler._last_lr = [g["lr"] for g in engine.optimizer.param_groups]


def new_noise_record(engine, seen):
    """(the noise-scale record if one was made since ``seen``, the step it was made at)."""
    rec = named_telemetry(engine)
    if rec is None or "b_simple_ema" not in rec or rec["step"] == seen:
        return None, seen
    box = [rec]  # rank 0's numbers decide, so every rank takes the same batch
    dist.broadcast_object_list(box, src=0)
    return box[0], rec["step"]


def save_checkpoint(engine, ckpt_dir, step, keep, sched):
    """Save tag step<N> on every rank, sync it, then (rank 0) mark it complete and apply retention."""
    tag = checkpointing.tag_for(step)
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state={"step": step, "batch_schedule": sched.state_dict()})
    fault("saved")
    fsync_tree(Path(ckpt_dir) / tag)
    dist.barrier()  # every rank's files are on disk before the checkpoint is marked complete
    fault("before-mark")
    if dist.get_rank() == 0:
        checkpointing.mark_complete(ckpt_dir, tag, step, keep, fault=fault)


def check_before_start(args, run, meta, out):
    """Everything refused before a process group exists or a file is written. Rank 0 also takes
    the output folder's lock; returns (completion record to resume from, lock handle)."""
    if run.eval_every and not meta.get("instances", {}).get("heldout"):
        raise ValueError(f"--data {str(args.data)!r} has no held-out instances, but pretraining.eval_every is "
                         f"{run.eval_every}: prepare the data with --heldout-fraction > 0, or set eval_every 0")
    if int(os.environ.get("RANK", "0")) != 0:
        return None, None  # rank 0 alone judges the folder (it may already be writing to it)
    checkpointing.check_output_dir(out, args.resume)  # a refusal writes nothing
    lock = checkpointing.lock_output_dir(out)
    found = checkpointing.check_output_dir(out, args.resume)  # again: another run may have written meanwhile
    if found is not None and found["step"] > run.max_steps:
        raise ValueError(f"--resume: the newest complete checkpoint ({found['tag']}) is at step {found['step']}, "
                         f"beyond max_steps {run.max_steps}; pass --max-steps {found['step']} or more")
    return found, lock


def start_step(engine, args, found, ckpt_dir):
    """Load the checkpoint to resume from (all ranks get rank 0's record) or phase 1's optimizer state."""
    box = [found]
    dist.broadcast_object_list(box, src=0)
    found = box[0]
    if found is not None:
        _, client = engine.load_checkpoint(str(ckpt_dir), tag=found["tag"])
        return client["step"], client
    if args.init_checkpoint and args.carry_optimizer_state:
        checkpointing.carry_optimizer_state(engine, args.init_checkpoint, ckpt_dir.parent)
    return 0, None


def prepare_output(out, args, run, config, start, world):
    """Rank 0: metrics.jsonl cut back to the checkpoint, debris of killed saves removed, run.json.
    (Runs after start_step: a carried optimizer state is loaded by then.)"""
    note = checkpointing.truncate_metrics(out / "metrics.jsonl", start)
    if note:
        print(f"[run_pretraining] {note}", flush=True)
    carried = out / checkpointing.CARRIED
    if carried.exists():  # a --carry-optimizer-state killed before it removed its file
        carried.unlink()
        print(f"[run_pretraining] removed {carried}: left by a killed --carry-optimizer-state", flush=True)
    for folder in checkpointing.remove_unlisted(out / "checkpoints") if args.resume else []:
        print(f"[run_pretraining] removed {folder}: not a complete checkpoint (a save was killed)", flush=True)
    write_json_atomic(out / "run.json", {"config": args.config, "run": run.as_dict(), "data": str(args.data),
                                         "world_size": world, "ds_config": config}, indent=1)


def main(argv=None):
    args = parse_args(argv)
    config, run = run_config.load(args.config, args)
    out = Path(args.output_dir)
    meta = load_meta(args.data)
    run.check_data(meta, args.data)
    found, run_lock = check_before_start(args, run, meta, out)  # noqa: F841  (held until exit)
    install_torch_save_fault()
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # one bar per phase: ours (not weight loading/saving)
    with deepspeed_run() as (rank, world):
        pretrain(args, config, run, meta, out, found, rank, world)


def pretrain(args, config, run, meta, out, found, rank, world):
    """The phase from its start step (0, or the checkpoint ``found``) to max_steps / max_samples,
    then (rank 0) the ``hf/`` export."""
    model = build_model(run, meta, args.init_checkpoint)
    dynamic = (run.batch_schedule or {}).get("type", "fixed") != "fixed" or run.max_samples > 0
    lr_now = [1.0]  # with a batch schedule the LR multiplier is set before each step
    engine, _, _, scheduler = deepspeed.initialize(
        model=model, model_parameters=param_groups(model), config=config,
        lr_scheduler=(lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda _: lr_now[0])) if dynamic else
        (lambda opt: poly_warmup_scheduler(opt, run.max_steps, run.warmup_proportion, run.poly_power)))
    micro = engine.train_micro_batch_size_per_gpu()
    sched = BatchSchedule(run.batch_schedule, engine.train_batch_size(), micro * world)
    if sched.kind == "gns" and not noise_scale_source(engine):
        raise ValueError("pretraining.batch_schedule gns needs the noise scale: give the VR optimizer a "
                         "telemetry_interval > 0, or (any optimizer) add \"vrgd_noise_scale\": {\"interval\": N}")
    ckpt_dir = out / "checkpoints"
    start, client = start_step(engine, args, found, ckpt_dir)
    if client and "batch_schedule" in client:
        sched.load_state_dict(client["batch_schedule"])
    elif start:  # a fixed-batch checkpoint of an earlier version
        sched.samples = start * sched.batch
    if rank == 0:
        prepare_output(out, args, run, config, start, world)
    train = load_pretraining_data(args.data, "train")
    heldout = load_pretraining_data(args.data, "heldout")
    if dynamic:
        stream = SampleStream(train, run.seed)
    else:
        batches = Batches(len(train), engine.train_batch_size(), world, rank, engine.gradient_accumulation_steps(),
                          run.seed, lambda rows: collate([train[int(i)] for i in rows]), unit="instances",
                          remedy="prepare more data or lower train_batch_size")
    log = Logger(out, engine, run, start, args.no_progress)
    step, seen = start, None
    while step < run.max_steps and not (run.max_samples and sched.samples >= run.max_samples):
        batch = sched.batch_for(step)
        if run.max_samples:  # the last batch takes no more than the samples left (in whole units)
            batch = min(batch, -(-(run.max_samples - sched.samples) // sched.unit) * sched.unit)
        if batch != engine.train_batch_size():
            engine.set_train_batch_size(batch)  # more or fewer accumulation micro-steps
        gas = batch // (micro * world)
        if dynamic:
            lr_now[0] = lr_multiplier(sched, run)
            set_lr(engine, scheduler, lr_now[0])
            micro_batches = stream.micro_batches(sched.samples, batch, world, gas, rank, collate)
            epoch = stream.epoch(sched.samples)
        else:
            micro_batches, epoch = batches(step), batches.epoch(step)
        lr = scheduler.get_last_lr()[0]  # the LR this step uses
        losses = train_step(engine, micro_batches, dropout_seed(run.seed, step, world, rank))
        losses /= world * gas
        sched.consumed(batch)
        noise, seen = new_noise_record(engine, seen)
        if noise is not None:
            sched.observe(step, noise["b_simple_ema"])
        log.train(step, losses, lr, epoch, sched.samples, batch, noise)
        step += 1
        last = step == run.max_steps or bool(run.max_samples and sched.samples >= run.max_samples)
        if run.eval_every and (step % run.eval_every == 0 or last):
            log.eval(step - 1, evaluate_heldout(engine, heldout, micro, run.eval_batches))
        if last or (run.checkpoint_every and step % run.checkpoint_every == 0):
            save_checkpoint(engine, ckpt_dir, step, run.keep_checkpoints, sched)
    if rank == 0:  # also after a resume of a finished run: the export may have been killed
        save_hf(engine, ckpt_dir, checkpointing.tag_for(step), out / "hf", meta)
    log.close()


class Logger:
    """metrics.jsonl + DeepSpeed monitor + a progress bar (rank 0 only)."""

    def __init__(self, out, engine, run, start, no_progress):
        self.on = dist.get_rank() == 0
        self.engine, self.run, self.out = engine, run, out
        self.t0, self.start, self.window = time.perf_counter(), start, max(1, run.eval_every or 10)
        self.recent = self._recent_losses(start) if self.on and start else []  # the gap after a resume
        self.bar = progress_bar(run.max_steps, f"phase {run.phase}", "step", self.on and not no_progress, start)

    def _recent_losses(self, start):
        """The train losses up to ``start`` that an uninterrupted run would still average (rank 0)."""
        path = self.out / "metrics.jsonl"
        lines = path.read_text().splitlines() if path.is_file() else []
        records = [json.loads(line) for line in lines]
        return [r["loss"] for r in records if "loss" in r and r["step"] <= start][-self.window:]

    def _write(self, rec):
        torn_append(self.out / "metrics.jsonl", json.dumps(rec) + "\n")

    def train(self, step, losses, lr, epoch, samples, batch, noise=None):
        loss = float(losses[0])
        self.recent = (self.recent + [loss])[-self.window:]
        if not self.on:
            return
        self.samples_since_start = getattr(self, "samples_since_start", 0) + batch
        elapsed = time.perf_counter() - self.t0
        rate = self.samples_since_start / max(elapsed, 1e-9)
        rec = {"phase": self.run.phase, "step": step + 1, "epoch": epoch, "samples": samples, "batch": batch,
               "loss": loss, "mlm_loss": float(losses[1]), "nsp_loss": float(losses[2]), "lr": lr,
               "samples_per_s": rate}
        if noise is not None:  # the gradient noise scale measured at this step (whole model)
            rec.update({f"gns_{k}": noise[k] for k in ("b_simple", "b_simple_ema", "trace_cov", "grad_sq")})
            self.b_crit = noise["b_simple_ema"]
        self._write(rec)
        if not math.isfinite(loss):
            raise FloatingPointError(f"training loss is {loss} at step {step + 1}")
        if self.engine.monitor.enabled:
            self.engine.monitor.write_events([("Train/loss", loss, step + 1), ("Train/lr", lr, step + 1),
                                              ("Train/samples_per_s", rate, step + 1)])
        if self.bar is not None:
            extra = {"B": batch} if self.run.batch_schedule else {}
            if getattr(self, "b_crit", None) is not None:
                extra["B_crit"] = f"{self.b_crit:.0f}"
            self.bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.2e}", samples_s=f"{rate:.0f}", **extra)
            self.bar.update(1)

    def eval(self, step, metrics):
        train_recent = sum(self.recent) / len(self.recent)
        metrics = dict(metrics, step=step + 1, phase=self.run.phase, train_loss_recent=train_recent,
                       generalization_gap=metrics["eval_loss"] - train_recent)
        if not self.on:
            return
        self._write(metrics)
        if self.engine.monitor.enabled:
            self.engine.monitor.write_events([(f"Eval/{k}", v, step + 1) for k, v in metrics.items()
                                              if k.startswith(("eval_", "generalization")) and k != "eval_rows"])
        if self.bar is not None:
            self.bar.write(f"step {step + 1}: held-out MLM loss {metrics['eval_mlm_loss']:.3f} "
                           f"acc {metrics['eval_mlm_acc']:.3f}, NSP acc {metrics['eval_nsp_acc']:.3f}, "
                           f"gap {metrics['generalization_gap']:+.3f}")

    def close(self):
        if self.bar is not None:
            self.bar.close()


if __name__ == "__main__":
    main()
