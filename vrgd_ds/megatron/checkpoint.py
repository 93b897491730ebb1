"""Save and resume the optimizer of a Megatron-core run: one file, or one shard per rank.

Megatron's legacy optimizer checkpoints (``state_dict`` with ``save_parameter_state``) know
Adam's ``exp_avg`` and ``exp_avg_sq`` only; they would drop the VR state (GSNR momentum,
step counters), so :func:`vrgd_ds.megatron.get_megatron_optimizer` refuses them. Megatron's
distributed checkpointing works (:mod:`.dist_checkpoint`). This module is the other way, with
the training loop's own state kept beside the optimizer's::

    from vrgd_ds.megatron import save_optimizer, load_optimizer

    # every data-parallel rank calls it; user_state: the iteration, the scheduler, ...
    save_optimizer(optimizer, ddp_model, "ckpt/optimizer.pt",
                   user_state={"iteration": it, "scheduler": scheduler.state_dict()})
    save_optimizer(optimizer, ddp_model, "ckpt/optimizer", user_state=..., sharded=True)  # or
    ...
    optimizer = get_megatron_optimizer(config, [ddp_model])   # a new run, same model
    saved = load_optimizer(optimizer, ddp_model, "ckpt/optimizer.pt")  # every rank, before a step
    scheduler.load_state_dict(saved["scheduler"])

What is kept, per model parameter name: the fp32 main weight and every per-element
optimizer state tensor; each parameter's scalar state (step counts); each param group's
hyperparameters and parameter names; the loss scaler; the VR optimizer's noise-scale
averages; and ``user_state``, so that what the training loop needs to resume always
matches the optimizer state. Both formats load with the distributed optimizer on or off
and at any data-parallel size: loading puts this rank's elements into its main parameters
and optimizer state, then sets the model's weights from the main parameters as Megatron's
step does (cast to the model's dtype; with the distributed optimizer, its all-gather of the
parameters); the training then continues as if it had not stopped (tested bitwise on 2
ranks). A loading rank memory-maps the files and reads the element ranges it holds: with
the distributed optimizer, about 1/W of the checkpoint on each of W ranks.

One file (``sharded=False``): the distributed optimizer's shards are gathered (as pickled
objects, one parameter at a time, through the data-parallel group) to the group's first
rank, which writes whole tensors (its memory grew by 2.3x the whole state in
``benchmarks/megatron_checkpoint.py``, where one weight holds 78% of the parameters). For
small models, and for a file to inspect.

Sharded (``sharded=True``): ``path`` is a folder of this module's own. Each save writes a
new version folder ``vNNNNNN`` in it: every rank its own ``shard-RRRRR-of-WWWWW.pt`` (its
elements, no tensor travels between ranks; without the distributed optimizer the state is
the same on every rank and rank 0 writes the one shard), then the first rank
``meta.pt`` (which rank holds which element range of each parameter, and everything but
the tensors), then the file ``latest``, which names the version; older versions are
removed after that.

Under pipeline parallelism each stage keeps its own checkpoint (its parameters, by their
names in the stage's model): pass every stage a path of its own (two stages given the same
path are refused before anything is written); a stage loads its own checkpoint only, at the
pipeline-parallel size it was saved with (anything else is refused, naming both). Under
virtual pipeline parallelism pass the list of the rank's model chunks where a function takes
the model: the parameters are kept as ``model<i>.<name>`` (chunk i, as Megatron-LM names
chunks), and the checkpoint loads with the same number of chunks only (Megatron's
distributed checkpointing loads at another). Both functions refuse, on every rank and
before anything is read or written, a model other than the one (or the chunks) the
optimizer was built with, such as the first chunk alone.

Under tensor parallelism every rank of Megatron's tensor- and data-parallel group calls
both functions, and one checkpoint holds every tensor-parallel rank's state: a parameter
split by tensor parallelism under ``name#tp<t>`` per tensor-parallel rank t, a replicated
one once (tensor-parallel rank 0's). It loads at any data-parallel size, at the
tensor-parallel size it was saved with only (another is refused, naming both).

Every file is written to a temporary name, fsynced and renamed (:mod:`vrgd_ds.files`), so
a checkpoint is only ever replaced by a complete one: a save killed midway leaves a
temporary file (or an unnamed version folder), which the next save removes.
"""

