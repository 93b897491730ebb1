"""ZeRO-1/2/3 checkpoints of any world size -> one consolidated file -> any world size and stage.

DeepSpeed's universal checkpoint converter (``ds_to_universal``) only knows Adam's
``exp_avg``/``exp_avg_sq``; it drops the VR state (GSNR momentum, step counters) and fails
for optimizers without those keys. This module consolidates every per-element state key
instead, using the fragment map DeepSpeed saves with each rank's partition
(``param_slice_mappings``):

    python -m vrgd_ds.deepspeed.checkpoint CKPT_DIR/TAG OUT.pt     # any saved world size
    vrgd_ds.deepspeed.checkpoint.load_consolidated(engine, OUT.pt)  # after deepspeed.initialize

The consolidated file holds, per parameter name: the fp32 master weight and every
optimizer state tensor, whole; the scalar state; each param group's hyperparameters;
and the engine's step counters and LR scheduler state; frozen parameters and buffers
whole, from the module state. Loading writes this rank's
pieces into its ZeRO partitions (stage 1/2/3; at stage 3 also the parameters' bit16
partitions, through DeepSpeed's ``GatheredParameters``) or the parameters themselves
(stage 0), so training continues with the same parameters and optimizer state.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch

from ..files import torch_save_atomic
from . import seam

FORMAT = "vrgd-ds consolidated checkpoint v1"


def _load(path: Path) -> dict:
    # our own file holds only tensors and plain containers; memory-mapped, so that a rank
    # reads the pieces its partitions hold, not the whole state
    return torch.load(path, map_location="cpu", weights_only=True, mmap=True)


def consolidate(checkpoint_dir: str | os.PathLike) -> dict:
    """Read a DeepSpeed ZeRO-1/2/3 checkpoint folder (``save_dir/tag``) of any world size
    (``elastic_checkpoint`` on or off)."""
    files = seam.read_zero_checkpoint(checkpoint_dir)
    weights, state, groups = {}, {}, []
    for i, group_shapes in enumerate(files.param_shapes):
        groups.append({"hyperparameters": dict(files.shards[0][i].hyperparameters), "params": list(group_shapes)})
        pieces: dict[str, dict[str, list[torch.Tensor]]] = {n: {} for n in group_shapes}
        scalars: dict = {}
        for shard in files.shards:
            sg = shard[i]
            tensors = {"fp32": sg.fp32, **{k: v for k, v in sg.state.items() if torch.is_tensor(v) and v.dim() > 0}}
            scalars.update({k: v for k, v in sg.state.items() if k not in tensors})
            for name, (start, numel) in sg.slices.items():
                for key, t in tensors.items():
                    pieces[name].setdefault(key, []).append(t.narrow(0, start, numel))
        for name, shape in group_shapes.items():
            full = {k: torch.cat(v).view(shape).clone() for k, v in pieces[name].items()}
            weights[name] = full.pop("fp32")
            state[name] = {**full, **scalars}
    # frozen parameters and buffers: not in the optimizer, saved whole with the module
    module = {k: v.clone() for k, v in files.module.items() if k not in weights and torch.is_tensor(v)}
    return {"format": FORMAT, "weights": weights, "state": state, "param_groups": groups, "module": module,
            "saved_world_size": len(files.shards), "engine": files.engine}


def save_consolidated(checkpoint_dir, out_path) -> dict:
    """consolidate() and write the result atomically (a temporary file, fsync, rename, fsync
    of the folder: :func:`vrgd_ds.files.save_atomic`); an existing ``out_path`` is only ever
    replaced by a complete file."""
    result = consolidate(checkpoint_dir)
    torch_save_atomic(result, out_path)
    return result


def load_consolidated(engine, consolidated: dict | str | os.PathLike, *, engine_state: bool = True,
                      hyperparameters: bool = True) -> None:
    """Put a consolidated checkpoint into an initialized engine (ZeRO stage 0 to 3).

    ``engine_state=False`` keeps the engine's step counters and LR scheduler, and
    ``hyperparameters=False`` keeps the param groups' lr etc.: what carrying phase 1's
    optimizer state into phase 2 needs."""
    data = consolidated if isinstance(consolidated, dict) else _load(Path(consolidated))
    if data.get("format") != FORMAT:
        raise ValueError(f"not a vrgd-ds consolidated checkpoint (format {data.get('format')!r}); "
                         f"make one with python -m vrgd_ds.deepspeed.checkpoint CKPT_DIR/TAG OUT.pt")
    module = seam.engine_module(engine)
    names = {id(p): n for n, p in module.named_parameters()}
    saved = {**data.get("module", {}), **data["weights"]}
    missing = sorted(n for n in names.values() if n not in saved)
    if missing:
        raise KeyError(f"the consolidated checkpoint has no weights for {missing[:5]} "
                       f"({len(missing)} parameters); it was saved from a different model")
    opt = seam.inner_optimizer(engine)
    snap = getattr(opt.layout, "snap", None)
    with torch.no_grad():
        with seam.full_parameters(engine, list(module.parameters())):  # ZeRO-3: gathered, then partitioned
            for name, t in list(module.named_parameters()) + list(module.named_buffers()):
                if name in saved:
                    t.copy_(saved[name].to(t.dtype))
        if snap is not None:
            _load_zero(opt, snap, names, data, hyperparameters)
        else:
            _load_plain(opt, names, data, hyperparameters)
    if engine_state:
        seam.restore_engine_counters(engine, data["engine"])


def _restore_hyperparameters(group: dict, saved: dict) -> None:
    for k, v in saved.items():
        if k in group:
            group[k] = v


def _load_zero(opt, snap: seam.ZeroSnapshot, names, data, hyperparameters: bool) -> None:
    for g in snap.groups:
        st = opt.state[g.flat]
        for t, pieces in zip(g.params, g.pieces):
            saved = data["state"][names[id(t)]]
            for piece in (pc for pc in pieces if pc.owner == g.rank):
                src = slice(piece.start, piece.start + piece.numel)
                g.flat.narrow(0, piece.dst, piece.numel).copy_(data["weights"][names[id(t)]].view(-1)[src])
                for key, v in saved.items():
                    if torch.is_tensor(v) and v.dim() > 0:
                        if key not in st:
                            st[key] = torch.zeros_like(g.flat)
                        st[key].narrow(0, piece.dst, piece.numel).copy_(v.view(-1)[src])
                    else:
                        st[key] = v
            for key, v in saved.items():  # scalars also where this rank holds no piece
                if not (torch.is_tensor(v) and v.dim() > 0):
                    st[key] = v
        if hyperparameters:
            _restore_hyperparameters(opt.param_groups[g.index], _group_of(data, names[id(g.params[0])]))


def _load_plain(optimizer, names, data, hyperparameters: bool) -> None:
    for group in optimizer.param_groups:
        for p in group["params"]:
            if id(p) not in names:
                raise NotImplementedError("load_consolidated: the optimizer steps copies of the model's "
                                          "parameters (DeepSpeed's fp16/bf16 wrapper at stage 0); load into "
                                          "a ZeRO stage 1/2 or fp32 stage 0 engine")
            optimizer.state[p] = {k: (v.clone().to(p.device) if torch.is_tensor(v) else v)
                                  for k, v in data["state"][names[id(p)]].items()}
        if hyperparameters:
            _restore_hyperparameters(group, _group_of(data, names[id(group["params"][0])]))


def _group_of(data, name) -> dict:
    for g in data["param_groups"]:
        if name in g["params"]:
            return g["hyperparameters"]
    raise KeyError(f"parameter {name!r} is in no saved param group")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("checkpoint_dir", help="a DeepSpeed checkpoint tag folder, e.g. ckpt/global_step100")
    ap.add_argument("out", help="consolidated file to write (.pt)")
    args = ap.parse_args(argv)
    result = save_consolidated(args.checkpoint_dir, args.out)
    print(f"consolidated {len(result['weights'])} parameters saved by {result['saved_world_size']} "
          f"ranks -> {args.out}")


if __name__ == "__main__":
    main()
