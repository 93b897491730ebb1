"""ChunkedSquares.reduce_scatter on real gloo ranks (2 and 3): both ways of sending each
owner its squares (gloo's point-to-point exchange, and a ``reduce`` per owner, the way every
other backend takes) against a float64 sum every rank forms from all ranks' inputs.

The inputs are ZeroMoments-like: rank-independent transfer lists per owner (pieces of several
sources, two targets, an owner with nothing to receive, pieces cut across chunk ends), with
rank-dependent source values; targets start non-zero (a second micro-step adds to the first).
"""

from __future__ import annotations

from datetime import timedelta

import pytest
import torch
import torch.distributed as dist

from spawn_ranks import save_results, spawn_ranks, started
from vrgd_ds.moments.chunked import ChunkedSquares, Transfer

SIZES = [13, 40, 7, 26]  # the sources (a bucket's local gradients)
TARGET = [30, 25]  # the owners' targets (two param groups), each owner has its own copy


def layout(world):
    """sends[o]: rank-independent transfers (source, start, numel, target, dst) into owner o's
    targets, pieces of at most 9 elements dealt round-robin over the owners and the two
    targets; the last owner gets none when world > 2."""
    owners = world - 1 if world > 2 else world
    sends = [[] for _ in range(world)]
    spots = {(o, t): 0 for o in range(world) for t in range(2)}
    piece = 0
    for i, n in enumerate(SIZES):
        for at in range(0, n, 9):
            o, tgt = piece % owners, (piece // owners) % 2
            k = min(n - at, 9, TARGET[tgt] - spots[o, tgt])
            if k > 0:
                sends[o].append((i, at, k, tgt, spots[o, tgt]))
                spots[o, tgt] += k
            piece += 1
    return sends


def sources(rank, dtype):
    g = torch.Generator().manual_seed(100 + rank)
    return [torch.randn(n, generator=g).to(dtype) for n in SIZES]


def start_targets(rank):
    g = torch.Generator().manual_seed(7 + rank)
    return [torch.rand(n, generator=g) for n in TARGET]


CASES = {  # name: (exchange, chunk, wire dtype, source dtype, squared)
    "exchange": (True, 1 << 20, torch.float32, torch.float32, False),
    "exchange-chunk5": (True, 5, torch.float32, torch.float32, False),  # 3 ranks: one round in flight
    "exchange-chunk16": (True, 16, torch.float32, torch.float32, False),  # two rounds in flight, many rounds
    "exchange-squared": (True, 4, torch.float32, torch.float32, True),
    "exchange-bf16-wire": (True, 6, torch.bfloat16, torch.float32, False),
    "exchange-bf16-grad": (True, 8, torch.float32, torch.bfloat16, False),
    "reduce": (False, 1 << 20, torch.float32, torch.float32, False),
    "reduce-chunk5": (False, 5, torch.float32, torch.float32, False),
    "reduce-bf16-grad": (False, 8, torch.float32, torch.bfloat16, False),
}


def run_case(rank, world, exchange, chunk, wire, src_dtype, squared):
    srcs = sources(rank, src_dtype)
    if squared:
        srcs = [s.float().square() for s in srcs]
    targets = start_targets(rank)
    sends = [[Transfer(srcs[i], at, k, targets[tgt], dst) for i, at, k, tgt, dst in owner]
             for owner in layout(world)]
    sq = ChunkedSquares(dist.group.WORLD, chunk, wire)
    sq._p2p = exchange  # the way under test, whatever the backend
    sq.reduce_scatter(sends, squared=squared, rank=rank)
    return {"targets": targets, "sent": sq.comm_bytes, "peak": sq.peak_chunk_numel}


def worker(rank, init_file, out_dir, world):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))
    started(out_dir, rank)
    save_results(out_dir, rank, lambda: {name: run_case(rank, world, *case) for name, case in CASES.items()})
    dist.barrier()
    dist.destroy_process_group()


def expected(world, owner, src_dtype, squared):
    """Owner's targets in float64: its start values plus every rank's squares of its pieces."""
    targets = [t.double() for t in start_targets(owner)]
    for r in range(world):
        srcs = [s.double() for s in sources(r, src_dtype)]
        for i, at, k, tgt, dst in layout(world)[owner]:
            targets[tgt][dst:dst + k] += srcs[i][at:at + k] ** 2
    return targets


class _World:  # spawn_ranks passes (init_file, out_dir); the world size rides on the class
    def __init__(self, world):
        self.world = world

    def __call__(self, rank, init_file, out_dir):
        worker(rank, init_file, out_dir, self.world)


@pytest.fixture(scope="module", params=[2, 3], ids=["2 ranks", "3 ranks"])
def ranks(request, tmp_path_factory):
    world = request.param
    return world, spawn_ranks(_World(world), world, tmp_path_factory.mktemp(f"chunked{world}"))


@pytest.mark.parametrize("name", list(CASES))
def test_every_owner_gets_the_sum_of_all_ranks_squares(ranks, name):
    world, out = ranks
    exchange, chunk, wire, src_dtype, squared = CASES[name]
    assert all({tgt for *_, tgt, _ in layout(world)[o]} == {0, 1} for o in range(2))
    rel = 1e-2 if wire == torch.bfloat16 else 1e-6
    for owner in range(world):
        want = expected(world, owner, src_dtype, squared)
        got = out[owner][name]["targets"]
        touched = [torch.zeros(n, dtype=torch.bool) for n in TARGET]
        for i, at, k, tgt, dst in layout(world)[owner]:
            touched[tgt][dst:dst + k] = True
        for g, w, t, start in zip(got, want, touched, start_targets(owner)):
            assert torch.allclose(g.double()[t], w[t], rtol=rel, atol=0), (owner, name)
            assert torch.equal(g[~t], start[~t])  # where no piece lands, nothing changed


def test_only_other_owners_elements_travel_in_the_exchange(ranks):
    """Exchange: a rank sends exactly the elements other ranks own; reduce: every rank hands
    in every element. Temporaries stay within one chunk either way."""
    world, out = ranks
    owned_numel = [sum(k for _, _, k, _, _ in layout(world)[o]) for o in range(world)]
    total = sum(owned_numel)
    for r in range(world):
        assert out[r]["exchange"]["sent"] == (total - owned_numel[r]) * 4
        assert out[r]["exchange-bf16-wire"]["sent"] == (total - owned_numel[r]) * 2
        assert out[r]["reduce"]["sent"] == total * 4
        assert out[r]["exchange-chunk5"]["peak"] <= 5
        assert out[r]["reduce-chunk5"]["peak"] <= 5
        assert out[r]["exchange-chunk16"]["peak"] <= 16