from __future__ import annotations

import math
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from ..files import fsync_dir, save_atomic, torch_save_atomic
from ..optim.base import BaseOptimizer
from . import seam

FORMAT = "vrgd-ds megatron optimizer checkpoint v1"
SHARDED_FORMAT = "vrgd-ds megatron sharded optimizer checkpoint v1"
SHARD_FORMAT = "vrgd-ds megatron optimizer shard v1"
LATEST, META = "latest", "meta.pt"
VERSION = re.compile(r"v\d{6,}")


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


TP_MARK = "#tp"  # a parameter split by tensor parallelism is kept as name#tp0, name#tp1, ...


@dataclass(frozen=True)
class _Ranks:
    """Who takes part in a checkpoint, and under which names. Without tensor parallelism: the
    data-parallel group, parameters by their model names. With it: the tensor- and
    data-parallel group; a parameter split by tensor parallelism is kept once per
    tensor-parallel rank t, as ``name#tp<t>``, a replicated one once, by its name (from
    tensor-parallel rank 0)."""

    group: object
    what: str  # the group, in words
    tp_size: int
    tp_rank: int
    dp_first: bool  # this rank is its data-parallel group's first
    names: dict  # id(model parameter) -> its name in a checkpoint
    saves: frozenset  # ids of the parameters whose state this rank's tensor-parallel rank keeps
    stored: dict  # every trained parameter's checkpoint name (all tensor-parallel ranks) -> shape
    stage: tuple  # (pipeline stage, pipeline-parallel size)
    chunks: int  # model chunks on this rank (virtual pipeline stages)
    pp_group: object  # the pipeline-parallel group


def _ranks(model) -> _Ranks:
    """``model``: the DDP chunk, or the list of this rank's chunks."""
    chunks = seam.chunk_list(model)
    ddp = chunks[0]
    tp_group, dp_group = seam.tensor_parallel_group(ddp), seam.data_parallel_group(ddp)
    tp, t = dist.get_world_size(tp_group), dist.get_rank(tp_group)
    params = seam.named_parameters(chunks)

    def split(p) -> bool:
        return tp > 1 and seam.tensor_parallel(p)

    def name_on(name, p, rank) -> str:
        return f"{name}{TP_MARK}{rank}" if split(p) else name

    stored = {name_on(n, p, r): tuple(p.shape) for r in range(tp) for n, p in params
              if p.requires_grad and (r == 0 or split(p))}
    group = dp_group if tp == 1 else seam.tensor_and_data_parallel_group(ddp)
    pp_group = seam.pipeline_group(ddp)
    return _Ranks(group, "data-parallel" if tp == 1 else "tensor- and data-parallel", tp, t,
                  dist.get_rank(dp_group) == 0, {id(p): name_on(n, p, t) for n, p in params},
                  frozenset(id(p) for _, p in params if t == 0 or split(p)), stored,
                  (dist.get_rank(pp_group), dist.get_world_size(pp_group)), len(chunks), pp_group)


def _check_model(inner, model) -> None:
    """``model`` is the model the optimizer was built with: the same DDP chunk, or the same list
    of chunks (decided alike on every rank, before anything is read or written)."""
    built = getattr(inner, "_vrgd_model_chunks", None)
    given = seam.chunk_list(model)
    if built is not None and tuple(id(c) for c in given) != built:
        raise ValueError(f"vrgd_ds.megatron: the model given ({len(given)} model chunk(s)) is not the one this "
                         f"optimizer was built with ({len(built)} chunk(s)); pass the DDP-wrapped model given to "
                         "get_megatron_optimizer, or under virtual pipeline parallelism the list of all of this "
                         "rank's chunks")


