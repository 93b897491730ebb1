"""Train a small MLP with VR-LAMB under Megatron-core's DDP and distributed optimizer.

    pip install -e '.[megatron]'
    torchrun --nproc-per-node 2 examples/megatron_vrlamb.py --steps 50

Megatron's own training loop, top to bottom: ``initialize_model_parallel``, the model
wrapped in ``DistributedDataParallel``, the forward/backward schedule (micro-batches with
``no_sync``, ``finalize_model_grads``), ``optimizer.step()`` and ``OptimizerParamScheduler``.
The one vrgd_ds line is ``get_megatron_optimizer(VROptimizerConfig(...), [model])`` in place
of Megatron's ``get_megatron_optimizer(OptimizerConfig(...), [model])``. k = data-parallel
ranks x micro-batches gradient groups per step (keep k >= 4).

Tensor parallelism: ``--tensor-model-parallel-size T`` splits the two layers with Megatron's
``ColumnParallelLinear`` / ``RowParallelLinear`` over T ranks (same initial weights, same
data per data-parallel rank), so that ``torchrun --nproc-per-node 2 ... --tensor-model-parallel-size 2``
trains the same model as ``torchrun --nproc-per-node 1 ...``:

    torchrun --nproc-per-node 4 examples/megatron_vrlamb.py --tensor-model-parallel-size 2

Pipeline parallelism: ``--pipeline-model-parallel-size 2`` puts the first layer on one
pipeline stage and the second on the next (Megatron's 1F1B schedule hands the activations
over; same initial weights, same data per data-parallel rank), so that ``torchrun
--nproc-per-node 2 ... --pipeline-model-parallel-size 2`` trains the same model as
``torchrun --nproc-per-node 1 ...``. With ``--save`` each stage keeps its optimizer file or
folder in ``DIR/pp<stage>``; ``--dist-checkpoint`` keeps one checkpoint of all stages, which
resumes at another pipeline size too.

``--sequence-parallel`` adds Megatron's sequence parallelism (the micro-batch's samples are
the sequence: each tensor-parallel rank holds its part of them outside the split layers, and
the second layer's bias gets a partial gradient there, which Megatron sums over the
tensor-parallel group).

Checkpointing: ``--save DIR`` writes the optimizer (with the model's fp32 weights), the
iteration and the scheduler to ``DIR/optimizer.pt`` through
``vrgd_ds.megatron.save_optimizer``, at the end (or at ``--stop-after N``) and every
``--save-every`` steps; with ``--sharded``, each rank writes its own shard into the folder
``DIR/optimizer`` instead (no gather to one rank). With ``--dist-checkpoint``, Megatron's
distributed checkpointing (``torch_dist``, as Megatron-LM's ``--ckpt-format torch_dist``)
writes the model, the optimizer and the run's state into ``DIR/dist/iter_NNNNNNN``, then the
file ``DIR/dist/latest`` names it (older ones are removed after that); it resumes at another
tensor-parallel size too. ``--resume DIR`` continues from whichever of the three DIR holds,
with the same data, as if the run had not stopped (the same ``--steps`` and
``--micro-batches``; others are refused):

    torchrun --nproc-per-node 2 examples/megatron_vrlamb.py --steps 50 --stop-after 20 --save ckpt
    torchrun --nproc-per-node 2 examples/megatron_vrlamb.py --steps 50 --resume ckpt
    torchrun --nproc-per-node 4 examples/megatron_vrlamb.py --tensor-model-parallel-size 2 --steps 50 \
        --stop-after 20 --save ckpt2 --dist-checkpoint
    torchrun --nproc-per-node 2 examples/megatron_vrlamb.py --steps 50 --resume ckpt2

Runs on GPUs with NCCL. (megatron-core 0.16 itself assumes CUDA; the test suite runs this
script on 2 CPU ranks through tests/megatron_example_cpu.py, which redirects that.)
"""

from __future__ import annotations

