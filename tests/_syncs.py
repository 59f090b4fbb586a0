"""A host-sync spy for tests that run on CPU tensors: the ops that would make the host wait for
a CUDA device (a value read back, a data-dependent shape, a copy to the host).

One decision of what a sync is: the traffic meter's (:mod:`fastvq.bench.traffic`), which also
runs custom-op bodies under itself and sees ``tolist``/``numpy`` on the CPU. The spy
had its own list and saw neither (syncprobe Y6: an ``.item()`` inside ``code_statistics``' body
went unseen). ``torch._assert_async`` is not a sync: on CUDA it is an asynchronous device-side
assert.
"""

from __future__ import annotations

import contextlib


@contextlib.contextmanager
def count_host_syncs():
    """``with count_host_syncs() as syncs: ...``; after the block, ``syncs`` lists the sync op
    names (one entry per sync)."""
    from fastvq.bench.traffic import metering

    syncs: list[str] = []
    with metering() as meter:
        yield syncs
    for counts in meter.counts.values():
        for name, n in counts.sync_ops.items():
            syncs.extend([name] * n)
