"""Triton kernels and their launchers (installed as ``fastvq.kernels``).

One file per op; each holds ``_<op>_fwd_kernel`` / ``_<op>_bwd_kernel`` and the launchers
``<op>_fwd`` / ``<op>_bwd`` (assert their preconditions, allocate, launch). Nothing else lives here: input
validation for users, backend choice and autograd are in :mod:`fastvq.ops`.

Importing this package imports Triton and fixes whether kernels are interpreted: Triton
reads ``TRITON_INTERPRET`` when a ``@triton.jit`` function is defined, so the ops import
the kernel modules lazily, on first use.
"""

from ._common import INTERPRETED  # noqa: F401 (read from the environment in _common only)
