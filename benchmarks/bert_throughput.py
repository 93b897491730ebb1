"""BERT pretraining throughput (sequences/s) with LAMB and VRLAMB on one device.

    python -m benchmarks.bert_throughput [--device cuda] [--size large] [--micro-batch 64] [--seq 128]

Phase-1 shapes (sequence 128, 20 masked positions), bf16 autocast on CUDA, one process:
each step is ``--accum`` micro-batches (k = accum gradient groups for VRLAMB, squared by
:class:`~vrgd_ds.MicroStepMoments` hooks) and one optimizer step. Two identical models,
one per optimizer, are stepped round-robin so both see the same machine; the JSON has the
median step time and sequences/s of each and their ratio.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from vrgd_ds import LAMB, MicroStepMoments, VRLAMB


def micro_batch(gen, vocab, batch, seq, device):
    masked = seq * 20 // 128
    ids = torch.randint(5, vocab, (batch, seq), generator=gen)
    pos = torch.sort(torch.randint(1, seq, (batch, masked), generator=gen), dim=1).values
    out = {"input_ids": ids, "token_type_ids": torch.zeros_like(ids), "attention_mask": torch.ones_like(ids),
           "masked_lm_positions": pos, "masked_lm_ids": torch.gather(ids, 1, pos),
           "next_sentence_label": torch.randint(0, 2, (batch,), generator=gen)}
    return {k: v.to(device) for k, v in out.items()}


def main(argv=None):
    from pretrain_bert.modeling import BertForPreTrainingMasked, bert_config

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--size", default="large")
    ap.add_argument("--vocab", type=int, default=30522)
    ap.add_argument("--micro-batch", type=int, default=64)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--accum", type=int, default=2)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--out", default="results/bert_throughput")
    args = ap.parse_args(argv)
    cuda = args.device.startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    cfg = bert_config(args.size, vocab_size=args.vocab)
    runs = {}
    start = time.perf_counter()
    for name in ("LAMB", "VRLAMB"):
        torch.manual_seed(0)
        model = BertForPreTrainingMasked(cfg).to(args.device)
        moments = MicroStepMoments(model.parameters()) if name == "VRLAMB" else None
        opt = (VRLAMB(model.parameters(), lr=1e-4, moments=moments) if moments is not None
               else LAMB(model.parameters(), lr=1e-4))
        runs[name] = (model, opt)
        print(f"{name}: model built ({time.perf_counter() - start:.0f} s)", flush=True)
    gen = torch.Generator().manual_seed(1)
    times = {name: [] for name in runs}
    for step in range(args.warmup + args.steps):
        for name, (model, opt) in runs.items():
            batches = [micro_batch(gen, args.vocab, args.micro_batch, args.seq, args.device) for _ in range(args.accum)]
            sync()
            t0 = time.perf_counter()
            for b in batches:
                with torch.autocast(args.device.split(":")[0], dtype=torch.bfloat16, enabled=cuda):
                    loss = model(**b).loss / args.accum
                loss.backward()
            opt.step()
            opt.zero_grad()
            sync()
            took = time.perf_counter() - t0
            if step >= args.warmup:
                times[name].append(took)
            print(f"step {step} {'(warm-up) ' if step < args.warmup else ''}{name}: {took * 1e3:.1f} ms", flush=True)
    seqs = args.micro_batch * args.accum
    med = {n: statistics.median(v) for n, v in times.items()}
    result = {"size": args.size, "params": sum(p.numel() for p in runs["LAMB"][0].parameters()),
              "device": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__,
              "micro_batch": args.micro_batch, "accum": args.accum, "seq": args.seq, "bf16_autocast": cuda,
              "median_step_s": med, "sequences_per_s": {n: seqs / t for n, t in med.items()},
              "VRLAMB/LAMB step time": med["VRLAMB"] / med["LAMB"], "step_times_s": times}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"bert_throughput_{args.size}.json").write_text(json.dumps(result, indent=1))
    for n, t in med.items():
        print(f"{n:8s} {t * 1e3:9.1f} ms/step  {seqs / t:9.1f} sequences/s")
    print(f"VRLAMB/LAMB step time {result['VRLAMB/LAMB step time']:.3f}")
    return result


if __name__ == "__main__":
    main()
