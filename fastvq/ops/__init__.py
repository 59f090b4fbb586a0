"""The ops: torch.library custom ops with fake implementations and registered autograd.

Each op file validates user input, asks :func:`fastvq._backend.use_triton` which
implementation runs, and calls the kernel launcher in ``fastvq.kernels`` or the reference
in :mod:`fastvq.reference`.
"""