def _check_stage_paths(ranks: _Ranks, path) -> None:
    """Under pipeline parallelism each stage writes its own checkpoint: one all-gather of the
    paths over the pipeline group, and every rank raises if any two stages named the same."""
    if ranks.stage[1] == 1:
        return
    paths: list = [None] * ranks.stage[1]
    dist.all_gather_object(paths, str(Path(path).resolve()), group=ranks.pp_group)
    for a, first in enumerate(paths):
        if first in paths[a + 1:]:
            raise ValueError(f"vrgd_ds.megatron: pipeline stages {a} and {paths.index(first, a + 1)} were given the "
                             f"same checkpoint path {first}; under pipeline parallelism (pipeline_model_parallel_size="
                             f"{ranks.stage[1]}) every stage saves its own optimizer checkpoint: pass a path per "
                             "stage, e.g. f'ckpt/optimizer-pp{parallel_state.get_pipeline_model_parallel_rank()}.pt'")


def _group_ok(ranks: _Ranks, error: str | None) -> None:
    """Every rank of the group learns whether any rank failed, and all raise alike (no rank
    goes on to a collective the failed one never joins)."""
    errors: list = [None] * dist.get_world_size(ranks.group)
    dist.all_gather_object(errors, error, group=ranks.group)
    bad = [(r, e) for r, e in enumerate(errors) if e is not None]
    if bad:
        r, e = bad[0]
        raise RuntimeError(f"vrgd_ds.megatron: rank {r} of the {ranks.what} group failed: {e}")


def _pieces(inner, ranks: _Ranks) -> dict:
    """This rank's elements of every parameter it keeps:
    {name: [[(start, end, {key: 1-D tensor})], scalars, shape, param group index]}."""
    opt = inner.optimizer
    names = ranks.names
    out: dict = {}
    for gi, group in enumerate(seam.main_params(inner)):
        for m in group:
            if m.model_param is None or m.end <= m.start or id(m.model_param) not in ranks.saves:
                continue  # a placeholder (vrgd_ds.megatron.optimizer), nothing of this parameter, or replicated
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


def _merge(all_pieces: list[dict], group_count: int) -> tuple[dict, list[list[str]]]:
    """Every rank's pieces per name, in element order, checked to tile each parameter exactly
    once with the same state keys: {name: (parts, scalars, shape)}, and the names in each
    param group (model order). A part is (start, end, {key: payload})."""
    merged: dict = {}
    for pieces in all_pieces:
        for name, (parts, scalars, shape, gi) in pieces.items():
            entry = merged.setdefault(name, [[], scalars, shape, gi])
            if entry[3] != gi:
                raise RuntimeError(f"vrgd_ds.megatron: ranks put {name} in param groups {entry[3]} and {gi}")
            entry[0].extend(parts)
    groups: list[list[str]] = [[] for _ in range(group_count)]
    out = {}
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
        out[name] = (parts, scalars, shape)
    return out, groups


def _consolidate(all_pieces: list[dict], group_count: int) -> tuple[dict, dict, list[list[str]]]:
    """Whole weights and state per name, and the names in each param group (model order)."""
    weights, state = {}, {}
    merged, groups = _merge(all_pieces, group_count)
    for name, (parts, scalars, shape) in merged.items():
        whole = {k: torch.cat([p[2][k] for p in parts]).view(shape) for k in sorted(parts[0][2])}
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


def _check_user_state(user_state) -> None:
    if user_state is not None and not _storable(user_state):
        raise ValueError("user_state must be a dict of numbers, strings, None, tensors and "
                         f"lists/tuples/dicts of them, got {user_state!r:.200}")


def _header(inner, opt, ranks: _Ranks, members: list[list[str]], user_state) -> dict:
    """What both formats keep besides the tensors: the optimizer, its param groups (plain
    hyperparameters and parameter names), the loss scaler, the noise-scale averages, the
    skipped-step count and ``user_state``."""
    groups = [{"hyperparameters": {k: v for k, v in g.items() if k != "params" and _plain(v)},
               "params": names_in} for g, names_in in zip(opt.param_groups, members)]
    scaler = seam.grad_scaler(inner)
    extra = {k: getattr(opt, k) for k in ("skipped_steps",) if hasattr(opt, k)}
    if hasattr(opt, "noise_scale"):
        extra["noise_scale"] = opt.noise_scale.state_dict()
    return {"optimizer": type(opt).__name__, "kind": seam.optimizer_kind(inner),
            "saved_world_size": dist.get_world_size(ranks.group), "tensor_parallel_size": ranks.tp_size,
            "pipeline_stage": list(ranks.stage), "model_chunks": ranks.chunks,
            "param_groups": groups,
            "grad_scaler": scaler.state_dict() if scaler is not None else None, "extra": extra,
            "user_state": user_state}


