"""Row chunking shared by the references: bounds their extra memory."""

ROW_CHUNK_ELEMENTS = 1 << 24  # at most ~64 MiB of float32 scratch per chunk
ROW_CHUNK = 4096


def row_chunk(n_cols: int) -> int:
    """Rows per chunk so that a (rows, n_cols) float32 scratch stays near ROW_CHUNK_ELEMENTS."""
    return max(1, min(ROW_CHUNK, ROW_CHUNK_ELEMENTS // max(n_cols, 1)))
