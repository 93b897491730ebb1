"""Count what a block of code reads back from tensors to the host, and whose code did it.

On CUDA these are the stream synchronisations torch reports (``set_sync_debug_mode``); on
the CPU there is nothing to wait for, so the calls that turn a tensor's values into Python
objects (``item``, ``tolist``, ``bool()``...) stand in for them: on a GPU each is a sync.
A read is *ours* when the innermost frame outside torch that made it is in ``vrgd_ds``
(reads of torch's per-parameter Adam ``step`` counters, CPU tensors that never are on the
device, are not counted). Used by tests/test_flat.py and train_tiny.py (here: the workers import it from their folder).
"""

from __future__ import annotations

import os
import sys
import warnings

import torch

NAMES = ("item", "tolist", "numpy", "__bool__", "__float__", "__int__", "__index__")
# reads of CPU tensors only: torch's Adam step counters; the ZeRO-1/2 bucket agreement's flags,
# all-reduced over a gloo group (vrgd_ds.deepspeed.adapter.host_group) also beside NCCL
HOST_ONLY = ("_advance_torch_steps", "_read_flags")
TORCH_DIR = os.path.dirname(torch.__file__) + os.sep
OURS = os.sep + "vrgd_ds" + os.sep


class HostReads:
    def __init__(self, device: str = "cpu"):
        self.cuda = str(device).startswith("cuda")
        self.ours, self.others, self.where = 0, 0, []
        self._saved: dict = {}

    def _count(self, frame) -> None:
        names = []
        while frame is not None and frame.f_code.co_filename.startswith(TORCH_DIR):
            frame = frame.f_back
        if frame is None:
            return
        where = frame.f_code.co_filename
        probe = frame
        while probe is not None and len(names) < 12:
            names.append(probe.f_code.co_name)
            probe = probe.f_back
        if any(n in HOST_ONLY for n in names):
            return
        if OURS in where:
            self.ours += 1
            self.where.append(f"{where.split(OURS)[-1]}:{frame.f_lineno} {frame.f_code.co_name}")
        else:
            self.others += 1

    def __enter__(self):
        if self.cuda:
            self._warnings = warnings.catch_warnings(record=True)
            self._caught = self._warnings.__enter__()
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            return self
        for name in NAMES:
            original = self._saved[name] = getattr(torch.Tensor, name)

            def counted(t, *a, _original=original, **k):
                self._count(sys._getframe(1))
                return _original(t, *a, **k)

            setattr(torch.Tensor, name, counted)
        return self

    def __exit__(self, *exc):
        if self.cuda:
            torch.cuda.set_sync_debug_mode("default")
            self._warnings.__exit__(*exc)
            for w in self._caught:
                if "synchroniz" not in str(w.message):
                    continue
                if OURS in w.filename:
                    self.ours += 1
                    self.where.append(f"{w.filename.split(OURS)[-1]}:{w.lineno}")
                else:
                    self.others += 1
            return
        for name, original in self._saved.items():
            setattr(torch.Tensor, name, original)
        self._saved = {}

    def summary(self) -> dict:
        return {"ours": self.ours, "others": self.others, "where": self.where}
