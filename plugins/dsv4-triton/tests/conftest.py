"""The plugin's tests run its kernels on the CPU in Triton's interpreter.

``TRITON_INTERPRET`` is read when a kernel module is imported (``@triton.jit``), so it is set here,
before any test module imports one.
"""

import os

os.environ["TRITON_INTERPRET"] = "1"
