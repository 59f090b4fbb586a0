"""fastvq: fused Triton kernels for vector-quantization training."""

from . import _source_tree

_source_tree.map_kernels()

from ._backend import BACKENDS, backend, get_backend, set_backend  # noqa: E402
from .functional import *  # noqa: E402,F401,F403
from .functional import __all__ as _functional_all  # noqa: E402
from . import nn  # noqa: E402,F401

__version__ = "0.1.0"
__all__ = ["BACKENDS", "backend", "get_backend", "set_backend", "nn", *_functional_all]
