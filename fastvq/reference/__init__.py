"""Pure-torch references: the test oracle and the path for tensors Triton cannot run on.

Each ``<op>_ref`` has the same signature as the public op. They work in row chunks so that
their extra memory stays bounded on large inputs (never an N x K matrix beyond the output).
"""

from ._chunks import ROW_CHUNK  # noqa: F401
from .pairwise_sqdist import pairwise_sqdist_ref  # noqa: F401