import argparse
import os
import shutil

import torch
import torch.distributed as dist

IN, HIDDEN, OUT = 32, 64, 8


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--optimizer", default="vrlamb", help="vrlamb, vrlars, vradam, vrsgd, vrmomentum, lamb, lars")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--micro-batches", type=int, default=4, help="micro-batches per rank per step")
    p.add_argument("--micro-batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--warmup-steps", type=int, default=5)
    p.add_argument("--no-distributed-optimizer", action="store_true")
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--tensor-model-parallel-size", type=int, default=1, metavar="T",
                   help="split the layers over T ranks (tensor parallelism); the world size must be a multiple")
    p.add_argument("--pipeline-model-parallel-size", type=int, default=1, metavar="P",
                   help="1 or 2: the two layers on P pipeline stages; the world size must be a multiple of "
                        "P x the tensor-parallel size")
    p.add_argument("--sequence-parallel", action="store_true",
                   help="with --tensor-model-parallel-size > 1: Megatron's sequence parallelism")
    p.add_argument("--stop-after", type=int, default=None, metavar="N",
                   help="stop after step N of --steps (the schedule still spans --steps)")
    p.add_argument("--hidden", type=int, default=HIDDEN, help="width of the hidden layer")
    p.add_argument("--save", metavar="DIR", help="save optimizer, iteration and scheduler to DIR/optimizer.pt "
                                                 "at the end (and every --save-every steps)")
    p.add_argument("--save-every", type=int, default=0, metavar="N", help="with --save: also every N steps")
    p.add_argument("--sharded", action="store_true",
                   help="with --save: every rank writes its shard, into the folder DIR/optimizer")
    p.add_argument("--dist-checkpoint", action="store_true",
                   help="with --save: Megatron's distributed checkpointing (model, optimizer, run state) into "
                        "DIR/dist; resumes at any tensor-parallel size")
    p.add_argument("--resume", metavar="DIR",
                   help="continue from DIR/optimizer.pt, DIR/optimizer (sharded) or DIR/dist (--dist-checkpoint)")
    args = p.parse_args(argv)
    if args.stop_after is not None and not 0 < args.stop_after <= args.steps:
        p.error(f"--stop-after must be between 1 and --steps ({args.steps}), got {args.stop_after}")
    if args.save_every < 0 or (args.save_every and not args.save):
        p.error(f"--save-every needs --save and a positive N, got {args.save_every}")
    if args.sharded and not args.save:
        p.error("--sharded needs --save")
    if args.dist_checkpoint and (not args.save or args.sharded):
        p.error("--dist-checkpoint needs --save, and not --sharded (it is a format of its own)")
    if args.tensor_model_parallel_size < 1 or args.hidden % args.tensor_model_parallel_size:
        p.error(f"--tensor-model-parallel-size must be >= 1 and divide --hidden ({args.hidden}), "
                f"got {args.tensor_model_parallel_size}")
    if args.pipeline_model_parallel_size not in (1, 2):
        p.error(f"--pipeline-model-parallel-size must be 1 or 2 (the MLP has 2 layers), got "
                f"{args.pipeline_model_parallel_size}")
    if args.pipeline_model_parallel_size > 1 and args.tensor_model_parallel_size > 1:
        p.error("--pipeline-model-parallel-size 2 with --tensor-model-parallel-size > 1 is not in this example "
                "(vrgd_ds.megatron supports both together; this MLP does not split its stages)")
    if args.sequence_parallel and (args.tensor_model_parallel_size < 2
                                   or args.micro_batch_size % args.tensor_model_parallel_size):
        p.error(f"--sequence-parallel needs --tensor-model-parallel-size >= 2 that divides --micro-batch-size "
                f"({args.micro_batch_size}), got {args.tensor_model_parallel_size}")
    return args


