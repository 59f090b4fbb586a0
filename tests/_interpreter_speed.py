"""Make Triton's interpreter cheaper to run, without changing what it computes (test setup only).

The suite spends most of its CPU time in Triton's interpreter (``TRITON_INTERPRET=1``). Two
pieces of its per-call bookkeeping are repeated work that profiles show as a third of that time:

- every call of a ``@triton.jit`` helper from inside a kernel re-patches ``triton.language``
  (``_patch_lang``: an ``inspect.getmembers`` walk over ``tl``, ``tl.tensor`` and ``tl.math``),
  although the launch of the enclosing kernel has already patched those same module objects
  and restores them when the launch ends. :func:`install` skips the walk when every language
  module the helper sees is already patched (its ``program_id`` is no longer Triton's builtin)
  and does it as before otherwise;
- ``_get_np_dtype`` builds a 20-entry dict on every call (hundreds of thousands per test file);
  the table is built once here, and a dtype outside it goes to the original function.

Both are checked against the interpreter they patch (:func:`install` returns False and patches
nothing when its internals are not the expected shape), and tests/test_interpreter_speed.py
checks that kernels give bitwise the same results with and without them.
"""

from __future__ import annotations

import inspect

import numpy as np
import triton.language as tl

_NP_DTYPE_KEYS = ("int1", "float16", "float32", "float64", "int8", "uint8", "int16", "uint16", "int32",
                  "uint32", "int64", "uint64", "bfloat16", "float8e5", "float8e5b16", "float8e4nv",
                  "float8e4b8", "float8e4b15")

INSTALLED = False
_ORIGINALS: dict = {}


def _expected_shape(itp) -> bool:
    """Whether the interpreter's internals are the ones this module was written against."""
    cls = getattr(itp, "InterpretedFunction", None)
    if cls is None or not callable(getattr(itp, "_patch_lang", None)) or not callable(getattr(itp, "_get_np_dtype", None)):
        return False
    try:
        src = inspect.getsource(cls.__call__)
    except (OSError, TypeError):
        return False
    return "_patch_lang(self.fn)" in src and "self.rewrite()" in src and hasattr(itp, "InterpreterError")


def install() -> bool:
    """Patch the interpreter (idempotent); returns whether the patches are in place."""
    global INSTALLED
    if INSTALLED:
        return True
    from triton.runtime import interpreter as itp

    if not _expected_shape(itp):
        return False

    langs_of: dict = {}

    def already_patched(fn) -> bool:
        langs = langs_of.get(fn)
        if langs is None:
            langs = langs_of[fn] = tuple(v for v in fn.__globals__.values() if v is tl or v is tl.core)
        return bool(langs) and not any(tl.core.is_builtin(lang.program_id) for lang in langs)

    def device_call(self, *args, **kwargs):  # InterpretedFunction.__call__: a helper called in a kernel
        if not already_patched(self.fn):
            itp._patch_lang(self.fn)
        fn = self.rewrite()
        try:
            return fn(*args, **kwargs)
        except Exception as e:
            raise itp.InterpreterError(repr(e)) from e

    original_np_dtype = itp._get_np_dtype
    table = {getattr(tl, k): original_np_dtype(getattr(tl, k)) for k in _NP_DTYPE_KEYS if hasattr(tl, k)}
    uint64 = np.dtype(np.uint64)

    def get_np_dtype(tt_dtype):
        if isinstance(tt_dtype, tl.pointer_type):
            return uint64
        if isinstance(tt_dtype, tl.block_type):
            tt_dtype = tt_dtype.element_ty
            if isinstance(tt_dtype, tl.pointer_type):
                return uint64
        found = table.get(tt_dtype)
        return found if found is not None else original_np_dtype(tt_dtype)

    _ORIGINALS.update(call=itp.InterpretedFunction.__call__, np_dtype=original_np_dtype)
    itp.InterpretedFunction.__call__ = device_call
    itp._get_np_dtype = get_np_dtype
    INSTALLED = True
    return True


def uninstall() -> None:
    """Put the interpreter back as Triton ships it (idempotent)."""
    global INSTALLED
    if not INSTALLED:
        return
    from triton.runtime import interpreter as itp

    itp.InterpretedFunction.__call__ = _ORIGINALS["call"]
    itp._get_np_dtype = _ORIGINALS["np_dtype"]
    INSTALLED = False
