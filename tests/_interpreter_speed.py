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

- the language's type bookkeeping: every block value the interpreter makes builds a
  ``block_type`` (its shape unwrapped from ``constexpr`` and validated, its name formatted) and a
  ``tensor`` (its shape re-wrapped as a tuple of ``constexpr``, with a ``tuple_type`` built for
  it), for the same few shapes over and over. :func:`install` keeps each shape's unwrapped dims
  and numel for ``block_type`` and each shape's ``constexpr`` tuple and numel for ``tensor``
  (immutable values, shared), and builds the rest as before; a shape given in another form goes
  to the original constructor.

All are checked against the interpreter they patch (:func:`install` returns False and patches
nothing when its internals are not the expected shape), and tests/test_interpreter_speed.py
checks that kernels give bitwise the same results with and without them.
"""

from __future__ import annotations

import inspect
import math

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
    if not ("_patch_lang(self.fn)" in src and "self.rewrite()" in src and hasattr(itp, "InterpreterError")):
        return False
    try:  # the constructors whose bookkeeping install() caches
        bt, tt = inspect.getsource(tl.core.block_type.__init__), inspect.getsource(tl.core.tensor.__init__)
    except (OSError, TypeError):
        return False
    return ("self.shape = tuple(_unwrap_shape(shape))" in bt and "validate_block_shape(self.shape)" in bt
            and "self.shape = tuple([constexpr(s) for s in self.shape])" in tt
            and "self.numel = constexpr(math.prod(self.shape))" in tt and "__init__" not in vars(tl.core.base_value))


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

    core = tl.core
    constexpr, lang_tuple, builtin_tuple = core.constexpr, core.tuple, tuple
    block_type_init, tensor_init = core.block_type.__init__, core.tensor.__init__
    block_dims: dict = {}  # dims -> (dims, numel), the checks passed
    tensor_dims: dict = {}  # dims -> (numel constexpr, shape as a language tuple of constexpr)

    def fast_block_type_init(self, element_ty, shape):
        if type(shape) is list or type(shape) is builtin_tuple:
            dims = builtin_tuple(d.value if type(d) is constexpr else d for d in shape)
            known = block_dims.get(dims)
            if known is not None:
                self.element_ty = element_ty
                self.shape, self.numel = known
                self.name = f'<{self.shape}, {self.element_ty}>'
                return
            block_type_init(self, element_ty, shape)
            if all(type(d) is int for d in dims):
                block_dims[dims] = (self.shape, self.numel)
            return
        block_type_init(self, element_ty, shape)

    def fast_tensor_init(self, handle, type):
        dims = type.shape if type.is_block() else ()
        known = tensor_dims.get(dims)
        if known is None:
            known = tensor_dims[dims] = (constexpr(math.prod(dims)), lang_tuple([constexpr(s) for s in dims]))
        self.handle = handle
        self.numel, self.shape = known
        self.type = type
        self.dtype = type.scalar

    _ORIGINALS.update(call=itp.InterpretedFunction.__call__, np_dtype=original_np_dtype,
                      block_type_init=block_type_init, tensor_init=tensor_init)
    itp.InterpretedFunction.__call__ = device_call
    itp._get_np_dtype = get_np_dtype
    core.block_type.__init__ = fast_block_type_init
    core.tensor.__init__ = fast_tensor_init
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
    tl.core.block_type.__init__ = _ORIGINALS["block_type_init"]
    tl.core.tensor.__init__ = _ORIGINALS["tensor_init"]
    INSTALLED = False
