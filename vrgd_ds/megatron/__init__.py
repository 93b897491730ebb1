"""Megatron-core adapter: the VR optimizers and LAMB/LARS under Megatron's DDP.

    from vrgd_ds.megatron import VROptimizerConfig, get_megatron_optimizer

    config = VROptimizerConfig(optimizer="vrlamb", lr=1e-3, weight_decay=0.01, adam_eps=1e-6,
                               clip_grad=1.0, bf16=True, use_distributed_optimizer=True)
    optimizer = get_megatron_optimizer(config, [ddp_model])   # instead of Megatron's own

Everything else in the training loop stays Megatron's (``zero_grad_buffer``, the
forward/backward schedule with ``no_sync``, ``finish_grad_sync``, ``optimizer.step()``,
``OptimizerParamScheduler``). Checkpoints: Megatron's distributed checkpointing
(``optimizer.sharded_state_dict(model_sharded_state_dict)`` with
``megatron.core.dist_checkpointing``, then ``optimizer.load_state_dict``; :mod:`.dist_checkpoint`),
or :func:`save_optimizer` / :func:`load_optimizer` (:mod:`.checkpoint`). :mod:`.optimizer` builds the optimizer and states how layer
statistics stay exact across distributed-optimizer shards, :mod:`.squares` how the
squared micro-batch gradients travel beside Megatron's gradient buckets, :mod:`.support`
what is refused, :mod:`.seam` which Megatron internals are used (tested: megatron-core
0.16.1). Importing ``vrgd_ds`` does not import this package.
"""

try:
    import megatron.core  # noqa: F401
except ImportError as e:  # pragma: no cover
    raise ImportError("vrgd_ds.megatron needs megatron-core: pip install 'vrgd-ds[megatron]'") from e

from .checkpoint import load_optimizer, save_optimizer
from .optimizer import OPTIMIZERS, VROptimizerConfig, get_megatron_optimizer
from .seam import TESTED as TESTED_MEGATRON_CORE

__all__ = ["VROptimizerConfig", "get_megatron_optimizer", "save_optimizer", "load_optimizer", "OPTIMIZERS",
           "TESTED_MEGATRON_CORE"]
