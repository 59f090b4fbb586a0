"""Triton kernels and their launchers (installed as ``fastvq.kernels``).

One file per op; each holds ``_<op>_fwd_kernel`` / ``_<op>_bwd_kernel`` and the launchers
``<op>_fwd`` / ``<op>_bwd`` (check, allocate, launch). Nothing else lives here: input
validation for users, backend choice and autograd are in :mod:`fastvq.ops`.

Importing this package imports Triton and fixes whether kernels are interpreted: Triton
reads ``TRITON_INTERPRET`` when a ``@triton.jit`` function is defined, so the ops import
the kernel modules lazily, on first use.
"""

import triton

INTERPRETED: bool = bool(triton.knobs.runtime.interpret) if hasattr(triton, "knobs") else False
if not hasattr(triton, "knobs"):  # triton < 3.4
    import os

    INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") in ("1", "true", "True")