class MLP(torch.nn.Module):
    """A plain module with the two attributes Megatron's schedules ask for."""

    def __init__(self, hidden=HIDDEN):
        from megatron.core.enums import ModelType

        super().__init__()
        torch.manual_seed(0)
        self.fc1, self.fc2 = torch.nn.Linear(IN, hidden), torch.nn.Linear(hidden, OUT)
        self.model_type = ModelType.encoder_or_decoder

    def forward(self, x):
        return self.fc2(torch.nn.functional.gelu(self.fc1(x)))

    def set_input_tensor(self, tensor):  # pipeline stages hand activations over here; one stage: none
        assert tensor is None or tensor == [None], "no pipeline parallelism in this example"


class PipelineStageMLP(torch.nn.Module):
    """One pipeline stage of :class:`MLP` (its initial weights): stage 0 its first layer and
    the activation, handing [1, micro-batch, hidden] to stage 1, which holds the second."""

    def __init__(self, hidden, stage):
        from megatron.core.enums import ModelType

        super().__init__()
        whole = MLP(hidden)
        self.stage = stage
        if stage == 0:
            self.fc1 = whole.fc1
        else:
            self.fc2 = whole.fc2
        self.model_type = ModelType.encoder_or_decoder
        self.pre_process, self.post_process = stage == 0, stage == 1
        self.share_embeddings_and_output_weights = False  # read by finalize_model_grads
        self.input_tensor = None

    def forward(self, x):
        if self.stage == 0:
            return torch.nn.functional.gelu(self.fc1(x)).unsqueeze(0)
        return self.fc2(self.input_tensor.squeeze(0))

    def set_input_tensor(self, tensor):  # the schedule hands stage 1 the activations here
        self.input_tensor = tensor[0] if isinstance(tensor, list) else tensor


class TensorParallelMLP(torch.nn.Module):
    """:class:`MLP` with its layers split over the tensor-parallel ranks by Megatron's own
    layers: the first by rows (``ColumnParallelLinear``), the second by columns
    (``RowParallelLinear``, whose bias every rank holds whole); MLP's initial weights."""

    def __init__(self, hidden, tp, config):
        from megatron.core import parallel_state
        from megatron.core.enums import ModelType
        from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

        super().__init__()
        whole = MLP(hidden)
        keep = torch.nn.init.zeros_  # the weights are MLP's, set below
        self.fc1 = ColumnParallelLinear(IN, hidden, config=config, init_method=keep, bias=True, gather_output=False)
        self.fc2 = RowParallelLinear(hidden, OUT, config=config, init_method=keep, bias=True, input_is_parallel=True,
                                     skip_bias_add=False)
        t = parallel_state.get_tensor_model_parallel_rank()
        with torch.no_grad():
            self.fc1.weight.copy_(whole.fc1.weight.chunk(tp, 0)[t])
            self.fc1.bias.copy_(whole.fc1.bias.chunk(tp, 0)[t])
            self.fc2.weight.copy_(whole.fc2.weight.chunk(tp, 1)[t])
            self.fc2.bias.copy_(whole.fc2.bias)
        self.model_type = ModelType.encoder_or_decoder
        self.sequence_parallel = config.sequence_parallel

    def forward(self, x):
        from megatron.core.tensor_parallel import (gather_from_sequence_parallel_region,
                                                   scatter_to_sequence_parallel_region)

        if self.sequence_parallel:  # samples as the sequence ([s, b=1, h]): each rank takes its part
            x = scatter_to_sequence_parallel_region(x.unsqueeze(1))
        h, _ = self.fc1(x)  # with sequence parallelism it gathers the parts
        out, _ = self.fc2(torch.nn.functional.gelu(h))  # and this reduce-scatters them
        if not self.sequence_parallel:
            return out
        # every rank computes the loss on the whole output; the backward keeps its part
        return gather_from_sequence_parallel_region(out, tensor_parallel_output_grad=False).squeeze(1)

    def set_input_tensor(self, tensor):
        assert tensor is None or tensor == [None], "no pipeline parallelism in this example"


