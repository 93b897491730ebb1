"""Run examples/megatron_vrlamb.py on CPU ranks under torchrun: the test's CUDA redirection,
then the example exactly as a user runs it (``python -m torch.distributed.run
--nproc-per-node 2 tests/megatron_example_cpu.py --steps 8``)."""

import runpy
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from megatron_cpu import redirect_cuda_to_cpu  # noqa: E402

if __name__ == "__main__":  # not in a child that multiprocessing spawns (distributed checkpointing starts one)
    redirect_cuda_to_cpu()
    runpy.run_path(str(Path(__file__).parents[1] / "examples" / "megatron_vrlamb.py"), run_name="__main__")
