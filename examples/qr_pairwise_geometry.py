"""Can QR embeddings of hashed ids learn a pairwise geometry, and what do they cost in recall?

Item embeddings ("actuals", e.g. BLIP embeddings of videos) say which items are near which.
For each item's hashed id we learn a QR embedding (the sum of a quotient row and a remainder
row of two small tables) with 10x fewer parameters than the actuals, trained only to
reproduce the in-batch similarity distributions of the actuals with
:func:`fastvq.pairwise_kl_loss`, with the recipe of the original experiment: batches of 1024,
Adagrad(lr=0.5), temperature ``max(0.5 * 0.95**epoch, 0.05)``. Then we search nearest
neighbours (inner product of normalised embeddings) among the learned embeddings and report
recall@100 against the true neighbours from the actuals.

The same recipe then trains two plain tables, one row per item, and the example prints all
three side by side, so what the QR tables buy is measured rather than claimed:

- a full table at the same width (``items x dim``: what QR compresses), and
- a full table at the same parameter budget (``items x floor(budget / items)``: what the same
  number of parameters gives without hashing).

The actuals are generated, deterministically from ``--seed``: unit vectors around
hierarchically clustered centres (a few thousand items x 256 dims), so that neighbourhoods
have structure at two scales. Nothing is downloaded.

What "10x fewer parameters" means here, plainly: the QR tables hold 10x fewer *parameters*
than the actuals (``items x actual_dim`` numbers against ``2 * div x dim``). With the defaults
(4096 items, 256-d actuals, 32-d QR rows) that is two 1639 x 32 tables: 3278 rows for 4096
items, and 8x of the 10x comes from the rows being 8x narrower than the actuals, which a plain
table gets too. ``--compression-of rows`` takes the other reading, 10x fewer table rows than
items (two 205-row tables).

Measured with the defaults (seed 0, recall@100; chance, what random embeddings get, is
100/4095 = 2.4%; about 3 CPU-minutes for the three models):

    QR tables, two 1639 x 32 (104,896 parameters, 10.0x fewer than the actuals)    54.6%
    full table, same width, 4096 x 32 (131,072 parameters, 8.0x fewer)             87.7%
    full table, same budget, 4096 x 25 (102,400 parameters, 10.2x fewer)           86.1%

On this data a plain table of narrower rows beats the QR tables at the same budget: hashing
ids into shared rows costs recall here. What QR buys is a fixed number of rows for ids that
were never enumerated (hashed ids of any size need no vocabulary), not recall per parameter.
With ``--compression-of rows`` (10x fewer rows than items, 79.9x fewer parameters than the
actuals) the QR tables recall 4.2% and a full 4096 x 3 table of the same budget 54.6%. The
seed reports about 65% on its BLIP data; these generated actuals are not that data, so the
numbers are not comparable one to one.

    python examples/qr_pairwise_geometry.py                  # defaults: a few minutes on a CPU
    python examples/qr_pairwise_geometry.py --qr-only        # only the QR model
    python examples/qr_pairwise_geometry.py --device cuda --items 65536 --batch-size 65536
"""

from __future__ import annotations

import argparse
import math
import sys

import torch
import torch.nn.functional as F
from tqdm import tqdm

try:
    import fastvq
except ImportError:  # a fresh clone, not installed: use the source tree beside this script
    sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1]))
    import fastvq


