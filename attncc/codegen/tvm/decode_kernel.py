"""The forward kernel for a few query rows (a decoding step): scores row-major, dot products.

Why a second layout: the key-major kernel (``kernels.py``) holds a SIMD vector of query rows,
so a tile costs the same with 1 live row as with 8. A decoding step has ``G * Lq`` rows per kv
head (1 without GQA, 4 for 32 query heads over 8): there it wasted 7/8 (half) of its products.
Here a tile has exactly the step's rows (``block_m``, 1 to 7) and vectors run along features
and keys instead:

- ``St[r, j] = q_r . k_j``: 8-lane partial sums over the features, ``KB`` keys by ``BM`` rows
  at a time (``KB * BM`` accumulators), then a sum over the lanes;
- the score function and mask, the normalizer's update (row max, ``exp``, row sums), vectorized
  along the tile's keys;
- ``Acc[r] = Alpha[r] Acc[r] + sum_j P[r, j] v_j``: vectors along the value features, ``VC``
  vectors by ``BM`` rows at a time.

Same arguments, task table and block tables as the key-major kernel (``launcher.launch`` runs
either); the normalizers the split-KV path merges: softmax (its sink merged outside, or added by
one chunk's kernel), sigmoid, an unnormalised pointwise map. ``supports`` says which regions and
shapes.
"""

from __future__ import annotations

from attncc.codegen.tvm.kernels import NEG_INF, KeyMajorForward, tree
from attncc.codegen.tvm.register_block import RegisterBlock, nest
from attncc.ir import nodes
from attncc.passes.plan import AttentionRegion

LANES = 8  # float32 lanes of an AVX2 vector
ACCUMULATORS = 8  # accumulators: KB keys x BM rows, VC vectors x BM rows, at most 8 (16 registers)


def supports(region: AttentionRegion, rows: int, D: int, Dv: int) -> bool:
    """Whether ``rows`` query rows of ``region`` take this kernel: fewer than a vector's lanes
    (8 rows fill the key-major kernel's vectors, which is faster there: MQA 8 query heads of
    128 over 4096 keys, B=2, 0.66 ms against 0.88)."""
    norm = region.normalizer
    merged = isinstance(norm, nodes.SoftmaxNorm | nodes.SigmoidNorm) or (
        isinstance(norm, nodes.PointwiseNorm) and not norm.normalize)
    return merged and rows < LANES and D % LANES == 0 and Dv % LANES == 0


def config(rows: int, block_n: int) -> dict:
    """The launch config of this kernel: tiles of exactly ``rows`` query rows by ``block_n`` keys."""
    return {"block_m": rows, "block_n": block_n, "rows": 1, "vector": LANES, "layout": "row_major"}


