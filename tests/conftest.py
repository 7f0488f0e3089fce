import os

# One OpenMP thread per test process and per process a test starts (they inherit it), unless the caller says
# otherwise: the models here are tiny, and two threads per process on a 2-core machine shared with other processes
# (the 2-rank tests, a second job) run a tiny GRPO step 80x slower (27 s against 0.35 s, measured).
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch

# Triton kernels run on CPU through the interpreter; it must be chosen before triton is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
