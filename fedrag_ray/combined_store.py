"""Two stores searched as one: a client's private shard and the public store
(``federation.knowledge: both``), instead of a copy of the public corpus in every shard.

Ids ``0..len(public)-1`` are the public store's, the private shard's follow. Each search
asks both for the top-k and merges them by score, which for exact indexes is the search
of one index over both corpora.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from fedrag_ray.data import Passage
from fedrag_ray.fusion import merge_top_k


class CombinedStore:
    def __init__(self, public: Any, private: Any) -> None:
        if public.dim != private.dim:
            raise ValueError(f"public store dim {public.dim} != private shard dim {private.dim}")
        self.public, self.private = public, private
        self.dim = public.dim
        self.split = len(public)

    def __len__(self) -> int:
        return self.split + len(self.private)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        k = min(k, len(self))
        s1, i1 = self.public.search(queries, k)
        s2, i2 = self.private.search(queries, k)
        return merge_top_k([s1, s2], [i1, np.where(i2 >= 0, i2 + self.split, -1)], k)

    def get(self, indices: np.ndarray) -> list[list[Passage]]:
        rows = np.atleast_2d(indices)
        pub = self.public.get(np.where(rows < self.split, rows, -1))
        priv = self.private.get(np.where(rows >= self.split, rows - self.split, -1))
        out = []
        for row, a, b in zip(rows, pub, priv, strict=True):
            a_it, b_it = iter(a), iter(b)
            out.append([next(a_it) if i < self.split else next(b_it) for i in row if i >= 0])
        return out

    def vectors(self, indices: np.ndarray) -> np.ndarray:
        idx = np.asarray(indices)
        public = idx < self.split
        out = self.public.vectors(np.where(public, idx, 0))
        priv = self.private.vectors(np.where(public, 0, np.maximum(idx - self.split, 0)))
        return np.where(public[..., None], out, priv)
