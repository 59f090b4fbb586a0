"""Command line: ``python -m fastvq bench | check``.

    python -m fastvq check            # every op's Triton kernels vs its reference, PASS/FAIL table
    python -m fastvq bench            # time the kernel ops and module steps vs eager torch, torch.compile, the roofline
    python -m fastvq bench --ops nearest_code --quick
    python -m fastvq bench --list     # the names --ops takes
    python -m fastvq bench --traffic  # passes over the activations, launches, host syncs per step
"""

from __future__ import annotations

import argparse
import os
import sys

from ._checks import UsageError


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def _writable_folder(path: str) -> str | None:
    """Why results cannot be written to the folder ``path`` (None when they can). A folder that
    does not exist yet is made to find out and removed again (with the folders made above it):
    nothing is left behind by a run that then fails, or by a check that fails."""
    path = os.path.abspath(path)  # (normalised: "new/../x" is "x", and makes no "new")
    missing, probe = [], path
    while not os.path.exists(probe) and os.path.dirname(probe) != probe:
        missing.append(probe)
        probe = os.path.dirname(probe)
    try:
        os.makedirs(path, exist_ok=True)
        if not os.access(path, os.W_OK | os.X_OK):
            return "not writable"
        return None
    except OSError as exc:
        return exc.strerror or str(exc)
    finally:
        for folder in missing:  # deepest first
            try:
                os.rmdir(folder)
            except OSError:
                break


# the options of a timing run, which --traffic and --list do not take
_TIMING_ONLY = ("providers", "quick", "name", "no_plot", "no_check")


def main(argv=None) -> int:
    prog = "fastvq" if os.path.basename(sys.argv[0] or "") == "fastvq" else "python -m fastvq"  # (the console script)
    parser = argparse.ArgumentParser(prog=prog, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("bench", help="benchmark the kernel ops and module steps (--list names them) against eager "
                                     "torch, torch.compile and the roofline")
    b.add_argument("--ops", nargs="+", help="only these row groups (see --list); with --traffic, the rows whose "
                                            "name contains one of these words (see --list --traffic)")
    b.add_argument("--list", action="store_true", help="print the row groups --ops takes, in run order, and exit "
                                                       "(with --traffic: the traffic rows)")
    b.add_argument("--quick", action="store_true", help="small shapes (the default without CUDA)")
    b.add_argument("--providers", nargs="+", help="only these providers (e.g. reference fastvq); default all")
    b.add_argument("--out", help="results folder (default: ./benchmarks/results)")
    b.add_argument("--name", help="file stem of the results (default: bench-<gpu|cpu>-<device>-<git sha>)")
    b.add_argument("--no-plot", action="store_true")
    b.add_argument("--matmul-precision", choices=["highest", "high"], default=None,
                   help="torch.set_float32_matmul_precision for the whole run: 'high' runs every float32 row "
                        "(fastvq's modules, the seeds, vector-quantize-pytorch, cdist) with TF32 on a GPU")
    b.add_argument("--no-check", action="store_true", help="without CUDA, skip the interpreter check after timing")
    b.add_argument("--traffic", action="store_true",
                   help="count passes over the activations, launches and host syncs per training step and op "
                        "(any device) and write traffic.json")
    b.add_argument("--traffic-scale", type=_positive_int, default=None,
                   help="divide the traffic rows' sizes by this (default 8 without CUDA, 1 with)")
    c = sub.add_parser("check", help="run every op's Triton kernels against a float64 computation of the same "
                                     "inputs (semantic_ids: against its reference) on this machine")
    c.add_argument("--ops", nargs="+", help="only these ops")
    c.add_argument("--dtypes", nargs="+", choices=["float32", "bfloat16", "float16"])
    args = parser.parse_args(argv)
    if args.command == "bench":
        for name in ("out", "name"):  # (an empty value is not "not given")
            if getattr(args, name) == "":
                b.error(f"--{name} must not be empty")
        if args.name is not None and (os.sep in args.name or (os.altsep and os.altsep in args.name)):
            b.error(f"--name is a file stem, not a path (the results go to --out): {args.name!r}")
        mode = "--list" if args.list else "--traffic" if args.traffic else None
        takes_not = _TIMING_ONLY + (("ops", "out", "traffic_scale") if mode == "--list" else ())
        ignored = [name for name in takes_not if getattr(args, name) not in (None, False)] if mode else []
        if ignored:
            b.error(f"{mode} does not take " + ", ".join("--" + name.replace("_", "-") for name in ignored))
        if args.traffic_scale is not None and not args.traffic:
            b.error("--traffic-scale needs --traffic")
        if args.out is not None:
            # (checked before any work; the folder is made when results are written: normalised,
            # so that "new/../x" makes no "new")
            if why := _writable_folder(args.out):
                b.error(f"--out {args.out}: cannot write there ({why})")
            args.out = os.path.abspath(args.out)

    import torch

    if not torch.cuda.is_available():
        # Triton reads this when the kernels are defined: set it before any kernel module loads.
        os.environ.setdefault("TRITON_INTERPRET", "1")

    try:
        if args.command == "check":
            from .check import run_check

            dtypes = [getattr(torch, d) for d in args.dtypes] if args.dtypes else None
            return run_check(ops=args.ops, dtypes=dtypes)
        if args.traffic and args.list:
            from .bench.traffic import all_cases

            for case in all_cases():
                print(case.name)
            return 0
        if args.traffic:
            from .bench.traffic import run_traffic

            return run_traffic(out_dir=args.out, names=args.ops, scale=args.traffic_scale)
        if args.list:
            from .bench.registry import groups

            for g in groups():
                print(f"{g.name:28} weight {g.weight:3}" + (f"  needs {', '.join(g.requires)}" if g.requires else ""))
            return 0
        from .bench import run_bench

        if args.matmul_precision:
            torch.set_float32_matmul_precision(args.matmul_precision)
        return run_bench(ops=args.ops, quick=args.quick, out_dir=args.out, plot=not args.no_plot,
                         providers=args.providers, name=args.name, check=not args.no_check)
    except UsageError as exc:
        print(f"{prog} {args.command}: error: {exc}", file=sys.stderr)
        return 2


def _run() -> int:
    """:func:`main` for the command line: output piped into a reader that stops early
    (``| head``) ends the command quietly, as a closed pipe does for other tools."""
    try:
        code = main()
        sys.stdout.flush()
        return code
    except BrokenPipeError:
        # (Python would report the failed flush at exit: point stdout at nothing first)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


if __name__ == "__main__":
    sys.exit(_run())
