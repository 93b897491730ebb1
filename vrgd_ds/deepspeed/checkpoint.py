"""ZeRO-1/2 checkpoints of any world size -> one consolidated file -> any world size.

DeepSpeed's universal checkpoint converter (``ds_to_universal``) only knows Adam's
``exp_avg``/``exp_avg_sq``; it drops the VR state (GSNR momentum, step counters) and fails
for optimizers without those keys. This module consolidates every per-element state key
instead, using the fragment map DeepSpeed saves with each rank's partition
(``param_slice_mappings``):

    python -m vrgd_ds.deepspeed.checkpoint CKPT_DIR/TAG OUT.pt     # any saved world size
    vrgd_ds.deepspeed.checkpoint.load_consolidated(engine, OUT.pt)  # after deepspeed.initialize

The consolidated file holds, per parameter name: the fp32 master weight and every
optimizer state tensor, whole; the scalar state; each param group's hyperparameters;
and the engine's step counters and LR scheduler state. Loading writes this rank's
pieces into its ZeRO partitions (stage 1/2) or the parameters themselves (stage 0), so
training continues with the same parameters and optimizer state.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch

FORMAT = "vrgd-ds consolidated checkpoint v1"


def _load_deepspeed(path: Path):
    """One of DeepSpeed's own checkpoint files: a full pickle (fragment maps, config objects), so
    loading it runs code from the file; only load checkpoints you trust."""
    return torch.load(path, map_location="cpu", weights_only=False)


def _load(path: Path):
    """A consolidated file: tensors and plain containers only, loaded without running pickled code."""
    return torch.load(path, map_location="cpu", weights_only=True)


def consolidate(checkpoint_dir: str | os.PathLike) -> dict:
    """Read a DeepSpeed ZeRO-1/2 checkpoint folder (``save_dir/tag``) of any world size."""
    folder = Path(checkpoint_dir)
    model_file = folder / "mp_rank_00_model_states.pt"
    shards = sorted(folder.glob("zero_pp_rank_*_mp_rank_00_optim_states.pt"),
                    key=lambda p: int(p.name.split("_")[3]))
    if not model_file.exists() or not shards:
        raise FileNotFoundError(
            f"{folder} is not a DeepSpeed ZeRO-1/2 checkpoint folder: it needs "
            "mp_rank_00_model_states.pt and zero_pp_rank_*_mp_rank_00_optim_states.pt "
            "(pass the tag folder, e.g. checkpoints/global_step100)")
    model_states = _load_deepspeed(model_file)
    shapes = model_states["param_shapes"]
    optim = [_load_deepspeed(s)["optimizer_state_dict"] for s in shards]
    if len(optim) != optim[0]["partition_count"][0]:
        raise ValueError(f"{folder}: {len(optim)} optimizer shards but the checkpoint was saved by "
                         f"{optim[0]['partition_count'][0]} ranks")
    weights, state, groups = {}, {}, []
    for i, group_shapes in enumerate(shapes):
        base = optim[0]["base_optimizer_state"]
        hyper = {k: v for k, v in base["param_groups"][i].items() if k != "params"}
        groups.append({"hyperparameters": hyper, "params": list(group_shapes)})
        pieces: dict[str, dict[str, list[torch.Tensor]]] = {n: {} for n in group_shapes}
        scalars: dict = {}
        for shard in optim:
            flat = shard["single_partition_of_fp32_groups"][i]  # saved without the padding
            st = shard["base_optimizer_state"]["state"].get(i, {})
            tensors = {"fp32": flat, **{k: v for k, v in st.items() if torch.is_tensor(v) and v.dim() > 0}}
            scalars.update({k: v for k, v in st.items() if k not in tensors})
            for name, frag in shard["param_slice_mappings"][i].items():
                for key, t in tensors.items():
                    pieces[name].setdefault(key, []).append(t.narrow(0, frag.start, frag.numel))
        for name, shape in group_shapes.items():
            full = {k: torch.cat(v).view(shape).clone() for k, v in pieces[name].items()}
            weights[name] = full.pop("fp32")
            state[name] = {**full, **scalars}
    return {"format": FORMAT, "weights": weights, "state": state, "param_groups": groups,
            "saved_world_size": len(optim),
            "engine": {k: model_states.get(k) for k in ("global_steps", "global_samples", "skipped_steps",
                                                          "lr_scheduler")}}


def save_consolidated(checkpoint_dir, out_path) -> dict:
    """consolidate() and write the result atomically (a temp file, then rename)."""
    result = consolidate(checkpoint_dir)
    out = Path(out_path)
    tmp = out.with_name(out.name + ".tmp")
    torch.save(result, tmp)
    os.replace(tmp, out)
    return result


def load_consolidated(engine, consolidated: dict | str | os.PathLike, *, engine_state: bool = True,
                      hyperparameters: bool = True) -> None:
    """Put a consolidated checkpoint into an initialized engine (ZeRO stage 0, 1 or 2).

    ``engine_state=False`` keeps the engine's step counters and LR scheduler, and
    ``hyperparameters=False`` keeps the param groups' lr etc.: what carrying phase 1's
    optimizer state into phase 2 needs."""
    data = consolidated if isinstance(consolidated, dict) else _load(Path(consolidated))
    if data.get("format") != FORMAT:
        raise ValueError(f"not a vrgd-ds consolidated checkpoint (format {data.get('format')!r}); "
                         f"make one with python -m vrgd_ds.deepspeed.checkpoint CKPT_DIR/TAG OUT.pt")
    names = {id(p): n for n, p in engine.module.named_parameters()}
    missing = sorted(set(names.values()) - set(data["weights"]))
    if missing:
        raise KeyError(f"the consolidated checkpoint has no weights for {missing[:5]} "
                       f"({len(missing)} parameters); it was saved from a different model")
    zero = engine.optimizer
    with torch.no_grad():
        for p in engine.module.parameters():
            p.copy_(data["weights"][names[id(p)]].to(p.dtype))
        if hasattr(zero, "single_partition_of_fp32_groups"):
            _load_zero(zero, names, data, hyperparameters)
        else:
            _load_plain(zero, names, data, hyperparameters)
    if not engine_state:
        return
    eng = data["engine"]
    engine.global_steps = eng["global_steps"] or 0
    engine.global_samples = eng["global_samples"] or 0
    engine.skipped_steps = eng["skipped_steps"] or 0
    if engine.lr_scheduler is not None and eng["lr_scheduler"] is not None:
        engine.lr_scheduler.load_state_dict(eng["lr_scheduler"])


def _restore_hyperparameters(group: dict, saved: dict) -> None:
    for k, v in saved.items():
        if k in group:
            group[k] = v


def _load_zero(zero, names, data, hyperparameters: bool) -> None:
    from .zero_layout import owner_pieces
    import torch.distributed as dist

    inner = zero.optimizer
    for i, flat in enumerate(zero.single_partition_of_fp32_groups):
        pg = zero.real_dp_process_group[i]
        rank = dist.get_rank(group=pg)
        tensors = zero.round_robin_bit16_groups[i]
        paddings = zero.round_robin_bit16_padding[i] or [0] * len(tensors)
        pieces = owner_pieces([t.numel() for t in tensors], paddings, zero.partition_size[i],
                              dist.get_world_size(group=pg))
        st = inner.state[flat]
        for t, tp in zip(tensors, pieces):
            saved = data["state"][names[id(t)]]
            for owner, src, dst, n in tp:
                if owner != rank:
                    continue
                flat.narrow(0, dst, n).copy_(data["weights"][names[id(t)]].view(-1).narrow(0, src, n))
                for key, v in saved.items():
                    if torch.is_tensor(v) and v.dim() > 0:
                        if key not in st:
                            st[key] = torch.zeros_like(flat)
                        st[key].narrow(0, dst, n).copy_(v.view(-1).narrow(0, src, n))
                    else:
                        st[key] = v
        if hyperparameters:
            _restore_hyperparameters(inner.param_groups[i], _group_of(data, names[id(tensors[0])]))


def _load_plain(optimizer, names, data, hyperparameters: bool) -> None:
    for group in optimizer.param_groups:
        for p in group["params"]:
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