class RowMajorForward(KeyMajorForward):
    """``KeyMajorForward`` with the row-major task body; the header, index environment, score, mask
    and base-2 rules are the key-major kernel's."""

    def _task(self) -> None:
        s, w = self.s, self.w
        BM, D, Dv = s.block_m, s.D, s.Dv
        self._task_indices()
        w(f'Qs = T.decl_buffer(({BM}, {D}), "float32")')
        w(f'St = T.decl_buffer(({BM}, {s.block_n}), "float32")')
        w(f'Acc = T.decl_buffer(({BM}, {Dv}), "float32")')
        for name in ("M", "L", "Alpha"):
            w(f'{name} = T.decl_buffer(({BM},), "float32")')
        with w.block(f"for i in range({BM}):"):
            with w.block(f"for d in T.vectorized({D}):"):
                w(f"Qs[i, d] = {self._f32('Q[b, h, T.min(q0 + i, LQ - 1), d]')} * {self._q_scale}")
            w(f"M[i] = {NEG_INF}")
            w("L[i] = T.float32(0.0)")
            w("Alpha[i] = T.float32(1.0)")
            with w.block(f"for d in T.vectorized({Dv}):"):
                w("Acc[i, d] = T.float32(0.0)")
        for count, index, masked in (("FC", "FI", "False"), ("PC", "PI", "True")):
            with w.block(f"for n in range({count}[tb, th, qt]):"):
                w(f"kv0 = {index}[tb, th, qt, n] * {s.block_n}")
                self._row_tile(masked)
        self._finish()

    # ---- one tile ----------------------------------------------------------------------

    def _key(self, j: str, masked: str) -> str:
        return self._key_row(j, clamp=masked != "False")

    def _row_tile(self, masked: str) -> None:
        self._masked = masked
        self._dot_products(masked)
        if masked != "False" or self.region.score is not None:
            with self.w.block(f"for i in range({self.s.block_m}):"):
                with self.w.block(f"for j in T.vectorized({self.s.block_n}):"):
                    self.w(f"St[i, j] = {self._score_and_mask('St[i, j]', masked, 'i', 'j')}")
        if isinstance(self.norm, nodes.SoftmaxNorm):
            self._row_softmax()
        else:
            self._row_weights()
        self._weighted_values(masked)

    def _dot_products(self, masked: str) -> None:
        """``St[i, j] = Qs[i] . K[j]``: ``KB`` keys x ``BM`` rows of 8-lane sums over features."""
        s, w = self.s, self.w
        BM, BN = s.block_m, s.block_n
        KB = _largest_divisor(BN, ACCUMULATORS // BM)
        parts = RegisterBlock("Part", (("jk", "T.unroll", KB), ("i", "T.unroll", BM), ("l", "T.vectorized", LANES)))
        parts.declare(w)
        with w.block(f"for j0 in range({BN // KB}):"):
            parts.fill(w, "T.float32(0.0)")
            key = self._f32(f"K[{self._key(f'j0 * {KB} + jk', masked)}, d0 * {LANES} + l]", s.kv_type)
            parts.accumulate(w, f"Qs[i, d0 * {LANES} + l] * {key}", ("d0", "range", s.D // LANES))
            with nest(w, *parts.loops[:2]):
                w(f"St[i, j0 * {KB} + jk] = {tree('', [f'Part[jk, i, {lane}]' for lane in range(LANES)])}")

    def _row_softmax(self) -> None:
        """Online softmax per row: the new max (a vector max over keys, then over lanes), ``Alpha``,
        ``St <- exp(St - m)`` and the row sum, vectorized over the tile's keys."""
        w, BN = self.w, self.s.block_n
        lanes = range(LANES)
        with w.block(f"for i in range({self.s.block_m}):"):
            w(f'Mx = T.decl_buffer(({LANES},), "float32", scope="local")')
            w(f'Ls = T.decl_buffer(({LANES},), "float32", scope="local")')
            w('Mu = T.decl_buffer((2,), "float32", scope="local")')
            with w.block(f"for l in T.vectorized({LANES}):"):
                w("Mx[l] = St[i, l]")
                w("Ls[l] = T.float32(0.0)")
            with w.block(f"for j0 in range(1, {BN // LANES}):"):
                with w.block(f"for l in T.vectorized({LANES}):"):
                    w(f"Mx[l] = T.max(Mx[l], St[i, j0 * {LANES} + l])")
            w(f"Mu[0] = T.max(M[i], {tree('T.max', [f'Mx[{lane}]' for lane in lanes])})")
            # a row with no live score yet keeps m = -inf; subtract 0 there (exp(-inf) = 0)
            w(f"Mu[1] = T.if_then_else(Mu[0] == {NEG_INF}, T.float32(0.0), Mu[0])")
            w(f"Alpha[i] = {self._exp('(M[i] - Mu[1])')}")
            w("M[i] = Mu[0]")
            with w.block(f"for j0 in range({BN // LANES}):"):
                with w.block(f"for l in T.vectorized({LANES}):"):
                    j = f"j0 * {LANES} + l"
                    w(f"St[i, {j}] = {self._exp(f'(St[i, {j}] - Mu[1])')}")
                    w(f"Ls[l] = Ls[l] + St[i, {j}]")
            w(f"L[i] = L[i] * Alpha[i] + {tree('', [f'Ls[{lane}]' for lane in lanes])}")

    def _row_weights(self) -> None:
        """Sigmoid or an unnormalised pointwise map: ``St <- weight(St)``, masked scores weigh 0."""
        w, BN = self.w, self.s.block_n
        fills, weight = self._pointwise_weight("St[i, j]", "E[j]", BN)
        with w.block(f"for i in range({self.s.block_m}):"):
            for statement in (*fills, f"St[i, j] = {weight}"):
                with w.block(f"for j in T.vectorized({BN}):"):
                    w(statement)

    def _weighted_values(self, masked: str) -> None:
        """``Acc[i] = Alpha[i] Acc[i] + sum_j St[i, j] V[j]``: ``VC`` vectors of value features x
        ``BM`` rows per pass over the tile's keys."""
        s, w = self.s, self.w
        BM, Dv = s.block_m, s.Dv
        VC = _largest_divisor(Dv // LANES, ACCUMULATORS // BM)
        width = VC * LANES
        rescale = isinstance(self.norm, nodes.SoftmaxNorm)
        values = RegisterBlock.of("Or", ("i", BM), ("c", width))
        acc = f"Acc[i, d0 * {width} + c]"
        with w.block(f"for d0 in range({Dv // width}):"):
            values.declare(w)
            values.fill(w, f"{acc} * Alpha[i]" if rescale else acc)
            value = self._f32(f"V[{self._key('j', masked)}, d0 * {width} + c]", s.kv_type)
            values.accumulate(w, f"St[i, j] * {value}", ("j", "range", s.block_n))
            values.store(w, acc)


def _largest_divisor(n: int, most: int) -> int:
    """The largest divisor of ``n`` that is at most ``most`` (at least 1)."""
    return max(d for d in range(1, max(1, most) + 1) if n % d == 0)


__all__ = ["ACCUMULATORS", "LANES", "RowMajorForward", "config", "supports"]
