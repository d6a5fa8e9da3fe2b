"""The backward kernels (TVMScript text): FlashAttention-2's structure, for every normalizer
but linear attention (``linear_backward.py``).

Notation (as in ``kernels.py``; ``BM`` query rows x ``BN`` keys per tile, ``RI`` x ``VJ``
register blocks, ``G = HQ // HKV`` query heads per kv head):

- per tile, ``S = (scale * Q) K^T`` and the score function (masked -> ``-inf``), ``P`` the
  weights, ``dP = dO V^T``, and ``dS``, the gradient of the raw score, with ``g`` the
  derivative of the score function at the raw score (``attncc.ir.derivative``):
  softmax ``P = exp(S - lse)``, ``dS = P (dP - Delta) g`` with ``Delta_i = rowsum(dO_i O_i)
  - dlse_i``; sigmoid ``P = sigmoid(S + bias)``, ``dS = P (1 - P) dP g``; pointwise
  ``P = phi(S) / L_i``, ``dS = (dP - Delta) phi'(S) g / L_i`` (``L_i = 1`` and no ``Delta``
  without ``normalize``);
- rows: ``Lr`` holds the forward's lse (softmax; minus the ``row_shift`` the simplified score
  lacks; ``+inf`` for a dead row, so ``P = 0`` there without a branch) or ``1 / L_i``; rows
  past ``LQ`` get zero weights and a zero ``dO``;
- ``dq``: one task per (batch ``b``, query head ``h``, query tile ``qt``), run by
  ``T.parallel``, walks the forward's block tables (PARTIAL tiles evaluate the mask, FULL
  tiles do not, EMPTY tiles are never listed) and accumulates ``dQ += scale * dS K``; for a
  normalised pointwise map it first sums ``phi`` over the same tiles and leaves ``1 / L_i``
  in ``LSE`` for ``dkdv``, which runs after it;
- ``dkdv``: one task per (``b``, kv head ``hk``, kv tile ``kt``) walks, for each of the ``G``
  query heads of its group, the query tiles that see ``kt`` (the tables transposed) and
  accumulates ``dV += P^T dO``, ``dK += dS^T (scale Q)`` in its own buffers: no two tasks
  write the same rows. It recomputes ``S`` and ``dP`` that ``dq`` also computes
  (FlashAttention-2 shares them through atomics, which a CPU task pool does not have);
- ``fused``: one task per (``b``, ``hk``) walks every kv tile in turn as ``dkdv`` does and
  also adds ``dS K`` to the dQ rows of its own query heads, in place: five products per tile
  instead of seven, but only ``B * HKV`` tasks, so it is chosen when every thread gets a few
  (``use_fused``); a normalised pointwise map needs its row sums first and takes two kernels;
- stick-breaking (``_stick_breaking_tile``): ``dS_ij = U_ij (1 - beta_ij) - beta_ij T_ij`` with
  ``U = P dP`` (elementwise), ``beta = sigmoid(S)`` and ``T_ij`` the sum of ``U`` over the row's
  kept keys before ``j`` (times ``g``); ``P`` needs ``C_ij``, the sum of ``softplus`` over the
  kept keys after ``j``. First the ``sums`` kernel (dq's tasks and tables) sums ``softplus`` per
  row and kv tile, which ``launch_backward`` turns into ``CE`` (the sums over the later tiles);
  each tile then walks its keys down from ``CE`` for ``C`` and up for ``T``, from ``SB`` in
  ``fused`` (its kv tiles ascend; each row's ``T`` carried in place), from ``Tr`` in ``dq``
  (each query tile's kv tiles in ascending order, both lists merged; ``T`` at each tile's
  first key left in ``TE``), from ``TE`` in ``dkdv``. Neither sum needs ``Delta``; rows past
  ``LQ`` get zero weights here too;
- K and V are staged once as float32 transposed tiles ``[NKT, D, BN]`` (the products over the
  head dimension vectorize along keys) and, for ``dq``, K row-major; Q and dO are converted
  to float32 once per call (``backward_launch``); gradients accumulate in float32. No buffer is
  ``Lq x Lkv`` (stick-breaking's ``CE``, and ``TE`` on two kernels, are ``Lq x Lkv / BN``);
- bfloat16 on a host with AVX-512 BF16 (``BackwardShape.pair_dots``) multiplies by pairs
  (``bf16_pairs``): ``S`` and ``dP`` by pairs of features (K and V staged as transposed tiles of
  feature-pair words ``[NKT, D / 2, BN]``, Q and dO rows read as words; exact products, as the
  float32 ones), ``dV`` and ``dK`` by pairs of rows (Q and dO laid out by row pairs once per
  call, ``launcher.key_pairs``; P and dS rounded to bfloat16 first, as FlashAttention does,
  ``Pr`` / ``dSr``; dK's scale goes on its store) and ``dQ`` by pairs of keys (K by key pairs,
  dS rounded in its own order, ``dSk``). Nothing is converted to float32.

Tuning knobs: ``block_m``, ``block_n``, ``rows``, ``vector`` (``BackwardShape``).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

from attncc.codegen.tvm import bf16_pairs, llvm_import
from attncc.codegen.tvm.kernels import NEG_INF, TASK_TABLE, Lines, captured_specs, task_loop, tree
from attncc.codegen.tvm.register_block import Loop, RegisterBlock
from attncc.codegen.tvm.render import Renderer, _sigmoid, buffer_declaration, fast_exp_nonpositive, fast_log1p
from attncc.ir import nodes
from attncc.ir.derivative import derivative, score_derivative
from attncc.ir.expr import Expr
from attncc.passes.plan import AttentionRegion

POS_INF = 'T.float32("inf")'


@dataclass(frozen=True)
class BackwardShape:
    """What the backward kernels are specialised on besides the region: dims and knobs. Every
    input arrives as float32 (``backward_launch`` converts float16 / bfloat16 once per call)."""

    D: int
    Dv: int
    block_m: int = 64
    block_n: int = 64
    rows: int = 4
    vector: int = 16
    # True: the five products by bfloat16 pairs (``bf16_pairs``): K and V arrive as transposed
    # tiles of feature-pair words and K also by key pairs, Q and dO as words and by row pairs
    # (``backward_launch.uses_pair_dots``)
    pair_dots: bool = False

    @property
    def fits_pair_dots(self) -> bool:
        """Whether these knobs can multiply by pairs: vectors of 16 keys, head dims in whole
        vectors, row pairs within a tile (even ``block_m``) and runs of 32 keys (``block_n``)."""
        n = bf16_pairs.LANES
        return (self.vector == n and self.D % n == 0 and self.Dv % n == 0 and self.block_m % 2 == 0
                and self.block_n % (2 * n) == 0)


def learned_loads(score: Expr | None, name: str) -> list[Expr]:
    """The distinct loads of captured tensor ``name`` in ``score`` (a score function or row_shift)."""
    if score is None:
        return []
    return [n for n in dict.fromkeys(score.walk()) if n.op == "load" and n.src[0].arg.name == name]


def render_backward(region: AttentionRegion, shape: BackwardShape, kind: str, learn: tuple[str, ...] = ()) -> str:
    """TVMScript source of the ``kind`` (``"dkdv"``, ``"dq"``, ``"fused"``, or stick-breaking's
    ``"sums"``) kernel, named ``attn``; ``learn``: captured tensors whose gradients ``fused``
    accumulates."""
    return _Backward(region, shape, learn).render(kind)


class _Backward:
    def __init__(self, region: AttentionRegion, shape: BackwardShape, learn: tuple[str, ...] = ()) -> None:
        self.learn = learn
        self.region = region
        self.s = shape
        self.specs = captured_specs(region)
        self.w = Lines()
        self.norm = region.normalizer
        self.dscore = score_derivative(region.score) if region.score is not None else None
        self.identity = region.score is None
        self.dphi = score_derivative(self.norm.phi) if isinstance(self.norm, nodes.PointwiseNorm) else None
        # NOTE: a normalised pointwise row needs its sum L_i: dq computes 1/L_i first (a pass
        # over its tiles) and leaves it in LSE for dkdv, which runs after it.
        self.row_sums = isinstance(self.norm, nodes.PointwiseNorm) and self.norm.normalize
        self.stick_breaking = isinstance(self.norm, nodes.StickBreakingNorm)
        # a pointwise map's dS is (dP - Delta) times a factor its weights step stores; learned
        # tensors need that factor before the score function's chain, in dSo
        self.dphi_factor_learned = bool(learn) and isinstance(self.norm, nodes.PointwiseNorm)
        self.kind = ""  # "dq", "dkdv", "fused" or "sums", set by render
        if shape.pair_dots and not shape.fits_pair_dots:
            raise ValueError(f"backward pair dots need vector {bf16_pairs.LANES}, head dims in whole vectors, an "
                             f"even block_m and block_n in whole runs of {2 * bf16_pairs.LANES}; got {shape}")

    def render(self, kind: str) -> str:
        s, w = self.s, self.w
        self.kind = kind
        w(f"# generated by attncc.codegen.tvm.backward ({kind})")
        w("@T.prim_func")
        extra = "".join(f", x{i}: T.handle" for i in range(len(self.specs)))
        extra += "".join(f", g{i}_h: T.handle" for i in range(len(self.learn)))
        outs = {"dq": "dq_h: T.handle, kp_h: T.handle", "dkdv": "dk_h: T.handle, dv_h: T.handle",
                "fused": "dq_h: T.handle, kp_h: T.handle, dk_h: T.handle, dv_h: T.handle",
                "sums": "spt_h: T.handle"}[kind]
        if kind == "sums" and not self.stick_breaking:
            raise ValueError("the 'sums' kernel is stick-breaking's")
        if self.stick_breaking and kind != "sums":  # CE, and T where the kernel starts or keeps it
            outs += {"dq": ", ce_h: T.handle, te_h: T.handle", "dkdv": ", ce_h: T.handle, te_h: T.handle",
                     "fused": ", ce_h: T.handle, sb_h: T.handle"}[kind]
        words = "qr_h: T.handle, dor_h: T.handle, " if self._row_pairs else ""
        w(f"def attn(q_h: T.handle, kt_h: T.handle, vt_h: T.handle, do_h: T.handle, lse_h: T.handle, "
          f"delta_h: T.handle, {words}{outs}, pc_h: T.handle, pi_h: T.handle, fc_h: T.handle, fi_h: T.handle"
          f"{'' if kind == 'fused' else ', to_h: T.handle'}"
          f"{extra}, scale: T.float32, q_offset: T.int32, bias: T.float32, LKV: T.int32):")
        with w:
            w('T.func_attr({"global_symbol": "attn", "tirx.noalias": True})')
            for name in ("B", "HQ", "HKV", "LQ", "LQP", "LKP", "NKT", "TB", "TH", "NT", "MP", "MF", "NS"):
                w(f"{name} = T.int32()")
            half = 2 if s.pair_dots else 1  # pair dots: Q, dO, and K and V's tiles as feature-pair words
            w(f'Q = T.match_buffer(q_h, (B, HQ, LQ, {s.D // half}), "float32")')
            w(f'KT = T.match_buffer(kt_h, (B, HKV, NKT, {s.D // half}, {s.block_n}), "float32")')
            w(f'VT = T.match_buffer(vt_h, (B, HKV, NKT, {s.Dv // half}, {s.block_n}), "float32")')
            w(f'DO = T.match_buffer(do_h, (B, HQ, LQ, {s.Dv // half}), "float32")')
            if self._row_pairs:
                w("LQ2 = T.int32()")  # rows of the row-pair layouts: ceil(LQ / 2)
                w(f'QR = T.match_buffer(qr_h, (B, HQ, LQ2, {s.D}), "float32")')
                w(f'DOR = T.match_buffer(dor_h, (B, HQ, LQ2, {s.Dv}), "float32")')
            w('LSE = T.match_buffer(lse_h, (B, HQ, LQ), "float32")')
            w('DELTA = T.match_buffer(delta_h, (B, HQ, LQ), "float32")')
            if kind in ("fused", "dq"):  # fused: DQ padded to whole query tiles, accumulated in place
                w(f'DQ = T.match_buffer(dq_h, (B, HQ, {"LQ" if kind == "dq" else "LQP"}, {s.D}), "float32")')
                if s.pair_dots:  # K by key pairs (words), ceil(LKV / 2) rows
                    w("LK2 = T.int32()")
                    w(f'KP = T.match_buffer(kp_h, (B, HKV, LK2, {s.D}), "float32")')
                else:
                    w(f'KP = T.match_buffer(kp_h, (B, HKV, LKP, {s.D}), "float32")')
            if kind == "sums":  # per row and kv tile: the sum of softplus(s)
                w("LQS = T.int32()")  # rows of SPT: LQ or more (the launcher turns it into CE in place)
                w('SPT = T.match_buffer(spt_h, (B, HQ, LQS, NKT), "float32")')
            elif self.stick_breaking:  # per row and kv tile: C at the tile's last key, T at its first
                w("LQS = T.int32()")
                w('CE = T.match_buffer(ce_h, (B, HQ, LQS, NKT), "float32")')
                if kind == "fused":  # T carried up the kv tiles, per row
                    w('SB = T.match_buffer(sb_h, (B, HQ, LQS), "float32")')
                else:  # dq writes T at each tile's first key, dkdv reads it
                    w('TE = T.match_buffer(te_h, (B, HQ, LQS, NKT), "float32")')
            if kind in ("dkdv", "fused"):
                w(f'DK = T.match_buffer(dk_h, (B, HKV, LKP, {s.D}), "float32")')
                w(f'DV = T.match_buffer(dv_h, (B, HKV, LKP, {s.Dv}), "float32")')
            # NOTE: dq reads the forward tables (per q tile), dkdv their transpose (per kv tile).
            w('PC = T.match_buffer(pc_h, (TB, TH, NT), "int32")')
            w('PI = T.match_buffer(pi_h, (TB, TH, NT, MP), "int32")')
            w('FC = T.match_buffer(fc_h, (TB, TH, NT), "int32")')
            w('FI = T.match_buffer(fi_h, (TB, TH, NT, MF), "int32")')
            if kind != "fused":  # its tasks are whole (b, hk): balanced already
                w(TASK_TABLE)
            for i, spec in enumerate(self.specs):
                w(buffer_declaration(i, spec))
            for i, name in enumerate(self.learn):
                size = math.prod(learned_loads(self.region.score, name)[0].src[0].arg.shape)
                # NOTE: float64 sums: one entry (an ALiBi slope) gathers a term from every score of
                # its heads, and under an unnormalised pointwise map the terms are large (float32
                # sums lost 20x the float32 reference's error, 8.7e-4, at 70 keys)
                # one row per task: B * HKV fused, B * HKV * NKT in dkdv
                w(f'G_{i} = T.match_buffer(g{i}_h, ({"B * HKV" if kind == "fused" else "B * HKV * NKT"}, {size}), '
                  '"float64")')
            with contextlib.ExitStack() as imports:
                if s.pair_dots:
                    imports.enter_context(w.block(bf16_pairs.import_statement()))
                if kind in ("dq", "sums"):
                    with task_loop(w):
                        self._dq_task()
                elif kind == "dkdv":
                    with task_loop(w):
                        self._dkdv_task(fused=False)
                else:
                    with w.block("for task in T.parallel(B * HKV):"):
                        self._dkdv_task(fused=True)
        return w.text()

    # ---- the two tasks ---------------------------------------------------------------

    def _buffers(self) -> None:
        s, w = self.s, self.w
        if not s.pair_dots:
            w(f'Qs = T.decl_buffer(({s.block_m}, {s.D}), "float32")')
            w(f'dOs = T.decl_buffer(({s.block_m}, {s.Dv}), "float32")')
        else:  # the rows as feature-pair words (S, dP), unscaled
            w(f'Qp = T.decl_buffer(({s.block_m}, {s.D // 2}), "float32")')
            w(f'dOp = T.decl_buffer(({s.block_m}, {s.Dv // 2}), "float32")')
        if self._row_pairs:  # dV and dK: rows and weights by row pairs
            w(f'Qr = T.decl_buffer(({s.block_m // 2}, {s.D}), "float32")')
            w(f'dOr = T.decl_buffer(({s.block_m // 2}, {s.Dv}), "float32")')
            w(f'Pr = T.decl_buffer(({s.block_m // 2}, {s.block_n}), "float32")')
            w(f'dSr = T.decl_buffer(({s.block_m // 2}, {s.block_n}), "float32")')
        if s.pair_dots and self.kind != "dkdv":  # dQ: dS by key pairs
            w(f'dSk = T.decl_buffer(({s.block_m}, {s.block_n // 2}), "float32")')
        w(f'P = T.decl_buffer(({s.block_m}, {s.block_n}), "float32")')
        w(f'dS = T.decl_buffer(({s.block_m}, {s.block_n}), "float32")')
        w(f'Lr = T.decl_buffer(({s.block_m},), "float32")')
        w(f'Dr = T.decl_buffer(({s.block_m},), "float32")')
        # stick-breaking, each reused in turn: dPs holds dP, then U = P dP; SPs softplus, then C,
        # then T; LSs logsigmoid; Bt exp(-|s|), then sigmoid
        if self.stick_breaking:
            for name in ("dPs", "SPs", "LSs", "Bt"):
                w(f'{name} = T.decl_buffer(({s.block_m}, {s.block_n}), "float32")')
        if self.learn:  # raw scores and d loss / d score_fn, for the captured tensors' gradients
            w(f'So = T.decl_buffer(({s.block_m}, {s.block_n}), "float32")')
            w(f'dSo = T.decl_buffer(({s.block_m}, {s.block_n}), "float32")')

    def _dkdv_task(self, fused: bool) -> None:
        """One kv tile per task, or (``fused``) every kv tile of one (b, hk) in turn: that task
        owns the dQ rows of its query heads too and adds ``dS K`` to them in place (five
        products per tile instead of seven; parallel over B * HKV only)."""
        s, w = self.s, self.w
        BN, D, Dv = s.block_n, s.D, s.Dv
        if fused:
            w("b = task // HKV")
            w("hk = task % HKV")
        else:
            w("b = task // (HKV * NKT)")
            w("hk = task // NKT % HKV")
        w("tb = T.min(b, TB - 1)")
        self._buffers()
        w(f'dKa = T.decl_buffer(({BN}, {D}), "float32")')
        w(f'dVa = T.decl_buffer(({BN}, {Dv}), "float32")')
        if fused:
            with w.block("for kt in range(NKT):"):
                self._kv_tile(fused)
        else:
            w("kt = task % NKT")
            self._kv_tile(fused)

    def _kv_tile(self, fused: bool) -> None:
        s, w = self.s, self.w
        BN, D, Dv = s.block_n, s.D, s.Dv
        w(f"kv0 = kt * {BN}")
        with w.block(f"for j in range({BN}):"):
            with w.block(f"for d in T.vectorized({D}):"):
                w("dKa[j, d] = T.float32(0.0)")
            with w.block(f"for d in T.vectorized({Dv}):"):
                w("dVa[j, d] = T.float32(0.0)")
        with w.block("for g in range(HQ // HKV):"):
            w("h = hk * (HQ // HKV) + g")
            w("th = T.min(h, TH - 1)")
            with w.block("for n in range(PC[tb, th, kt] + FC[tb, th, kt]):"):
                self._pick("kt", "qt")
                w(f"q0 = qt * {s.block_m}")
                self._load_rows()
                self._p_and_ds()
                if s.pair_dots:  # dV and dK by pairs of rows: the weights rounded to bfloat16
                    self._round_row_pairs("Pr", "P")
                    self._round_row_pairs("dSr", "dS")
                    self._pair_accumulate("dVa", "Pr", "dOr", Dv)
                    self._pair_accumulate("dKa", "dSr", "Qr", D)
                else:
                    self._accumulate("dVa", "P", "dOs", Dv)
                    self._accumulate("dKa", "dS", "Qs", D)
                if fused:
                    self._dq_update("DQ[b, h, q0 + ")
                if self.learn:
                    self._learned_gradients()
        with w.block(f"for j in range({BN}):"):
            with w.block(f"for d in T.vectorized({D}):"):
                w(f"DK[b, hk, kv0 + j, d] = dKa[j, d]{' * scale' if s.pair_dots else ''}")  # pairs: Q unscaled
            with w.block(f"for d in T.vectorized({Dv}):"):
                w("DV[b, hk, kv0 + j, d] = dVa[j, d]")

    def _dq_task(self) -> None:
        s, w = self.s, self.w
        BM, BN, D = s.block_m, s.block_n, s.D
        w(f"NQ = (LQ + {BM - 1}) // {BM}")
        w("b = task // (HQ * NQ)")
        w("h = task // NQ % HQ")
        w("qt = task % NQ")
        w("hk = h // (HQ // HKV)")
        w("tb = T.min(b, TB - 1)")
        w("th = T.min(h, TH - 1)")
        w(f"q0 = qt * {BM}")
        self._buffers()
        if self.kind == "sums":
            self._load_rows()
            self._softplus_sums()
            return
        w(f'dQa = T.decl_buffer(({BM}, {D}), "float32")')
        with w.block(f"for i in range({BM}):"):
            with w.block(f"for d in T.vectorized({D}):"):
                w("dQa[i, d] = T.float32(0.0)")
        self._load_rows(from_lse=not self.row_sums)
        if self.row_sums:
            self._row_sums()
        if self.stick_breaking:  # T runs up each row's keys: the tiles in ascending order
            w(f'Tr = T.decl_buffer(({BM},), "float32")')
            with w.block(f"for i in range({BM}):"):
                w("Tr[i] = T.float32(0.0)")
            w('Ptr = T.decl_buffer((2,), "int32")')
            w("Ptr[0] = 0")
            w("Ptr[1] = 0")
        with w.block("for n in range(PC[tb, th, qt] + FC[tb, th, qt]):"):
            if self.stick_breaking:
                self._pick_ascending()
            else:
                self._pick("qt", "kt")
            w(f"kv0 = kt * {BN}")
            self._p_and_ds()
            self._dq_update("dQa[")
        with w.block(f"for i in range({BM}):"):
            with w.block("if q0 + i < LQ:"):
                with w.block(f"for d in T.vectorized({D}):"):
                    w("DQ[b, h, q0 + i, d] = dQa[i, d] * scale")

    # ---- the shared pieces -------------------------------------------------------------

    def _pick(self, at: str, name: str) -> None:
        """``name``: the n-th listed tile, PARTIAL ones first; ``partial`` says which list.

        NOTE: one loop over both lists keeps the kernel half the size (compile time); only the
        elementwise step differs, behind a branch that is uniform over the tile."""
        w = self.w
        w(f"partial = n < PC[tb, th, {at}]")
        w(f"{name} = T.if_then_else(partial, PI[tb, th, {at}, T.min(n, MP - 1)], "
          f"FI[tb, th, {at}, T.max(n - PC[tb, th, {at}], 0)])")

    def _pick_ascending(self) -> None:
        """``kt``: the query tile's n-th listed kv tile in ascending order, both lists merged
        (stick-breaking's ``dq``: T runs up a row's keys across tiles); ``partial`` says which."""
        w = self.w
        w("pk = T.if_then_else(Ptr[0] < PC[tb, th, qt], PI[tb, th, qt, T.min(Ptr[0], MP - 1)], NKT)")
        w("fk = T.if_then_else(Ptr[1] < FC[tb, th, qt], FI[tb, th, qt, T.min(Ptr[1], MF - 1)], NKT)")
        w("partial = pk < fk")
        w("kt = T.min(pk, fk)")
        with w.block("if partial:"):
            w("Ptr[0] = Ptr[0] + 1")
        with w.block("else:"):
            w("Ptr[1] = Ptr[1] + 1")

    def _index_env(self, i: str, j: str | None) -> dict[str, str]:
        env = {"b": 'T.Cast("int64", b)', "h": 'T.Cast("int64", h)', "q_idx": f'T.Cast("int64", q0 + {i} + q_offset)'}
        if j is not None:
            env["kv_idx"] = f'T.Cast("int64", kv0 + {j})'
        return env

    def _row_sums(self) -> None:
        """Lr = 1 / sum_j phi(s_ij) over the listed tiles (0 for a zero sum), stored to LSE."""
        s, w = self.s, self.w
        BM, BN = s.block_m, s.block_n
        w(f'Ls = T.decl_buffer(({BM},), "float32")')
        with w.block(f"for i in range({BM}):"):
            w("Ls[i] = T.float32(0.0)")
        with w.block("for n in range(PC[tb, th, qt] + FC[tb, th, qt]):"):
            self._pick("qt", "kt")
            w(f"kv0 = kt * {BN}")
            self._p_and_ds(weights_only=True)
            with w.block(f"for i in range({BM}):"):
                w(f"Ls[i] = Ls[i] + {self._row_total('P')}")
        with w.block(f"for i in range({BM}):"):
            w("Lr[i] = T.if_then_else(Ls[i] != T.float32(0.0), T.float32(1.0) / Ls[i], T.float32(0.0))")
            with w.block("if q0 + i < LQ:"):
                w("LSE[b, h, q0 + i] = Lr[i]")

    def _load_rows(self, from_lse: bool = True) -> None:
        """Qs = scale * Q, dOs = dO (float32, 0 past LQ; with pair dots Qp, dOp, Qr and dOr, words),
        Dr = Delta, Lr per normalizer: softmax
        lse (+inf for dead rows), a normalised pointwise 1/L_i (LSE, written by dq), else 1;
        rows past LQ get weights 0 (stick-breaking: ``_stick_breaking_tile``)."""
        s, w = self.s, self.w
        if self._row_pairs:  # rows 2p and 2p + 1 of the tile (q0 is even): the pair layouts' row q0 / 2 + p
            with w.block(f"for p in range({s.block_m // 2}):"):
                w("pr = T.min(q0 // 2 + p, LQ2 - 1)")
                with w.block(f"for d in T.vectorized({s.D}):"):
                    w("Qr[p, d] = QR[b, h, pr, d]")
                with w.block(f"for d in T.vectorized({s.Dv}):"):
                    w("dOr[p, d] = T.if_then_else(q0 + 2 * p < LQ, DOR[b, h, pr, d], T.float32(0.0))")
        with w.block(f"for i in range({s.block_m}):"):
            w("qi = T.min(q0 + i, LQ - 1)")
            if s.pair_dots:  # bit copies of words; a zero word is a pair of bfloat16 zeros
                with w.block(f"for d in T.vectorized({s.D // 2}):"):
                    w("Qp[i, d] = Q[b, h, qi, d]")
                with w.block(f"for d in T.vectorized({s.Dv // 2}):"):
                    w("dOp[i, d] = T.if_then_else(q0 + i < LQ, DO[b, h, qi, d], T.float32(0.0))")
            else:
                with w.block(f"for d in T.vectorized({s.D}):"):
                    w("Qs[i, d] = Q[b, h, qi, d] * scale")
                with w.block(f"for d in T.vectorized({s.Dv}):"):
                    w("dOs[i, d] = T.if_then_else(q0 + i < LQ, DO[b, h, qi, d], T.float32(0.0))")
            w("Dr[i] = DELTA[b, h, qi]")
            if not isinstance(self.norm, nodes.SoftmaxNorm):
                value = "LSE[b, h, qi]" if self.row_sums and from_lse else "T.float32(1.0)"
                w(f"Lr[i] = T.if_then_else(q0 + i < LQ, {value}, T.float32(0.0))")
                return
            w("lse = LSE[b, h, qi]")
            alive = f"T.And(q0 + i < LQ, lse != {NEG_INF})"
            if self.region.row_shift is not None:
                shift = Renderer(self._index_env("i", None), self.specs)(self.region.row_shift)
                w(f"rs = {shift}")
                w(f"Lr[i] = T.if_then_else(T.And({alive}, rs != {NEG_INF}), lse - rs, {POS_INF})")
            else:
                w(f"Lr[i] = T.if_then_else({alive}, lse, {POS_INF})")

    def _score(self, raw: str, masked: bool, i: str, j: str) -> tuple[str, str | None]:
        """(masked score text, derivative text or None for 1) at one position."""
        render = Renderer({**self._index_env(i, j), "score": raw}, self.specs)
        score = raw if self.identity else render(self.region.score)
        keep = f"(kv0 + {j} < LKV)"
        if self.region.mask is not None and masked:
            keep = f"T.And({keep}, {render(self.region.mask)})"
        if self.identity:
            grad = None
        else:
            grad = "T.float32(0.0)" if self.dscore is None else render(self.dscore)
        return f"T.if_then_else({keep}, {score}, {NEG_INF})", grad

    def _p_and_ds(self, weights_only: bool = False) -> None:
        """P (the weights) and dS (the gradient of the raw score) of one tile, register blocked;
        the mask is evaluated on PARTIAL tiles only. ``weights_only``: P alone (row sums)."""
        s, w = self.s, self.w
        BM, BN, RI, VJ = s.block_m, s.block_n, s.rows, s.vector
        i, j = f"(i0 * {RI} + i1)", f"(j0 * {VJ} + j1)"
        scores = RegisterBlock.of("Sr", ("i1", RI), ("j1", VJ))
        with w.block(f"for i0 in range({BM // RI}):"):
            with w.block(f"for j0 in range({BN // VJ}):"):
                scores.declare(w)
                if s.pair_dots:  # Qp holds Q unscaled: the scale goes on the sums
                    self._pair_product("Sr", "Qp", "KT", s.D)
                    with scores.each(w):
                        w("Sr[i1, j1] = Sr[i1, j1] * scale")
                else:
                    self._product("Sr", "Qs", "KT", s.D)
                if self.learn and not weights_only:
                    scores.store(w, f"So[{i}, {j}]")
                cases = (True, False) if self.region.mask is not None else (False,)
                for masked in cases:
                    score, grad = self._score("Sr[i1, j1]", masked, i, j)
                    if len(cases) > 1:
                        w("if partial:" if masked else "else:")
                        w.depth += 1
                    with scores.each(w):
                        self._weights(score, grad, f"[{i}, {j}]", i)
                    if len(cases) > 1:
                        w.depth -= 1
                if weights_only:
                    return
                if s.pair_dots:
                    self._pair_product("Sr", "dOp", "VT", s.Dv)
                else:
                    self._product("Sr", "dOs", "VT", s.Dv)
                with scores.each(w):
                    if self.stick_breaking:  # dS needs the whole row's walk first
                        w(f"dPs[{i}, {j}] = {scores.at}")
                    else:
                        if self.learn:  # pointwise: dSo holds phi'(s) / L_i (``_weights``)
                            factor = f"dSo[{i}, {j}]" if self.dphi_factor_learned else ""
                            w(f"dSo[{i}, {j}] = {self._ds(f'P[{i}, {j}]', scores.at, factor, i, None)}")
                        w(f"dS[{i}, {j}] = {self._ds(f'P[{i}, {j}]', scores.at, f'dS[{i}, {j}]', i, grad)}")
        if self.stick_breaking and not weights_only:
            self._stick_breaking_tile(grad is not None)

    def _softplus_sums(self) -> None:
        """``SPT[row, kt]``: the sum of ``softplus(s)`` over each listed kv tile's kept keys
        (stick-breaking's ``sums`` kernel, run first; ``launch_backward`` turns them into ``CE``)."""
        s, w = self.s, self.w
        BM, BN = s.block_m, s.block_n
        with w.block("for n in range(PC[tb, th, qt] + FC[tb, th, qt]):"):
            self._pick("qt", "kt")
            w(f"kv0 = kt * {BN}")
            self._p_and_ds(weights_only=True)  # P: the masked scores
            self._stick_breaking_terms(softplus_only=True)
            with w.block(f"for i in range({BM}):"):
                total = self._row_total("SPs")
                with w.block("if q0 + i < LQ:"):
                    w(f"SPT[b, h, q0 + i, kt] = {total}")

    def _row_total(self, buffer: str) -> str:
        """Inside ``for i``: the sum of row ``i`` of the tile ``buffer`` (vector lanes summed
        over the key vectors, ``Lv``, then a tree over the lanes), as an expression."""
        s, w, VJ = self.s, self.w, self.s.vector
        w(f'Lv = T.decl_buffer(({VJ},), "float32", scope="local")')
        with w.block(f"for j1 in T.vectorized({VJ}):"):
            w(f"Lv[j1] = {buffer}[i, j1]")
        with w.block(f"for j0 in range(1, {s.block_n // VJ}):"):
            with w.block(f"for j1 in T.vectorized({VJ}):"):
                w(f"Lv[j1] = Lv[j1] + {buffer}[i, j0 * {VJ} + j1]")
        return tree("", [f"Lv[{n}]" for n in range(VJ)])

    def _stick_breaking_terms(self, softplus_only: bool = False) -> None:
        """From the masked scores in ``P``: ``SPs = softplus(s)``, ``LSs = logsigmoid(s)`` and
        ``Bt = sigmoid(s)`` (0, ``-inf`` and 0 where masked), vectorized over keys; the first
        alone with ``softplus_only``."""
        s, w = self.s, self.w
        zero = "T.float32(0.0)"
        x = "P[i, j]"
        alive = f"({x} != {NEG_INF})"
        with w.block(f"for i in range({s.block_m}):"):
            with w.block(f"for j in T.vectorized({s.block_n}):"):  # E = exp(-|s|), in Bt until the sigmoid
                w(f"Bt[i, j] = {fast_exp_nonpositive(f'(T.float32(0.0) - T.abs({x}))')}")
            with w.block(f"for j in T.vectorized({s.block_n}):"):
                w(f"SPs[i, j] = {fast_log1p('Bt[i, j]')}")
            with w.block(f"for j in T.vectorized({s.block_n}):"):
                # softplus(s) = max(s, 0) + log1p(E), logsigmoid(s) = min(s, 0) - log1p(E)
                if not softplus_only:
                    w(f"LSs[i, j] = T.if_then_else({alive}, T.min({x}, {zero}) - SPs[i, j], {NEG_INF})")
                w(f"SPs[i, j] = T.if_then_else({alive}, T.max({x}, {zero}) + SPs[i, j], {zero})")
                if not softplus_only:
                    w(f"Bt[i, j] = T.if_then_else({alive}, T.if_then_else({x} >= {zero}, T.float32(1.0), Bt[i, j]) "
                      f"/ (T.float32(1.0) + Bt[i, j]), {zero})")

    def _stick_breaking_tile(self, chained: bool) -> None:
        """P and dS of a stick-breaking tile from its masked scores (in ``P``) and dP (``dPs``).

        ``log p_ij = logsigmoid(s_ij) - C_ij`` with ``C_ij`` the sum of ``softplus(s_it)`` over the
        row's kept keys ``t > j``; with ``U_ij = p_ij dP_ij``, ``beta = sigmoid(s)`` and ``T_ij`` the
        sum of ``U_it`` over kept ``t < j``: ``dS_ij = U_ij (1 - beta_ij) - beta_ij T_ij``, times the
        score function's derivative (``chained``: stored in ``dS``). ``C`` runs down from the
        tile's last key, from ``CE`` (the ``sums`` kernel's sums over the later tiles); ``T`` runs
        up from its first key, from the sum over the earlier tiles: ``SB`` in ``fused`` (its kv
        tiles ascend), ``Tr`` in ``dq`` (which leaves it in ``TE``), ``TE`` in ``dkdv``. Each sum
        runs from where its terms are small, so neither is a difference of large ones (``T =
        Delta - sum_{t >= j} U``, one walk down, lost 1.7e-4 in dQ at 2048 keys). The two walks
        take ``RW`` rows at a time, so that their dependent adds interleave.
        Rows past ``LQ`` (a ragged last query tile, Q clamped) weigh 0."""
        s, w = self.s, self.w
        BM, BN = s.block_m, s.block_n
        zero = "T.float32(0.0)"
        kept = f"(LSs[i, j] != {NEG_INF})"
        self._stick_breaking_terms()
        self._row_walks("SPs", "CE[b, h, {row}, kt]", down=True)  # SPs <- C
        with w.block(f"for i in range({BM}):"), w.block(f"for j in T.vectorized({BN}):"):
            weight = fast_exp_nonpositive("(LSs[i, j] - SPs[i, j])")
            w(f"P[i, j] = T.if_then_else(T.And({kept}, q0 + i < LQ), {weight}, {zero})")
            w("dPs[i, j] = P[i, j] * dPs[i, j]")  # U
        if self.kind == "dq":  # T at the tile's first key, for dkdv
            with w.block(f"for i in range({BM}):"):
                w("TE[b, h, q0 + i, kt] = Tr[i]")
        start = {"fused": "SB[b, h, {row}]", "dq": "Tr[{local}]", "dkdv": "TE[b, h, {row}, kt]"}[self.kind]
        self._row_walks("dPs", start, down=False, into="SPs", store_total=self.kind != "dkdv")  # SPs <- T
        chain = " * dS[i, j]" if chained else ""
        with w.block(f"for i in range({BM}):"), w.block(f"for j in T.vectorized({BN}):"):
            value = "(dPs[i, j] * (T.float32(1.0) - Bt[i, j]) - Bt[i, j] * SPs[i, j])"
            if self.learn:  # d loss / d score_fn, before the chain
                w(f"dSo[i, j] = T.if_then_else({kept}, {value}, {zero})")
            w(f"dS[i, j] = T.if_then_else({kept}, {value}{chain}, {zero})")

    def _row_walks(self, values: str, start: str, down: bool, into: str | None = None,
                   store_total: bool = False) -> None:
        """Per row, the running sum of ``values`` over the tile's keys, down from the last
        (``down``) or up from the first, each key's sum before its own value, into ``into``
        (default in place); it starts from ``start`` (a format of ``{row}``, the query row, or
        ``{local}``, the tile's), and ``store_total`` writes the row's total back there."""
        s, w = self.s, self.w
        BM, BN, RW = s.block_m, s.block_n, math.gcd(8, s.block_m)
        into = into or values
        origin = start.format(row=f"q0 + i0 * {RW} + i1", local=f"i0 * {RW} + i1")
        with w.block(f"for i0 in range({BM // RW}):"):
            w(f'Run = T.decl_buffer(({RW},), "float32", scope="local")')
            with w.block(f"for i1 in T.unroll({RW}):"):
                w(f"Run[i1] = {origin}")
            with w.block(f"for jw in range({BN}):"), w.block(f"for i1 in T.unroll({RW}):"):
                at = f"[i0 * {RW} + i1, {f'{BN - 1} - jw' if down else 'jw'}]"
                w(f"t = {values}{at}")
                w(f"{into}{at} = Run[i1]")
                w("Run[i1] = Run[i1] + t")
            if store_total:
                with w.block(f"for i1 in T.unroll({RW}):"):
                    w(f"{origin} = Run[i1]")

    def _learned_gradients(self) -> None:
        """G[task, index of each load] += dSo * d score_fn / d load, element by element (loads
        of one tile may hit the same entry, so no vector lanes)."""
        s, w = self.s, self.w
        with w.block(f"for i in range({s.block_m}):"):
            with w.block(f"for j in range({s.block_n}):"):
                with w.block("if dSo[i, j] != T.float32(0.0):"):
                    render = Renderer({**self._index_env("i", "j"), "score": "So[i, j]"}, self.specs)
                    for k, name in enumerate(self.learn):
                        for load in learned_loads(self.region.score, name):
                            local = derivative(self.region.score, load)
                            if local is None:
                                continue
                            shape = load.src[0].arg.shape
                            flat = " + ".join(
                                f"{render.index(load, d)} * T.int64({math.prod(shape[d + 1:])})"
                                for d in range(len(load.src) - 1)) or "T.int64(0)"
                            at = f'G_{k}[task, T.Cast("int32", {flat})]'
                            w(f'{at} = {at} + T.Cast("float64", dSo[i, j] * {render(local)})')

    def _weights(self, score: str, grad: str | None, at: str, i: str) -> None:
        """``P[at]`` from the masked score text and, where the normalizer has one, dS's factor
        before dP in ``dS[at]`` (``g``; outside softmax, the masked score goes through ``P``
        first, so that phi and its derivative read a buffer rather than repeat the score)."""
        w, norm = self.w, self.norm
        p, ds = f"P{at}", f"dS{at}"
        if isinstance(norm, nodes.SoftmaxNorm):
            # s - lse <= 0 (lse is at least every kept score, up to rounding): the cheaper polynomial,
            # which has no upper clamp (an exponent past 88 would need an inconsistent lse)
            w(f"{p} = {fast_exp_nonpositive(f'({score} - Lr[{i}])')}")
            if grad is not None:
                w(f"{ds} = {grad}")
            return
        w(f"{p} = {score}")
        dead = f"({p} == {NEG_INF})"
        if self.stick_breaking:  # P holds the masked score until _stick_breaking_tile
            if grad is not None:
                w(f"{ds} = {grad}")
            return
        if isinstance(norm, nodes.SigmoidNorm):
            if grad is not None:
                w(f"{ds} = {grad}")
            w(f"{p} = T.if_then_else({dead}, T.float32(0.0), {_sigmoid(f'({p} + bias)')})")
            return
        render = Renderer({"score": p}, self.specs)
        dphi = "T.float32(0.0)" if self.dphi is None else render(self.dphi)
        chain = f" * {grad}" if grad is not None else ""
        if self.dphi_factor_learned:  # the factor before the chain, for the learned gradients
            w(f"dSo{at} = T.if_then_else({dead}, T.float32(0.0), {dphi} * Lr[{i}])")
        w(f"{ds} = T.if_then_else({dead}, T.float32(0.0), {dphi} * Lr[{i}]{chain})")
        w(f"{p} = T.if_then_else({dead}, T.float32(0.0), {render(norm.phi)} * Lr[{i}])")

    def _ds(self, p: str, dp: str, factor: str, i: str, grad: str | None) -> str:
        """dS from the weight, dP and the factor stored in dS, per normalizer.

        NOTE: where the weight is 0 (masked, dead row) dS is 0 even where g is not finite."""
        norm = self.norm
        if isinstance(norm, nodes.PointwiseNorm):
            return f"({dp} - Dr[{i}]) * {factor}" if norm.normalize else f"{dp} * {factor}"
        scaled = f" * {factor}" if grad is not None else ""
        if isinstance(norm, nodes.SigmoidNorm):
            return f"T.if_then_else({p} != T.float32(0.0), {p} * (T.float32(1.0) - {p}) * {dp}{scaled}, T.float32(0.0))"
        return f"T.if_then_else({p} != T.float32(0.0), {p} * ({dp} - Dr[{i}]){scaled}, T.float32(0.0))"

    def _product(self, acc: str, rows: str, tiles: str, depth: int) -> None:
        """acc[RI, VJ] = rows[i block, :depth] @ tiles[b, hk, kt, :depth, j block]."""
        s = self.s
        block = RegisterBlock.of(acc, ("i1", s.rows), ("j1", s.vector))
        block.fill(self.w, "T.float32(0.0)")
        term = f"{rows}[i0 * {s.rows} + i1, d] * {tiles}[b, hk, kt, d, j0 * {s.vector} + j1]"
        block.accumulate(self.w, term, ("d", "range", depth))

    def _pair_product(self, acc: str, rows: str, tiles: str, depth: int) -> None:
        """acc[RI, VJ] = rows[i block, :depth] @ tiles[b, hk, kt, :depth, j block] by bfloat16
        pairs: ``rows`` and ``tiles`` hold words of feature pairs (``depth / 2`` of them)."""
        s, w = self.s, self.w
        RegisterBlock.of(acc, ("i1", s.rows), ("j1", s.vector)).fill(w, "T.float32(0.0)")
        with w.block(f"for d in range({depth // 2}):"), w.block(f"for i1 in T.unroll({s.rows}):"):
            keys = llvm_import.lanes(tiles, "b", "hk", "kt", "d", first=f"j0 * {s.vector}")
            w(bf16_pairs.accumulate(llvm_import.lanes(acc, "i1"), keys, f"{rows}[i0 * {s.rows} + i1, d]"))

    def _round_row_pairs(self, words: str, weights: str) -> None:
        """``words[p, j]``: ``weights`` rows 2p and 2p + 1 at key j, rounded to bfloat16, one word."""
        s, w, n = self.s, self.w, bf16_pairs.LANES
        with w.block(f"for p in range({s.block_m // 2}):"), w.block(f"for j0 in range({s.block_n // n}):"):
            pair = [llvm_import.lanes(weights, f"2 * p + {k}", first=f"j0 * {n}") for k in (0, 1)]
            w(f"{llvm_import.lanes(words, 'p', first=f'j0 * {n}')} = {bf16_pairs.rounded_pairs(*pair)}")

    def _pair_accumulate(self, acc: str, weights: str, rows: str, width: int) -> None:
        """acc[BN, width] += weights^T @ rows by bfloat16 pairs of rows: ``weights[p, j]`` and
        ``rows[p, c]`` hold rows 2p and 2p + 1 as words (``_round_row_pairs``, ``Qr`` / ``dOr``)."""
        self._add_pair_products(("j0", "j1", self.s.block_n), width, f"{acc}[{{r}}, {{c}}]",
                                llvm_import.lanes(rows, "{p}", first="{d}"), f"{weights}[{{p}}, {{r}}]",
                                self.s.block_m // 2)

    def _accumulate(self, acc: str, weights: str, rows: str, width: int) -> None:
        """acc[BN, width] += weights[BM, BN]^T @ rows[BM, width], register blocked over keys."""
        self._add_products(("j0", "j1", self.s.block_n), width, f"{acc}[{{r}}, {{c}}]",
                           f"{weights}[i, {{r}}] * {rows}[i, {{c}}]", ("i", "range", self.s.block_m))

    def _dq_update(self, row: str) -> None:
        """dQ[BM, D] += dS[BM, BN] @ K[kv tile], register blocked over query rows; ``row`` opens
        the accumulator's access up to the tile row (task-local ``dQa[`` or global ``DQ[...``).
        With pair dots by pairs of keys: dS rounded to bfloat16 in its own order (``dSk``), K by
        key pairs (``KP``, clamped to its last pair: keys past LKV weigh 0)."""
        s = self.s
        if not s.pair_dots:
            self._add_products(("i0", "i1", s.block_m), s.D, f"{row}{{r}}, {{c}}]",
                               "dS[{r}, j] * KP[b, hk, kv0 + j, {c}]", ("j", "range", s.block_n))
            return
        self._round_key_pairs()
        keys = llvm_import.lanes("KP", "b", "hk", "T.min(kv0 // 2 + {p}, LK2 - 1)", first="{d}")
        self._add_pair_products(("i0", "i1", s.block_m), s.D, f"{row}{{r}}, {{c}}]", keys, "dSk[{r}, {p}]",
                                s.block_n // 2)

    def _round_key_pairs(self) -> None:
        """``dSk[i, p]``: dS at keys 2p and 2p + 1 of row i, rounded to bfloat16, one word (32
        consecutive values at a time, ``bf16_pairs.rounded_run``)."""
        s, w, n = self.s, self.w, bf16_pairs.LANES
        with w.block(f"for i in range({s.block_m}):"), w.block(f"for j0 in range({s.block_n // (2 * n)}):"):
            run = [llvm_import.lanes("dS", "i", first=f"j0 * {2 * n} + {k * n}") for k in (0, 1)]
            w(f"{llvm_import.lanes('dSk', 'i', first=f'j0 * {n}')} = {bf16_pairs.rounded_run(*run)}")

    def _add_pair_products(self, rows: tuple[str, str, int], width: int, target: str, values: str, weight: str,
                           pairs: int) -> None:
        """``target += values * weight`` by bfloat16 pairs, summed over ``pairs`` words ``p``, for
        ``rows = (outer, inner, extent)`` rows x ``width`` columns in register blocks of
        ``self.s.rows`` rows x 16 columns (``_add_products``' form). Formats: ``target`` of the
        row ``{r}`` and column ``{c}``; ``values`` (a float32x16 access, 16 words) of ``{p}`` and
        the block's first column ``{d}``; ``weight`` (one word) of ``{r}`` and ``{p}``."""
        s, w, n = self.s, self.w, bf16_pairs.LANES
        outer, inner, extent = rows
        R = s.rows
        r = f"{outer} * {R} + {inner}"
        block = RegisterBlock.of("Ar", (inner, R), ("d1", n))
        with w.block(f"for {outer} in range({extent // R}):"), w.block(f"for d0 in range({width // n}):"):
            block.declare(w)
            block.fill(w, target.format(r=r, c=f"d0 * {n} + d1"))
            with w.block(f"for p in range({pairs}):"), w.block(f"for {inner} in T.unroll({R}):"):
                w(bf16_pairs.accumulate(llvm_import.lanes("Ar", inner), values.format(p="p", d=f"d0 * {n}"),
                                        weight.format(r=r, p="p")))
            block.store(w, target.format(r=r, c=f"d0 * {n} + d1"))

    @property
    def _row_pairs(self) -> bool:
        """Whether this kernel multiplies dV and dK by row pairs (pair dots, ``dkdv`` or ``fused``)."""
        return self.s.pair_dots and self.kind in ("dkdv", "fused")

    def _add_products(self, rows: tuple[str, str, int], width: int, target: str, term: str, over: Loop) -> None:
        """``target += term`` summed over the loop ``over``, for ``rows = (outer, inner, extent)``
        rows x ``width`` columns in register blocks of ``self.s.rows`` rows x ``VD`` columns;
        ``target`` and ``term`` are formats of the row ``{r}`` and the column ``{c}``."""
        s, w = self.s, self.w
        outer, inner, extent = rows
        R, VD = s.rows, math.gcd(width, s.vector)
        at = {"r": f"{outer} * {R} + {inner}", "c": f"d0 * {VD} + d1"}
        block = RegisterBlock.of("Ar", (inner, R), ("d1", VD))
        with w.block(f"for {outer} in range({extent // R}):"):
            with w.block(f"for d0 in range({width // VD}):"):
                block.declare(w)
                block.fill(w, target.format(**at))
                block.accumulate(w, term.format(**at), over)
                block.store(w, target.format(**at))


__all__ = ["BackwardShape", "learned_loads", "render_backward"]
