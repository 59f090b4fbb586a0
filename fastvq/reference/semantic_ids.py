import torch


def semantic_ids_ref(codes: torch.Tensor) -> torch.Tensor:
    """Reference for :func:`fastvq.semantic_ids`: ``(N, L)`` ints -> ``(N, L + 1)`` int64.

    Column ``L`` counts the earlier rows (input order) with the same codes. Sort-based,
    O(L N log N): ``L`` stable sorts, last column first, order the rows lexicographically with
    equal rows kept in input order; a row's rank in its run of equal rows is its level.
    """
    n, depth = codes.shape
    codes = codes.long()
    out = torch.empty((n, depth + 1), dtype=torch.int64, device=codes.device)
    out[:, :depth] = codes
    if n == 0:
        return out
    perm = torch.arange(n, device=codes.device)
    for level in reversed(range(depth)):
        perm = perm[torch.sort(codes[perm, level], stable=True).indices]
    rows = codes[perm]
    pos = torch.arange(n, device=codes.device)
    is_start = torch.ones(n, dtype=torch.bool, device=codes.device)
    if depth > 0:
        is_start[1:] = (rows[1:] != rows[:-1]).any(dim=1)
    else:
        is_start[1:] = False
    run_start = torch.where(is_start, pos, torch.zeros_like(pos)).cummax(0).values
    out[perm, depth] = pos - run_start
    return out