def model_sharded_state_dict(module) -> dict:
    """The model's weights for Megatron's distributed checkpointing, as a MegatronModule
    builds them: Megatron's layers their own (split over the tensor-parallel ranks), the
    others replicated; the same keys (fc1.weight, ...) with and without tensor parallelism."""
    from megatron.core import parallel_state
    from megatron.core.transformer.utils import sharded_state_dict_default

    tp_group = parallel_state.get_tensor_model_parallel_group()
    out = {}
    for name, child in module.named_children():
        out.update(sharded_state_dict_default(child, f"{name}.", tp_group=tp_group))
    return {k: v for k, v in out.items() if not k.endswith("_extra_state")}  # Megatron's layers' (None)


LATEST = "latest"


def save_dist(folder, model, optimizer, run_state) -> None:
    """Model, optimizer and ``run_state`` into ``folder/iter_NNNNNNN``, then ``folder/latest``
    names it (written atomically), then older iterations are removed: a save killed midway
    leaves the last complete one named."""
    from megatron.core import dist_checkpointing

    from vrgd_ds.files import save_atomic

    name = f"iter_{run_state['iteration']:07d}"

    def start():
        shutil.rmtree(os.path.join(folder, name), ignore_errors=True)  # what a killed save of it left
        os.makedirs(os.path.join(folder, name))

    def publish():
        save_atomic(lambda f: f.write(f"{name}\n".encode()), os.path.join(folder, LATEST))
        for old in os.listdir(folder):
            if old.startswith("iter_") and old != name:
                shutil.rmtree(os.path.join(folder, old), ignore_errors=True)

    on_first_rank(start, f"--save: cannot start {os.path.join(folder, name)}")
    model_sd = model_sharded_state_dict(model.module)
    dist_checkpointing.save({"model": model_sd, "optimizer": optimizer.sharded_state_dict(model_sd),
                             "run": run_state}, os.path.join(folder, name))
    dist.barrier()  # every rank's part is written
    on_first_rank(publish, f"--save: cannot publish {os.path.join(folder, name)}")


def on_first_rank(fn, what: str) -> None:
    """``fn()`` on rank 0; if it fails, every rank exits naming the error (none waits for a
    rank that has left)."""
    box = [None]
    if dist.get_rank() == 0:
        try:
            fn()
        except OSError as e:
            box[0] = f"{what}: {e}"
    dist.broadcast_object_list(box, src=0)
    if box[0] is not None:
        raise SystemExit(box[0])


def load_dist(folder, model, optimizer) -> dict:
    """Megatron-LM's load_checkpoint for torch_dist: the iteration ``folder/latest`` names;
    returns its run state."""
    from megatron.core import dist_checkpointing

    with open(os.path.join(folder, LATEST)) as f:
        path = os.path.join(folder, f.read().strip())
    model_sd = model_sharded_state_dict(model.module)
    loaded = dist_checkpointing.load({"model": model_sd,
                                      "optimizer": optimizer.sharded_state_dict(model_sd, is_loading=True)}, path)
    model.module.load_state_dict(loaded["model"], strict=False)  # without the layers' _extra_state
    optimizer.load_state_dict(loaded["optimizer"])
    return loaded.get("run")


def batches(rank, micro_batch_size, device, dtype):
    """This rank's micro-batches of a fixed noisy linear teacher, forever."""
    teacher = torch.randn(IN, OUT, generator=torch.Generator().manual_seed(1)) / IN**0.5
    gen = torch.Generator().manual_seed(1000 + rank)
    while True:
        x = torch.randn(micro_batch_size, IN, generator=gen)
        y = x @ teacher + 0.1 * torch.randn(micro_batch_size, OUT, generator=gen)
        yield x.to(device, dtype), y.to(device)


