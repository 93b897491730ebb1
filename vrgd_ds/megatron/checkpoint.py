"""Save and resume the optimizer of a Megatron-core run: one consolidated file, any layout.

Megatron's own optimizer checkpoints (``state_dict`` with ``save_parameter_state``, or
``sharded_state_dict`` for distributed checkpointing) know Adam's ``exp_avg`` and
``exp_avg_sq`` only; they would drop the VR state (GSNR momentum, step counters) or fail,
so :func:`vrgd_ds.megatron.get_megatron_optimizer` refuses them. Instead::

    from vrgd_ds.megatron import save_optimizer, load_optimizer

    # every data-parallel rank calls it; user_state: the iteration, the scheduler, ...
    save_optimizer(optimizer, ddp_model, "ckpt/optimizer.pt",
                   user_state={"iteration": it, "scheduler": scheduler.state_dict()})
    ...
    optimizer = get_megatron_optimizer(config, [ddp_model])   # a new run, same model
    saved = load_optimizer(optimizer, ddp_model, "ckpt/optimizer.pt")  # every rank, before a step
    scheduler.load_state_dict(saved["scheduler"])

The file holds, per model parameter name: the fp32 main weight and every per-element
optimizer state tensor, whole (the distributed optimizer's shards are gathered to the
group's first rank, which writes the file); each parameter's scalar state (step counts);
each param group's hyperparameters and parameter names; the loss scaler; the VR
optimizer's noise-scale averages; and ``user_state``, so that what the training loop needs
to resume always matches the optimizer state. It loads with the distributed optimizer on
or off and at any data-parallel size. Loading puts this rank's elements into its main
parameters and optimizer state and the whole weights, in the model's dtype, into the
model parameters; the training then continues as if it had not stopped (tested bitwise
on 2 ranks). Every rank reads the whole file (CPU memory: about 4 bytes per parameter per
state key, plus the weights). The file is written to a temporary name, flushed, and
renamed, so an existing checkpoint is only ever replaced by a complete one (a save killed
midway leaves a temporary file, which the next save on that host removes).
"""

from __future__ import annotations

import glob
import math
import os
import socket
from pathlib import Path

import torch
import torch.distributed as dist

from ..optim.base import BaseOptimizer
from . import seam

FORMAT = "vrgd-ds megatron optimizer checkpoint v1"


def _inner(megatron_optimizer):
    inners = seam.inner_optimizers(megatron_optimizer)
    if len(inners) != 1:
        raise ValueError(f"vrgd_ds.megatron: expected one Megatron optimizer, got {len(inners)}")
    inner = inners[0]
    if not isinstance(inner.optimizer, BaseOptimizer):
        raise TypeError("vrgd_ds.megatron.save_optimizer / load_optimizer take an optimizer built by "
                        f"vrgd_ds.megatron.get_megatron_optimizer; its inner optimizer is "
                        f"{type(inner.optimizer).__name__}")
    return inner


def _names(ddp) -> dict[int, str]:
    return {id(p): name for name, p in seam.module_of(ddp).named_parameters()}


def _group_ok(group, error: str | None) -> None:
    """Every rank of ``group`` learns whether any rank failed, and all raise alike (no rank
    goes on to a collective the failed one never joins)."""
    errors: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(errors, error, group=group)
    bad = [(r, e) for r, e in enumerate(errors) if e is not None]
    if bad:
        r, e = bad[0]
        raise RuntimeError(f"vrgd_ds.megatron: rank {r} of the data-parallel group failed: {e}")


