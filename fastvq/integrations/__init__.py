"""Integrations: run other libraries' vector-quantization models on fastvq's ops, unchanged.

Each integration is a module named after the library it patches, with the same three
functions: ``patch()``, ``unpatch()`` and ``patched()`` (a context manager). Nothing here is
imported with ``fastvq``; import the integration you need::

    from fastvq.integrations import vector_quantize_pytorch as fastvq_vqp

    fastvq_vqp.patch()          # every VectorQuantize / ResidualVQ / SimVQ now runs on fastvq

=====================================  ==========================================
module                                 library
=====================================  ==========================================
:mod:`.vector_quantize_pytorch`        vector-quantize-pytorch (``VectorQuantize``,
                                       ``ResidualVQ``, ``GroupedResidualVQ``,
                                       ``SimVQ``, ``ResidualSimVQ``, ...)
=====================================  ==========================================
"""
