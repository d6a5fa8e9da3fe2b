"""The forward kernel skeleton, filled from one attention region (TVMScript text).

Notation (FlexAttention's template, on a CPU):

- one task per (batch ``b``, query head ``h``, query tile ``qt`` of ``BM`` rows), run by
  ``T.parallel`` in the order of the task table ``TO`` (balanced work per thread); the kv head
  is ``hk = h // (HQ // HKV)`` (GQA / MQA);
- a task walks kv tiles of ``BN`` keys listed in the block tables: PARTIAL tiles evaluate
  the mask and the ``kv < LKV`` bound, FULL tiles neither (a ragged last tile is listed as
  PARTIAL, ``schedule.ragged_tile_partial``), EMPTY tiles are never listed (two loops);
- per tile: ``St = K_tile (scale * Q_tile)^T`` (with pair dots the scale goes on the sums), the
  score tile stored key-major (``St[j, i]``),
  in register blocks of ``R`` keys x ``V`` query rows; then the score function and mask
  elementwise (masked -> ``-inf``; plain softmax keeps scores in base 2, ``_base2``), then the
  normalizer's update (softmax and stick-breaking exponentials by ``vector_exp`` on AVX-512
  hosts), then
  ``Acc += P V_tile`` in
  register blocks of ``R`` rows x ``VD`` value columns;
- sequence lengths, batch and head counts are symbolic: one module serves every length.

Why key-major: a SIMD vector holds ``V`` query rows, so a row's max, sum or stick-breaking
suffix sum is a vertical vector operation over keys (no horizontal reductions), and the
product reads K in its own row-major layout (one broadcast per key and feature).

Tuning knobs (``space.py``): ``block_m``, ``block_n``, ``rows`` (R), ``vector`` (V, VD).
Inputs of any float dtype are converted to float32 on load (K and V a tile at a time into
compact buffers, ``_reads``, or once per call by the launcher, ``KernelShape.kv_dtype``);
accumulation is float32. bfloat16 on a host with AVX-512 BF16, in the default register blocks,
is multiplied by pairs instead, nothing converted (``KernelShape.pair_dots``,
``forward.uses_pair_dots``, ``bf16_pairs``).
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Iterator
from dataclasses import dataclass

from attncc.codegen.call_ranges import region_exprs
from attncc.codegen.tvm import bf16_pairs, llvm_import, vector_exp
from attncc.codegen.tvm.memo import by_value
from attncc.codegen.tvm.register_block import RegisterBlock
from attncc.codegen.tvm.render import (
    LN2,
    LOG2E,
    Renderer,
    _sigmoid,
    buffer_declaration,
    buffer_name,
    fast_exp,
    fast_exp2_nonpositive,
    fast_exp_nonpositive,
    fast_log1p,
    softplus_steps,
)
from attncc.ir import expr as ex
from attncc.ir import nodes
from attncc.ir.expr import Expr, TensorSpec
from attncc.passes.halfplanes import halfplane_conjuncts, only_halfplanes
from attncc.passes.plan import AttentionRegion

NEG_INF = 'T.float32("-inf")'
TORCH_TO_TIR = {"float32": "float32", "float16": "float16", "bfloat16": "bfloat16"}


@dataclass(frozen=True)
class KernelShape:
    """What the generated code is specialised on besides the region: dims, dtype, knobs."""

    D: int
    Dv: int
    dtype: str  # torch dtype name of q and o (and of K and V unless ``kv_dtype`` says otherwise)
    block_m: int
    block_n: int
    rows: int
    vector: int
    group: int = 1  # > 1: the query heads of a GQA group share a tile's rows (see packing.py)
    # True: the keys come in chunks (split-KV decoding, decode.py): task batch ``b`` reads K and V
    # at batch ``b // KS``, keys from ``(b % KS) * KC`` (two more int arguments, KS and KC), so the
    # chunks need no copy of the cache folded into the batch
    kv_chunks: bool = False
    # "key_major": this module's kernel; "row_major": few query rows (decoding, decode_kernel.py)
    layout: str = "key_major"
    # K and V's dtype where it is not ``dtype``: "float32" when the launcher converted float16 /
    # bfloat16 keys and values up front (``forward.converts_kv_up_front``); the cache's own
    # float16 / bfloat16 when a decoding step's float32 query rows read it in place (``forward._kv_type``)
    kv_dtype: str = ""
    # > 0: Q tiles are transposed in registers, blocks of this many rows and features at a time
    # (``KeyMajorForward._shuffle_q``); 0: by strided reads
    transpose_lanes: int = 0
    # True: bfloat16 products by pairs (``bf16_pairs``): Q and K arrive as float32 words of feature
    # pairs, V as words of key pairs (``launcher.key_pairs``); nothing is converted to float32
    pair_dots: bool = False
    # True: softmax and stick-breaking exponentials by AVX-512's vreduceps / vscalefps, a vector
    # of 16 rows at a time (``vector_exp``); False: the portable polynomials
    # (``render.fast_exp2_nonpositive``, ``fast_exp_nonpositive`` in base e, ``fast_exp``)
    vector_exp: bool = False

    @property
    def fits_pair_dots(self) -> bool:
        """Whether these knobs can multiply by bfloat16 pairs: the key-major kernel without chunked
        keys (read in place from a cache with any strides), vectors of 16 rows, even rows, keys
        and features, whole vectors of value columns."""
        n = bf16_pairs.LANES
        return (self.layout == "key_major" and not self.kv_chunks and self.vector == n and self.block_m % n == 0
                and self.rows % 2 == 0 and self.block_n % 2 == 0 and self.D % 2 == 0 and self.Dv % n == 0)

    @property
    def fits_vector_exp(self) -> bool:
        """Whether these knobs can take ``vector_exp``: the key-major kernel, vectors of 16 rows."""
        return self.layout == "key_major" and self.vector == llvm_import.LANES

    @property
    def kv_type(self) -> str:
        """The torch dtype name K and V arrive in."""
        return self.kv_dtype or self.dtype


@by_value(maxsize=256)
def captured_specs(region: AttentionRegion) -> tuple[TensorSpec, ...]:
    """Captured tensors the kernel reads through loads, in a fixed order (its extra arguments).
    Memoized per region: walking its expressions cost about 9 us of every launch."""
    found: dict[TensorSpec, None] = {}
    for expr in region_exprs(region):
        found.update(dict.fromkeys(expr.inputs()))
    sink = getattr(region.normalizer, "sink", None)
    if sink is not None:
        found[sink] = None
    return tuple(found)


def is_plain_softplus(norm: object) -> bool:
    """A pointwise normalizer that is softplus of the score itself (``render.softplus_steps``)."""
    return isinstance(norm, nodes.PointwiseNorm) and norm.phi.op == "softplus" and norm.phi.src[0].op == "var"


def tree(fn: str, terms: list[str]) -> str:
    """A balanced reduction of ``terms`` by ``fn`` (``""``: +) as one expression, so that a row
    reduction does not round-trip through memory once per lane."""
    while len(terms) > 1:
        pairs = [terms[i : i + 2] for i in range(0, len(terms), 2)]
        terms = [(f"{fn}({p[0]}, {p[1]})" if fn else f"({p[0]} + {p[1]})") if len(p) == 2 else p[0] for p in pairs]
    return terms[0]


def shuffle_transpose(a: str, b: str, n: int) -> tuple[list[str], str]:
    """Statements that transpose the ``n x n`` local buffer ``a`` (``n`` a power of two) with
    two-vector shuffles, ping-ponging with ``b``, and the buffer left holding the result.

    Stage ``h`` (``n/2, n/4, ..., 1``) swaps the off-diagonal ``h x h`` blocks of every
    ``2h x 2h`` block: rows ``r`` and ``r + h`` exchange their halves, one shuffle each. After
    ``log2 n`` stages every element sits transposed; LLVM turns each shuffle into one or two
    permute instructions (a strided gather is a load per element)."""
    lines, src, dst, h = [], a, b, n // 2

    def row(buf: str, r: int) -> str:
        return f"{buf}[{r}, T.Ramp(0, 1, {n})]"

    while h >= 1:
        for r in (r for r in range(n) if not r & h):
            low = ", ".join(str(c if not c & h else n + c - h) for c in range(n))
            high = ", ".join(str(c + h if not c & h else n + c) for c in range(n))
            pair = f"[{row(src, r)}, {row(src, r + h)}]"
            lines.append(f"{row(dst, r)} = T.Shuffle({pair}, [{low}])")
            lines.append(f"{row(dst, r + h)} = T.Shuffle({pair}, [{high}])")
        src, dst, h = dst, src, h // 2
    return lines, src


class Lines:
    """An indented text builder (the dispatch printer's ``indented()``, minimal)."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.depth = 0

    def __call__(self, text: str) -> None:
        self.lines.append("    " * self.depth + text)

    def block(self, header: str) -> Lines:
        self(header)
        return self

    def __enter__(self) -> Lines:
        self.depth += 1
        return self

    def __exit__(self, *exc: object) -> None:
        self.depth -= 1

    def text(self) -> str:
        return "\n".join(self.lines) + "\n"


EXP_KEYS = 4
TASK_TABLE = 'TO = T.match_buffer(to_h, (NS,), "int32")'


@contextlib.contextmanager
def task_loop(w: Lines) -> Iterator[None]:
    """``T.parallel`` over the slots of the task table ``TO``; the body sees ``task``.

    Why a table: TVM hands each thread one contiguous run of a parallel loop, with no
    stealing, so row-major tasks leave a causal or document mask's threads unequally loaded.
    ``schedule.balanced_order`` lays the tasks out so that the runs carry equal work; -1 pads
    to whole runs.
    """
    with w.block("for slot in T.parallel(NS):"):
        w("task = TO[slot]")
        with w.block("if task >= 0:"):
            yield


_RENDERED: dict[tuple[AttentionRegion, KernelShape], str] = {}


def render_forward(region: AttentionRegion, shape: KernelShape) -> str:
    """TVMScript source of the forward kernel ``attn`` for ``region`` at ``shape``.

    Memoized: a call renders once per (region, shape), not once per kernel launch (rendering
    costs about a millisecond, the whole launch of a small problem).
    """
    try:
        return _RENDERED[region, shape]
    except TypeError:  # a payload that does not hash: render every time
        return _renderer(shape)(region, shape).render()
    except KeyError:
        source = _RENDERED[region, shape] = _renderer(shape)(region, shape).render()
        return source


def _renderer(shape: KernelShape) -> type[KeyMajorForward]:
    if shape.layout == "row_major":
        from attncc.codegen.tvm.decode_kernel import RowMajorForward

        return RowMajorForward
    return KeyMajorForward


class KeyMajorForward:
    def __init__(self, region: AttentionRegion, shape: KernelShape) -> None:
        self.region = region
        self.s = shape
        self.norm = region.normalizer
        self.specs = captured_specs(region)
        self.w = Lines()
        self._masked = "True"
        if shape.pair_dots and not shape.fits_pair_dots:
            raise ValueError(f"pair dots need the key-major kernel without chunked keys, vector "
                             f"{bf16_pairs.LANES}, even rows, keys and features, whole vectors of values; got {shape}")
        if shape.vector_exp and not shape.fits_vector_exp:
            raise ValueError(f"vector exponentials need the key-major kernel with vector {llvm_import.LANES}; "
                             f"got {shape}")
        self._tile_reads = "staged"

    # ---- the pieces of the kernel, in source order ----------------------------------

    def render(self) -> str:
        s, w = self.s, self.w
        dt = TORCH_TO_TIR[s.dtype]
        w("# generated by attncc.codegen.tvm.kernels")
        w("@T.prim_func")
        extra = "".join(f", x{i}: T.handle" for i in range(len(self.specs)))
        chunks = ", KS: T.int32, KC: T.int32" if s.kv_chunks else ""
        w(f"def attn(q_h: T.handle, k_h: T.handle, v_h: T.handle, o_h: T.handle, lse_h: T.handle, "
          f"pc_h: T.handle, pi_h: T.handle, fc_h: T.handle, fi_h: T.handle, to_h: T.handle{extra}, "
          f"scale: T.float32, q_offset: T.int32, bias: T.float32, LKV: T.int32{chunks}):")
        with w:
            w('T.func_attr({"global_symbol": "attn", "tirx.noalias": True})')
            for name in ("B", "HQ", "HKV", "LQ", "LKP", "TB", "TH", "NQ", "MP", "MF", "NS", *(["BK"] * s.kv_chunks)):
                w(f"{name} = T.int32()")
            words = '"float32"'  # pair dots: bfloat16 pairs as 32-bit words
            w(f'Q = T.match_buffer(q_h, (B, HQ, LQ, {s.D // 2}), {words})' if s.pair_dots else
              f'Q = T.match_buffer(q_h, (B, HQ, LQ, {s.D}), "{dt}")')
            if s.kv_chunks:  # a decoding step reads a slice of a preallocated cache as it is (strided)
                w("KS0, KS1, KS2, VS0, VS1, VS2 = T.int32(), T.int32(), T.int32(), T.int32(), T.int32(), T.int32()")
                kv = TORCH_TO_TIR[s.kv_type]
                w(f'K = T.match_buffer(k_h, (BK, HKV, LKP, {s.D}), "{kv}", strides=(KS0, KS1, KS2, 1))')
                w(f'V = T.match_buffer(v_h, (BK, HKV, LKP, {s.Dv}), "{kv}", strides=(VS0, VS1, VS2, 1))')
            elif s.pair_dots:
                w("LVP = T.int32()")
                w(f'K = T.match_buffer(k_h, (B, HKV, LKP, {s.D // 2}), {words})')
                w(f'V = T.match_buffer(v_h, (B, HKV, LVP, {s.Dv}), {words})')
            else:
                kv = TORCH_TO_TIR[s.kv_type]
                w(f'K = T.match_buffer(k_h, (B, HKV, LKP, {s.D}), "{kv}")')
                w(f'V = T.match_buffer(v_h, (B, HKV, LKP, {s.Dv}), "{kv}")')
            w(f'O = T.match_buffer(o_h, (B, HQ, LQ, {s.Dv}), "{dt}")')
            w('LSE = T.match_buffer(lse_h, (B, HQ, LQ), "float32")')
            w('PC = T.match_buffer(pc_h, (TB, TH, NQ), "int32")')
            w('PI = T.match_buffer(pi_h, (TB, TH, NQ, MP), "int32")')
            w('FC = T.match_buffer(fc_h, (TB, TH, NQ), "int32")')
            w('FI = T.match_buffer(fi_h, (TB, TH, NQ, MF), "int32")')
            w(TASK_TABLE)
            for i, spec in enumerate(self.specs):
                w(buffer_declaration(i, spec))
            with contextlib.ExitStack() as imports:
                if s.pair_dots:
                    imports.enter_context(w.block(bf16_pairs.import_statement()))
                if s.vector_exp and isinstance(self.norm, nodes.SoftmaxNorm | nodes.StickBreakingNorm):
                    imports.enter_context(w.block(vector_exp.import_statement()))
                with task_loop(w):
                    self._task()
        return w.text()

    def _task(self) -> None:
        s, w = self.s, self.w
        BM, BN, D, Dv = s.block_m, s.block_n, s.D, s.Dv
        G = s.group
        self._task_indices()
        if G > 1:  # row r of the packed rows is query r // G of head hk * G + r % G
            w(f'HI = T.decl_buffer(({BM},), "int32")')
            w(f'QI = T.decl_buffer(({BM},), "int32")')
            with w.block(f"for i in range({BM}):"):
                w(f"HI[i] = hk * {G} + (q0 + i) % {G}")
                w(f"QI[i] = T.min((q0 + i) // {G}, LQ - 1)")
        w(f'QT = T.decl_buffer(({self._q_width}, {BM}), "float32")')
        w(f'St = T.decl_buffer(({BN}, {BM}), "float32")')
        if s.pair_dots:
            w(f'Pw = T.decl_buffer(({BN // 2}, {BM}), "float32")')
        if self._staged:
            w(f'Kf = T.decl_buffer(({BN}, {D}), "float32")')
            w(f'Vf = T.decl_buffer(({BN}, {Dv}), "float32")')
        w(f'Acc = T.decl_buffer(({BM}, {Dv}), "float32")')
        w(f'M = T.decl_buffer(({BM},), "float32")')
        w(f'L = T.decl_buffer(({BM},), "float32")')
        w(f'Alpha = T.decl_buffer(({BM},), "float32")')
        if self._folds_max:
            w(f'Mn = T.decl_buffer(({BM},), "float32")')
        self._transpose_q()
        with w.block(f"for i in T.vectorized({BM}):"):
            w(f"M[i] = {NEG_INF}")
            w("L[i] = T.float32(0.0)")
        with w.block(f"for i in range({BM}):"):
            with w.block(f"for d in T.vectorized({Dv}):"):
                w("Acc[i, d] = T.float32(0.0)")
        if isinstance(self.norm, nodes.StickBreakingNorm):
            self._descending_tiles()
        else:
            with w.block("for n in range(FC[tb, th, qt]):"):
                w("kt = FI[tb, th, qt, n]")
                w(f"kv0 = kt * {BN}")
                self._tile(masked="False")
            with w.block("for n in range(PC[tb, th, qt]):"):
                w("kt = PI[tb, th, qt, n]")
                w(f"kv0 = kt * {BN}")
                with w.block("if n + 1 < PC[tb, th, qt]:"):
                    self._prefetch_tile("PI[tb, th, qt, n + 1]")
                self._tile(masked="True")
        self._finish()

    def _prefetch_tile(self, tile: str) -> None:
        """Ask for kv tile ``tile``'s K and V rows (into L2, one request per 64-byte line) while
        the current tile computes. Given to PARTIAL tiles only, for the next one in the list: a
        sliding window's diagonal tile is the one tile no earlier task has read, and fetched on
        first touch it cost 0.3-0.5 us of 8.2 (window 256, L=8192); the FULL tiles before it are
        in cache, and prefetching theirs made causal L=2048 1% slower."""
        s, w = self.s, self.w
        w(f"pk0 = {tile} * {s.block_n}")
        if s.pair_dots:  # words: K rows of D / 2, V rows of key pairs
            per_line = 16
            layouts = (("K", s.D // 2, s.block_n, "pk0", "LKP"), ("V", s.Dv, s.block_n // 2, "pk0 // 2", "LVP"))
        else:
            per_line = 64 // (2 if s.kv_type in ("float16", "bfloat16") else 4)
            layouts = (("K", s.D, s.block_n, "pk0", "LKP"), ("V", s.Dv, s.block_n, "pk0", "LKP"))
        for buf, width, rows, start, length in layouts:
            with w.block(f"for j in range({rows}):"):
                for c in range(0, width, per_line):
                    line = f"T.address_of({buf}[{self._key_row('j', clamp=True, start=start, rows=length)}, {c}])"
                    w(f'T.evaluate(T.call_llvm_intrin("void", "llvm.prefetch.p0", {line}, 0, 2, 1))')

    def _task_indices(self) -> None:
        """The task's batch, heads, query tile and first row (``q0``), the tables' broadcast
        indices, and with chunked keys the batch and first key its K and V are read at."""
        s, w = self.s, self.w
        if s.group == 1:
            w("b = task // (HQ * NQ)")
            w("h = task // NQ % HQ")
            w("qt = task % NQ")
            w("hk = h // (HQ // HKV)")
            w("th = T.min(h, TH - 1)")
        else:
            w("b = task // (HKV * NQ)")
            w("hk = task // NQ % HKV")
            w("qt = task % NQ")
            w("th = T.min(hk, TH - 1)")
        w("tb = T.min(b, TB - 1)")
        if s.kv_chunks:
            w("kb = b // KS")
            w("ko = b % KS * KC")
        w(f"q0 = qt * {s.block_m}")

    def _transpose_q(self) -> None:
        """``QT = scale * Q_tile^T`` (pair dots: ``Q_tile^T`` as words, bit copies) in two steps: the
        rows copied (contiguous, vectorized) into
        ``Qs``, then transposed between two buffers of fixed strides. Read straight from ``Q``
        (symbolic strides, a clamped row per element), the transposition took 2.8 us of a
        task's 4 us outside its tiles (window L=2048, 8 heads, 1 thread: 2-3% of the call).
        With ``transpose_lanes``, the second step goes through registers (``_shuffle_q``)."""
        s, w = self.s, self.w
        BM, D = s.block_m, self._q_width
        w(f'Qs = T.decl_buffer(({BM}, {D}), "float32")')
        with w.block(f"for i in range({BM}):"):
            head, row = self._row("i")
            with w.block(f"for d in T.vectorized({D}):"):
                read = f"Q[b, {head}, T.min({row}, LQ - 1), d]"
                w(f"Qs[i, d] = {read if s.pair_dots else f'{self._f32(read)} * {self._q_scale}'}")
        n = s.transpose_lanes
        if n and BM % n == 0 and D % n == 0:
            self._shuffle_q(n)
            return
        U = math.gcd(BM, 8)  # vectors of U rows: a strided read of U floats, one vector store
        with w.block(f"for i0 in range({BM // U}):"):
            with w.block(f"for d in range({D}):"):
                with w.block(f"for i1 in T.vectorized({U}):"):
                    w(f"QT[d, i0 * {U} + i1] = Qs[i0 * {U} + i1, d]")

    def _shuffle_q(self, n: int) -> None:
        """``QT = Qs^T`` a block of ``n`` rows x ``n`` features at a time: rows read as vectors into
        ``Qa``, transposed by ``shuffle_transpose``, stored as vectors of ``QT``. On AVX-512 with
        blocks of 8, a 64 x 64 transposition cost 0.06 us more than a plain copy, against 0.45
        by strided reads; reading ``Q`` itself in such blocks, instead of ``Qs``, was slower
        (per task of a window at L=8192: 4.9-5.3 us against 3.7-4.3)."""
        s, w = self.s, self.w
        with w.block(f"for i0 in range({s.block_m // n}):"), w.block(f"for d0 in range({self._q_width // n}):"):
            w(f'Qa = T.decl_buffer(({n}, {n}), "float32", scope="local")')
            w(f'Qb = T.decl_buffer(({n}, {n}), "float32", scope="local")')
            with w.block(f"for m in T.unroll({n}):"), w.block(f"for c in T.vectorized({n}):"):
                w(f"Qa[m, c] = Qs[i0 * {n} + m, d0 * {n} + c]")
            lines, result = shuffle_transpose("Qa", "Qb", n)
            for line in lines:
                w(line)
            for k in range(n):
                w(f"QT[d0 * {n} + {k}, T.Ramp(i0 * {n}, 1, {n})] = {result}[{k}, T.Ramp(0, 1, {n})]")

    @property
    def _q_width(self) -> int:
        """Columns of a Q tile as the kernel holds it: features, or with pair dots 32-bit words
        of feature pairs (bit copies: the scale goes on the scores)."""
        return self.s.D // 2 if self.s.pair_dots else self.s.D

    @property
    def _base2(self) -> bool:
        """Softmax without a score function keeps its scores, maxima and ``exp`` in base 2:
        ``St = s log2(e)``, the factor riding on Q's scale, so that ``exp(s - m) = 2**(St - M)``
        needs no multiply per score (``fast_exp2_nonpositive``). With a score function the factor
        would be one more multiply per score, and on the ALiBi score it made LLVM's code for the
        score blocks twice as slow (causal L=2048: 14.5 -> 26.5 ms): such kernels stay in base e."""
        return isinstance(self.norm, nodes.SoftmaxNorm) and self.region.score is None

    def _exp(self, x: str) -> str:
        """``exp`` of a softmax exponent (``<= 0`` or ``-inf``) in the kernel's base."""
        return fast_exp2_nonpositive(x) if self._base2 else fast_exp_nonpositive(x)

    @property
    def _q_scale(self) -> str:
        return f"(scale * T.float32({LOG2E!r}))" if self._base2 else "scale"

    def _descending_tiles(self) -> None:
        """Stick-breaking walks tiles by descending kv index: merge both lists from the back."""
        w, BN = self.w, self.s.block_n
        w('Ptr = T.decl_buffer((2,), "int32")')
        w("Ptr[0] = PC[tb, th, qt] - 1")
        w("Ptr[1] = FC[tb, th, qt] - 1")
        with w.block("for n in range(PC[tb, th, qt] + FC[tb, th, qt]):"):
            w("pk = T.if_then_else(Ptr[0] >= 0, PI[tb, th, qt, T.max(Ptr[0], 0)], -1)")
            w("fk = T.if_then_else(Ptr[1] >= 0, FI[tb, th, qt, T.max(Ptr[1], 0)], -1)")
            w("is_full = fk > pk")
            w("kt = T.max(pk, fk)")
            w(f"kv0 = kt * {BN}")
            with w.block("if is_full:"):
                w("Ptr[1] = Ptr[1] - 1")
            with w.block("else:"):
                w("Ptr[0] = Ptr[0] - 1")
            self._tile(masked="T.Not(is_full)")

    def _f32(self, access: str, dtype: str | None = None) -> str:
        """``access`` (of q's dtype, or ``dtype``) as float32."""
        return access if (dtype or self.s.dtype) == "float32" else f'T.Cast("float32", {access})'

    @property
    def _staged(self) -> bool:
        """Whether tiles copy K and V into compact float32 buffers (``_reads``)."""
        return self.s.kv_type != "float32" and not self.s.pair_dots

    def _reads(self, masked: str) -> str:
        """How a tile reads K and V (``_kv``):

        - ``"staged"``: float16 / bfloat16 copied a tile at a time into ``Kf`` / ``Vf`` as float32
          (the products read each element BM / R times), unless the launcher converted them up
          front (``forward.converts_kv_up_front``) or the kernel multiplies by pairs;
        - ``"direct"``: the inputs as they are, in a FULL tile, which lies inside the keys
          (``schedule.ragged_tile_partial``);
        - ``"clamped"``: the inputs, key rows clamped to the last one, in a PARTIAL tile (it may
          run past the last key; those keys weigh exactly 0). float32 PARTIAL tiles of 16 rows
          or more were copied instead: on the Zen 4 host the clamped reads measured as fast or
          faster (window 256, L=8192: 7.9 against 8.0-8.4 us a tile), and a copy-free tile in
          range beside a copied ragged one doubled the PARTIAL code (window compile 1.0 -> 1.75 s).
        """
        if self._staged:
            return "staged"
        return "direct" if masked == "False" else "clamped"

    def _kv(self, buf: str, j: str, d: str) -> str:
        """Key or value ``j`` of the current tile (0 <= j < BN), feature ``d``, as float32; with pair
        dots, K's word of features ``2d`` and ``2d + 1``."""
        if self._tile_reads == "staged":
            return f"{buf}f[{j}, {d}]"
        clamp = self._tile_reads == "clamped"
        if self.s.pair_dots:  # a 32-bit word: features d and d + 1 of K, or keys j and j + 1 of V
            return f"{buf}[{self._key_row(j, clamp=clamp)}, {d}]"
        return self._f32(f"{buf}[{self._key_row(j, clamp=clamp)}, {d}]", self.s.kv_type)

    def _key_row(self, j: str, clamp: bool = False, start: str = "kv0", rows: str = "LKP") -> str:
        """The K / V indices (batch, kv head, key) of key ``j`` of the tile from key ``start``;
        ``clamp``: the last key stands in for keys past the end (their weight is exactly 0).
        ``rows``: the buffer's rows (V's key pairs: ``LVP``)."""
        batch, key = ("kb", f"ko + {start} + {j}") if self.s.kv_chunks else ("b", f"{start} + {j}")
        return f"{batch}, hk, {f'T.min({key}, {rows} - 1)' if clamp else key}"

    def _stage_tile(self) -> None:
        s, w = self.s, self.w
        key = self._key_row("j", clamp=True)
        with w.block(f"for j in range({s.block_n}):"):
            for buf, width in (("K", s.D), ("V", s.Dv)):
                with w.block(f"for d in T.vectorized({width}):"):
                    w(f"{buf}f[j, d] = {self._f32(f'{buf}[{key}, d]', self.s.kv_type)}")

    def _tile(self, masked: str) -> None:
        s, w = self.s, self.w
        self._masked = masked  # the kind of tile being rendered
        self._tile_reads = self._reads(masked)  # read by _kv
        if self._tile_reads == "staged":
            self._stage_tile()
        if self._folds_max:
            with w.block(f"for i in T.vectorized({s.block_m}):"):
                w("Mn[i] = M[i]")
        BM, BN, Dv, R, V = s.block_m, s.block_n, s.Dv, s.rows, s.vector
        VD = math.gcd(Dv, V)
        # St = score_mask(K_tile QT), register blocked: R keys (broadcast) x V query rows (vector)
        with w.block(f"for j0 in range({BN // R}):"):
            with w.block(f"for i0 in range({BM // V}):"):
                box = (f"i0 * {V}", f"i0 * {V} + {V - 1}"), (f"j0 * {R}", f"j0 * {R} + {R - 1}")
                live, whole = self._live_box(masked, *box), self._whole_box(masked, *box)
                if live is None:
                    self._score_block(masked)
                else:
                    with contextlib.ExitStack() as inside:
                        if whole is not None:  # every pair kept: the block evaluates no mask
                            with w.block(f"if {whole}:"):
                                self._score_block("False")
                            inside.enter_context(w.block("else:"))
                        with w.block(f"if {live}:"):
                            self._score_block(masked)
                        with w.block("else:"):
                            with w.block(f"for j1 in T.unroll({R}):"):
                                with w.block(f"for i1 in T.vectorized({V}):"):
                                    w(f"St[j0 * {R} + j1, i0 * {V} + i1] = {NEG_INF}")
        self._normalizer_update()
        if s.pair_dots:
            self._round_weights()
        # Acc = Alpha * Acc + P @ V, register blocked: R rows (broadcast from St) x VD value columns
        # NOTE: key rows past the end are clamped to the last one (their weight is exactly 0), so
        # K and V need no padding copy
        rescale = isinstance(self.norm, nodes.SoftmaxNorm)
        acc = f"Acc[i0 * {R} + i1, d0 * {VD} + d1]"
        values = RegisterBlock.of("Or", ("i1", R), ("d1", VD))
        with w.block(f"for i0 in range({BM // R}):"):
            with w.block(f"for d0 in range({Dv // VD}):"):
                values.declare(w)
                values.fill(w, f"{acc} * Alpha[i0 * {R} + i1]" if rescale else acc)
                live = self._live_box(masked, (f"i0 * {R}", f"i0 * {R} + {R - 1}"),
                                      (f"jc * {R}", f"jc * {R} + {R - 1}"))
                step = R // 2 if s.pair_dots else R  # with pair dots, keys are counted in pairs
                keys = BN // R * step
                if live is not None:
                    self._live_keys(live)
                    keys = f"Jl[0] * {step}, T.max(Jl[0], Jl[1]) * {step}"
                if s.pair_dots:
                    self._pair_values(keys)
                else:
                    term = f"St[j, i0 * {R} + i1] * {self._kv('V', 'j', f'd0 * {VD} + d1')}"
                    values.accumulate(w, term, ("j", "range", keys))
                values.store(w, acc)

    def _pair_values(self, pairs: str | int) -> None:
        """``Or += P V`` by pairs of keys (``bf16_pairs``) over ``pairs`` (an extent, or ``"start,
        stop"``); a row's two weights are one word of ``Pw``."""
        w, R = self.w, self.s.rows
        row = self._key_row("jp", clamp=self._tile_reads == "clamped", start="kv0 // 2", rows="LVP")
        values = llvm_import.lanes("V", row, first=f"d0 * {bf16_pairs.LANES}")
        with w.block(f"for jp in range({pairs}):"), w.block(f"for i1 in T.unroll({R}):"):
            w(bf16_pairs.accumulate(llvm_import.lanes("Or", "i1"), values, f"Pw[jp, i0 * {R} + i1]"))

    def _round_weights(self) -> None:
        """``Pw``: the tile's weights rounded to bfloat16, a word per row and pair of keys."""
        s, w, n = self.s, self.w, bf16_pairs.LANES
        with w.block(f"for jp in range({s.block_n // 2}):"), w.block(f"for i0 in range({s.block_m // n}):"):
            pair = [llvm_import.lanes("St", f"jp * 2 + {k}", first=f"i0 * {n}") for k in (0, 1)]
            w(f"{llvm_import.lanes('Pw', 'jp', first=f'i0 * {n}')} = {bf16_pairs.rounded_pairs(*pair)}")

    def _live_keys(self, live: str) -> None:
        """``Jl``: the first and one past the last chunk of ``R`` keys that ``live`` keeps for these
        rows. Chunks outside carry weight exactly 0 and are skipped; the keys between run in one
        plain loop, as in a FULL tile, instead of a test per chunk inside the product (measured
        0-2% faster on causal L=1024-2048). The chunks between may hold dead ones too: their
        weights are 0, so the bounds need not be tight (half-planes keep an interval)."""
        w, chunks = self.w, self.s.block_n // self.s.rows
        w('Jl = T.decl_buffer((2,), "int32", scope="local")')
        w(f"Jl[0] = {chunks}")
        w("Jl[1] = 0")
        with w.block(f"for jc in range({chunks}):"):
            with w.block(f"if {live}:"):
                w("Jl[0] = T.min(Jl[0], jc)")
                w("Jl[1] = jc + 1")

    def _score_block(self, masked: str) -> None:
        """One register block of ``St``: R keys x V query rows, through the score and the mask."""
        s, w = self.s, self.w
        R, V = s.rows, s.vector
        scores = RegisterBlock.of("Sr", ("j1", R), ("i1", V))
        scores.declare(w)
        scores.fill(w, "T.float32(0.0)")
        raw = scores.at
        if s.pair_dots:  # QT holds Q unscaled: the scale goes on the sums
            with w.block(f"for d in range({s.D // 2}):"), w.block(f"for j1 in T.unroll({R}):"):
                queries = llvm_import.lanes("QT", "d", first=f"i0 * {V}")
                w(bf16_pairs.accumulate(llvm_import.lanes("Sr", "j1"), queries, self._kv("K", f"j0 * {R} + j1", "d")))
            raw = f"({raw} * {self._q_scale})"
        else:
            scores.accumulate(w, f"{self._kv('K', f'j0 * {R} + j1', 'd')} * QT[d, i0 * {V} + i1]",
                              ("d", "range", s.D))
        with scores.each(w):
            i, j = f"(i0 * {V} + i1)", f"(j0 * {R} + j1)"
            w(f"St[{j}, {i}] = {self._score_and_mask(raw, masked, i, j)}")
        if self._folds_max:  # the block's scores are still in registers: no pass over St for the max
            i = f"i0 * {V} + i1"
            keys = [f"St[j0 * {R} + {j1}, {i}]" for j1 in range(R)]
            with w.block(f"for i1 in T.vectorized({V}):"):
                w(f"Mn[{i}] = T.max(Mn[{i}], {tree('T.max', keys)})")

    def _live_box(self, masked: str, rows: tuple[str, str], keys: tuple[str, str]) -> str | None:
        """In a PARTIAL tile, a scalar test that the box of tile rows ``rows`` x keys ``keys``
        (first, last) may keep a pair: every half-plane conjunct of the mask holds at one of
        its four corners (``passes.halfplanes``). None where there is nothing to test."""
        terms = halfplane_conjuncts(self.region.mask) if masked == "True" else ()
        tests = []
        for term in terms:
            tests.append(functools.reduce(lambda a, b: f"T.Or({a}, {b})", self._corners(term, rows, keys)))
        return functools.reduce(lambda a, b: f"T.And({a}, {b})", tests) if tests else None

    def _whole_box(self, masked: str, rows: tuple[str, str], keys: tuple[str, str]) -> str | None:
        """In a PARTIAL tile of a mask made of half-planes only, a scalar test that the box keeps
        every pair: each conjunct holds at all four corners (a half-plane is convex) and the last
        key is in range. None where the mask has other conjuncts (their values are per pair)."""
        if masked != "True" or not only_halfplanes(self.region.mask):
            return None
        tests = [f"(kv0 + {keys[1]} < LKV)"]
        for term in halfplane_conjuncts(self.region.mask):
            tests += self._corners(term, rows, keys)
        return functools.reduce(lambda a, b: f"T.And({a}, {b})", tests)

    def _corners(self, term: Expr, rows: tuple[str, str], keys: tuple[str, str]) -> list[str]:
        """A mask conjunct rendered at the four corners of the box ``rows`` x ``keys``."""
        return [Renderer(self._index_env(i, j), self.specs)(term) for i in rows for j in keys]

    @property
    def _folds_max(self) -> bool:
        """Softmax keeps the tile's new row maxima ``Mn`` as the score blocks are written."""
        return isinstance(self.norm, nodes.SoftmaxNorm)

    def _row(self, i: str) -> tuple[str, str]:
        """(query head, query row) of tile row ``i``: ``h`` and ``q0 + i``, or the packed ones."""
        if self.s.group == 1:
            return "h", f"q0 + {i}"
        return f"HI[{i}]", f"QI[{i}]"

    def _index_env(self, i: str = "i", j: str = "j") -> dict[str, str]:
        head, row = self._row(i)
        return {
            "b": 'T.Cast("int64", b)', "h": f'T.Cast("int64", {head})',
            "q_idx": f'T.Cast("int64", {row} + q_offset)', "kv_idx": f'T.Cast("int64", kv0 + {j})',
        }

    def _score_and_mask(self, raw: str, masked: str, i: str, j: str) -> str:
        env = {**self._index_env(i, j), "score": raw}
        render = Renderer(env, self.specs)
        score = raw if self.region.score is None else render(self.region.score)
        if masked == "False":  # a FULL tile: every pair kept, every key in range (schedule.ragged_tile_partial)
            return score
        keep = f"(kv0 + {j} < LKV)"
        if self.region.mask is not None:
            mask = render(self.region.mask)
            keep = f"T.And({keep}, {mask})" if masked == "True" else f"T.And({keep}, T.Or(T.Not({masked}), {mask}))"
        return f"T.if_then_else({keep}, {score}, {NEG_INF})"

    # ---- normalizers: the per-tile update (S holds masked scores, becomes P) ---------

    def _normalizer_update(self) -> None:
        norm = self.norm
        if isinstance(norm, nodes.SoftmaxNorm):
            self._softmax_update()
        elif isinstance(norm, nodes.SigmoidNorm | nodes.PointwiseNorm):
            fills, weight = self._pointwise_weight("St[j, i]", "E[i]", self.s.block_m)
            self._pointwise_update(weight, before=fills)
        elif isinstance(norm, nodes.StickBreakingNorm):
            self._stick_breaking_update()
        else:
            raise NotImplementedError(f"no TVM kernel for normalizer {type(norm).__name__}")

    def _row_groups(self) -> Lines:
        """Open ``for i0``: one SIMD vector of ``V`` query rows at a time; ``i`` is the row."""
        V = self.s.vector
        return self.w.block(f"for i0 in range({self.s.block_m // V}):")

    def _softmax_update(self) -> None:
        """Online softmax: new row max, rescale factor ``Alpha``, ``St <- exp(St - m)``, row sums."""
        w, BN, V = self.w, self.s.block_n, self.s.vector
        i = f"i0 * {V} + i1"
        with self._row_groups():
            w(f'Mv = T.decl_buffer(({V},), "float32", scope="local")')
            w(f'Mu = T.decl_buffer(({V},), "float32", scope="local")')
            w(f'Lv = T.decl_buffer(({V},), "float32", scope="local")')
            with w.block(f"for i1 in T.vectorized({V}):"):
                w(f"Mv[i1] = Mn[{i}]")  # the new row max, folded into the score blocks
                w("Lv[i1] = T.float32(0.0)")
            with w.block(f"for i1 in T.vectorized({V}):"):
                # a row with no live score yet keeps m = -inf; subtract 0 there (exp(-inf) = 0)
                w(f"Mu[i1] = T.if_then_else(Mv[i1] == {NEG_INF}, T.float32(0.0), Mv[i1])")
                w(f"Alpha[{i}] = {self._exp(f'(M[{i}] - Mu[i1])')}")
                w(f"M[{i}] = Mv[i1]")
            # EXP_KEYS keys' exponentials per step: independent polynomial chains interleave (one
            # key at a time the loop waits on each chain's latency; 4 measured about 4% faster)
            U = math.gcd(BN, EXP_KEYS)
            j = f"(j0 * {U} + j1)"
            # in a PARTIAL tile, a chunk of keys the mask's half-planes drop for all these rows
            # weighs 0 without its exponentials (half of a diagonal tile's)
            live = self._live_box(self._masked, (f"i0 * {V}", f"i0 * {V} + {V - 1}"),
                                  (f"j0 * {U}", f"j0 * {U} + {U - 1}"))

            def weights(dropped: bool) -> None:
                if self.s.vector_exp and not dropped:
                    with w.block(f"for j1 in T.unroll({U}):"):
                        self._vector_weights(j)
                    return
                with w.block(f"for j1 in T.unroll({U}):"), w.block(f"for i1 in T.vectorized({V}):"):
                    if dropped:
                        w(f"St[{j}, {i}] = T.float32(0.0)")
                    else:
                        w(f"St[{j}, {i}] = {self._exp(f'(St[{j}, {i}] - Mu[i1])')}")
                        w(f"Lv[i1] = Lv[i1] + St[{j}, {i}]")

            with w.block(f"for j0 in range({BN // U}):"):
                if live is None:
                    weights(dropped=False)
                else:
                    with w.block(f"if {live}:"):
                        weights(dropped=False)
                    with w.block("else:"):
                        weights(dropped=True)
            with w.block(f"for i1 in T.vectorized({V}):"):
                w(f"L[{i}] = L[{i}] * Alpha[{i}] + Lv[i1]")

    def _vector_weights(self, j: str) -> None:
        """Key ``j``'s weights of the row group ``i0`` and their row sums, as explicit float32x16
        values through ``vector_exp`` (TVM's vectorizer cannot carry its intrinsics)."""
        w, first = self.w, f"i0 * {llvm_import.LANES}"
        scores = llvm_import.lanes("St", j, first=first)
        exponent = f"({scores} - {llvm_import.lanes('Mu')})"
        w(f"{scores} = {(vector_exp.exp2 if self._base2 else vector_exp.exp)(exponent)}")
        w(f"{llvm_import.lanes('Lv')} = {llvm_import.lanes('Lv')} + {scores}")

    def _pointwise_update(self, weight: str, before: tuple[str, ...] = ()) -> None:
        """``St[j, i] <- weight`` elementwise (``before``: buffer fills the weight reads, each a
        vectorized statement of its own), and the row sums ``L`` when the normalizer divides by them."""
        w, BN, BM = self.w, self.s.block_n, self.s.block_m
        normalize = getattr(self.norm, "normalize", False)
        if normalize:
            w(f'Lv = T.decl_buffer(({BM},), "float32", scope="local")')
            with w.block(f"for i in T.vectorized({BM}):"):
                w("Lv[i] = L[i]")
        with w.block(f"for j in range({BN}):"):
            for fill in before:
                with w.block(f"for i in T.vectorized({BM}):"):
                    w(fill)
            with w.block(f"for i in T.vectorized({BM}):"):
                w(f"St[j, i] = {weight}")
                if normalize and self.s.pair_dots:  # the row sums the weights the products use
                    w(f"St[j, i] = {bf16_pairs.rounded_in_float32('St[j, i]')}")
                if normalize:
                    w("Lv[i] = Lv[i] + St[j, i]")
        if normalize:
            with w.block(f"for i in T.vectorized({BM}):"):
                w("L[i] = Lv[i]")

    def _pointwise_weight(self, score: str, buf: str, extent: int) -> tuple[tuple[str, ...], str]:
        """(fills, weight) of a sigmoid or pointwise normalizer at ``score``, masked scores weighing
        0; a plain softplus declares ``E`` (``extent`` floats) and fills its element ``buf`` first
        (``render.softplus_steps``). Shared by both layouts (``decode_kernel.py``)."""
        norm, fills = self.norm, ()
        if isinstance(norm, nodes.SigmoidNorm):
            value = _sigmoid(f"({score} + bias)")
        elif is_plain_softplus(norm):
            self.w(f'E = T.decl_buffer(({extent},), "float32")')
            fills, value = softplus_steps(score, buf)
        else:
            value = Renderer({"score": score}, self.specs)(norm.phi)
        return fills, f"T.if_then_else({score} == {NEG_INF}, T.float32(0.0), {value})"

    def _stick_breaking_update(self) -> None:
        """log p_ij = logsigmoid(s_ij) + R_i + sum_{t in tile, t > j} logsigmoid(-s_it), R_i the
        running sum over the tiles already walked (all later keys, kept in ``L``): one walk over
        the tile's keys from the last down, a vector of rows at a time."""
        w, BN, V = self.w, self.s.block_n, self.s.vector
        i = f"i0 * {V} + i1"
        kept = f"(St[j, {i}] != {NEG_INF})"
        x = f"T.if_then_else({kept}, St[j, {i}], T.float32(0.0))"
        with self._row_groups():
            w(f'Sum = T.decl_buffer(({V},), "float32", scope="local")')
            w(f'E = T.decl_buffer(({V},), "float32", scope="local")')
            w(f'G = T.decl_buffer(({V},), "float32", scope="local")')
            with w.block(f"for i1 in T.vectorized({V}):"):
                w(f"Sum[i1] = L[{i}]")
            with w.block(f"for jr in range({BN}):"):
                w(f"j = {BN - 1} - jr")
                if self.s.vector_exp:
                    self._vector_stick_breaking(kept, x)
                else:
                    self._stick_breaking_key(kept, x, i)
            with w.block(f"for i1 in T.vectorized({V}):"):
                w(f"L[{i}] = Sum[i1]")

    def _stick_breaking_key(self, kept: str, x: str, i: str) -> None:
        """One key ``j`` of the walk above, rows ``i`` of the group, with the portable exponential."""
        w, V = self.w, self.s.vector
        with w.block(f"for i1 in T.vectorized({V}):"):
            w(f"E[i1] = {fast_exp(f'(-T.abs({x}))')}")
        with w.block(f"for i1 in T.vectorized({V}):"):
            w(f"G[i1] = {fast_log1p('E[i1]')}")
        with w.block(f"for i1 in T.vectorized({V}):"):
            # logsigmoid(x) = min(x, 0) - log1p(exp(-|x|)); logsigmoid(-x) likewise
            w(f"E[i1] = T.if_then_else({kept}, T.min(-{x}, T.float32(0.0)) - G[i1], T.float32(0.0))")
            w(f"St[j, {i}] = T.if_then_else({kept}, "
              f"{fast_exp(f'(T.min({x}, T.float32(0.0)) - G[i1] + Sum[i1])')}, T.float32(0.0))")
            w("Sum[i1] = Sum[i1] + E[i1]")

    def _vector_stick_breaking(self, kept: str, x: str) -> None:
        """``_stick_breaking_key`` with both exponentials through ``vector_exp``: the
        statements that hold them are explicit float32x16 values (vector selects are
        ``T.Select``), the log1p and the logsigmoid stay vectorized loops. Measured 1.32x the
        portable walk's whole call (L=4096, causal, 8 heads of 64, 2 threads, paired medians)."""
        w, n = self.w, llvm_import.LANES
        row = llvm_import.lanes("St", "j", first=f"i0 * {n}")
        zero = f"T.Broadcast(T.float32(0.0), {n})"
        kept_lanes = f"({row} != T.Broadcast({NEG_INF}, {n}))"
        x_lanes = f"T.Select({kept_lanes}, {row}, {zero})"
        E, G, Sum = (llvm_import.lanes(buf) for buf in ("E", "G", "Sum"))
        w(f"{E} = {vector_exp.exp(f'(T.float32(0.0) - T.abs({x_lanes}))')}")
        with w.block(f"for i1 in T.vectorized({n}):"):
            w(f"G[i1] = {fast_log1p('E[i1]')}")
        with w.block(f"for i1 in T.vectorized({n}):"):  # logsigmoid(-x), added to the sum below
            w(f"E[i1] = T.if_then_else({kept}, T.min(-{x}, T.float32(0.0)) - G[i1], T.float32(0.0))")
        weight = vector_exp.exp(f"(T.min({x_lanes}, {zero}) - {G} + {Sum})")
        w(f"{row} = T.Select({kept_lanes}, {weight}, {zero})")
        w(f"{Sum} = {Sum} + {E}")

    def _finish(self) -> None:
        """Per row, ``O = Acc * Inv`` and ``LSE = Lse``. ``Inv`` and ``Lse`` are computed first for
        the whole tile in vectorized loops (a scalar ``log`` and division per row took about a
        microsecond of each task, 3-8% of a call whose tasks walk a few tiles: windows, documents)."""
        s, w, norm = self.s, self.w, self.norm
        BM, Dv = s.block_m, s.Dv
        out_dt = TORCH_TO_TIR[s.dtype]
        head, row = self._row("i")
        rows = "LQ" if s.group == 1 else f"{s.group} * LQ"
        w(f'Inv = T.decl_buffer(({BM},), "float32")')
        w(f'Lse = T.decl_buffer(({BM},), "float32")')
        if isinstance(norm, nodes.SoftmaxNorm):
            self._softmax_finish()
        else:
            normalize = isinstance(norm, nodes.PointwiseNorm) and norm.normalize
            inv = "T.if_then_else(L[i] != T.float32(0.0), T.float32(1.0) / L[i], T.float32(0.0))"
            with w.block(f"for i in T.vectorized({BM}):"):
                w(f"Inv[i] = {inv if normalize else 'T.float32(1.0)'}")
                w("Lse[i] = T.float32(0.0)")
        with w.block(f"for i in range({BM}):"):
            with w.block(f"if q0 + i < {rows}:"):
                with w.block(f"for d in T.vectorized({Dv}):"):
                    value = "Acc[i, d] * Inv[i]"
                    w(f"O[b, {head}, {row}, d] = {value if out_dt == 'float32' else f'T.Cast({out_dt!r}, {value})'}")
                w(f"LSE[b, {head}, {row}] = Lse[i]")

    def _softmax_finish(self) -> None:
        """``Inv = 1 / l`` and ``Lse = m + log l`` per row, with the sink and the row shift when the
        region has them. One value per statement through buffers (TVM vectorizes a let-bound value
        wrongly, see ``render.fast_exp``); ``l >= 1`` for a live row (its max's own term is
        ``exp(0)``), so ``log l = log1p(l - 1)`` takes the fast polynomial."""
        w, norm, BM = self.w, self.norm, self.s.block_m
        w(f'Lt = T.decl_buffer(({BM},), "float32")')
        w(f'Mt = T.decl_buffer(({BM},), "float32")')
        w(f'Et = T.decl_buffer(({BM},), "float32")')
        sink_head = self.region.sink_head
        row_env = {k: v for k, v in self._index_env().items() if k != "kv_idx"}
        if norm.sink is not None and sink_head is not None:  # rows of other heads than h (a decoding step's)
            w(f'Sk = T.decl_buffer(({BM},), "float32")')
            with w.block(f"for i in range({BM}):"):
                w(f"Sk[i] = {Renderer(row_env, self.specs)(ex.load(ex.input_ref(norm.sink), (sink_head,)))}")
        with w.block(f"for i in T.vectorized({BM}):"):
            if norm.sink is not None:
                if sink_head is None:
                    sink = f"{buffer_name(norm.sink, self.specs)}[{self._row('i')[0]}]"
                    sink = f'T.Cast("float32", {sink})' if norm.sink.dtype != "float32" else sink
                else:
                    sink = "Sk[i]"
                sink = f"({sink} * T.float32({LOG2E!r}))" if self._base2 else sink  # in M's base
                # a dead row (m = -inf): Et = 0, Lt = 1, so o = 0 and lse = sink; with a sink of
                # -inf too (switched off), Mt = 0 and Lt = 0: o = 0 and lse = -inf, not NaN
                w(f"Mt[i] = T.max(M[i], {sink})")
                w(f"Mt[i] = T.if_then_else(Mt[i] == {NEG_INF}, T.float32(0.0), Mt[i])")
                w(f"Et[i] = {self._exp('(M[i] - Mt[i])')}")
                w(f"Lt[i] = L[i] * Et[i] + {self._exp(f'({sink} - Mt[i])')}")
                w("Inv[i] = T.if_then_else(Lt[i] > T.float32(0.0), Et[i] / Lt[i], T.float32(0.0))")
            else:
                w("Mt[i] = M[i]")
                w("Lt[i] = T.if_then_else(L[i] > T.float32(0.0), L[i], T.float32(1.0))")
                w("Inv[i] = T.if_then_else(L[i] > T.float32(0.0), T.float32(1.0) / Lt[i], T.float32(0.0))")
            w("Et[i] = Lt[i] - T.float32(1.0)")
            log_l = fast_log1p("Et[i]")
            lse = f"Mt[i] * T.float32({LN2!r}) + {log_l}" if self._base2 else f"Mt[i] + {log_l}"
            live = "L[i]" if norm.sink is None else "Lt[i]"
            lse = f"T.if_then_else({live} > T.float32(0.0), {lse}, {NEG_INF})"
            w(f"Lse[i] = {lse}")
            if self.region.row_shift is not None:
                shift = Renderer(row_env, self.specs)(self.region.row_shift)
                w(f"Mt[i] = {shift}")  # the row shift; -inf: a dead row
                w(f"Inv[i] = T.if_then_else(Mt[i] == {NEG_INF}, T.float32(0.0), Inv[i])")
                w(f"Lse[i] = T.if_then_else(Mt[i] == {NEG_INF}, {NEG_INF}, Lse[i] + Mt[i])")