def forward_step(data_iterator, model):
    x, y = next(data_iterator)
    out = model(x)

    def loss_func(output):
        loss = torch.nn.functional.mse_loss(output.float(), y, reduction="sum") / OUT
        num_tokens = torch.tensor(y.shape[0], dtype=torch.int, device=y.device)
        return loss, num_tokens, {"loss": loss.detach() / y.shape[0]}  # Megatron divides by num_tokens

    return out, loss_func


def build(args, device):
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
    from megatron.core.transformer import TransformerConfig

    from vrgd_ds.megatron import VROptimizerConfig, get_megatron_optimizer

    distributed = not args.no_distributed_optimizer
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    tp, pp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size
    # hidden_size: the width of the activations the pipeline stages hand over
    config = TransformerConfig(num_layers=pp, hidden_size=args.hidden, num_attention_heads=tp, bf16=args.bf16,
                               params_dtype=dtype, tensor_model_parallel_size=tp,
                               pipeline_model_parallel_size=pp, pipeline_dtype=dtype,
                               sequence_parallel=args.sequence_parallel, use_cpu_initialization=True)
    ddp_config = DistributedDataParallelConfig(overlap_grad_reduce=True, use_distributed_optimizer=distributed,
                                               grad_reduce_in_fp32=True, bucket_size=1000)
    if pp > 1:
        from megatron.core import parallel_state

        module = PipelineStageMLP(args.hidden, parallel_state.get_pipeline_model_parallel_rank())
    else:
        module = MLP(args.hidden) if tp == 1 else TensorParallelMLP(args.hidden, tp, config)
    model = DistributedDataParallel(config, ddp_config, module.to(device, dtype))
    config.no_sync_func = model.no_sync
    config.finalize_model_grads_func = finalize_model_grads
    opt_config = VROptimizerConfig(optimizer=args.optimizer, lr=args.lr, min_lr=0.0, weight_decay=0.01,
                                   adam_beta1=0.9, adam_beta2=0.999, adam_eps=1e-6, clip_grad=1.0,
                                   bf16=args.bf16, use_distributed_optimizer=distributed,
                                   vr_gamma=0.1, vr_beta3=0.9 if args.optimizer in ("vrlamb", "vradam") else 0.0)
    optimizer = get_megatron_optimizer(opt_config, [model])
    scheduler = OptimizerParamScheduler(
        optimizer, init_lr=0.0, max_lr=args.lr, min_lr=0.0, lr_warmup_steps=args.warmup_steps,
        lr_decay_steps=args.steps, lr_decay_style="cosine", start_wd=0.01, end_wd=0.01,
        wd_incr_steps=args.steps, wd_incr_style="constant")
    return model, optimizer, scheduler


