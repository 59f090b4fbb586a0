"""Run the fuzz properties without stopping at the first failure, and list the distinct ones.

    TRITON_INTERPRET=1 python -m tests.fuzz.explore [--scale 4] [-k nearest] [--backend triton]

For every ``@given`` property in ``tests/fuzz/test_fuzz_*.py`` (each pytest parametrization,
each backend), it draws the same derandomized examples as pytest (``--scale`` times as many)
and records every contract failure, bucketed by its message with the numbers taken out; each
bucket is printed once with its count and the first (replayable) example. Also the time a
passing run of each property takes, i.e. the CI cost of the suite once the library is fixed.
Not collected by pytest (no ``test_`` prefix).
"""

from __future__ import annotations

import argparse
import importlib
import itertools
import os
import re
import sys
import time
import traceback
import warnings
from collections import OrderedDict

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import Phase, given, settings  # noqa: E402

import fastvq  # noqa: E402

MODULES = ["test_fuzz_search", "test_fuzz_codebook_ops", "test_fuzz_train_ops", "test_fuzz_int_ops", "test_fuzz_modules"]


def _bucket(msg: str) -> str:
    msg = msg.splitlines()[0] if msg else msg
    msg = re.sub(r"TSpec\(.*?\)\)", "TSpec(...)", msg)
    msg = re.sub(r"\{'ema'.*?\}", "{opts}", msg)
    msg = re.sub(r"\[[-+0-9.e, ]*\]", "[#]", msg)
    msg = re.sub(r"(?<![A-Za-z_])[-+]?(\d+\.?\d*(e[-+]?\d+)?|inf|nan)(?![A-Za-z_])", "#", msg)
    return msg


def _params(fn):
    marks = [m for m in getattr(fn, "pytestmark", []) if m.name == "parametrize"]
    names, values = [], []
    for m in marks:
        ns = [n.strip() for n in m.args[0].split(",")]
        names.append(ns)
        values.append([v if len(ns) > 1 else (v,) for v in m.args[1]])
    for combo in itertools.product(*values) if values else [()]:
        kw = {}
        for ns, vs in zip(names, combo):
            kw.update(dict(zip(ns, vs)))
        yield kw


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--scale", type=float, default=1.0)
    ap.add_argument("-k", default="")
    ap.add_argument("--backend", default="both", choices=("both", "reference", "triton"))
    args = ap.parse_args(argv)
    from tests.conftest import DEVICE  # sets TRITON_INTERPRET without CUDA
    from tests.fuzz._oracle import ContractError

    backends = ("reference", "triton") if args.backend == "both" else (args.backend,)
    buckets: "OrderedDict[str, list]" = OrderedDict()
    total_time = 0.0
    for modname in MODULES:
        mod = importlib.import_module(f"tests.fuzz.{modname}")
        for name in sorted(dir(mod)):
            fn = getattr(mod, name)
            if not name.startswith("test_") or not hasattr(fn, "hypothesis") or args.k not in f"{modname}::{name}":
                continue
            inner = fn.hypothesis.inner_test
            strategies = fn.hypothesis._given_kwargs
            n = max(1, int(round(fn._hypothesis_internal_use_settings.max_examples * args.scale)))
            uses_backend = "backend" in inner.__code__.co_varnames[: inner.__code__.co_argcount]
            for params in _params(fn):
                for be in backends if uses_backend else ("-",):
                    label = f"{name}[{be}{''.join(',' + str(v) for v in params.values())}]"
                    failures = []

                    @settings(max_examples=n, derandomize=True, database=None, deadline=None,
                              phases=[Phase.explicit, Phase.generate], suppress_health_check=list(
                                  __import__("hypothesis").HealthCheck))
                    @given(**strategies)
                    def run(**drawn):
                        kw = dict(params, **drawn)
                        if uses_backend:
                            kw["backend"] = be
                        if "device" in inner.__code__.co_varnames[: inner.__code__.co_argcount]:
                            kw["device"] = DEVICE
                        try:
                            with warnings.catch_warnings():
                                warnings.simplefilter("ignore")
                                if uses_backend:
                                    with fastvq.backend(be):
                                        inner(**kw)
                                else:
                                    inner(**kw)
                        except pytest.skip.Exception:
                            return  # not applicable on this branch (feature absent)
                        except ContractError as err:
                            failures.append((str(err), drawn))
                        except (Exception, pytest.fail.Exception) as err:  # noqa: BLE001  (a crash is a failure too)
                            tb = traceback.extract_tb(err.__traceback__)[-1]
                            failures.append((f"{label.split('[')[0]}[{be}]: CRASH {type(err).__name__}: {err} "
                                             f"(at {os.path.basename(tb.filename)}:{tb.lineno})", drawn))

                    t0 = time.perf_counter()
                    run()
                    dt = time.perf_counter() - t0
                    total_time += dt
                    print(f"{label}: {n} examples, {len(failures)} failing, {dt:.1f}s", flush=True)
                    for msg, drawn in failures:
                        b = f"{name}[{be}] {_bucket(msg)}"
                        buckets.setdefault(b, []).append((msg, drawn))
    print(f"\n== {len(buckets)} distinct failures; properties ran {total_time:.1f}s in all\n")
    for b, items in buckets.items():
        msg, drawn = items[0]
        print(f"[{len(items)}x] {b}\n    first: {msg[:400]}\n    input: {drawn!r}"[:1500] + "\n")
    return 1 if buckets else 0


if __name__ == "__main__":
    sys.exit(main())