def _pieces(inner, names: dict[int, str]) -> dict:
    """This rank's elements of every parameter:
    {name: [[(start, end, {key: 1-D tensor})], scalars, shape, param group index]}."""
    opt = inner.optimizer
    out: dict = {}
    for gi, group in enumerate(seam.main_params(inner)):
        for m in group:
            if m.model_param is None or m.end <= m.start:
                continue  # a placeholder (vrgd_ds.megatron.optimizer), or nothing of this parameter
            state = opt.state.get(m.tensor, {})
            tensors = {"fp32": m.tensor.detach().float().reshape(-1).cpu().clone()}
            scalars = {}
            for k, v in state.items():
                if torch.is_tensor(v) and v.dim() > 0:
                    if v.shape != m.tensor.shape:
                        raise RuntimeError(f"vrgd_ds.megatron: optimizer state {k!r} of parameter "
                                           f"{names[id(m.model_param)]} has shape {tuple(v.shape)}, its "
                                           f"main parameter {tuple(m.tensor.shape)}")
                    tensors[k] = v.detach().reshape(-1).cpu().clone()
                else:
                    scalars[k] = v.detach().cpu().clone() if torch.is_tensor(v) else v
            entry = out.setdefault(names[id(m.model_param)], [[], scalars, tuple(m.model_param.shape), gi])
            entry[0].append((m.start, m.end, tensors))
    return out


def _consolidate(all_pieces: list[dict], group_count: int) -> tuple[dict, dict, list[list[str]]]:
    """Whole weights and state per name, and the names in each param group (model order)."""
    weights, state = {}, {}
    merged: dict = {}
    for pieces in all_pieces:
        for name, (parts, scalars, shape, gi) in pieces.items():
            entry = merged.setdefault(name, [[], scalars, shape, gi])
            if entry[3] != gi:
                raise RuntimeError(f"vrgd_ds.megatron: ranks put {name} in param groups {entry[3]} and {gi}")
            entry[0].extend(parts)
    groups: list[list[str]] = [[] for _ in range(group_count)]
    for name, (parts, scalars, shape, gi) in merged.items():
        groups[gi].append(name)
        parts.sort(key=lambda p: p[0])
        numel, at = math.prod(shape), 0
        for start, end, _ in parts:  # the shards must tile the parameter exactly once
            if start != at:
                raise RuntimeError(f"vrgd_ds.megatron: the shards of {name} overlap or leave a gap at element {at} "
                                   f"(a shard starts at {start})")
            at = end
        if at != numel:
            raise RuntimeError(f"vrgd_ds.megatron: the shards of {name} cover {at} of its {numel} elements")
        keys = set(parts[0][2])
        if any(set(p[2]) != keys for p in parts):
            raise RuntimeError(f"vrgd_ds.megatron: the shards of {name} hold different optimizer state keys")
        whole = {k: torch.cat([p[2][k] for p in parts]).view(shape) for k in sorted(keys)}
        weights[name] = whole.pop("fp32")
        state[name] = {**whole, **scalars}
    return weights, state, groups


def _plain(v) -> bool:
    """A hyperparameter the file keeps: numbers, strings, None, and tuples/lists of them
    (what ``torch.load(weights_only=True)`` reads back)."""
    if isinstance(v, (tuple, list)):
        return all(_plain(x) for x in v)
    return v is None or isinstance(v, (bool, int, float, str))


