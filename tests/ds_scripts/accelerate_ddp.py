"""Worker for tests/test_hf_trainer_ddp.py: a plain Accelerate loop (no Trainer) with our
optimizer and ``vrgd_ds.hf.attach_to_model`` on what ``accelerator.prepare`` returned.

    torchrun --nproc_per_node 2 tests/ds_scripts/accelerate_ddp.py --out DIR

The tiny BERT of hf_trainer_ddp.py; ``accelerator.accumulate`` (no_sync on the accumulation
steps), ``accelerator.backward`` (the loss divided by the accumulation steps) and
``accelerator.clip_grad_norm_``, as Accelerate's examples do. Writes the same result.pt.
"""

import argparse

import torch
import torch.distributed as dist
from accelerate import Accelerator

from hf_trainer_ddp import OPTIMIZERS, recorded_model, save_result  # this folder: first on sys.path
from hf_trainer_tiny import Tokens
from vrgd_ds.hf import attach_to_model


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--accumulation", type=int, default=2)
    ap.add_argument("--max-grad-norm", type=float, default=0.05)
    args = ap.parse_args()
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=args.accumulation)
    model, seen = recorded_model()
    cls, hp = OPTIMIZERS["VRLAMB"]
    opt = cls(model.parameters(), **hp)
    loader = torch.utils.data.DataLoader(Tokens(n=48, seq=12, vocab=60), batch_size=4, shuffle=False)
    ddp, prepared_opt, loader = accelerator.prepare(model, opt, loader)
    moments = attach_to_model(ddp, prepared_opt, batch_size=4, accumulation=args.accumulation)
    norms, counts = [], []
    for batch in loader:
        with accelerator.accumulate(ddp):
            accelerator.backward(ddp(**batch).loss)
            if accelerator.sync_gradients:
                norms.append(float(accelerator.clip_grad_norm_(ddp.parameters(), args.max_grad_norm)))
                counts.append(moments.group_count)
            prepared_opt.step()
            prepared_opt.zero_grad()
    save_result(args.out, model, seen, hp=hp, source=type(moments).__name__, wrapped=type(ddp).__name__,
                k=counts, samples_per_group=moments.samples_per_group, max_grad_norm=args.max_grad_norm,
                grad_norms=norms)
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