def make_actuals(items: int, dim: int, seed: int) -> torch.Tensor:
    """``(items, dim)`` unit-norm float32 embeddings with cluster structure at two scales:
    ``~sqrt(items/10)`` topics, each with sub-topics of ~10 items, plus item noise."""
    g = torch.Generator().manual_seed(seed)  # drawn on the CPU (the same values on any device), as
    # are the ids and the batch order: device=g.device, since a script or notebook may have made
    # another device torch's default (torch.set_default_device("cuda")), where a CPU generator fails
    n_sub = max(items // 10, 1)
    n_top = max(int(math.sqrt(n_sub)), 1)
    topics = torch.randn(n_top, dim, generator=g, device=g.device)
    sub = (topics[torch.randint(0, n_top, (n_sub,), generator=g, device=g.device)]
           + 0.7 * torch.randn(n_sub, dim, generator=g, device=g.device))
    x = (sub[torch.randint(0, n_sub, (items,), generator=g, device=g.device)]
         + 0.5 * torch.randn(items, dim, generator=g, device=g.device))
    return F.normalize(x, dim=1)


def hashed_ids(items: int, seed: int) -> torch.Tensor:
    """Large random int64 ids (as a hashing of video ids would give), one per item."""
    g = torch.Generator().manual_seed(seed + 1)
    return torch.randint(0, 2**62, (items,), generator=g, dtype=torch.int64, device=g.device)


@torch.no_grad()
def top_k_neighbours(emb: torch.Tensor, k: int, chunk: int = 4096) -> torch.Tensor:
    """``(N, k)`` indices of each row's k largest inner products with the other rows."""
    n = emb.shape[0]
    out = torch.empty((n, k), dtype=torch.int64, device=emb.device)
    for s in range(0, n, chunk):
        sim = emb[s : s + chunk] @ emb.T
        rows = torch.arange(sim.shape[0], device=emb.device)
        sim[rows, rows + s] = float("-inf")  # not its own neighbour
        out[s : s + chunk] = sim.topk(k, dim=1).indices
    return out


@torch.no_grad()
def recall_at_k(found: torch.Tensor, truth: torch.Tensor) -> float:
    """Mean over rows of |found_i & truth_i| / k."""
    n, k = truth.shape
    hits = 0
    for s in range(0, n, 1024):
        f, t = found[s : s + 1024], truth[s : s + 1024]
        hits += (f[:, :, None] == t[:, None, :]).any(-1).sum().item()
    return hits / (n * k)


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--items", type=int, default=4096, help="number of items (default 4096)")
    p.add_argument("--actual-dim", type=int, default=256, help="dimension of the actuals (default 256)")
    p.add_argument("--dim", type=int, default=32, help="dimension of the learned QR embeddings (default 32)")
    p.add_argument("--epochs", type=int, default=50)
    p.add_argument("--batch-size", type=int, default=1024)
    p.add_argument(
        "--compression", type=float, default=10.0,
        help="how many times smaller the QR tables are, in the unit of --compression-of (default 10)",
    )
    p.add_argument(
        "--compression-of", choices=["parameters", "rows"], default="parameters",
        help="parameters: actuals' parameters (items x actual-dim) per QR table parameter (default); "
        "rows: items per QR table row",
    )
    p.add_argument("--k", type=int, default=100, help="recall@k (default 100)")
    p.add_argument("--lr", type=float, default=0.5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--qr-only", action="store_true",
                   help="train only the QR model, not the two full tables it is compared with")
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    args = p.parse_args(argv)
    if args.items < 2 or args.batch_size < 2:
        p.error("--items and --batch-size must be at least 2 (the loss compares rows within a batch)")
    if args.compression <= 0 or args.lr <= 0 or args.epochs < 0 or args.k < 1 or min(args.dim, args.actual_dim) < 1:
        p.error("--compression and --lr must be > 0, --epochs >= 0, --k, --dim and --actual-dim >= 1")
    try:
        device = torch.device(args.device)
        torch.empty(0, device=device)  # (a device this torch build or machine lacks fails here)
    except (RuntimeError, AssertionError) as exc:
        p.error(f"--device {args.device}: not available here ({exc}); "
                f"use --device {'cuda' if torch.cuda.is_available() else 'cpu'}")
    return args


def train(model, ids, actuals, args, desc: str):
    """The original recipe: shuffled batches, Adagrad, the decaying temperature schedule."""
    n = ids.shape[0]
    optim = torch.optim.Adagrad(model.parameters(), lr=args.lr)
    batch_size = min(args.batch_size, n)
    num_batches = max(n // batch_size, 1)  # the last partial batch is dropped, as in the original
    g = torch.Generator().manual_seed(args.seed + 2)
    bar = tqdm(range(args.epochs), desc=desc, disable=args.no_progress)
    for epoch in bar:
        temperature = max(0.5 * 0.95**epoch, 0.05)
        order = torch.randperm(n, generator=g, device=g.device).to(ids.device)
        total = 0.0
        for b in range(num_batches):
            idx = order[b * batch_size : (b + 1) * batch_size]
            optim.zero_grad()
            pred = F.normalize(model(ids[idx]), p=2.0, dim=1)
            loss = fastvq.pairwise_kl_loss(pred, actuals[idx], temperature)
            loss.backward()
            optim.step()
            total += loss.item()
        bar.set_postfix(loss=f"{total / num_batches:.4f}", temperature=f"{temperature:.3f}")
    with torch.no_grad():
        return F.normalize(model(ids), dim=1)


def main(argv=None) -> dict:
    """Run the experiment; print the comparison and return recall@k per model.

    Returns ``{"qr": ..., "full_same_width": ..., "full_same_budget": ..., "chance": ...}``
    (fractions; the two full tables are left out with ``--qr-only``)."""
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    n, k = args.items, min(args.k, args.items - 1)

    actuals = make_actuals(n, args.actual_dim, args.seed).to(device)
    ids = hashed_ids(n, args.seed).to(device)
    truth = top_k_neighbours(actuals, k)
    actual_params = n * args.actual_dim

    # QR tables: two of div rows of `dim` (the seed's split) for div**2 buckets, div chosen so
    # that the tables hold 1/compression of the actuals' parameters (or 1/compression rows per item).
    if args.compression_of == "parameters":
        div = max(math.ceil(actual_params / (args.compression * args.dim) / 2), 1)
    else:
        div = max(math.ceil(n / args.compression / 2), 1)
    num_embeddings = div * div
    buckets = torch.remainder(ids, num_embeddings)  # the hashed id's bucket, as the QR trick's forward does
    model = fastvq.nn.QREmbedding(num_embeddings, args.dim).to(device)
    params = sum(p.numel() for p in model.parameters())
    rows = params // args.dim
    print(
        f"actuals: {n} items x {args.actual_dim} dims. QR embedding of the hashed ids: two {div} x {args.dim} "
        f"tables, {rows} rows for {n} items ({n / rows:.2f}x fewer rows than one per item; "
        f"{actual_params / params:.1f}x fewer parameters than the actuals, of which "
        f"{args.actual_dim / args.dim:.1f}x is the narrower width); {num_embeddings} buckets, "
        f"{n - torch.unique(buckets).numel()} items share a bucket with another"
    )
    chance = k / (n - 1)
    results = [(f"QR tables, two {div} x {args.dim}", params, "qr",
                recall_at_k(top_k_neighbours(train(model, buckets, actuals, args, "QR embedding"), k), truth))]
    if not args.qr_only:
        budget_dim = max(params // n, 1)  # the widest one-row-per-item table within the QR budget
        rows_of_items = torch.arange(n, device=device)
        for label, key, width in (("full table, same width", "full_same_width", args.dim),
                                  ("full table, same budget", "full_same_budget", budget_dim)):
            torch.manual_seed(args.seed)
            table = torch.nn.Embedding(n, width).to(device)
            learned = train(table, rows_of_items, actuals, args, label)
            results.append((f"{label}, {n} x {width}", n * width, key, recall_at_k(top_k_neighbours(learned, k), truth)))

    print(f"\n{'model':44} {'parameters':>11} {'vs actuals':>11} {'recall@' + str(k):>11}")
    for label, p, _, recall in results:
        print(f"{label:44} {p:>11,} {actual_params / p:>10.1f}x {100 * recall:>10.1f}%")
    print(f"{'chance (random embeddings)':44} {'':>11} {'':>11} {100 * chance:>10.1f}%")
    out = {key: recall for _, _, key, recall in results}
    out["chance"] = chance
    if not args.qr_only:
        qr, same_budget = out["qr"], out["full_same_budget"]
        verdict = "beat" if qr > same_budget else "match" if qr == same_budget else "trail"
        print(f"\nAt the same parameter budget the QR tables {verdict} a plain table of {budget_dim}-d rows "
              f"({100 * qr:.1f}% vs {100 * same_budget:.1f}% recall@{k}); at the same width the plain table "
              f"recalls {100 * out['full_same_width']:.1f}% with {n * args.dim / params:.2f}x the parameters.")
    return out


if __name__ == "__main__":
    main(sys.argv[1:])