def _storable(v) -> bool:
    """What ``user_state`` may hold: plain values, tensors, and dicts/lists/tuples of them."""
    if isinstance(v, dict):
        return all(isinstance(k, (str, int)) and _storable(x) for k, x in v.items())
    if isinstance(v, (tuple, list)):
        return all(_storable(x) for x in v)
    return torch.is_tensor(v) or _plain(v)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def _write(obj: dict, path: Path) -> None:
    """``path`` replaced only by a complete file: a temporary name in the same folder, fsync,
    rename, fsync of the folder. Temporary files of this name that a killed save of this
    host left (their process is gone) are removed first."""
    path.parent.mkdir(parents=True, exist_ok=True)
    host = socket.gethostname()
    prefix = f".{path.name}.tmp.{host}."
    for old in path.parent.glob(f"{glob.escape(prefix)}*"):
        pid = old.name[len(prefix):]
        if pid.isdigit() and not _alive(int(pid)):
            old.unlink(missing_ok=True)
    tmp = path.with_name(f"{prefix}{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_optimizer(megatron_optimizer, ddp, path: str | os.PathLike, user_state: dict | None = None) -> None:
    """Write the optimizer's state to ``path`` (one file; see the module docstring).

    A collective over the data-parallel group: every rank calls it; the group's first rank
    writes. Returns on every rank only once the file is complete, or raises on every rank.
    ``user_state``: the data-parallel group's first rank's dict of numbers, strings, tensors
    and containers of them (the iteration, the ``OptimizerParamScheduler``'s ``state_dict``),
    kept in the same file, so that it always matches the optimizer state;
    :func:`load_optimizer` returns it."""
    inner = _inner(megatron_optimizer)
    opt = inner.optimizer
    group = seam.data_parallel_group(ddp)
    names = _names(ddp)
    first = dist.get_rank(group) == 0
    sharded = seam.optimizer_kind(inner) == "distributed"  # else every rank holds the whole state
    error, pieces = None, None
    try:
        if sharded or first:
            pieces = _pieces(inner, names)
    except Exception as e:  # reported to every rank below
        error = f"{type(e).__name__}: {e}"
    gathered: list | None = [None] * dist.get_world_size(group) if first else None
    dist.gather_object((error, pieces), gathered, dst=dist.get_global_rank(group, 0), group=group)
    if first:
        failed = [(r, e) for r, (e, _) in enumerate(gathered) if e is not None]
        if failed:
            error = f"rank {failed[0][0]} could not collect its optimizer state: {failed[0][1]}"
    if first and error is None:
        try:
            if user_state is not None and not _storable(user_state):
                raise ValueError("user_state must be a dict of numbers, strings, None, tensors and "
                                 f"lists/tuples/dicts of them, got {user_state!r:.200}")
            weights, state, members = _consolidate([p for _, p in gathered if p is not None],
                                                   len(opt.param_groups))
            groups = [{"hyperparameters": {k: v for k, v in g.items() if k != "params" and _plain(v)},
                       "params": names_in} for g, names_in in zip(opt.param_groups, members)]
            scaler = seam.grad_scaler(inner)
            extra = {k: getattr(opt, k) for k in ("skipped_steps",) if hasattr(opt, k)}
            if hasattr(opt, "noise_scale"):
                extra["noise_scale"] = opt.noise_scale.state_dict()
            _write({"format": FORMAT, "optimizer": type(opt).__name__, "kind": seam.optimizer_kind(inner),
                    "saved_world_size": dist.get_world_size(group), "weights": weights, "state": state,
                    "param_groups": groups, "grad_scaler": scaler.state_dict() if scaler is not None else None,
                    "extra": extra, "user_state": user_state}, Path(path))
        except Exception as e:
            error = f"{type(e).__name__}: {e}"
    _group_ok(group, error)


def _check(ckpt, path, opt, names_in_model: dict[str, torch.Size], groups: list[set[str]]) -> None:
    """Everything a load needs, before anything is written: the format, the optimizer class,
    the same parameter names and shapes, and this rank's parameters in the same groups."""
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise ValueError(f"{path} is not a vrgd-ds Megatron optimizer checkpoint (format "
                         f"{ckpt.get('format') if isinstance(ckpt, dict) else type(ckpt).__name__!r}, "
                         f"expected {FORMAT!r}); write one with vrgd_ds.megatron.save_optimizer")
    if ckpt["optimizer"] != type(opt).__name__:
        raise ValueError(f"{path} holds the state of {ckpt['optimizer']}, this run's optimizer is "
                         f"{type(opt).__name__}; build the run with the optimizer that was saved")
    saved = {n: tuple(w.shape) for n, w in ckpt["weights"].items()}
    for name, shape in names_in_model.items():
        if name not in saved:
            raise ValueError(f"{path} has no parameter {name!r} of this model (it has {len(saved)} "
                             f"parameters, e.g. {sorted(saved)[:3]})")
        if saved[name] != tuple(shape):
            raise ValueError(f"{path}: parameter {name!r} has shape {saved[name]} there, {tuple(shape)} in "
                             "this model")
    extra = sorted(set(saved) - set(names_in_model))
    if extra:
        raise ValueError(f"{path} has parameters this model does not train: {extra[:3]}")
    saved_groups = [set(g["params"]) for g in ckpt["param_groups"]]
    if len(saved_groups) != len(groups) or any(not mine <= saved for mine, saved in zip(groups, saved_groups)):
        raise ValueError(f"{path}: its {len(saved_groups)} param groups do not hold the same parameters as "
                         f"this optimizer's {len(groups)}; build the optimizer with the same config")


def load_optimizer(megatron_optimizer, ddp, path: str | os.PathLike) -> dict | None:
    """Put a file written by :func:`save_optimizer` into a freshly built optimizer and model.

    Every data-parallel rank calls it (it ends with one check that all ranks loaded, so a
    rank that cannot read the file makes all of them raise). The param groups' saved
    hyperparameters replace the built ones, as torch's ``load_state_dict`` does (Megatron's
    scheduler sets lr and weight decay again at its next step). Returns the ``user_state``
    saved with it (None if none was). After an error, build the model and optimizer anew
    before trying again: the ranks that could read the file have loaded it."""
    inner = _inner(megatron_optimizer)
    opt = inner.optimizer
    group = seam.data_parallel_group(ddp)
    try:
        user_state = _load_here(inner, opt, ddp, Path(path))
    except Exception as e:
        _group_ok(group, f"{type(e).__name__}: {e}")  # raises on every rank
    _group_ok(group, None)
    return user_state


def _load_here(inner, opt, ddp, path: Path) -> dict | None:
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    mains = seam.main_params(inner)
    model_params = dict(seam.module_of(ddp).named_parameters())
    names = {id(p): name for name, p in model_params.items()}
    mine = [[m for m in g if m.model_param is not None] for g in mains]  # no placeholders
    # every model parameter the optimizer trains on some rank: all of them with a gradient
    wanted = {n: p.shape for n, p in model_params.items() if p.requires_grad}
    _check(ckpt, path, opt, wanted, [{names[id(m.model_param)] for m in g} for g in mine])
    with torch.no_grad():
        for name, p in model_params.items():
            if name in ckpt["weights"]:
                p.copy_(ckpt["weights"][name].to(p.dtype))
        for g in mine:
            for m in g:
                name = names[id(m.model_param)]
                whole, state = ckpt["weights"][name].reshape(-1), ckpt["state"][name]
                m.tensor.copy_(whole[m.start:m.end].view_as(m.tensor))
                new = {}
                for k, v in state.items():
                    if torch.is_tensor(v) and v.dim() > 0:
                        new[k] = v.reshape(-1)[m.start:m.end].view(m.tensor.shape).to(m.tensor.device).clone()
                    else:
                        new[k] = v.clone() if torch.is_tensor(v) else v
                opt.state[m.tensor] = new
    for g, saved in zip(opt.param_groups, ckpt["param_groups"]):
        g.update({k: v for k, v in saved["hyperparameters"].items() if k in g})
    scaler = seam.grad_scaler(inner)
    if scaler is not None and ckpt["grad_scaler"] is not None:
        scaler.load_state_dict(ckpt["grad_scaler"])
    extra = ckpt.get("extra", {})
    if "noise_scale" in extra and hasattr(opt, "noise_scale"):
        opt.noise_scale.load_state_dict(extra["noise_scale"])
    if "skipped_steps" in extra and hasattr(opt, "skipped_steps"):
        opt.skipped_steps = extra["skipped_steps"]
    return ckpt.get("user_state")

