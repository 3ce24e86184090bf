"""Nearest-neighbour similarity between query cells and a support bank, memory-bounded.

``max_similarity`` never builds the full query x bank matrix: it works on blocks
of ``chunk`` similarities (16 M = 64 MB in fp32 by default), so any K and grid fit.
In bf16 the inputs are rounded to bf16 and the products accumulated by the BLAS in
fp32; the maximum is taken on fp32 values.
"""
from __future__ import annotations

import torch

DEFAULT_CHUNK = 1 << 24


def max_similarity(q: torch.Tensor, bank: torch.Tensor, chunk: int = DEFAULT_CHUNK,
                   dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """q: M x C, bank: N x C (unit norm) -> M, the largest cosine of each query row."""
    out = torch.empty(q.shape[0], dtype=torch.float32, device=q.device)
    if bank.shape[0] == 0:
        return out.fill_(-1.0)
    bank_t = bank.to(dtype).T.contiguous()
    step = max(1, chunk // bank.shape[0])
    for i in range(0, q.shape[0], step):
        sim = q[i:i + step].to(dtype) @ bank_t
        out[i:i + step] = sim.amax(dim=1).float()
    return out


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
