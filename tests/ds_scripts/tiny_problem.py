"""The tiny regression problem the distributed tests share (DDP and DeepSpeed workers)."""

import torch

N = 48  # samples per global batch


class GatedMLP(torch.nn.Sequential):
    """The MLP plus a side layer (module ``3``, ``x -> 3``) that a micro-batch runs through only
    while ``use_side`` is set: parameters with no gradient on some micro-steps, as a
    conditional branch or an MoE expert that no token chose has."""

    def __init__(self, width):
        super().__init__(torch.nn.Linear(6, width), torch.nn.Tanh(), torch.nn.Linear(width, 3), torch.nn.Linear(6, 3))
        self.use_side = True

    def forward(self, x):
        out = self[2](self[1](self[0](x)))
        return out + self[3](x) if self.use_side else out


# per data step, per micro-step: whether the batch runs through GatedMLP's side layer. In
# order: never had a gradient; first micro-step only; last only (DeepSpeed's ZeRO-3 would
# add it to the previous step's gradient); none after having had one (would keep it); all.
GATE = {0: (False, False), 1: (True, False), 2: (False, True), 3: (False, False), 4: (True, True)}


def uses_side(flag, rank: int) -> bool:
    """A GATE-style flag: True/False for every rank, or the list of ranks that use the side layer."""
    return flag if isinstance(flag, bool) else rank in flag


def make_model(width=5, gated=False):
    torch.manual_seed(0)
    if gated:
        return GatedMLP(width)
    return torch.nn.Sequential(torch.nn.Linear(6, width), torch.nn.Tanh(), torch.nn.Linear(width, 3))


def batch(step):
    gen = torch.Generator().manual_seed(500 + step)
    x = torch.randn(N, 6, generator=gen)
    return x, torch.randn(N, 3, generator=gen) + x[:, :3]
