"""Test set-up for this repository's suites (tests/ and plugins/*/tests), not shipped with vlm-core.

- ``HF_HUB_OFFLINE=1``: nothing in the suite may reach a model hub.
- ``TRITON_INTERPRET=1`` when there is no GPU: the Triton kernels then run on CPU tensors in
  triton's interpreter. Triton reads it when a kernel is *defined*, so it is set here, before any
  test imports ``vlm.kernels``. On a GPU machine it stays unset and the kernels run compiled
  (``scripts/gpu_check.sh``); ``TRITON_INTERPRET=1`` set by hand still forces the interpreter.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
if "TRITON_INTERPRET" not in os.environ:
    import torch

    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"
