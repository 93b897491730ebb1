"""The tiny regression problem the distributed tests share (DDP and DeepSpeed workers)."""

import torch

N = 48  # samples per global batch


def make_model(width=5):
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, width), torch.nn.Tanh(), torch.nn.Linear(width, 3))


def batch(step):
    gen = torch.Generator().manual_seed(500 + step)
    x = torch.randn(N, 6, generator=gen)
    return x, torch.randn(N, 3, generator=gen) + x[:, :3]
