"""What handing the gradient over in the optimizer's flat buffer does to backward and step.

    python -m benchmarks.grad_handover [--rounds 6] [--micro 8] [--out results/grad_handover]

A BERT MLM (``transformers.BertForMaskedLM`` from a config: BERT-base by default, random
weights, nothing downloaded) trains with VRLAMB fed by ``MicroStepMoments`` (or, with
``--optimizer LAMB``, plain LAMB, which hands the gradient over itself: ``opt.flat_grads``). Each round
runs two steps of ``--micro`` micro-steps (``--batch`` x ``--seq`` tokens each), one per
mode, in alternating order:

- ``placed`` (the default, ``flat_grads=True``): the hooks write the squares and copy the
  first micro-step's gradient into the optimizer's flat buffers (``p.grad`` becomes a view),
  so the step gathers nothing;
- ``gathered`` (``flat_grads=False``): ``p.grad`` stays where autograd puts it and the step
  gathers it into the flat buffer.

Forward, backward and the optimizer step are timed separately; the JSON has every sample,
the medians, and the median over rounds of each placed - gathered difference (the two
steps of a round share the machine's load, so this is the steadier figure); the PNG the
medians. The first round (compilation, first placement) is
not timed, nor the second (the first steps on placed buffers compile their kernels).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from vrgd_ds import LAMB, MicroStepMoments, VRLAMB

MODES = ("placed", "gathered")
WARMUP = 2  # untimed rounds


def build(tiny: bool, seed: int = 0):
    from transformers import BertConfig, BertForMaskedLM

    torch.manual_seed(seed)
    config = BertConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=2, intermediate_size=128,
                        vocab_size=1000) if tiny else BertConfig()
    return BertForMaskedLM(config)


def one_step(model, moments, opt, ids, micro: int, placed: bool) -> dict:
    if moments is not None:
        moments.flat_grads = placed
    opt.flat_grads = placed  # plain LAMB hands the gradient over itself
    fwd = bwd = 0.0
    for chunk in ids.chunk(micro):
        t0 = time.perf_counter()
        loss = model(input_ids=chunk, labels=chunk).loss / micro
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        fwd, bwd = fwd + t1 - t0, bwd + t2 - t1
    t0 = time.perf_counter()
    opt.step()
    step = time.perf_counter() - t0
    opt.zero_grad()
    return {"forward": fwd, "backward": bwd, "step": step}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=6, help="timed rounds (one step per mode each)")
    ap.add_argument("--micro", type=int, default=8, help="micro-steps (gradient groups) per step")
    ap.add_argument("--batch", type=int, default=2, help="sequences per micro-step")
    ap.add_argument("--seq", type=int, default=32, help="tokens per sequence")
    ap.add_argument("--tiny", action="store_true", help="a 2-layer toy BERT (smoke runs)")
    ap.add_argument("--optimizer", choices=("VRLAMB", "LAMB"), default="VRLAMB",
                    help="VRLAMB fed by MicroStepMoments, or plain LAMB (no moment source: the optimizer "
                         "hands the gradient over itself); LAMB writes grad_handover_lamb.json")
    ap.add_argument("--out", default="results/grad_handover")
    args = ap.parse_args(argv)
    for name in ("rounds", "micro", "batch", "seq"):
        if getattr(args, name) < 1:
            ap.error(f"--{name} must be >= 1, got {getattr(args, name)}")

    model = build(args.tiny)
    params = [p for p in model.parameters() if p.requires_grad]
    if args.optimizer == "VRLAMB":
        moments = MicroStepMoments(params)
        opt = VRLAMB(params, lr=1e-5, moments=moments)
    else:
        moments, opt = None, LAMB(params, lr=1e-5)
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(1)
    samples = {m: {"forward": [], "backward": [], "step": []} for m in MODES}
    for r in range(args.rounds + WARMUP):
        ids = torch.randint(0, vocab, (args.micro * args.batch, args.seq), generator=gen)
        for mode in (MODES if r % 2 == 0 else MODES[::-1]):
            t = one_step(model, moments, opt, ids, args.micro, mode == "placed")
            if r >= WARMUP:
                for k, v in t.items():
                    samples[mode][k].append(v)
    result = {
        "model": "tiny BERT" if args.tiny else "BERT-base", "optimizer": args.optimizer,
        "params": sum(p.numel() for p in params),
        "micro_steps": args.micro, "batch": args.batch, "seq": args.seq, "rounds": args.rounds,
        "torch": torch.__version__, "threads": torch.get_num_threads(), **summarise(samples),
    }
    med, total = result["median_s"], result["backward_plus_step_s"]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = "grad_handover" + ("_lamb" if args.optimizer == "LAMB" else "")
    (out / f"{stem}.json").write_text(json.dumps(result, indent=2))
    plot(result, out / f"{stem}.png")
    print(f"{result['model']}, {result['params'] / 1e6:.1f}M parameters, {args.micro} micro-steps of "
          f"{args.batch}x{args.seq} tokens, {args.rounds} rounds, median ms:")
    print(f"{'mode':<10}{'forward':>10}{'backward':>10}{'step':>10}{'bwd+step':>10}")
    for m in MODES:
        print(f"{m:<10}{med[m]['forward'] * 1e3:>10.1f}{med[m]['backward'] * 1e3:>10.1f}"
              f"{med[m]['step'] * 1e3:>10.1f}{total[m] * 1e3:>10.1f}")
    print("placed / gathered:", {k: round(v, 3) for k, v in result["placed_over_gathered"].items()})
    print("placed - gathered, median over rounds (ms):",
          {k: round(v * 1e3, 1) for k, v in result["paired_difference_s"].items()})
    print(f"wrote {out / f'{stem}.json'}")
    return result


def summarise(samples: dict) -> dict:
    """Medians per mode, their ratios, and the median over rounds of the placed - gathered
    difference (each round runs both modes back to back, so the pair shares the load)."""
    med = {m: {k: statistics.median(v) for k, v in d.items()} for m, d in samples.items()}
    total = {m: med[m]["backward"] + med[m]["step"] for m in MODES}
    P, G = samples["placed"], samples["gathered"]
    pairs = {k: [a - b for a, b in zip(P[k], G[k])] for k in ("forward", "backward", "step")}
    pairs["backward+step"] = [a + b for a, b in zip(pairs["backward"], pairs["step"])]
    return {"samples_s": samples, "median_s": med, "backward_plus_step_s": total,
            "placed_over_gathered": {k: med["placed"][k] / med["gathered"][k] for k in ("backward", "step")}
            | {"backward+step": total["placed"] / total["gathered"]},
            "paired_difference_s": {k: statistics.median(v) for k, v in pairs.items()}}


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    med = result["median_s"]
    parts = ("backward", "step")
    fig, ax = plt.subplots(figsize=(6, 2.6))
    for i, mode in enumerate(MODES):
        left = 0.0
        for j, part in enumerate(parts):
            ax.barh(i, med[mode][part] * 1e3, left=left, color=f"C{j}", label=part if i == 0 else None)
            left += med[mode][part] * 1e3
    ax.set_yticks(range(len(MODES)), MODES)
    ax.set_xlabel("median ms per step")
    ax.set_title(f"{result['model']}, {result.get('optimizer', 'VRLAMB')}: gradient handed over (placed) or gathered",
                 fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
