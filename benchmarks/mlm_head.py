"""BERT forward+backward step time: the stock full-sequence MLM head vs the masked-positions head.

    python -m benchmarks.mlm_head [--steps 10] [--warmup 2] [--batch 8 2] [--full] [--quick]
                                  [--out results/mlm_head]

One `BertForPreTrainingMasked` per size (real BERT vocabulary, 30522) runs the same batch both
ways: with full-length `labels` (exactly the stock `BertForPreTraining.forward`: MLM head on all
B * S tokens) and with `masked_lm_positions` (head on the B * P slots). The two are stepped
alternately, so every sample of both sees the same machine load; the JSON has the medians and
the speedup stock / masked. Sequences are full and carry NVIDIA's number of predictions,
min(P, round(0.15 S)): 19 of 20 slots at S = 128, 77 of 80 at S = 512. Train mode, fp32, CPU
unless a GPU is present; no optimizer step. The default batches (8 at S = 128, 2 at S = 512) are
small because the stock head's [B * S, 30522] fp32 logits and their gradients take ~0.5 GB per
1024 tokens; the time per token, hence the speedup, hardly depends on the batch.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from pretrain_bert.modeling import BertForPreTrainingMasked, bert_config, masked_to_labels

CASES = ((128, 20), (512, 80))  # (sequence length, prediction slots), NVIDIA's phase 1 and 2
VOCAB = 30522


def make_batch(batch, seq, slots, vocab, device, seed=0):
    """Full-length random sequences with NVIDIA's masked-slot count, in both label formats."""
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(1000, vocab, (batch, seq), generator=g)
    input_ids[:, 0] = 101                                             # [CLS]
    token_type_ids = torch.zeros(batch, seq, dtype=torch.long)
    token_type_ids[:, seq // 2:] = 1
    n_masked = min(slots, round(0.15 * seq))
    positions = torch.zeros(batch, slots, dtype=torch.long)
    for row in range(batch):
        positions[row, :n_masked] = 1 + torch.randperm(seq - 1, generator=g)[:n_masked].sort().values
    ids = torch.where(positions != 0, input_ids.gather(1, positions), 0)
    input_ids.scatter_(1, positions[:, :n_masked], 103)               # [MASK]
    common = dict(input_ids=input_ids, attention_mask=torch.ones(batch, seq, dtype=torch.long),
                  token_type_ids=token_type_ids,
                  next_sentence_label=torch.randint(0, 2, (batch,), generator=g))
    stock = dict(common, labels=masked_to_labels(positions, ids, seq))
    masked = dict(common, masked_lm_positions=positions, masked_lm_ids=ids)
    to = lambda d: {k: v.to(device) for k, v in d.items()}  # noqa: E731
    return to(stock), to(masked), n_masked


def time_case(size, seq, slots, batch, steps, warmup, device):
    torch.manual_seed(0)
    model = BertForPreTrainingMasked(bert_config(size, VOCAB, max_position_embeddings=max(512, seq)))
    model.to(device).train()
    stock_inputs, masked_inputs, n_masked = make_batch(batch, seq, slots, VOCAB, device)
    samples = {"stock": [], "masked": []}
    for i in range(warmup + steps):
        for head, inputs in (("stock", stock_inputs), ("masked", masked_inputs)):
            model.zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            model(**inputs).loss.backward()
            if device.type == "cuda":
                torch.cuda.synchronize()
            if i >= warmup:
                samples[head].append(time.perf_counter() - t0)
    med = {head: statistics.median(v) for head, v in samples.items()}
    return {
        "size": size, "seq": seq, "predictions": slots, "masked_per_row": n_masked, "batch": batch,
        "params": sum(p.numel() for p in model.parameters()),
        "stock_median_s": med["stock"], "masked_median_s": med["masked"],
        "speedup": med["stock"] / med["masked"],
        "stock_samples_s": samples["stock"], "masked_samples_s": samples["masked"],
    }


def plot(result, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = list(dict.fromkeys(c["size"] for c in result["cases"]))
    cases = list(dict.fromkeys((c["seq"], c["predictions"], c["batch"]) for c in result["cases"]))
    width = 0.8 / len(cases)
    fig, ax = plt.subplots(figsize=(2.2 + 1.8 * len(sizes), 4))
    for j, (seq, slots, batch) in enumerate(cases):
        xs, ys = [], []
        for i, size in enumerate(sizes):
            for c in result["cases"]:
                if (c["size"], c["seq"], c["predictions"]) == (size, seq, slots):
                    xs.append(i + (j - (len(cases) - 1) / 2) * width)
                    ys.append(c["speedup"])
        bars = ax.bar(xs, ys, width, label=f"seq {seq}, {slots} predictions, batch {batch}")
        ax.bar_label(bars, fmt="%.2fx", fontsize=8)
    ax.axhline(1.0, color="grey", lw=0.6, ls=":")
    ax.set_xticks(range(len(sizes)), [f"BERT-{s}" for s in sizes])
    ax.set_ylabel("speedup of forward+backward (stock / masked head)")
    ax.set_title(f"MLM head on masked positions only ({result['device']}, "
                 f"{result['threads']} threads)", fontsize=10)
    ax.legend(fontsize=8, loc="upper left")
    ax.set_ylim(0, max(c["speedup"] for c in result["cases"]) * 1.35)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=10, help="timed steps per head and case")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps per head and case")
    ap.add_argument("--batch", type=int, nargs=2, default=(8, 2), metavar=("B128", "B512"),
                    help="batch at sequence length 128 and 512")
    ap.add_argument("--full", action="store_true", help="add BERT-base (slow on CPU)")
    ap.add_argument("--quick", action="store_true", help="smoke run: tiny only, 2 steps, 1 warm-up")
    ap.add_argument("--out", default="results/mlm_head")
    args = ap.parse_args(argv)
    if args.steps < 1 or args.warmup < 0 or min(args.batch) < 1:
        ap.error(f"--steps and --batch must be >= 1 and --warmup >= 0, got {args.steps}, "
                 f"{args.batch} and {args.warmup}")

    sizes = ["tiny", "mini"] + (["base"] if args.full else [])
    steps, warmup = args.steps, args.warmup
    if args.quick:
        sizes, steps, warmup = ["tiny"], 2, 1
    cases = tuple((seq, slots, batch) for (seq, slots), batch in zip(CASES, args.batch))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    print(f"torch {torch.__version__}, {device}, {torch.get_num_threads()} threads")

    results = []
    for size in sizes:
        for seq, slots, batch in cases:
            r = time_case(size, seq, slots, batch, steps, warmup, device)
            results.append(r)
            print(f"{size:<5} seq {seq:>3} P {slots:>2} batch {batch:>2}: stock "
                  f"{r['stock_median_s'] * 1e3:8.1f} ms, masked {r['masked_median_s'] * 1e3:8.1f} ms, "
                  f"speedup {r['speedup']:.2f}x", flush=True)
    result = {
        "steps": steps, "warmup": warmup, "vocab": VOCAB, "torch": torch.__version__,
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "threads": torch.get_num_threads(), "machine": platform.processor() or platform.machine(),
        "speedup": {f"{r['size']} seq{r['seq']}/p{r['predictions']}": r["speedup"] for r in results},
        "cases": results,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "mlm_head.json").write_text(json.dumps(result, indent=2))
    plot(result, out / "mlm_head.png")
    print(f"wrote {out / 'mlm_head.json'} and {out / 'mlm_head.png'}")
    return result


if __name__ == "__main__":
    main()
