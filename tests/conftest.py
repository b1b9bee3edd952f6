"""Session-wide test setup.

Without a GPU, Triton kernels run under the interpreter. Triton decides at import time whether a
``@triton.jit`` function is interpreted, so the variable must be set before any test imports a kernel
module; setting it per module left kernels compiled one way and their helpers the other.
"""

from __future__ import annotations

import glob
import os
import shutil

if "TRITON_INTERPRET" not in os.environ and not (glob.glob("/dev/nvidia[0-9]*") or shutil.which("nvidia-smi")):
    os.environ["TRITON_INTERPRET"] = "1"