def save_optimizer(megatron_optimizer, ddp, path: str | os.PathLike, user_state: dict | None = None, *,
                   sharded: bool = False) -> None:
    """Write the optimizer's state to ``path`` (see the module docstring). ``ddp``: the
    DDP-wrapped model, or the list of this rank's model chunks (virtual pipeline stages).

    A collective over the data-parallel group (under tensor parallelism: the tensor- and
    data-parallel group): every rank calls it. Returns on every rank only once the
    checkpoint is complete, or raises on every rank. ``user_state``: the
    data-parallel group's first rank's dict of numbers, strings, tensors and containers of
    them (the iteration, the ``OptimizerParamScheduler``'s ``state_dict``), kept with the
    optimizer state, so that it always matches it; :func:`load_optimizer` returns it.

    ``sharded=False``: one file; the group's first rank gathers the distributed optimizer's
    shards and writes it. ``sharded=True``: ``path`` is a folder of this function's own;
    every rank writes its own shard into a new version folder in it, no tensor travels
    between ranks, and a ``latest`` file, replaced last, names the complete version."""
    inner = _inner(megatron_optimizer)
    _check_model(inner, ddp)
    ranks = _ranks(ddp)
    _check_stage_paths(ranks, path)
    if sharded:
        _save_sharded(inner, ranks, Path(path), user_state)
    else:
        _save_consolidated(inner, ranks, Path(path), user_state)


def _save_consolidated(inner, ranks: _Ranks, path: Path, user_state) -> None:
    """The distributed optimizer's pieces travel to the first rank one parameter at a time
    (one ``gather_object`` per parameter, in model order, on every rank whatever fails): it
    holds the whole state and its own pieces, plus the other ranks' pickled pieces of one
    parameter at a time, rather than every rank's pickle of everything."""
    opt = inner.optimizer
    group = ranks.group
    first = dist.get_rank(group) == 0
    distributed = seam.optimizer_kind(inner) == "distributed"  # else each data-parallel group's first holds it all
    gather = distributed or ranks.tp_size > 1  # else the first rank holds the whole state
    error, pieces = None, {}
    try:
        if first:
            _check_user_state(user_state)
        if distributed or ranks.dp_first:
            pieces = _pieces(inner, ranks)
    except Exception as e:  # reported to every rank below
        error = f"{type(e).__name__}: {e}"
    weights, state, members = {}, {}, [[] for _ in opt.param_groups]
    for name in (ranks.stored if gather else ()):  # the same order on every rank
        entry = None if error is not None else pieces.pop(name, None)
        gathered: list | None = [None] * dist.get_world_size(group) if first else None
        # the first rank keeps its own pieces out of the pickles
        dist.gather_object((error, None if first else entry), gathered, dst=dist.get_global_rank(group, 0),
                           group=group)
        if first and error is None:
            error = _first_error(gathered, "could not collect its optimizer state")
        if first and error is None:
            try:
                _collect(weights, state, members, [{name: e} for e in [entry] + [e for _, e in gathered[1:]]
                                                   if e is not None])
            except Exception as e:
                error = f"{type(e).__name__}: {e}"
    if first and error is None:
        try:
            if not gather:
                _collect(weights, state, members, [pieces])
            header = _header(inner, opt, ranks, members, user_state)
            torch_save_atomic({"format": FORMAT, **header, "weights": weights, "state": state}, path)
        except Exception as e:
            error = f"{type(e).__name__}: {e}"
    _group_ok(ranks, error)


def _collect(weights: dict, state: dict, members: list[list[str]], all_pieces: list[dict]) -> None:
    w, s, groups = _consolidate(all_pieces, len(members))
    weights.update(w)
    state.update(s)
    for mine, names_in in zip(members, groups):
        mine.extend(names_in)


def _first_error(gathered: list, what: str) -> str | None:
    failed = [(r, e) for r, (e, _) in enumerate(gathered) if e is not None]
    return f"rank {failed[0][0]} {what}: {failed[0][1]}" if failed else None


