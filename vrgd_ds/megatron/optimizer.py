"""Build vrgd_ds optimizers through Megatron-core's own optimizer path.

:func:`get_megatron_optimizer` takes the arguments of
``megatron.core.optimizer.get_megatron_optimizer`` and returns what it returns (a
``ChainedOptimizer`` around a ``DistributedOptimizer``, ``Float16OptimizerWithFloat16Params``
or ``FP32Optimizer``). Megatron builds everything as usual, param groups (``wd_mult`` 0 for
biases and 1-D parameters, ``lr_mult``, ``max_lr``/``min_lr`` for its scheduler), process
groups, main-parameter shards and loss scaler, around a temporary, stateless torch AdamW;
then the AdamW is replaced by the optimizer named in ``config.optimizer``, over the very
same tensors and param groups. Megatron's ``OptimizerParamScheduler`` drives ``lr`` and
``weight_decay`` of every group as it would for Adam.

Layer statistics under the distributed optimizer (exact across shards)
----------------------------------------------------------------------
Each inner tensor is the part of one model parameter ("layer") that this rank's shard holds
(:class:`ShardLayout`); the GSNR layer means and the LAMB/LARS trust-ratio norms are summed
over all ranks with one all-reduce of a [layers, columns] table over the distributed
optimizer's data-parallel group, whose size does not depend on the shard.

Under tensor parallelism a model parameter that Megatron's tensor-parallel layers split
(``tensor_model_parallel``) is one layer of all tensor-parallel ranks' parts together: the
table is then also summed over the tensor-parallel group, with the rows of parameters every
tensor-parallel rank holds whole (norms, row-parallel biases) zeroed on all but its first
rank (:class:`ShardLayout`). Without the distributed optimizer that is the only sum.

Under pipeline parallelism each stage holds whole layers of its own, so their statistics
are the stage's; the table nevertheless has a row for every layer of every stage (the
stages' rows in stage order, placed by one all-gather of the stages' layer counts at
construction), each stage filling its own rows, and is also summed over the pipeline
group: what must hold for the whole model (the decisions below, the telemetry's noise
scale) is then read from the same rows on every rank of every stage.

Under virtual pipeline parallelism a rank holds several model chunks, each wrapped in its own
DDP (its own buffers and bucket groups): the squares follow each chunk's buffers
(:mod:`.squares`), and the stage's rows are the layers of all its chunks, in chunk order.

Every rank issues every collective, in the same order and with the same sizes:

- the optimizers issue one layer-statistics all-reduce per param group (and one for all
  groups together for the GSNR) whenever the group has tensors. Megatron gives every rank
  every param group (on every pipeline stage), but a rank (its shard, or its stage) may hold
  no element of a group. Such a group gets one zero-element placeholder tensor (with a
  zero-element gradient), so that every group has tensors on every rank; the table's size
  is the number of layers on every rank;
- whether a step computes the GSNR, overflows into float64, or is skipped for a non-finite
  gradient is decided from the all-reduced sums of every layer (not only of the layers the
  rank's shard holds pieces of), so on every rank alike;
- the squares collectives (:mod:`.squares`) run inside Megatron's own bucket-group
  start/finish calls, which Megatron issues in the same order on every rank;
- the backward-pass count check is one all-reduce at the first GSNR read of a step, which
  every rank reaches because the param groups (and their gamma) are the same everywhere.

Checkpoints: ``sharded_state_dict`` and ``load_state_dict`` are this package's
(:mod:`.dist_checkpoint`): Megatron's distributed checkpointing (``torch_dist``) saves and
loads every state key, at any tensor- and data-parallel size. Megatron's legacy optimizer
checkpoints (``state_dict``, ``save_parameter_state``, ``load_parameter_state``) know Adam's
state keys only and raise NotImplementedError naming both ways that keep everything;
:func:`vrgd_ds.megatron.save_optimizer` / :func:`~vrgd_ds.megatron.load_optimizer`
(:mod:`.checkpoint`) are the other.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from ..optim import LAMB, LARS, VRAdam, VRAdamW, VRLAMB, VRLARS, VRMomentum, VRSGD
from ..optim.layout import ReducedLayout, Segment
from ..optim.vr import GSNRTransform
from . import dist_checkpoint, seam
from .squares import BufferSquares
from .support import check_supported

try:
    from megatron.core.optimizer import OptimizerConfig
except ImportError as e:  # pragma: no cover - the package __init__ says how to install
    raise ImportError("vrgd_ds.megatron needs megatron-core: pip install 'vrgd-ds[megatron]'") from e

OPTIMIZERS = ("vrsgd", "vrmomentum", "vradam", "vrlamb", "vrlars", "lamb", "lars")
LEGACY_CHECKPOINT_METHODS = ("state_dict", "save_parameter_state", "load_parameter_state")


@dataclasses.dataclass
class VROptimizerConfig(OptimizerConfig):
    """Megatron's ``OptimizerConfig`` with the VR fields; ``optimizer`` names one of
    :data:`OPTIMIZERS` ("vradam" is VR-AdamW when ``decoupled_weight_decay``, as Megatron's
    "adam" is AdamW). LAMB and VR-Adam/LAMB read ``adam_beta1/2`` and ``adam_eps``; VR-Momentum
    and (VR-)LARS read ``sgd_momentum``. ``vr_beta3=None`` takes the optimizer's default
    (0.9 for VR-Adam and VR-LAMB, 0 otherwise). ``vr_gsnr_interval`` and
    ``vr_telemetry_interval`` are the VR optimizers' ``gsnr_interval`` and
    ``telemetry_interval`` (the record, with the gradient noise scale, is the inner
    optimizer's ``telemetry``)."""

    optimizer: str = "vrlamb"
    vr_gamma: float = 0.1
    vr_beta3: float | None = None
    vr_gsnr_interval: int = 1
    vr_telemetry_interval: int = 0
    lars_eta: float = 0.001


def _build(config, groups: list[dict]):
    name = config.optimizer
    betas, eps = (config.adam_beta1, config.adam_beta2), config.adam_eps
    vr = {"gamma": config.vr_gamma, "gsnr_interval": config.vr_gsnr_interval,
          "telemetry_interval": config.vr_telemetry_interval,
          **({} if config.vr_beta3 is None else {"beta3": config.vr_beta3})}
    lr, wd, mom = config.lr, config.weight_decay, config.sgd_momentum
    if name == "lamb":
        return LAMB(groups, lr=lr, betas=betas, eps=eps, weight_decay=wd)
    if name == "lars":
        return LARS(groups, lr=lr, momentum=mom, weight_decay=wd, eta=config.lars_eta)
    if name == "vrlamb":
        return VRLAMB(groups, lr=lr, betas=betas, eps=eps, weight_decay=wd, **vr)
    if name == "vrlars":
        return VRLARS(groups, lr=lr, momentum=mom, weight_decay=wd, eta=config.lars_eta, **vr)
    if name == "vradam":
        cls = VRAdamW if config.decoupled_weight_decay else VRAdam
        return cls(groups, lr=lr, betas=betas, eps=eps, weight_decay=wd, **vr)
    if name == "vrmomentum":
        return VRMomentum(groups, lr=lr, momentum=mom, weight_decay=wd, **vr)
    return VRSGD(groups, lr=lr, weight_decay=wd, **vr)


class ShardLayout(ReducedLayout):
    """Inner tensors as pieces of model layers, one segment each. A layer is a model
    parameter, whole: under tensor parallelism a parameter split over the tensor-parallel
    group (``tensor_model_parallel``) is one layer of ``numel x TP`` elements.

    Per-layer sums are added up over the distributed optimizer's shard group (``group``;
    None without the distributed optimizer, where every rank holds whole parameters), then
    over the tensor-parallel group (``tp_group``), where a layer every tensor-parallel rank
    holds whole (``replicated``: norms, biases of row-parallel layers) counts on the group's
    first rank only, as Megatron's gradient norm counts it."""

    def __init__(self, segments: dict[int, Segment], layer_count: int, group, tp_group=None,
                 replicated: Sequence[int] = (), pp_group=None):
        super().__init__(layer_count, group)
        self._segments = segments
        self.tp_group = tp_group
        self.pp_group = pp_group
        drop = tp_group is not None and dist.get_rank(tp_group) != 0 and len(replicated) > 0
        self._replicated = torch.tensor(sorted(replicated), dtype=torch.long) if drop else None

    def segments(self, param: Tensor) -> list[Segment]:
        try:
            return [self._segments[id(param)]]
        except KeyError:
            raise RuntimeError(f"ShardLayout got a tensor of shape {tuple(param.shape)} that is not "
                               "one of the Megatron optimizer's main parameters") from None

    def _all_reduce(self, table: Tensor) -> None:
        if self.group is not None:
            super()._all_reduce(table)
        if self.tp_group is not None:
            if self._replicated is not None:
                table.index_fill_(0, self._replicated.to(table.device), 0.0)
            dist.all_reduce(table, group=self.tp_group)
            self.comm_bytes += table.numel() * table.element_size()
        if self.pp_group is not None:  # each stage's rows hold its layers, zeros elsewhere
            dist.all_reduce(table, group=self.pp_group)
            self.comm_bytes += table.numel() * table.element_size()


def _with_placeholders(mains: list[list[seam.MainParam]], device) -> list[list[seam.MainParam]]:
    """A zero-element tensor in each group this rank holds nothing of (see above)."""
    return [group or [seam.MainParam(seam.placeholder(device), None, 0, 0)] for group in mains]


def _stage_layers(count: int, pp_group, device) -> tuple[int, int]:
    """This pipeline stage's first row in a layer table of every stage's layers, and the
    table's length: one all-gather of each stage's layer count over the pipeline group."""
    pp = dist.get_world_size(pp_group)
    counts = [torch.zeros(1, dtype=torch.long, device=device) for _ in range(pp)]
    dist.all_gather(counts, torch.tensor([count], dtype=torch.long, device=device), group=pp_group)
    counts = [int(c.item()) for c in counts]
    return sum(counts[:dist.get_rank(pp_group)]), sum(counts)


def _layer_layout(chunks: list, inner, kind: str, mains: list[list[seam.MainParam]]) -> ShardLayout | None:
    """The layers of the inner tensors, where a tensor is not a whole layer (shards of the
    distributed optimizer, parameters split by tensor parallelism) or where the layers are
    spread over pipeline stages (None: none of these). A stage's layers are those of all its
    model chunks (virtual pipeline stages), in chunk order."""
    tp_group, pp_group = seam.tensor_parallel_group(chunks[0]), seam.pipeline_group(chunks[0])
    tp, pp = dist.get_world_size(tp_group), dist.get_world_size(pp_group)
    if kind != "distributed" and tp == 1 and pp == 1:
        return None
    buffers = [b for ddp in chunks for b in seam.dense_buffers(ddp)]
    params = [p for buf in buffers for p in buf.params]
    first, count = 0, len(params)
    if pp > 1:
        first, count = _stage_layers(len(params), pp_group, buffers[0].device)
    layers = {p: first + i for i, p in enumerate(params)}
    segments = {}
    for m in (m for group in mains for m in group):
        if m.model_param is None:  # adds zeros to this stage's first row
            segments[id(m.tensor)] = Segment(0, 0, first, 1)
        else:
            whole = m.model_param.numel() * (tp if seam.tensor_parallel(m.model_param) else 1)
            segments[id(m.tensor)] = Segment(0, m.end - m.start, layers[m.model_param], whole)
    replicated = [i for p, i in layers.items() if not seam.tensor_parallel(p)]
    return ShardLayout(segments, count, seam.shard_group(inner) if kind == "distributed" else None,
                       tp_group if tp > 1 else None, replicated if tp > 1 else (),
                       pp_group if pp > 1 else None)


def _param_groups(inner, mains, adam_keys) -> list[dict]:
    """Megatron's groups without the AdamW keys; bias/1-D groups (wd_mult 0) are excluded
    from LARS's trust ratio and from weight decay, as docs/algorithm.md section 4 asks."""
    groups = []
    for g, group_mains in zip(inner.optimizer.param_groups, mains):
        group = {k: v for k, v in g.items() if k not in adam_keys and k != "params"}
        group["exclude_from_adaptation"] = float(g.get("wd_mult", 1.0)) == 0.0
        group["params"] = [m.tensor for m in group_mains]
        groups.append(group)
    return groups


def _install(config, chunks: list, inner) -> None:
    if seam.is_stub(inner):
        raise NotImplementedError("vrgd_ds.megatron: a rank without trainable parameters (a stub "
                                  "Megatron optimizer) is not supported")
    kind = seam.optimizer_kind(inner)
    mains = _with_placeholders(seam.main_params(inner), seam.dense_buffers(chunks[0])[0].device)
    adam_keys = set(inner.optimizer.defaults) - {"lr", "weight_decay"}
    groups = _param_groups(inner, mains, adam_keys)
    # torch refuses non-leaf tensors (the fp32 shard views) in add_param_group; Megatron
    # sets its inner optimizer's groups directly, and so do we
    opt = _build(config, [{**g, "params": []} for g in groups])
    for mine, g in zip(opt.param_groups, groups):
        mine["params"] = g["params"]
    layout = _layer_layout(chunks, inner, kind, mains)
    if layout is not None:
        opt.layout = layout
    if isinstance(opt, GSNRTransform):
        squares = BufferSquares(chunks)
        squares.bind([m for group in mains for m in group])
        opt.attach_moments(squares)
        seam.hook_prepare_grads(inner, lambda: squares.before_prepare(seam.loss_scale(inner)),
                                squares.after_prepare)
    seam.replace_inner(inner, opt)
    inner._vrgd_model_chunks = tuple(id(ddp) for ddp in chunks)  # save/load_optimizer check they get these


def _install_checkpointing(obj, inner, chunks: list) -> None:
    """Megatron's distributed checkpointing through :mod:`.dist_checkpoint`; its legacy
    optimizer checkpoints refused."""
    def refuse(*_args, **_kwargs):
        raise NotImplementedError(
            "vrgd_ds.megatron: Megatron's legacy optimizer checkpoints (state_dict, save_parameter_state; "
            "--ckpt-format torch) know Adam's exp_avg/exp_avg_sq only and would lose the VR state; use "
            "distributed checkpointing (optimizer.sharded_state_dict(model_sharded_state_dict) with "
            "megatron.core.dist_checkpointing; --ckpt-format torch_dist) or "
            "vrgd_ds.megatron.save_optimizer(optimizer, ddp_model, path) / load_optimizer(...)")
    for name in LEGACY_CHECKPOINT_METHODS:
        if hasattr(obj, name):
            setattr(obj, name, refuse)

    def sharded_state_dict(model_sharded_state_dict, is_loading=False, sharding_type=None, metadata=None):
        return dist_checkpoint.sharded_state_dict(inner, chunks, model_sharded_state_dict, is_loading,
                                                  sharding_type, metadata)

    obj.sharded_state_dict = sharded_state_dict
    obj.load_state_dict = lambda state_dict: dist_checkpoint.load_state_dict(inner, chunks, state_dict)


def get_megatron_optimizer(config, model_chunks, config_overrides=None, use_gloo_process_groups=True,
                           pg_collection=None):
    """Megatron's ``get_megatron_optimizer`` for the optimizers in :data:`OPTIMIZERS`.

    ``config`` is a :class:`VROptimizerConfig`; ``model_chunks`` the DDP-wrapped model in a
    list, or all of this rank's model chunks (virtual pipeline stages). Build it before the
    first backward pass: the VR optimizers register the squares hooks on the model's
    parameters here."""
    from megatron.core.optimizer import get_megatron_optimizer as megatron_get_optimizer

    seam.check_megatron_version()
    if not isinstance(config, VROptimizerConfig):
        raise TypeError(f"config must be a vrgd_ds.megatron.VROptimizerConfig, got {type(config).__name__}")
    if config.optimizer not in OPTIMIZERS:
        raise ValueError(f"VROptimizerConfig.optimizer must be one of {OPTIMIZERS}, got {config.optimizer!r}")
    model_chunks = list(model_chunks)
    check_supported(config, model_chunks)
    megatron_config = dataclasses.replace(config, optimizer="adam")
    megatron_opt = megatron_get_optimizer(megatron_config, model_chunks, config_overrides,
                                          use_gloo_process_groups, pg_collection)
    for ddp in model_chunks:
        seam.check_internals(ddp, megatron_opt)
    inners = seam.inner_optimizers(megatron_opt)
    if len(inners) != 1:  # the refusals above leave only the dense optimizer
        raise NotImplementedError(f"vrgd_ds.megatron expected one Megatron optimizer, got {len(inners)}")
    _install(config, model_chunks, inners[0])
    _install_checkpointing(inners[0], inners[0], model_chunks)
    _install_checkpointing(megatron_opt, inners[0], model_chunks)
    return megatron_opt
