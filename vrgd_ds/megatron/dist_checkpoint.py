"""Megatron's distributed checkpointing (``dist_checkpointing``, ``--ckpt-format torch_dist``)
for the vrgd_ds optimizers: ``sharded_state_dict`` and ``load_state_dict``.

:func:`vrgd_ds.megatron.get_megatron_optimizer` installs these on the optimizer it returns,
so a training loop saves and loads the way Megatron-LM's ``save_checkpoint`` /
``load_checkpoint`` do::

    from megatron.core import dist_checkpointing

    model_sd = ddp_model.sharded_state_dict()        # keep_vars: its tensors are the parameters
    dist_checkpointing.save({"model": model_sd, "optimizer": optimizer.sharded_state_dict(model_sd)},
                            folder)
    ...                                              # a new run, any tensor- or data-parallel size
    model_sd = ddp_model.sharded_state_dict()
    loaded = dist_checkpointing.load(
        {"model": model_sd, "optimizer": optimizer.sharded_state_dict(model_sd, is_loading=True)}, folder)
    ddp_model.load_state_dict(loaded["model"])
    optimizer.load_state_dict(loaded["optimizer"])

The layout is Megatron's "fully sharded model space" one, for every optimizer state key
rather than Adam's two: per model parameter, the fp32 main weight under
``optimizer.state.fp32_param.<model key>`` and every per-element state tensor (``exp_avg``,
``exp_avg_sq``, ``gsnr_momentum``, ``momentum_buffer``, ...) under
``optimizer.state.<state key>.<model key>``, each a ShardedTensor over the model parameter's
own global shape (under the distributed optimizer, this rank's flat element range of it, as
at most 2 x ndim - 1 N-D chunks: Megatron 0.16 no longer takes ``flattened_range``; a
ShardedTensorFactory, such as SwiGLU's fc1 weight, is followed tensor by tensor). So the
checkpoint loads at any tensor- and data-parallel size and with the distributed optimizer on
or off, whatever it was saved with. Each parameter's scalar state (step counts), its param
group and which state keys it has are a ShardedObject
``optimizer.vrgd_param.<model key>`` (one per slot of the axes a model tensor prepends, such
as a GPT's layer axis); the param groups' hyperparameters, the loss scaler, the
noise-scale averages and the skipped-step count are common state. Whatever
``metadata["distrib_optim_sharding_type"]`` asks, this layout is written (it reshards in
every dimension the others do); ``fsdp_dtensor`` is refused.

A load (``is_loading=True``) must ask for exactly the state tensors the checkpoint holds
before it can read it, so each optimizer names its per-element state keys
(:meth:`vrgd_ds.optim.base.BaseOptimizer.element_state_keys`); a parameter that has not been
stepped yet (a save before the first step, or after fp16 overflows only) is saved as such and
loads as such. Every rank checks what it loaded (the optimizer class, the parameter's param
group and state keys) before anything is written, and all ranks raise together if one
cannot; the model's weights are then set from the loaded main weights as Megatron's step does.
"""

from __future__ import annotations

import math

import torch

from . import seam

DIST_FORMAT = "vrgd-ds megatron dist-checkpoint optimizer v1"
STATE_PREFIX = "optimizer.state"
META_PREFIX = "optimizer.vrgd_param"