def main(argv=None) -> list[float]:
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func

    args = parse_args(argv)
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if cuda else "gloo")
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    tp, pp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size
    if dist.get_world_size() % (tp * pp):
        raise SystemExit(f"--tensor-model-parallel-size {tp} x --pipeline-model-parallel-size {pp} does not "
                         f"divide the {dist.get_world_size()} ranks")
    parallel_state.initialize_model_parallel(tp, pp)
    stage = parallel_state.get_pipeline_model_parallel_rank()

    def optimizer_path(folder, name):  # each pipeline stage its own optimizer checkpoint
        return os.path.join(folder, name) if pp == 1 else os.path.join(folder, f"pp{stage}", name)

    from vrgd_ds.megatron import load_optimizer, save_optimizer

    model, optimizer, scheduler = build(args, device)
    dp_rank, dp_size = parallel_state.get_data_parallel_rank(), parallel_state.get_data_parallel_world_size()
    # the tensor-parallel ranks of one data-parallel rank take the same micro-batches
    data = batches(dp_rank, args.micro_batch_size, device, torch.bfloat16 if args.bf16 else torch.float32)
    start = 0
    if args.resume:
        found = [p for p in (optimizer_path(args.resume, "optimizer.pt"), optimizer_path(args.resume, "optimizer"),
                             os.path.join(args.resume, "dist")) if os.path.exists(p)]
        if not found and pp == 1 and os.path.isdir(os.path.join(args.resume, "pp0")):
            raise SystemExit(f"--resume {args.resume}: it holds one optimizer checkpoint per pipeline stage (pp0, ...), "
                             "saved with --pipeline-model-parallel-size 2; resume with it (only --dist-checkpoint "
                             "saves resume at another pipeline size)")
        if len(found) != 1:
            where = "" if pp == 1 else f" (pipeline stage {stage}: pp{stage}/optimizer.pt or pp{stage}/optimizer)"
            raise SystemExit(f"--resume {args.resume}: expected one checkpoint there, optimizer.pt, the sharded "
                             f"folder optimizer or the distributed checkpoint folder dist{where}; found {len(found)}")
        if os.path.basename(found[0]) == "dist":
            saved = load_dist(found[0], model, optimizer)
        else:
            saved = load_optimizer(optimizer, model, found[0])
        missing = [k for k in ("iteration", "scheduler", "steps", "micro_batches") if k not in (saved or {})]
        if missing:
            raise SystemExit(f"--resume {args.resume}: its {os.path.basename(found[0])} was not saved by this script "
                             f"(no {', '.join(missing)} in its user_state)")
        for key in ("steps", "micro_batches"):  # what the data and the schedule depend on
            if saved[key] != getattr(args, key):
                raise SystemExit(f"--resume {args.resume}: saved with --{key.replace('_', '-')} {saved[key]}, "
                                 f"this run has {getattr(args, key)}; resume with the same value")
        start = saved["iteration"]
        scheduler.load_state_dict(saved["scheduler"])
        for _ in range(start * args.micro_batches):  # the micro-batches the saved steps used
            next(data)
        if dist.get_rank() == 0:
            print(f"resumed from {args.resume} at step {start}", flush=True)
    stop = args.steps if args.stop_after is None else args.stop_after
    forward_backward = get_forward_backward_func()
    losses = []
    for step in range(start, stop):
        model.zero_grad_buffer()
        optimizer.zero_grad()
        stats = forward_backward(forward_step_func=forward_step, data_iterator=data, model=[model],
                                 num_microbatches=args.micro_batches, seq_length=1,
                                 micro_batch_size=args.micro_batch_size)
        ok, grad_norm, _ = optimizer.step()
        scheduler.step(1)
        # the loss is the last pipeline stage's; the others add zeros
        loss = torch.stack([s["loss"] for s in stats]).mean() if stats else torch.zeros((), device=device)
        if pp > 1:
            dist.all_reduce(loss, group=parallel_state.get_pipeline_model_parallel_group())
        dist.all_reduce(loss, group=parallel_state.get_data_parallel_group())
        losses.append(loss.item() / dp_size)
        if dist.get_rank() == 0 and (step % 10 == 0 or step == stop - 1):
            print(f"step {step:4d}  loss {losses[-1]:.6f}  grad norm {grad_norm:.3f}  applied {ok}", flush=True)
        if args.save and (step + 1 == stop or (args.save_every and (step + 1) % args.save_every == 0)):
            run_state = {"iteration": step + 1, "scheduler": scheduler.state_dict(), "steps": args.steps,
                         "micro_batches": args.micro_batches}
            if args.dist_checkpoint:
                save_dist(os.path.join(args.save, "dist"), model, optimizer, run_state)
            else:
                save_optimizer(optimizer, model,
                               optimizer_path(args.save, "optimizer" if args.sharded else "optimizer.pt"),
                               user_state=run_state, sharded=args.sharded)
    if dist.get_rank() == 0 and losses:
        print(f"{args.optimizer}: loss {losses[0]:.4f} -> {losses[-1]:.4f} in {len(losses)} steps "
              f"(k = {dp_size} ranks x {args.micro_batches} micro-batches)", flush=True)
    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()
    return losses


if __name__ == "__main__":
    main()
