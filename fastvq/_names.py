"""The names string arguments take, defined once (a leaf: it imports nothing of fastvq).

The ops, the references, the modules and :mod:`fastvq.testing` read their choices from here, and
:func:`fastvq._checks.check_choice` is the one check of them (``TypeError`` for a value that is
not a string, ``ValueError`` naming the choices for an unknown one). The kernels keep only their
internal name -> id tables (``kernels/nearest_code.py`` ``METRIC_IDS``, ``kernels/qr_lookup.py``
``OP_CODES``); ``tests/test_layering.py`` holds those to these names.
"""

#: Distance metrics of the search ops. ``"l2"``: squared Euclidean ``|x - c|^2``;
#: ``"euclidean"``: ``|x - c|`` (same order as l2); ``"cosine"``: ``1 - cos(x, c)`` (a zero
#: vector has cosine 0 with any finite vector, so distance 1; with a code holding inf, 0 * inf
#: makes it NaN, as every distance to a non-finite code may be); ``"dot"``: ``-<x, c>`` (the nearest code is
#: the one with the largest inner product).
METRICS = ("l2", "cosine", "dot", "euclidean")

#: The metrics of the quantizer modules (and of ``fastvq.testing``'s search oracles): their fused
#: step trains on squared errors, so ``"euclidean"`` (the order of l2) adds nothing there.
MODULE_METRICS = ("l2", "cosine", "dot")

#: Negative-mining strategies of :func:`fastvq.mine_negatives`.
STRATEGIES = ("hardest", "semi-hard")

#: Gradients of the residual-quantize step and the quantizer modules: straight-through or the
#: rotation trick.
GRADS = ("ste", "rotation")

#: How :func:`fastvq.qr_lookup` composes a quotient row with a remainder row, and pools a bag.
QR_OPS = ("add", "mult", "concat")
QR_MODES = ("sum", "mean")
