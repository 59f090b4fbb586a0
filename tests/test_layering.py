"""The layering the README draws, enforced by parsing every import in the package.

    kernels/      torch, triton, its own modules (kernels._common)          -- a leaf
    reference/    torch, numpy, fastvq.reference, fastvq._names                -- never kernels, ops or checks
    ops/          kernels (lazily), reference, _backend, checks               -- the only place that dispatches
    nn/           ops (never kernels, never a custom op of its own)
    integrations/ ops, nn (never kernels)
    _checks       _names only;  _names   nothing of fastvq                      -- leaves the others read
and no import cycle between fastvq's modules at import time.
"""

from __future__ import annotations

import ast
import pathlib

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parent.parent
STDLIB_OK = {"__future__", "math", "numbers", "functools", "contextlib", "dataclasses", "typing", "os", "sys",
             "warnings", "itertools", "collections", "re", "importlib", "inspect", "enum", "abc", "operator"}


def _module_name(path: pathlib.Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[0] == "kernels":
        parts = ["fastvq", *parts]
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _files():
    yield from sorted((ROOT / "fastvq").rglob("*.py"))
    yield from sorted((ROOT / "kernels").rglob("*.py"))


def _imports(path: pathlib.Path) -> list[tuple[str, bool]]:
    """(absolute module imported, at module level?) for every import in ``path``."""
    mod = _module_name(path)
    package = mod if path.name == "__init__.py" else mod.rsplit(".", 1)[0]
    tree = ast.parse(path.read_text(), filename=str(path))
    top = {id(n) for n in tree.body}
    # imports nested in `if TYPE_CHECKING`/try at module level count as module level
    for n in tree.body:
        if isinstance(n, (ast.If, ast.Try)):
            top |= {id(c) for c in ast.walk(n)}
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, id(node) in top) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module
            if node.module is None or node.level and not node.module:
                out += [(f"{name}.{a.name}", id(node) in top) for a in node.names]
            else:
                out.append((name, id(node) in top))
    return out


def _layer(mod: str) -> str:
    parts = mod.split(".")
    if parts[0] != "fastvq" or len(parts) == 1:
        return "external" if parts[0] != "fastvq" else "fastvq"
    return parts[1]


RULES = {
    # layer: fastvq layers it must never import
    "kernels": {"ops", "reference", "nn", "integrations", "bench", "testing", "check", "functional", "_backend",
                "_checks", "distributed", "fastvq"},
    # reference may read the names (fastvq/_names.py), never an op, a kernel or the checks
    "reference": {"kernels", "ops", "nn", "integrations", "bench", "check", "functional", "_backend", "_checks"},
    "nn": {"kernels", "reference", "bench", "integrations"},
    "ops": {"nn", "integrations", "bench"},
    "integrations": {"kernels", "reference", "bench"},
    # the leaves: the names of every string choice, and the checks (which read the names)
    "_names": {"kernels", "ops", "reference", "nn", "integrations", "bench", "testing", "check", "functional",
               "_backend", "_checks", "distributed", "fastvq"},
    "_checks": {"kernels", "ops", "reference", "nn", "integrations", "bench", "testing", "check", "functional",
                "_backend", "distributed", "fastvq"},
}


@pytest.mark.parametrize("path", list(_files()), ids=lambda p: str(p.relative_to(ROOT)))
def test_layering(path):
    mod = _module_name(path)
    layer = _layer(mod)
    bad = []
    for name, _ in _imports(path):
        target = _layer(name)
        if layer == "kernels":
            root = name.split(".")[0]
            if target == "external" and root not in {"torch", "triton", "numpy", *STDLIB_OK}:
                bad.append(name)
        if target in RULES.get(layer, ()):
            bad.append(name)
    assert not bad, f"{mod} ({layer}) must not import {bad}"


def test_no_custom_ops_outside_ops():
    """Custom ops are registered only in fastvq/ops/: elsewhere no module imports torch.library or
    fastvq's op factory (fastvq.ops._custom_op), or calls one of torch.library's registrations
    (review11: the old check searched for the string "torch.library.custom_op", which the ops,
    going through their own factory, never spell)."""
    import re

    offenders = []
    # any spelling: torch.library.custom_op, library.custom_op after `from torch import library`,
    # an alias of torch.library, fastvq's factory imported by name or through its module
    registration = re.compile(r"\b(custom_op|triton_op|Library|define|impl|register_fake|register_autograd)\s*\(|"
                              r"\b_custom_op\b|\bimport\s+library\b|=\s*torch\.library\b")
    for path in _files():
        if _layer(_module_name(path)) == "ops":
            continue
        names = [name for name, _ in _imports(path)]
        if (any(n == "torch.library" or n.startswith(("torch.library.", "fastvq.ops._custom_op")) for n in names)
                or registration.search(path.read_text())):
            offenders.append(str(path.relative_to(ROOT)))
    assert not offenders, f"custom ops are registered only in fastvq/ops/: {offenders}"


