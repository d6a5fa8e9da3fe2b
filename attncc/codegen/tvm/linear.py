"""Linear attention kernels as TVMScript text: the causal chunked recurrence and the global form.

Why a module of its own: linear attention has no score tile, no block tables and no online
normalizer; its loop nest carries a ``D x Dv`` state across chunks. It shares with
``kernels.py`` the text builder, with ``register_block.py`` its products' register blocks and
with ``render.py`` the expression renderer.

Notation (``attncc.passes.lower_linear``, SEMANTICS.md ``Linear``; Lightning Attention-2,
Qin et al. 2024):

- ``phi`` the feature map, applied on load (float32); ``g = decay_h`` (1 without decay);
- ``C`` rows per chunk; query chunk ``c`` holds rows ``r0 = c * C ...`` with positions
  ``q0 = r0 + q_offset ...``, and reads the keys at the same positions ``[q0, q0 + C)``;
- state ``S = sum_{j < q0} g ** (q0 - 1 - j) phi(k_j) v_j^T`` (``D x Dv``) and normalizer
  state ``Z = sum_{j < q0} g ** (q0 - 1 - j) phi(k_j)`` (``D``), both float32;
- row ``i`` of the chunk: ``num_i = sum_{j <= i} g ** (i - j) (phi(q_i).phi(k_j)) v_j +
  g ** (i + 1) phi(q_i) S`` (``j < i`` for the strict mask), ``den_i`` the same with 1 for
  ``v_j`` and ``Z`` for ``S``; ``o_i = num_i / den_i`` (0 where ``den_i == 0``) or ``num_i``;
- a prefix pass folds the keys before ``q_offset`` into the state first (decoding).

One task per (batch, query head) walks its chunks in order (``T.parallel``); products are
register blocked, ``RI`` rows x ``VE`` value lanes and ``RI`` rows x ``VJ`` key lanes, with
the lanes vectorized. The global (unmasked) form runs two parallel loops: the state per
(batch, kv head) into a workspace, then ``phi(Q) S / phi(Q) Z`` per chunk of rows. Lengths,
batch and head counts are symbolic: one module serves every length.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from attncc.codegen.tvm.kernels import TORCH_TO_TIR, Lines, tree
from attncc.codegen.tvm.register_block import RegisterBlock
from attncc.codegen.tvm.render import Renderer, buffer_declaration, buffer_name, fast_exp, unsupported
from attncc.ir import nodes
from attncc.ir.expr import Expr, TensorSpec
from attncc.passes.plan import AttentionRegion

FEATURE_MAPS = ("elu1", "relu", "identity")
ZERO = "T.float32(0.0)"


@dataclass(frozen=True)
class LinearShape:
    """What the generated code is specialised on besides the region: dims, dtype, blocking."""

    D: int
    Dv: int
    dtype: str  # torch dtype name of q/k/v
    chunk: int = 64  # C, a multiple of ``vector``
    rows: int = 4  # RI
    vector: int = 16  # VJ; VE = gcd(Dv, vector)
    # rows in reversed time: position p of Q, K, V and O is row L - 1 - p of its tensor (the
    # backward's transposed products, linear_backward.py). NOTE: defined for LQ == LKV and
    # q_offset 0, the only way the backward runs it (its rows share one axis of positions)
    reverse: bool = False
    # the kernel also stores each row's denominator into a float32 [B, HQ, LQ] buffer after O
    # (with the normalizer): the backward reads it instead of running the kernel once more
    writes_den: bool = False


def kernel_chunk(lowering_chunk: int, vector: int = 16) -> int:
    """The plan's chunk when it tiles by whole vectors and stays in L1, else 64.

    NOTE: 32 ran 5-13% faster than the plan's 64 on the Zen 4 host (16 was slower still), but
    more of each sum then runs through the carried state: on the Lightning example (identity
    features, no normalizer, unscaled q; outputs up to 282) the largest error went from 0.83
    of SEMANTICS' float32 tolerance to 1.06, so the plan's chunk stays."""
    return lowering_chunk if lowering_chunk % vector == 0 and vector <= lowering_chunk <= 128 else 64


def linear_specs(region: AttentionRegion) -> tuple[TensorSpec, ...]:
    """Captured tensors the kernel reads (feature map loads, then the decay), its extra arguments."""
    norm = region.normalizer
    found: dict[TensorSpec, None] = {}
    if isinstance(norm.feature_map, Expr):
        found.update(dict.fromkeys(norm.feature_map.inputs()))
    if norm.decay is not None:
        found[norm.decay] = None
    return tuple(found)


def linear_checker(region: AttentionRegion) -> str | None:
    """Why this Linear region has no TVM kernel, or None."""
    if region.linear is None:
        return "linear attention with a mask that is neither absent nor causal (quadratic form) is not generated"
    if region.routing is not None or region.gate is not None or region.head_select is not None:
        return "routing with linear attention is not generated"
    feature = region.normalizer.feature_map
    if isinstance(feature, Expr):
        why = unsupported(feature)
        if why:
            return f"feature map: {why}"
        names = {node.arg for node in feature.walk() if node.op == "var"}
        if names - {"x"}:
            return f"feature map reads {sorted(names - {'x'})} (only x is defined)"
    elif feature not in FEATURE_MAPS:
        return f"feature map {feature!r}"
    decay = region.normalizer.decay
    if decay is not None and decay.dtype not in ("float32", "float16", "bfloat16"):
        return f"decay of dtype {decay.dtype}"
    return None


def render_linear(region: AttentionRegion, shape: LinearShape) -> str:
    """TVMScript source of ``attn`` for a region lowered to ``linear_chunked`` or ``linear_global``."""
    return _Linear(region, shape).render()


class _Linear:
    def __init__(self, region: AttentionRegion, shape: LinearShape) -> None:
        self.region, self.s = region, shape
        self.norm: nodes.LinearNorm = region.normalizer
        self.specs = linear_specs(region)
        self.decay = self.norm.decay is not None
        self.strict = region.linear.causal_strict
        self.RI = math.gcd(shape.rows, shape.chunk)
        self.RD = math.gcd(shape.rows, shape.D)
        self.VE = math.gcd(shape.Dv, shape.vector)
        self.VK = math.gcd(shape.D, shape.vector)
        self.writes_den = shape.writes_den and self.norm.normalize
        self.w = Lines()

    # ---- header ------------------------------------------------------------------------

    def render(self) -> str:
        s, w = self.s, self.w
        dt = TORCH_TO_TIR[s.dtype]
        glob = self.region.linear.strategy == "linear_global"
        w(f"# generated by attncc.codegen.tvm.linear ({self.region.linear.strategy})")
        w("@T.prim_func")
        ws = ", s_h: T.handle, z_h: T.handle" if glob else ""
        extra = "".join(f", x{i}: T.handle" for i in range(len(self.specs)))
        den = ", den_h: T.handle" if self.writes_den else ""
        w(f"def attn(q_h: T.handle, k_h: T.handle, v_h: T.handle, o_h: T.handle{den}{ws}{extra}, "
          "q_offset: T.int32):")
        with w:
            w('T.func_attr({"global_symbol": "attn", "tirx.noalias": True})')
            for name in ("B", "HQ", "HKV", "LQ", "LKV"):
                w(f"{name} = T.int32()")
            w(f'Q = T.match_buffer(q_h, (B, HQ, LQ, {s.D}), "{dt}")')
            w(f'K = T.match_buffer(k_h, (B, HKV, LKV, {s.D}), "{dt}")')
            w(f'V = T.match_buffer(v_h, (B, HKV, LKV, {s.Dv}), "{dt}")')
            w(f'O = T.match_buffer(o_h, (B, HQ, LQ, {s.Dv}), "{dt}")')
            if self.writes_den:
                w('DEN = T.match_buffer(den_h, (B, HQ, LQ), "float32")')
            if glob:
                w(f'WS = T.match_buffer(s_h, (B, HKV, {s.D}, {s.Dv}), "float32")')
                w(f'WZ = T.match_buffer(z_h, (B, HKV, {s.D}), "float32")')
            for i, spec in enumerate(self.specs):
                w(buffer_declaration(i, spec))
            if glob:
                self._global()
            else:
                self._chunked()
        return w.text()

    # ---- the two schedules -------------------------------------------------------------

    def _chunked(self) -> None:
        s, w, C = self.s, self.w, self.s.chunk
        with w.block("for task in T.parallel(B * HQ):"):
            w("b = task // HQ")
            w("h = task % HQ")
            w("hk = h // (HQ // HKV)")
            self._declare(queries=True, keys=True)
            w(f'S = T.decl_buffer(({s.D}, {s.Dv}), "float32")')
            if self.norm.normalize:
                w(f'Z = T.decl_buffer(({s.D},), "float32")')
            self._zero_state()
            if self.decay:
                self._decay_tables()
            w("P = T.min(q_offset, LKV)")
            with w.block(f"for p in range((P + {C - 1}) // {C}):"):
                w(f"t = p * {C}")
                w(f"n = T.min({C}, P - t)")
                self._load_keys("t", "n")
                self._update_state("n")
            if self.decay:
                with w.block("if q_offset > P:"):
                    self._scale_state('T.pow(g, T.Cast("float32", q_offset - P))')
            w(f"NC = (LQ + {C - 1}) // {C}")
            with w.block("for c in range(NC):"):
                w(f"r0 = c * {C}")
                w("q0 = r0 + q_offset")
                self._load_queries("r0")
                self._load_keys("q0", str(C))
                self._intra()
                if self.norm.normalize:
                    self._denominators()
                self._outputs()
                with w.block("if c < NC - 1:"):
                    self._update_state(str(C))

    def _global(self) -> None:
        w, C = self.w, self.s.chunk
        with w.block("for task in T.parallel(B * HKV):"):
            w("b = task // HKV")
            w("hk = task % HKV")
            self._declare(queries=False, keys=True)
            self._zero_state()
            with w.block(f"for p in range((LKV + {C - 1}) // {C}):"):
                w(f"t = p * {C}")
                w(f"n = T.min({C}, LKV - t)")
                self._load_keys("t", "n")
                self._update_state("n")
        w(f"NQ = (LQ + {C - 1}) // {C}")
        with w.block("for task in T.parallel(B * HQ * NQ):"):
            w("b = task // (HQ * NQ)")
            w("h = task // NQ % HQ")
            w("hk = h // (HQ // HKV)")
            w(f"r0 = task % NQ * {C}")
            self._declare(queries=True, keys=False)
            self._load_queries("r0")
            if self.norm.normalize:
                self._denominators()
            self._outputs()

    # ---- pieces ------------------------------------------------------------------------

    def _S(self, d: str, e: str) -> str:
        return f"WS[b, hk, {d}, {e}]" if self.region.linear.strategy == "linear_global" else f"S[{d}, {e}]"

    def _Z(self, d: str) -> str:
        return f"WZ[b, hk, {d}]" if self.region.linear.strategy == "linear_global" else f"Z[{d}]"

    def _declare(self, queries: bool, keys: bool) -> None:
        s, w, C = self.s, self.w, self.s.chunk
        if queries:
            w(f'Fq = T.decl_buffer(({C}, {s.D}), "float32")')
            w(f'Inv = T.decl_buffer(({C},), "float32")')
            if self.decay:
                w(f'FqC = T.decl_buffer(({C}, {s.D}), "float32")')
        if keys:
            w(f'Fk = T.decl_buffer(({C}, {s.D}), "float32")')
            w(f'FkT = T.decl_buffer(({s.D}, {C}), "float32")')
            w(f'Vc = T.decl_buffer(({C}, {s.Dv}), "float32")')
            if self.decay:
                w(f'FkW = T.decl_buffer(({s.D}, {C}), "float32")')
        if queries and keys:
            w(f'A = T.decl_buffer(({C}, {C}), "float32")')

    def _zero_state(self) -> None:
        s, w = self.s, self.w
        with w.block(f"for d in range({s.D}):"):
            with w.block(f"for e in T.vectorized({s.Dv}):"):
                w(f"{self._S('d', 'e')} = {ZERO}")
            if self.norm.normalize:
                w(f"{self._Z('d')} = {ZERO}")

    def _decay_tables(self) -> None:
        """``Pw[n] = g ** n`` for ``n <= C`` and the masked intra-chunk decay ``Dm[i, j]``."""
        w, C = self.w, self.s.chunk
        spec = self.norm.decay
        value = f"{buffer_name(spec, self.specs)}[h]"
        w(f"g = {value}" if spec.dtype == "float32" else f'g = T.Cast("float32", {value})')
        w(f'Pw = T.decl_buffer(({C + 1},), "float32")')
        w(f'Dm = T.decl_buffer(({C}, {C}), "float32")')
        with w.block(f"for n in range({C + 1}):"):
            w('Pw[n] = T.pow(g, T.Cast("float32", n))')
        with w.block(f"for i in range({C}):"):
            with w.block(f"for j in range({C}):"):
                w(f"Dm[i, j] = T.if_then_else({self._visible('i', 'j')}, Pw[T.max(i - j, 0)], {ZERO})")

    def _visible(self, i: str, j: str) -> str:
        return f"{j} < {i}" if self.strict else f"{j} <= {i}"

    def _scale_state(self, factor: str) -> None:
        s, w = self.s, self.w
        w(f"gap = {factor}")
        with w.block(f"for d in range({s.D}):"):
            with w.block(f"for e in T.vectorized({s.Dv}):"):
                w(f"{self._S('d', 'e')} = {self._S('d', 'e')} * gap")
            if self.norm.normalize:
                w(f"{self._Z('d')} = {self._Z('d')} * gap")

    def _f32(self, access: str) -> str:
        return access if self.s.dtype == "float32" else f'T.Cast("float32", {access})'

    def _phi(self, x: str) -> str:
        feature = self.norm.feature_map
        if feature == "elu1":  # elu(x) + 1 = exp(x) for x <= 0
            return f"T.if_then_else({x} > {ZERO}, {x} + T.float32(1.0), {fast_exp(x)})"
        if feature == "relu":
            return f"T.max({x}, {ZERO})"
        if feature == "identity":
            return x
        return Renderer({"x": x}, self.specs)(feature)

    def _row(self, position: str, length: str) -> str:
        """The tensor row of a sequence position (``LinearShape.reverse``)."""
        return f"{length} - 1 - ({position})" if self.s.reverse else position

    def _load_queries(self, r0: str) -> None:
        s, w, C = self.s, self.w, self.s.chunk
        row = self._row(f"T.min({r0} + i, LQ - 1)", "LQ")
        with w.block(f"for i in range({C}):"):
            with w.block(f"for d in T.vectorized({s.D}):"):
                w(f"Fq[i, d] = {self._phi(self._f32(f'Q[b, h, {row}, d]'))}")
            if self.decay:  # the carried state reaches row i decayed by g ** (i + 1)
                with w.block(f"for d in T.vectorized({s.D}):"):
                    w("FqC[i, d] = Fq[i, d] * Pw[i + 1]")

    def _load_keys(self, t: str, n: str) -> None:
        """Keys ``[t, t + n)`` (those below ``LKV``) as ``phi(K)`` rows, ``phi(K)^T`` and ``V``;
        the others are zero. With decay, ``FkW[:, j] = g ** (n - 1 - j) phi(k_j)``."""
        s, w, C = self.s, self.w, self.s.chunk
        with w.block(f"for jj in range({C}):"):
            w(f"kc = {self._row(f'T.min({t} + jj, LKV - 1)', 'LKV')}")
            w(f"ok = T.And(jj < {n}, {t} + jj < LKV)")
            with w.block(f"for d in T.vectorized({s.D}):"):
                w(f"Fk[jj, d] = T.if_then_else(ok, {self._phi(self._f32('K[b, hk, kc, d]'))}, {ZERO})")
            with w.block(f"for e in T.vectorized({s.Dv}):"):
                w(f"Vc[jj, e] = T.if_then_else(ok, {self._f32('V[b, hk, kc, e]')}, {ZERO})")
        with w.block(f"for d in range({s.D}):"):
            with w.block(f"for jj in range({C}):"):
                w("FkT[d, jj] = Fk[jj, d]")
                if self.decay:
                    w(f"FkW[d, jj] = Fk[jj, d] * Pw[T.max({n} - 1 - jj, 0)]")

    def _update_state(self, n: str) -> None:
        """``S = g ** n S + FkW Vc`` and ``Z = g ** n Z + FkW 1`` (register blocked)."""
        s, w, C, RD, VE, VJ = self.s, self.w, self.s.chunk, self.RD, self.VE, self.s.vector
        keys = "FkW" if self.decay else "FkT"
        keep = f" * Pw[{n}]" if self.decay else ""
        state = RegisterBlock.of("Sr", ("d1", RD), ("e1", VE))
        d, e = f"d0 * {RD} + d1", f"e0 * {VE} + e1"
        with w.block(f"for d0 in range({s.D // RD}):"):
            with w.block(f"for e0 in range({s.Dv // VE}):"):
                state.declare(w)
                state.fill(w, f"{self._S(d, e)}{keep}")
                state.accumulate(w, f"{keys}[{d}, j] * Vc[j, {e}]", ("j", "range", C))
                state.store(w, self._S(d, e))
        if not self.norm.normalize:
            return
        with w.block(f"for d in range({s.D}):"):
            w(f'Zv = T.decl_buffer(({VJ},), "float32", scope="local")')
            with w.block(f"for j1 in T.vectorized({VJ}):"):
                w(f"Zv[j1] = {ZERO}")
            with w.block(f"for j0 in range({C // VJ}):"):
                with w.block(f"for j1 in T.vectorized({VJ}):"):
                    w(f"Zv[j1] = Zv[j1] + {keys}[d, j0 * {VJ} + j1]")
            w(f"{self._Z('d')} = {self._Z('d')}{keep} + {tree('', [f'Zv[{n}]' for n in range(VJ)])}")

    def _intra(self) -> None:
        """``A = (Fq FkT) * mask * decay`` in ``RI x VJ`` register blocks; tiles entirely above
        the diagonal are zero without a product."""
        s, w, C, RI, VJ = self.s, self.w, self.s.chunk, self.RI, self.s.vector
        i, j = f"(i0 * {RI} + i1)", f"(j0 * {VJ} + j1)"
        weighted = (
            f"Ar[i1, j1] * Dm[{i}, {j}]"
            if self.decay
            else (f"T.if_then_else({self._visible(i, j)}, Ar[i1, j1], {ZERO})")
        )
        scores = RegisterBlock.of("Ar", ("i1", RI), ("j1", VJ))
        with w.block(f"for i0 in range({C // RI}):"):
            with w.block(f"for j0 in range({C // VJ}):"):
                with w.block(f"if j0 * {VJ} < i0 * {RI} + {RI}:"):
                    scores.declare(w)
                    scores.fill(w, ZERO)
                    scores.accumulate(w, f"Fq[{i}, d] * FkT[d, {j}]", ("d", "range", s.D))
                    with scores.each(w):
                        w(f"A[{i}, {j}] = {weighted}")
                with w.block("else:"):
                    with scores.each(w):
                        w(f"A[{i}, {j}] = {ZERO}")

    def _carried(self) -> str:
        return "FqC" if self.decay else "Fq"

    def _denominators(self) -> None:
        """``Inv[i] = 1 / den_i`` (0 where ``den_i == 0``), ``den_i = sum_j A[i, j] + FqC[i] . Z``."""
        s, w, C, VJ, VK = self.s, self.w, self.s.chunk, self.s.vector, self.VK
        chunked = self.region.linear.strategy == "linear_chunked"
        with w.block(f"for i in range({C}):"):
            w(f'Dl = T.decl_buffer(({VJ},), "float32", scope="local")')
            w(f'Zl = T.decl_buffer(({VK},), "float32", scope="local")')
            with w.block(f"for j1 in T.vectorized({VJ}):"):
                w(f"Dl[j1] = {ZERO}")
            with w.block(f"for d1 in T.vectorized({VK}):"):
                w(f"Zl[d1] = {ZERO}")
            if chunked:
                with w.block(f"for j0 in range({C // VJ}):"):
                    with w.block(f"for j1 in T.vectorized({VJ}):"):
                        w(f"Dl[j1] = Dl[j1] + A[i, j0 * {VJ} + j1]")
            with w.block(f"for d0 in range({s.D // VK}):"):
                with w.block(f"for d1 in T.vectorized({VK}):"):
                    w(f"Zl[d1] = Zl[d1] + {self._carried()}[i, d0 * {VK} + d1] * {self._Z(f'd0 * {VK} + d1')}")
            w(f"den = {tree('', [f'Dl[{n}]' for n in range(VJ)])} + {tree('', [f'Zl[{n}]' for n in range(VK)])}")
            if self.writes_den:
                with w.block("if r0 + i < LQ:"):
                    w(f"DEN[b, h, {self._row('r0 + i', 'LQ')}] = den")
            w(
                f"Inv[i] = T.if_then_else(den != {ZERO}, T.float32(1.0) / T.if_then_else(den != {ZERO}, den, "
                f"T.float32(1.0)), {ZERO})"
            )

    def _outputs(self) -> None:
        """``O = (A Vc + FqC S) * Inv`` in ``RI x VE`` register blocks, rows below ``LQ`` stored."""
        s, w, C, RI, VE = self.s, self.w, self.s.chunk, self.RI, self.VE
        chunked = self.region.linear.strategy == "linear_chunked"
        out_dt = TORCH_TO_TIR[s.dtype]
        i, e = f"i0 * {RI} + i1", f"e0 * {VE} + e1"
        outputs = RegisterBlock.of("Or", ("i1", RI), ("e1", VE))
        with w.block(f"for i0 in range({C // RI}):"):
            with w.block(f"for e0 in range({s.Dv // VE}):"):
                outputs.declare(w)
                outputs.fill(w, ZERO)
                if chunked:  # A is zero right of the diagonal block
                    outputs.accumulate(w, f"A[{i}, j] * Vc[j, {e}]", ("j", "range", f"i0 * {RI} + {RI}"))
                outputs.accumulate(w, f"{self._carried()}[{i}, d] * {self._S('d', e)}", ("d", "range", s.D))
                with w.block(f"for i1 in T.unroll({RI}):"):
                    with w.block(f"if r0 + {i} < LQ:"):
                        with w.block(f"for e1 in T.vectorized({VE}):"):
                            value = f"Or[i1, e1] * Inv[{i}]" if self.norm.normalize else "Or[i1, e1]"
                            cast = value if out_dt == "float32" else f"T.Cast({out_dt!r}, {value})"
                            w(f"O[b, h, {self._row(f'r0 + {i}', 'LQ')}, {e}] = {cast}")