def _new_version(folder: Path) -> str:
    """A new, empty version folder in ``folder``, which must be this module's own."""
    if folder.exists() and not folder.is_dir():
        raise NotADirectoryError(f"{folder} is a file; save_optimizer(..., sharded=True) writes a folder "
                                 "(a sharded checkpoint): give a folder path")
    folder.mkdir(parents=True, exist_ok=True)
    versions, foreign = [], []
    for entry in folder.iterdir():
        if VERSION.fullmatch(entry.name) and entry.is_dir():
            versions.append(int(entry.name[1:]))
        elif entry.name != LATEST and not entry.name.startswith(f".{LATEST}.tmp."):
            foreign.append(entry.name)
    if foreign:
        raise FileExistsError(f"{folder} holds files that are not part of a sharded optimizer checkpoint "
                              f"({sorted(foreign)[:3]}); save_optimizer(..., sharded=True) writes into a "
                              "folder of its own")
    name = f"v{max(versions, default=0) + 1:06d}"
    (folder / name).mkdir()
    return name


def _save_sharded(inner, ranks: _Ranks, folder: Path, user_state) -> None:
    opt = inner.optimizer
    group = ranks.group
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    first = rank == 0
    error = version = None
    if first:
        try:
            _check_user_state(user_state)
            version = _new_version(folder)
        except Exception as e:
            error = f"{type(e).__name__}: {e}"
    box = [(error, version)]
    dist.broadcast_object_list(box, src=dist.get_global_rank(group, 0), group=group)
    if box[0][0] is not None:
        _group_ok(ranks, error)  # raises on every rank, naming rank 0's error
    version = box[0][1]
    error, index = None, None
    try:
        if seam.optimizer_kind(inner) == "distributed" or ranks.dp_first:  # else it holds what they hold
            pieces = _pieces(inner, ranks)
            file = f"shard-{rank:05d}-of-{world:05d}.pt"
            torch_save_atomic({"format": SHARD_FORMAT, "pieces": {n: {s: t for s, _, t in parts}
                                                                  for n, (parts, *_) in pieces.items()}},
                              folder / version / file)
            index = {n: ([(s, e, dict.fromkeys(t, file)) for s, e, t in parts], *rest)
                     for n, (parts, *rest) in pieces.items()}
    except Exception as e:
        error = f"{type(e).__name__}: {e}"
    gathered: list | None = [None] * world if first else None
    dist.gather_object((error, index), gathered, dst=dist.get_global_rank(group, 0), group=group)
    if first:
        error = _first_error(gathered, "could not write its shard")
        published = False
        try:
            if error is None:
                merged, members = _merge([i for _, i in gathered if i is not None], len(opt.param_groups))
                params = {name: {"shape": shape, "scalars": scalars, "keys": sorted(set(parts[0][2]) - {"fp32"}),
                                 "pieces": [(s, e, next(iter(t.values()))) for s, e, t in parts]}
                          for name, (parts, scalars, shape) in merged.items()}
                header = _header(inner, opt, ranks, members, user_state)
                torch_save_atomic({"format": SHARDED_FORMAT, **header, "params": params}, folder / version / META)
                fsync_dir(folder / version)
                save_atomic(lambda f: f.write(f"{version}\n".encode()), folder / LATEST)
                published = True
        except Exception as e:
            error = f"{type(e).__name__}: {e}"
        for entry in folder.iterdir():  # older versions once published, else this incomplete one
            if VERSION.fullmatch(entry.name) and (entry.name != version) == published:
                shutil.rmtree(entry, ignore_errors=True)
    _group_ok(ranks, error)


def _check(src, path, opt, names_in_model: dict[str, torch.Size], groups: list[set[str]]) -> None:
    """Everything a load needs, before anything is written: the optimizer class, the same
    parameter names and shapes, and this rank's parameters in the same groups."""
    if src.meta["optimizer"] != type(opt).__name__:
        raise ValueError(f"{path} holds the state of {src.meta['optimizer']}, this run's optimizer is "
                         f"{type(opt).__name__}; build the run with the optimizer that was saved")
    saved = src.shapes
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
    saved_groups = [set(g["params"]) for g in src.meta["param_groups"]]
    if len(saved_groups) != len(groups) or any(not mine <= saved for mine, saved in zip(groups, saved_groups)):
        raise ValueError(f"{path}: its {len(saved_groups)} param groups do not hold the same parameters as "
                         f"this optimizer's {len(groups)}; build the optimizer with the same config")


