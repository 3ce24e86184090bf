"""Nearest-neighbour similarity between query cells and a support bank, memory-bounded.

``max_similarity`` never builds the full query x bank matrix: it works on blocks of at most
``chunk`` similarities (4 M = 8 MB in bf16, 16 MB in fp32 by default), so any K and grid fit.
The bank is streamed in blocks against all the query rows at once (``F.linear(bank block, q)``,
the bank block as the small operand) and a running maximum is kept: a few MB per block stay in
the CPU's cache, which made it ~2-3x faster than one large block of query rows x the whole bank
(BENCHMARKS.md, matching speed). In bf16 the inputs are rounded to bf16 and the products
accumulated by the BLAS in fp32 and rounded to bf16 (one ulp: 2^-8 near 1); the maximum is
returned in fp32.

Bank reductions for the matching:

* :func:`strided_subset`: every k-th bank row. Any subset's best cosine is a lower bound of the
  whole bank's, so it gives an upper bound of a margin ``fg - bg`` (fm's pruned search uses this).
* :func:`cover_subset`: near-duplicate removal with a stated radius: every dropped row has a kept
  row with cosine >= ``cos_min``, so each query's best cosine drops by at most
  ``sqrt(2 - 2 cos_min)`` (in practice far less: BENCHMARKS.md).
* :func:`greedy_coreset`: PatchCore's greedy k-center to a given size.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

DEFAULT_CHUNK = 1 << 22


def max_similarity(q: torch.Tensor, bank: torch.Tensor, chunk: int = DEFAULT_CHUNK,
                   dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """q: M x C, bank: N x C (unit norm) -> M, the largest cosine of each query row (fp32).

    At most ``chunk`` similarities exist at a time. ``bank`` already in ``dtype`` is not copied."""
    m, n = q.shape[0], bank.shape[0]
    out = torch.empty(m, dtype=torch.float32, device=q.device)
    if n == 0:
        return out.fill_(-1.0)
    if m == 0:
        return out
    qd = q.to(dtype).contiguous()
    bd = bank.to(dtype)
    qstep = min(m, max(1, chunk))
    bstep = max(1, chunk // qstep)
    for i in range(0, m, qstep):
        qi = qd[i:i + qstep]
        best = None
        for j in range(0, n, bstep):
            blk = F.linear(bd[j:j + bstep], qi).amax(dim=0)      # bank rows x query rows -> query rows
            best = blk if best is None else torch.maximum(best, blk, out=best)
        out[i:i + qstep] = best.float()
    return out


def strided_subset(n: int, stride: int) -> torch.Tensor:
    """Indices 0, stride, 2 * stride, ... of ``n`` rows (at least one row)."""
    if stride < 1:
        raise ValueError(f"stride must be >= 1, got {stride}")
    return torch.arange(0, n, stride)


def cover_subset(x: torch.Tensor, cos_min: float, block: int = 2048,
                 dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Indices of rows of ``x`` (unit norm) such that every row of ``x`` has a kept row with cosine
    >= ``cos_min`` (itself, for kept rows): leader clustering in blocks of ``block`` rows. A block's rows
    already covered by the kept rows are dropped; the rest are taken in order, each new leader covering
    the block's rows near it. Deterministic; the cost is one pass of ``x`` against the kept rows."""
    if not -1.0 <= cos_min <= 1.0:
        raise ValueError(f"cos_min must be in [-1, 1], got {cos_min}")
    kept_idx: list[torch.Tensor] = []
    kept = x[:0]
    for i in range(0, x.shape[0], block):
        b = x[i:i + block]
        if len(kept):
            # the covered test in fp32 on the kept rows found so far (exact radius guarantee)
            cand = torch.nonzero(max_similarity(b, kept, dtype=dtype) < cos_min).flatten()
        else:
            cand = torch.arange(len(b), device=x.device)
        if not len(cand):
            continue
        cb = b[cand]
        near = (cb @ cb.T) >= cos_min
        covered = torch.zeros(len(cb), dtype=torch.bool, device=x.device)
        picks = []
        for j in range(len(cb)):
            if not covered[j]:
                picks.append(j)
                covered |= near[j]
        sel = cand[torch.tensor(picks, device=x.device)]
        kept_idx.append(i + sel)
        kept = torch.cat([kept, b[sel]])
    return torch.cat(kept_idx) if kept_idx else torch.arange(0, device=x.device)


def greedy_coreset(x: torch.Tensor, k: int, seed: int = 0) -> torch.Tensor:
    """Indices of ``k`` rows of ``x`` chosen by greedy k-center (PatchCore's coreset):
    each new center is the row farthest from those chosen so far, so every row ends
    close to some center. Deterministic for a given ``seed``."""
    n = x.shape[0]
    if k >= n:
        return torch.arange(n, device=x.device)
    g = torch.Generator(device="cpu").manual_seed(seed)
    first = int(torch.randint(n, (1,), generator=g))
    chosen = torch.empty(k, dtype=torch.long, device=x.device)
    chosen[0] = first
    # unit vectors: squared distance = 2 - 2 cos
    dist = 2 - 2 * (x @ x[first])
    for i in range(1, k):
        j = int(torch.argmax(dist))
        chosen[i] = j
        dist = torch.minimum(dist, 2 - 2 * (x @ x[j]))
    return chosen


def kth_self_similarity(q: torch.Tensor, h: int, w: int, k: int, radius: int = 1,
                        chunk: int = DEFAULT_CHUNK) -> torch.Tensor:
    """For each of the h*w query cells (rows of q), its k-th highest cosine to the other cells
    of the same query farther than ``radius`` cells away: how common its appearance is in
    the query itself (a small defect is rare there)."""
    m = q.shape[0]
    k = max(1, min(k, m - (2 * radius + 1) ** 2))
    ys = torch.arange(h, device=q.device).repeat_interleave(w)
    xs = torch.arange(w, device=q.device).repeat(h)
    out = torch.empty(m, dtype=torch.float32, device=q.device)
    step = max(1, chunk // m)
    for i in range(0, m, step):
        sim = q[i:i + step] @ q.T
        near = ((ys[i:i + step, None] - ys[None]).abs() <= radius) & ((xs[i:i + step, None] - xs[None]).abs() <= radius)
        sim.masked_fill_(near, -2.0)
        out[i:i + step] = sim.topk(k, dim=1).values[:, -1]
    return out