def _model_tensors(model_sharded_state_dict) -> dict:
    """id(model parameter) -> its ShardedTensor (or ShardedTensorFactory) in the model's
    sharded state dict."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.utils import extract_sharded_tensors_and_factories

    tensors, _ = extract_sharded_tensors_and_factories(model_sharded_state_dict)
    return {id(sh.data): sh for sh in nested_values(tensors)}


def _local_params(inner):
    """(param group index, MainParam) of every model parameter element range this rank holds."""
    for gi, group in enumerate(seam.main_params(inner)):
        for m in group:
            if m.model_param is not None and m.end > m.start:  # not a placeholder, not empty
                yield gi, m


def _boxes(shape: tuple, s: int, e: int) -> list[tuple[tuple, tuple]]:
    """The flat element range [s, e) of a row-major tensor of ``shape`` as N-D boxes
    (offset, shape), in element order, each contiguous in memory (at most 2 * ndim - 1)."""
    if s >= e:
        return []
    if not shape:
        return [((), ())]
    inner = math.prod(shape[1:])
    (i0, r0), (i1, r1) = divmod(s, inner), divmod(e, inner)
    rest = (0,) * (len(shape) - 1)
    if r0 and i0 == i1:
        return [((i0, *o), (1, *b)) for o, b in _boxes(shape[1:], r0, r1)]
    out = []
    if r0:
        out += [((i0, *o), (1, *b)) for o, b in _boxes(shape[1:], r0, inner)]
        i0 += 1
    if i1 > i0:
        out.append(((i0, *rest), (i1 - i0, *shape[1:])))
    if r1:
        out += [((i1, *o), (1, *b)) for o, b in _boxes(shape[1:], 0, r1)]
    return out


def _parts(sharded, param, name: str) -> list[tuple[int, object]]:
    """The model's ShardedTensors of ``param`` and where each starts in its flat elements: the
    one ShardedTensor, or what a ShardedTensorFactory (e.g. a GLU's fc1 weight, saved as two
    tensors) builds, each of which must be a contiguous view of the parameter."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    if not isinstance(sharded, ShardedTensorFactory):
        return [(0, sharded)]
    out = []
    for st in nested_values(sharded.build()):
        if not (isinstance(st, ShardedTensor) and st.flattened_range is None and st.data.is_contiguous()
                and st.data.untyped_storage().data_ptr() == param.untyped_storage().data_ptr()):
            raise NotImplementedError(f"vrgd_ds.megatron: the model's sharded state dict saves {name} through a "
                                      f"ShardedTensorFactory ({sharded.key}) whose tensors are not contiguous parts "
                                      "of the parameter; this optimizer cannot map its state onto them")
        out.append((st.data.storage_offset() - param.storage_offset(), st))
    return sorted(out, key=lambda x: x[0])


def _replica(st, distributed: bool, name: str):
    """The distributed optimizer's data-parallel ranks hold different elements: no replicas
    among them (Megatron's replica id is (pipeline, tensor, data)-parallel)."""
    r = st.replica_id
    if not distributed:
        return r
    if not (isinstance(r, tuple) and len(r) == 3):
        raise NotImplementedError(f"vrgd_ds.megatron: {name}'s ShardedTensor has replica_id {r!r}; expected "
                                  "Megatron's (pipeline, tensor, data)-parallel triple")
    return (r[0], r[1], 0)


