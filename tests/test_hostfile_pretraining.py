"""`deepspeed --hostfile` for real: 2 "nodes" (127.0.0.1, 127.0.0.2) x 1 slot through pdsh/ssh.

A private loopback sshd (tests/loopback/loopback_ssh.py) stands in for a cluster's passwordless
ssh; launch/pretrain_bert.sh runs phase 1 and phase 2 of the tiny pretraining through
`deepspeed --hostfile ... --launcher pdsh --master_addr 127.0.0.1`, and the losses must
equal those of the same script on 2 local ranks (`NGPUS=2`).
"""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from ds_helpers import ROOT, free_port, tail
from loopback.loopback_ssh import loopback_hosts, skip_reason

VOCAB = ROOT / "data" / "vocab" / "bert-base-uncased-vocab.txt"
CORPUS = ROOT / "data" / "corpus" / "wikitext-2-valid.txt"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from pretrain_bert.data import InstanceConfig, prepare_pretraining_data

    root = tmp_path_factory.mktemp("hostfile-data")
    for seq, pred in ((128, 20), (512, 80)):
        prepare_pretraining_data([CORPUS], VOCAB, root / f"seq{seq}",
                                 InstanceConfig(seq_len=seq, max_predictions=pred, dupe_factor=2, max_documents=12,
                                                heldout_fraction=0.2))
    return root


def pretrain(workdir, data, out, env):
    cmd = ["bash", str(ROOT / "launch" / "pretrain_bert.sh"), str(ROOT / "configs" / "bert_tiny"), "vrlamb",
           str(data / "seq128"), str(data / "seq512"), str(out), "--max-steps", "2", "--no-progress",
           "--eval-every", "2"]
    return subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True, timeout=900)


def losses(run):
    return [json.loads(line).get("loss") for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.skipif(skip_reason() is not None, reason=f"loopback sshd: {skip_reason()}")
def test_two_nodes_through_hostfile_and_pdsh_match_local_ranks(tmp_path, data):
    local_env = dict(os.environ, NGPUS="2", MASTER_PORT=str(free_port()), DS_ACCELERATOR="cpu",
                     OMP_NUM_THREADS="1")
    proc = pretrain(tmp_path, data, tmp_path / "local", local_env)
    assert proc.returncode == 0, tail(proc)
    with loopback_hosts(tmp_path) as (hostfile, env, _):
        assert (tmp_path / ".deepspeed_env").read_text().startswith("DS_ACCELERATOR=cpu")
        env.update(HOSTFILE=str(hostfile), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), LAUNCHER="pdsh")
        proc = pretrain(tmp_path, data, tmp_path / "nodes", env)
        log = proc.stdout + proc.stderr
        assert proc.returncode == 0, log[-4000:]
    assert "pdsh" in log and "127.0.0.2" in log  # really launched through pdsh on both hosts
    assert not (tmp_path / ".deepspeed_env").exists()  # put back as it was
    for phase in ("phase1", "phase2"):
        assert json.loads((tmp_path / "nodes" / phase / "run.json").read_text())["world_size"] == 2
        assert losses(tmp_path / "nodes" / phase) == losses(tmp_path / "local" / phase)
    from transformers import BertForPreTraining

    BertForPreTraining.from_pretrained(tmp_path / "nodes" / "phase2" / "hf")
