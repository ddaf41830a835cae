"""Settings every test module needs before it imports stdd_kernels.

Without a visible GPU the Triton kernels can only run in Triton's interpreter,
which must be switched on (``TRITON_INTERPRET=1``) before the kernels are
defined, i.e. before ``stdd_kernels`` is first imported; pytest loads this file
before any test module, so ``python -m pytest tests/`` works unchanged on CPU
and GPU machines. An explicit ``TRITON_INTERPRET`` in the environment wins.

The GPU check is ``torch.cuda.device_count()``, which asks NVML and does not
initialize CUDA in this process (``torch.cuda.is_available()`` would, and a
CUDA-initialized parent cannot use CUDA in forked DataLoader workers or
multiprocessing children).
"""

import os

import torch

if "TRITON_INTERPRET" not in os.environ and torch.cuda.device_count() == 0:
    os.environ["TRITON_INTERPRET"] = "1"