def _state_tensors(parts, flat, key: str, m, distributed: bool, name: str) -> list:
    """``flat`` (one state tensor of main parameter ``m``: the model parameter's elements
    [m.start, m.end)) as ShardedTensors over the model's global tensors, one per N-D box of
    the range, in element order; irregular chunks, whose layout Megatron leaves to
    torch.distributed.checkpoint, so that they load into any other layout."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    out = []
    for first, st in parts:
        n = math.prod(st.local_shape)
        lo, hi = max(m.start, first), min(m.end, first + n)
        at = lo - m.start
        for off, box in _boxes(tuple(st.local_shape), lo - first, hi - first):
            pre = st.prepend_axis_num
            local = (1,) * pre + box
            offset = (*st.global_offset[:pre], *(g + o for g, o in zip(st.global_offset[pre:], off)))
            size = math.prod(box)
            out.append(ShardedTensor(f"{STATE_PREFIX}.{key}.{st.key}", flat[at:at + size].view(local), flat.dtype,
                                     local, tuple(st.global_shape), offset, None,
                                     replica_id=_replica(st, distributed, name),
                                     allow_shape_mismatch=st.allow_shape_mismatch))
            at += size
    return out


def _meta_object(sharded, parts, value, owner: bool):
    """The parameter's ShardedObject: one per model tensor, or per slot of the axes the
    model's tensor prepends (a GPT's layers share one key along a prepended layer axis)."""
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    st = parts[0][1]
    pre = st.prepend_axis_num
    shape, offset = (tuple(st.global_shape[:pre]), tuple(st.global_offset[:pre])) if pre else ((1,), (0,))
    pp = sharded.replica_id[0] if isinstance(sharded.replica_id, tuple) else 0
    return ShardedObject(f"{META_PREFIX}.{sharded.key}", value, shape, offset,
                         replica_id=(pp, 0, 0) if owner else (pp, 1, 1))


def _split_state(state: dict, name: str, main) -> tuple[dict, dict]:
    tensors, scalars = {}, {}
    for k, v in state.items():
        if torch.is_tensor(v) and v.dim() > 0:
            if v.shape != main.shape:
                raise RuntimeError(f"vrgd_ds.megatron: optimizer state {k!r} of {name} has shape "
                                   f"{tuple(v.shape)}, its main parameter {tuple(main.shape)}")
            tensors[k] = v
        else:
            scalars[k] = v.detach().cpu().clone() if torch.is_tensor(v) else v
    return tensors, scalars


def sharded_state_dict(inner, ddp, model_sharded_state_dict, is_loading: bool = False, sharding_type=None,
                       metadata: dict | None = None) -> dict:
    """The optimizer's sharded state dict (see the module docstring). Every rank of the
    tensor- and data-parallel group calls it, as Megatron's ``save_checkpoint`` /
    ``load_checkpoint`` do; all ranks raise together if one cannot build it."""
    from .checkpoint import _group_ok, _header, _ranks

    ranks = _ranks(ddp)
    error, out = None, None
    try:
        out = _build(inner, ranks, model_sharded_state_dict, is_loading, sharding_type, metadata)
    except Exception as e:  # reported to every rank below
        error = f"{type(e).__name__}: {e}"
    _group_ok(ranks, error)
    opt = inner.optimizer
    out.update(_header(inner, opt, ranks, [[] for _ in opt.param_groups], None))
    # common state is the same on every rank (Megatron keeps rank 0's): not the pipeline stage
    del out["user_state"], out["saved_world_size"], out["pipeline_stage"], out["model_chunks"]
    return out


def _build(inner, ranks, model_sharded_state_dict, is_loading, sharding_type, metadata) -> dict:
    kind = (metadata or {}).get("distrib_optim_sharding_type", sharding_type)
    if kind == "fsdp_dtensor":
        raise NotImplementedError("vrgd_ds.megatron: distrib_optim_sharding_type 'fsdp_dtensor' (Megatron FSDP) is "
                                  "not supported; the vrgd_ds optimizers write Megatron's model-space layout, "
                                  "which loads at any tensor- and data-parallel size")
    opt = inner.optimizer
    by_param = _model_tensors(model_sharded_state_dict)
    distributed = seam.optimizer_kind(inner) == "distributed"
    dp_first = ranks.dp_first
    tensors, metas, keys_of, targets = {}, {}, {}, {}
    for gi, m in _local_params(inner):
        name = ranks.names[id(m.model_param)]
        sharded = by_param.get(id(m.model_param))
        if sharded is None:
            raise ValueError(f"vrgd_ds.megatron: parameter {name} is not in the model's sharded state dict (build it "
                             "with the model's own sharded_state_dict(), whose tensors are the parameters)")
        keys_of[id(m.model_param)] = name  # unique here; a GPT's layers share one sharded key
        keys = list(opt.element_state_keys(opt.param_groups[gi]))
        state = opt.state.get(m.tensor, {})
        stepped = bool(state)
        if stepped and not is_loading:
            values, scalars = _split_state(state, name, m.tensor)
            if sorted(values) != sorted(keys):
                raise RuntimeError(f"vrgd_ds.megatron: {type(opt).__name__} holds the state {sorted(values)} for "
                                   f"{name}, but names {sorted(keys)} as its per-element state; a checkpoint could "
                                   "not be loaded")
        else:  # what a load reads into; or not stepped yet: zeros stand in, and a load leaves it unstepped
            values, scalars = {k: torch.zeros_like(m.tensor, dtype=torch.float32) for k in keys}, {}
        weight = m.tensor.detach().clone() if is_loading else m.tensor.detach()  # a load checks before it writes
        if is_loading:
            targets[name] = values
        parts = _parts(sharded, m.model_param, name)
        entry = {k: _state_tensors(parts, v.reshape(-1), k, m, distributed, name)
                 for k, v in {"fp32_param": weight, **{k: values[k] for k in keys}}.items()}
        tensors[name] = entry
        owner = (m.start == 0) if distributed else dp_first
        owner = owner and ranks.tp_rank == 0
        metas[name] = _meta_object(sharded, parts, {"group": gi, "keys": sorted(keys), "stepped": stepped,
                                                    "scalars": scalars}, owner)
    inner._vrgd_dist_keys = keys_of  # what load_state_dict reads each parameter's state under
    inner._vrgd_dist_targets = targets  # the tensors a load reads into (torch.distributed.checkpoint: in place)
    return {"format": DIST_FORMAT, "param_state": tensors, "param_meta": metas}


def _joined(boxes: list) -> torch.Tensor:
    """A main parameter's elements from its loaded boxes (in element order), in a new tensor."""
    return torch.cat([b.reshape(-1) for b in boxes])