def _not_ours(path, found) -> ValueError:
    return ValueError(f"{path} is not a vrgd-ds Megatron optimizer checkpoint (format {found!r}, expected "
                      f"{FORMAT!r} or, in a folder, {SHARDED_FORMAT!r}); write one with "
                      "vrgd_ds.megatron.save_optimizer")


def _torch_load(path: Path, mmap: bool = True):
    """``torch.load`` of one of our files, weights only; a file torch cannot read (truncated,
    not a torch file) is named. A missing file stays a FileNotFoundError."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except FileNotFoundError:
        raise
    except Exception as e:
        raise ValueError(f"{path} cannot be read as a checkpoint file ({type(e).__name__}: {str(e)[:200]}); "
                         "it is damaged or was not written by vrgd_ds.megatron.save_optimizer") from e


class _Consolidated:
    """A file of :func:`_save_consolidated`: whole tensors per name."""

    def __init__(self, path: Path):
        self.meta = _torch_load(path)
        found = self.meta.get("format") if isinstance(self.meta, dict) else type(self.meta).__name__
        if found != FORMAT:
            raise _not_ours(path, found)
        self.shapes = {n: tuple(w.shape) for n, w in self.meta["weights"].items()}

    def keys(self, name) -> list[str]:
        return [k for k, v in self.meta["state"][name].items() if torch.is_tensor(v) and v.dim() > 0]

    def scalars(self, name) -> dict:
        return {k: v for k, v in self.meta["state"][name].items() if not (torch.is_tensor(v) and v.dim() > 0)}

    def read(self, name, key, start, end):
        t = self.meta["weights"][name] if key == "fp32" else self.meta["state"][name][key]
        return t.reshape(-1)[start:end]


class _Sharded:
    """A folder of :func:`_save_sharded`: the version its ``latest`` names; each shard file is
    memory-mapped when first read, so a rank reads the elements it needs."""

    def __init__(self, folder: Path):
        latest = folder / LATEST
        if not latest.is_file():
            raise FileNotFoundError(f"{folder} is a folder without a {LATEST!r} file: not a sharded optimizer "
                                    "checkpoint, or its first save_optimizer(..., sharded=True) never completed")
        version = latest.read_text().strip()
        if not VERSION.fullmatch(version):
            raise ValueError(f"{latest} names {version[:40]!r}, not a version folder (v000001, ...)")
        self.folder = folder / version
        self.meta = _torch_load(self.folder / META, mmap=False)
        found = self.meta.get("format") if isinstance(self.meta, dict) else type(self.meta).__name__
        if found != SHARDED_FORMAT:
            raise _not_ours(self.folder / META, found)
        self.params = self.meta["params"]
        self.shapes = {n: tuple(p["shape"]) for n, p in self.params.items()}
        self._files: dict[str, dict] = {}

    def keys(self, name) -> list[str]:
        return self.params[name]["keys"]

    def scalars(self, name) -> dict:
        return self.params[name]["scalars"]

    def _shard(self, file: str) -> dict:
        if file not in self._files:
            shard = _torch_load(self.folder / file)
            if not isinstance(shard, dict) or shard.get("format") != SHARD_FORMAT:
                raise ValueError(f"{self.folder / file} is not a shard of this checkpoint")
            self._files[file] = shard["pieces"]
        return self._files[file]

    def read(self, name, key, start, end):
        parts = [self._shard(file)[name][s][key].reshape(-1)[max(start, s) - s:min(end, e) - s]
                 for s, e, file in self.params[name]["pieces"] if s < end and e > start]
        if not parts:
            raise RuntimeError(f"vrgd_ds.megatron: {self.folder} holds no element {start}..{end} of {name}")
        return parts[0] if len(parts) == 1 else torch.cat(parts)


def _open(path: Path):
    if path.is_dir():
        return _Sharded(path)
    return _Consolidated(path)


def load_optimizer(megatron_optimizer, ddp, path: str | os.PathLike) -> dict | None:
    """Put a checkpoint written by :func:`save_optimizer` (a file, or a sharded folder) into a
    freshly built optimizer and model.

    Every rank of the group :func:`save_optimizer` names calls it (it ends with one check that
    all ranks loaded, so a rank that cannot read the checkpoint makes all of them raise). The
    param groups' saved hyperparameters replace the built ones, as torch's ``load_state_dict`` does (Megatron's
    scheduler sets lr and weight decay again at its next step). Returns the ``user_state``
    saved with it (None if none was). After an error, build the model and optimizer anew
    before trying again: the ranks that could read the checkpoint have loaded it."""
    inner = _inner(megatron_optimizer)
    opt = inner.optimizer
    _check_model(inner, ddp)
    ranks = _ranks(ddp)
    try:
        user_state = _load_here(inner, opt, ranks, Path(path))
    except Exception as e:
        _group_ok(ranks, f"{type(e).__name__}: {e}")  # raises on every rank
    _group_ok(ranks, None)
    with torch.no_grad():
        seam.main_to_model_params(inner, seam.chunk_list(ddp))  # every rank loaded: the all-gather is safe
    return user_state


def _load_here(inner, opt, ranks: _Ranks, path: Path) -> dict | None:
    src = _open(path)
    saved_tp = src.meta.get("tensor_parallel_size", 1)
    if saved_tp != ranks.tp_size:
        raise ValueError(f"{path} was saved with tensor_model_parallel_size={saved_tp}, this run has "
                         f"{ranks.tp_size}; resume with the tensor-parallel size it was saved with")
    stage, size = src.meta.get("pipeline_stage", (0, 1))
    if (stage, size) != ranks.stage:
        raise ValueError(f"{path} holds pipeline stage {stage} of pipeline_model_parallel_size={size}; this rank is "
                         f"stage {ranks.stage[0]} of {ranks.stage[1]}: load each stage's own checkpoint, at the "
                         "pipeline-parallel size it was saved with")
    chunks = src.meta.get("model_chunks", 1)
    if chunks != ranks.chunks:
        raise ValueError(f"{path} was saved with {chunks} model chunk(s) per pipeline stage (virtual pipeline "
                         f"stages), this run has {ranks.chunks}; resume with the virtual pipeline size it was "
                         "saved with, or through Megatron's distributed checkpointing")
    mains = seam.main_params(inner)
    names = ranks.names
    mine = [[m for m in g if m.model_param is not None] for g in mains]  # no placeholders
    # every model parameter the optimizer trains on some rank (all of them with a gradient),
    # on every tensor-parallel rank
    _check(src, path, opt, ranks.stored, [{names[id(m.model_param)] for m in g} for g in mine])
    with torch.no_grad():
        for g in mine:
            for m in g:
                name = names[id(m.model_param)]
                m.tensor.copy_(src.read(name, "fp32", m.start, m.end).view_as(m.tensor))
                new = {k: src.read(name, k, m.start, m.end).view(m.tensor.shape).to(m.tensor.device).clone()
                       for k in src.keys(name)}
                for k, v in src.scalars(name).items():
                    new[k] = v.clone() if torch.is_tensor(v) else v
                opt.state[m.tensor] = new
    _load_header(inner, opt, src.meta)
    return src.meta.get("user_state")


def _load_header(inner, opt, meta: dict) -> None:
    """Inverse of :func:`_header` (both formats, and :mod:`.dist_checkpoint`'s common state):
    the param groups' saved hyperparameters, the loss scaler, the noise-scale averages and the
    skipped-step count."""
    for g, saved in zip(opt.param_groups, meta["param_groups"]):
        g.update({k: v for k, v in saved["hyperparameters"].items() if k in g})
    scaler = seam.grad_scaler(inner)
    if scaler is not None and meta["grad_scaler"] is not None:
        scaler.load_state_dict(meta["grad_scaler"])
    extra = meta.get("extra", {})
    if "noise_scale" in extra and hasattr(opt, "noise_scale"):
        opt.noise_scale.load_state_dict(extra["noise_scale"])
    if "skipped_steps" in extra and hasattr(opt, "skipped_steps"):
        opt.skipped_steps = extra["skipped_steps"]
