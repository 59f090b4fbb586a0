"""Row chunking shared by the references: bounds their extra memory.

Eagerly, a reference works through its rows in chunks, so its scratch stays near
``ROW_CHUNK_ELEMENTS`` floats whatever N is. When ``torch.compile`` traces a reference
directly (the ``compiled`` provider of the benchmark), it runs as one chunk: the compiler
plans memory itself, and an unrolled loop of hundreds of chunks would only slow tracing.
(Inside fastvq's custom ops the references run eagerly, so they stay chunked.)
"""

import torch

ROW_CHUNK_ELEMENTS = 1 << 24  # at most ~64 MiB of float32 scratch per chunk
ROW_CHUNK = 4096


def row_chunk(n_cols: int) -> int:
    """Rows per chunk so that a (rows, n_cols) float32 scratch stays near ROW_CHUNK_ELEMENTS."""
    if torch.compiler.is_compiling():
        return 1 << 62
    return max(1, min(ROW_CHUNK, ROW_CHUNK_ELEMENTS // max(n_cols, 1)))
