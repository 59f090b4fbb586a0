"""fastvq: fused Triton kernels for vector-quantization training."""

import os as _os

# Running from a source tree (PYTHONPATH=.): `kernels/` beside this package is the
# `fastvq.kernels` subpackage that an install maps in. Only inside a fastvq checkout.
_root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
if _os.path.isfile(_os.path.join(_root, "kernels", "__init__.py")) and _os.path.isfile(
    _os.path.join(_root, "kernels", "nearest_code.py")
):
    __path__.append(_root)  # type: ignore[name-defined]  # noqa: F821

from ._backend import BACKENDS, backend, get_backend, set_backend  # noqa: E402
from .functional import *  # noqa: E402,F401,F403
from .functional import __all__ as _functional_all  # noqa: E402
from . import nn  # noqa: E402,F401

__version__ = "0.1.0"
__all__ = ["BACKENDS", "backend", "get_backend", "set_backend", "nn", *_functional_all]