def test_no_import_cycles_at_module_level():
    graph: dict[str, set[str]] = {}
    mods = {_module_name(p): p for p in _files()}
    for mod, path in mods.items():
        deps = set()
        for name, top in _imports(path):
            if not top:
                continue
            # resolve "fastvq.ops.nearest_code.nearest_code_ref"-style names to a module we have
            while name and name not in mods:
                name = name.rpartition(".")[0]
            if name and name != mod:
                deps.add(name)
        graph[mod] = deps
    # packages import their children: an edge parent -> child is not a cycle through the parent
    state: dict[str, int] = {}
    cycle: list[str] = []

    def visit(m, stack):
        state[m] = 1
        for d in graph.get(m, ()):
            if m.startswith(d + "."):
                continue  # a module importing its own package's __init__ (always already loading)
            if state.get(d) == 1:
                cycle.extend(stack[stack.index(d):] + [d] if d in stack else [m, d])
                return True
            if state.get(d) is None and visit(d, stack + [d]):
                return True
        state[m] = 2
        return False

    for m in sorted(graph):
        if state.get(m) is None and visit(m, [m]):
            break
    assert not cycle, f"import cycle at module level: {' -> '.join(cycle)}"


# Raises of user-facing errors allowed in kernels/, by (file, function), with the reason.
KERNEL_RAISES_ALLOWED = {
    # validates the FASTVQ_AUTOTUNE environment variable, read where the autotuners are defined
    ("_common.py", "autotune_enabled"),
}


def _user_raises(path: pathlib.Path) -> list[tuple[str, int]]:
    """(enclosing function, line) of every ``raise ValueError/TypeError`` in ``path``."""
    tree = ast.parse(path.read_text(), filename=str(path))
    out = []

    def visit(node, func):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                visit(child, child.name)
                continue
            if isinstance(child, ast.Raise) and child.exc is not None:
                exc = child.exc.func if isinstance(child.exc, ast.Call) else child.exc
                if isinstance(exc, ast.Name) and exc.id in ("ValueError", "TypeError"):
                    out.append((func, child.lineno))
            visit(child, func)

    visit(tree, "<module>")
    return out


def test_user_errors_only_in_ops():
    """User-facing checks live in fastvq/ops/ (ValueError/TypeError naming the argument); the
    launchers in kernels/ only assert their internal preconditions (STYLE.md)."""
    bad = [f"kernels/{path.name}:{line} ({func})"
           for path in sorted((ROOT / "kernels").rglob("*.py"))
           for func, line in _user_raises(path) if (path.name, func) not in KERNEL_RAISES_ALLOWED]
    assert not bad, f"raise ValueError/TypeError in kernels/ (check in fastvq/ops/, assert in the launcher): {bad}"


def test_names_have_one_definition():
    """Every choice of a string argument is defined in fastvq/_names.py: the checks read it, and the
    kernels' internal name -> id tables cover exactly those names (review11: metric names had six
    copies, and non-string values raised TypeError from one entry point, ValueError from another)."""
    from fastvq import _names
    from fastvq._checks import check_choice, check_metric
    from fastvq.kernels.nearest_code import _STRATEGY_BOUND, METRIC_IDS
    from fastvq.kernels.qr_lookup import OP_CODES

    assert set(METRIC_IDS) == set(_names.METRICS) and set(_STRATEGY_BOUND) == set(_names.STRATEGIES)
    assert set(OP_CODES) == set(_names.QR_OPS) and set(_names.MODULE_METRICS) <= set(_names.METRICS)
    for metric in _names.METRICS:
        assert check_metric("op", metric) == metric
    with pytest.raises(ValueError, match=r"fastvq\.op: unknown metric 'l1'.*" + ".*".join(_names.METRICS)):
        check_metric("op", "l1")
    with pytest.raises(TypeError, match=r"fastvq\.op: grad must be a string"):
        check_choice("op", "grad", 1, _names.GRADS)


def test_kernel_and_reference_tolerances_agree():
    """The references never import the kernels, so a value both apply is written in each: "mean"'s
    snap tolerance (kernels/qr_lookup.py, fastvq/reference/_exact_sum.py) must stay one value."""
    from fastvq.kernels.qr_lookup import MEAN_TOL
    from fastvq.reference._exact_sum import MEAN_TOL as REF_MEAN_TOL

    assert float(MEAN_TOL.value if hasattr(MEAN_TOL, "value") else MEAN_TOL) == REF_MEAN_TOL == 2.0**-100