def _read(boxes: list, target) -> torch.Tensor:
    """A state tensor from its loaded boxes: the tensor they were read into when they are, in
    order, its views (torch.distributed.checkpoint loads in place; no copy, and the load's
    memory is one share of the state), else a new tensor of them."""
    if target is not None:
        at, base = target.storage_offset(), target.untyped_storage().data_ptr()
        for b in boxes:
            if b.untyped_storage().data_ptr() != base or b.storage_offset() != at or not b.is_contiguous():
                return _joined(boxes)
            at += b.numel()
        if at == target.storage_offset() + target.numel():
            return target
    return _joined(boxes)


def load_state_dict(inner, ddp, state_dict: dict) -> None:
    """Put what ``dist_checkpointing.load`` returned for :func:`sharded_state_dict`
    (``is_loading=True``) into the optimizer, then set the model's weights from the main
    weights. Every rank calls it; all raise together if one cannot."""
    from .checkpoint import _group_ok, _ranks

    ranks = _ranks(ddp)
    error = None
    try:
        _load(inner, ranks, state_dict)
    except Exception as e:
        error = f"{type(e).__name__}: {e}"
    _group_ok(ranks, error)
    with torch.no_grad():
        seam.main_to_model_params(inner, seam.chunk_list(ddp))  # every rank loaded: the all-gather is safe


def _load(inner, ranks, state_dict) -> None:
    from .checkpoint import _load_header

    opt = inner.optimizer
    if not isinstance(state_dict, dict) or state_dict.get("format") != DIST_FORMAT:
        raise ValueError("vrgd_ds.megatron: load_state_dict takes what megatron.core.dist_checkpointing.load "
                         "returned for this optimizer's sharded_state_dict(model_sharded_state_dict, "
                         "is_loading=True); Megatron's other optimizer state dicts know Adam's state only")
    if state_dict["optimizer"] != type(opt).__name__:
        raise ValueError(f"the checkpoint holds the state of {state_dict['optimizer']}, this run's optimizer is "
                         f"{type(opt).__name__}; build the run with the optimizer that was saved")
    if len(state_dict["param_groups"]) != len(opt.param_groups):
        raise ValueError(f"the checkpoint has {len(state_dict['param_groups'])} param groups, this optimizer "
                         f"{len(opt.param_groups)}")
    keys_of = getattr(inner, "_vrgd_dist_keys", None)
    if keys_of is None:
        raise RuntimeError("vrgd_ds.megatron: call optimizer.sharded_state_dict(model_sharded_state_dict, "
                           "is_loading=True) and load that from the checkpoint before load_state_dict")
    tensors, metas = state_dict["param_state"], state_dict["param_meta"]
    targets = inner.__dict__.pop("_vrgd_dist_targets", {})
    new_state = []
    for gi, m in _local_params(inner):
        name = ranks.names[id(m.model_param)]
        key = keys_of[id(m.model_param)]
        meta = metas[key]
        if meta["group"] != gi:
            raise ValueError(f"{name} is in param group {meta['group']} in the checkpoint, {gi} in this run")
        keys = sorted(opt.element_state_keys(opt.param_groups[gi]))
        if meta["keys"] != keys:
            raise ValueError(f"{name} has the optimizer state {meta['keys']} in the checkpoint, this run's "
                             f"{type(opt).__name__} keeps {keys}")
        entry = tensors[key]
        state = {}
        if meta["stepped"]:
            state = {k: _read(entry[k], targets.get(name, {}).get(k)).view(m.tensor.shape).to(m.tensor.device,
                                                                                               torch.float32)
                     for k in keys}
            state.update({k: v.clone() if torch.is_tensor(v) else v for k, v in meta["scalars"].items()})
        new_state.append((m, _joined(entry["fp32_param"]), state))
    with torch.no_grad():
        for m, weight, state in new_state:
            m.tensor.copy_(weight.reshape(m.tensor.shape))
            if state:
                opt.state[m.tensor] = state
            else:
                opt.state.pop(m.tensor, None)
    _load_header(inner, opt, state_dict)
