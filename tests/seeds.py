"""The seed modules (the tests' oracles): they live in :mod:`fastvq.bench.seed_modules`, where the
benchmark's seed providers use them too. Kept as written there, bugs included."""

from fastvq.bench.seed_modules import (  # noqa: F401
    Decoder,
    EMAQuantizer,
    Encoder,
    MultiQuantizer,
    QREmbedding,
    RQVAE,
    VectorQuantizer,
    generate_semantic_ids,
    train_step,
)