@pytest.mark.parametrize("call", ["nearest_code", "mine_negatives", "qr_lookup-op", "qr_lookup-mode",
                                  "residual_quantize_step", "VectorQuantizer", "ResidualQuantizer", "QREmbedding",
                                  "testing"])
def test_a_choice_that_is_not_a_string_is_a_type_error_everywhere(call, device):
    import fastvq
    import fastvq.testing as ft

    x, c = torch.zeros(2, 3, device=device), torch.zeros(4, 3, device=device)
    ids = torch.zeros(2, dtype=torch.long, device=device)
    name = call.split("-")[-1] if "-" in call else {"nearest_code": "metric", "mine_negatives": "strategy",
                                                     "residual_quantize_step": "grad", "VectorQuantizer": "metric",
                                                     "ResidualQuantizer": "grad", "QREmbedding": "op",
                                                     "testing": "metric"}[call]
    run = {
        "nearest_code": lambda v: fastvq.nearest_code(x, c, metric=v),
        "mine_negatives": lambda v: fastvq.mine_negatives(x, x, c, strategy=v),
        "qr_lookup-op": lambda v: fastvq.qr_lookup(ids, c, c, v),
        "qr_lookup-mode": lambda v: fastvq.qr_lookup(ids, c, c, offsets=ids[:1], mode=v),
        "residual_quantize_step": lambda v: fastvq.residual_quantize_step(x, c[None], grad=v),
        "VectorQuantizer": lambda v: fastvq.nn.VectorQuantizer(4, 3, metric=v),
        "ResidualQuantizer": lambda v: fastvq.nn.ResidualQuantizer(1, 4, 3, grad=v),
        "QREmbedding": lambda v: fastvq.nn.QREmbedding(10, 3, op=v),
        "testing": lambda v: ft.distances64(x, c, v),
    }[call]
    with pytest.raises(TypeError, match=rf"{name} must be a string"):
        run(1)
    with pytest.raises(ValueError, match=rf"unknown {name} 'nope'"):
        run("nope")


def _interpreter_reads(path: pathlib.Path) -> list[str]:
    """What in ``path`` reads the environment or the interpreter flag directly."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Attribute) and node.attr in ("environ", "getenv", "knobs"):
            out.append(f"{node.attr} (line {node.lineno})")
        elif isinstance(node, ast.Name) and node.id in ("INTERPRETED", "environ", "getenv"):
            out.append(f"{node.id} (line {node.lineno})")
        elif isinstance(node, ast.Constant) and node.value == "TRITON_INTERPRET":
            out.append(f"'TRITON_INTERPRET' (line {node.lineno})")
    return out


def test_only_common_reads_the_interpreter_flag():
    """kernels/_common.py reads TRITON_INTERPRET (and the environment) once; every kernel and
    launcher that differs under the interpreter calls one of its named helpers (dot_fp32,
    bf16_rne, sm_count, interpreter_or, autotune_configs)."""
    bad = {f"kernels/{path.name}": reads for path in sorted((ROOT / "kernels").rglob("*.py"))
           if path.name != "_common.py" and (reads := _interpreter_reads(path))}
    assert not bad, f"read the interpreter flag through kernels._common's helpers: {bad}"


def test_mirrored_constants_agree():
    """Kernels import nothing of fastvq, so a number both sides must agree on has a copy in each:
    every such pair is held here (review11: only EPS_NORM was, and that one is now passed in)."""
    from fastvq import _checks
    from fastvq.kernels import _common, nearest_code as k_nc, residual_quantize as k_rq
    from fastvq.ops import residual_quantize as o_rq
    from fastvq.reference import nearest_code as r_nc, residual_quantize as r_rq

    pairs = {
        "MAX_ROTATE_D": (o_rq.MAX_ROTATE_D, k_rq.MAX_ROTATE_D),
        # the residual search's rescue thresholds and scale (the kernel's are tl.constexpr)
        "BIG": (r_rq.BIG, k_rq.BIG_ROW.value), "TINY": (r_rq.TINY, k_rq.TINY_ROW.value),
        "TINY_SCORE": (r_rq.TINY_SCORE, k_rq.TINY_SCORE.value), "RESCALE": (r_rq.RESCALE, k_rq.RESCALE_DOWN.value),
        "RESCALE_UP": (1 / r_rq.RESCALE, k_rq.RESCALE_UP.value),
        "TAME_EXP": (r_nc.TAME_EXP, k_nc.TAME_EXP),
        "FP32_DOT_ENV": (_checks.FP32_DOT_ENV, _common.FP32_DOT_ENV),
    }
    assert {name: a for name, (a, b) in pairs.items() if a != b} == {}
