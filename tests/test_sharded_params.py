"""Parameters that are shards of a layer (torch FSDP) are refused at construction, naming
what they are: the layer statistics would be per shard. A real 1-rank gloo FSDP2
``fully_shard`` in a subprocess; FSDP1 needs an accelerator (CUDA only)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch

SCRIPT = textwrap.dedent("""
    import json, os, sys, socket
    import torch, torch.distributed as dist
    s = socket.socket(); s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]; s.close()
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    from vrgd_ds import LAMB, LARS, VRAdamW, VRLAMB, VRSGD, MicroStepMoments
    kind = sys.argv[1]
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 2))
    if kind == "fsdp2":
        from torch.distributed.fsdp import fully_shard
        fully_shard(model)
    elif kind.startswith("fsdp1"):
        from torch.distributed.fsdp import FullyShardedDataParallel
        model = FullyShardedDataParallel(model.cuda(), use_orig_params=kind == "fsdp1-orig")
    out = {}
    if kind == "fsdp2-hf":  # an optimizer built before the model was sharded (as passed to Trainer)
        from vrgd_ds.hf import attach_to_model
        opt = VRLAMB(model.parameters(), lr=1e-3)
        from torch.distributed.fsdp import fully_shard
        fully_shard(model)
        try:
            attach_to_model(model, opt)
        except ValueError as e:
            out["attach_to_model"] = str(e)
        dist.destroy_process_group()
        print(json.dumps(out))
        sys.exit(0)
    for cls in (LAMB, LARS, VRLAMB, VRAdamW, VRSGD):
        try:
            cls(model.parameters(), lr=1e-3)
            out[cls.__name__] = None
        except NotImplementedError as e:
            out[cls.__name__] = str(e)
    dist.destroy_process_group()
    print(json.dumps(out))
""")


def refusals(kind: str) -> dict:
    proc = subprocess.run([sys.executable, "-c", SCRIPT, kind], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_fsdp2_parameters_are_refused():
    for name, msg in refusals("fsdp2").items():
        assert msg is not None, name
        assert f"{name}: a parameter of shape" in msg and "DTensor (FSDP2 fully_shard" in msg
        assert "per shard" in msg


def test_hf_attach_refuses_an_fsdp2_model():
    msg = refusals("fsdp2-hf").get("attach_to_model")
    assert msg is not None and "the model is wrapped in FSDP (FSDPSequential)" in msg
    assert "layer statistics" in msg


@pytest.mark.skipif(not torch.cuda.is_available(), reason="FSDP1 needs an accelerator")
@pytest.mark.parametrize("kind", ["fsdp1", "fsdp1-orig"])
def test_fsdp1_parameters_are_refused(kind):
    for name, msg in refusals(kind).items():
        assert msg is not None and "FSDP flat parameter" in msg, (name, msg)


def test_plain_parameters_are_accepted_in_every_form():
    from vrgd_ds import LAMB

    model = torch.nn.Linear(4, 2)
    opt = LAMB(model.parameters())  # a generator
    opt.add_param_group({"params": torch.nn.Parameter(torch.zeros(3))})  # a single tensor
    assert [len(g["params"]) for g in opt.param_groups] == [2, 1]
    with pytest.raises(TypeError, match="ordered collections"):  # torch's own check still speaks
        opt.add_param_group({"params": {torch.nn.Parameter(torch.zeros(2))}})
