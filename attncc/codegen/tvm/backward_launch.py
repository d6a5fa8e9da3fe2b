"""Run the backward kernels (``backward.py``) on torch tensors: what they cover, staging, launch.

``backward_unsupported`` says why a region's gradients cannot come from the generated kernels
(the autograd Function then recomputes through the reference, after a one-time warning).
``launch_backward`` stages K and V as float32 tiles and Q and dO as float32 copies (bfloat16 with
pair dots: word layouts, ``BackwardShape.pair_dots``), transposes
the forward's block tables (per kv tile, the query tiles that see it), picks the fused kernel
or the two kernels (``use_fused``; stick-breaking runs its ``sums`` kernel before either) and
returns the gradients; the sink's and the
``row_shift``'s shares of the captured tensors' gradients are O(B * Hq * Lq) torch expressions.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from attncc.codegen.tvm import bf16_pairs, launcher, schedule
from attncc.codegen.tvm.backward import BackwardShape, learned_loads, render_backward
from attncc.codegen.tvm.kernels import captured_specs
from attncc.codegen.tvm.render import unsupported
from attncc.ir import nodes
from attncc.ir.derivative import derivative, score_derivative_problem
from attncc.passes.plan import AttentionRegion
from attncc.passes.sparsify import BlockTables, block_tables_for

NORMALIZERS = (nodes.SoftmaxNorm, nodes.SigmoidNorm, nodes.PointwiseNorm, nodes.StickBreakingNorm)


def backward_unsupported(
    region: AttentionRegion, grad_names: tuple[str, ...], tasks: int = 1,
    tensors: dict[str, torch.Tensor] | None = None, kv_tiles: int = 1,
) -> str | None:
    """Why the generated backward cannot compute these gradients, or None.

    ``grad_names``: captured float tensors that require grad: a softmax sink, or tensors read
    by the score function (and ``row_shift``), not by the mask or phi, whose per-task gradient
    buffers stay below ``LEARN_BYTES``: ``tasks`` = B * HKV of them, times ``kv_tiles`` for a
    normalised pointwise map (its two kernels: dkdv's tasks hold them).
    """
    norm = region.normalizer
    if not isinstance(norm, NORMALIZERS):
        return f"normalizer {type(norm).__name__} has no generated TVM backward yet"
    sink = norm.sink.name if isinstance(norm, nodes.SoftmaxNorm) and norm.sink is not None else None
    for name in (n for n in grad_names if n != sink):
        why = _learn_unsupported(region, name, tasks, (tensors or {}).get(name), kv_tiles)
        if why:
            return f"gradient of captured tensor {name!r}: {why}"
    if sink in grad_names:
        exprs = [e for e in (region.score, region.mask, region.row_shift) if e is not None]
        if sink in {spec.name for e in exprs for spec in e.inputs()}:
            return f"sink tensor {sink!r} is also read by the score, mask or row_shift"
    phi = norm.phi if isinstance(norm, nodes.PointwiseNorm) else None
    for what, expr in (("score", region.score), ("phi", phi)):
        why = None if expr is None else score_derivative_problem(expr, unsupported)
        if why:
            return f"{what} derivative: {why}"
    return None


LEARN_BYTES = 1 << 28  # per-task partial gradients of learned captured tensors, all tasks together


def _learn_unsupported(region: AttentionRegion, name: str, tasks: int, tensor: torch.Tensor | None,
                       kv_tiles: int) -> str | None:
    # NOTE: the kernel scatters d score_fn / d load; a ``row_shift`` only moves the lse, whose
    # gradient ``row_shift_gradient`` adds in torch.
    others = (region.mask, getattr(region.normalizer, "phi", None))
    if any(e is not None and name in {spec.name for spec in e.inputs()} for e in others):
        return "read by the mask or phi"
    loads = [(region.score, n) for n in learned_loads(region.score, name)]
    loads += [(region.row_shift, n) for n in learned_loads(region.row_shift, name)]
    if not loads:
        return "not read by the score function"
    spec = loads[0][1].src[0].arg
    if spec.dtype not in ("float32", "float16", "bfloat16"):
        return f"dtype {spec.dtype}"
    if tensor is not None and tuple(tensor.shape) != tuple(spec.shape):  # NOTE: the scatter's strides are traced
        return f"shape {tuple(tensor.shape)} differs from the traced {tuple(spec.shape)}"
    if isinstance(region.normalizer, nodes.PointwiseNorm) and region.normalizer.normalize:
        tasks *= kv_tiles  # two kernels (the row sums come first): dkdv's tasks, one per kv tile
    if 8 * tasks * math.prod(spec.shape) > LEARN_BYTES:  # float64 partial sums
        return f"per-task gradient buffers would exceed {LEARN_BYTES} bytes"
    for expr, load in loads:
        try:
            local = derivative(expr, load)
        except NotImplementedError as err:
            return str(err)
        why = unsupported(local) if local is not None else None
        if why:
            return why
    return None


def _tiles(t: torch.Tensor, block_n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(float32 ``[B, H, Lkp, D]`` zero-padded to whole tiles, its transposed tiles ``[B, H, NKT, D, BN]``)."""
    B, H, L, D = t.shape
    pad = -(-L // block_n) * block_n - L
    tf = launcher.dense(t.float())
    tf = torch.nn.functional.pad(tf, (0, 0, 0, pad)) if pad else tf
    return tf, tf.view(B, H, (L + pad) // block_n, block_n, D).transpose(-1, -2).contiguous()


def _pair_tiles(t: torch.Tensor, block_n: int) -> torch.Tensor:
    """bfloat16 ``[B, H, L, D]`` as transposed tiles of feature-pair words ``[B, H, NKT, D / 2, BN]``
    (float32-typed), zero past ``L``: word ``(d, j)`` of a tile holds features ``2d`` and ``2d + 1`` of
    its key ``j`` (``BackwardShape.pair_dots``)."""
    B, H, L, D = t.shape
    pad = -(-L // block_n) * block_n - L
    tp = torch.nn.functional.pad(t, (0, 0, 0, pad)) if pad else t
    words = launcher.words(tp).view(B, H, (L + pad) // block_n, block_n, D // 2)  # any storage offset
    return words.transpose(-1, -2).contiguous()


def uses_pair_dots(shape: BackwardShape, *tensors: torch.Tensor) -> bool:
    """Whether the backward's products multiply by bfloat16 pairs (``bf16_pairs``): every input
    bfloat16 (q, k, v and dO), a host with AVX-512 BF16, knobs that allow it
    (``BackwardShape.fits_pair_dots``)."""
    return all(t.dtype == torch.bfloat16 for t in tensors) and bf16_pairs.on_host() and shape.fits_pair_dots


def transpose_tables(count: torch.Tensor, index: torch.Tensor, nkv: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-q-tile lists of kv tiles ``[B', H', nq]`` / ``[B', H', nq, m]`` -> per-kv-tile lists of
    q tiles ``[B', H', nkv]`` / ``[B', H', nkv, m']`` (ascending, 0-padded, ``m' >= 1``).
    Work and memory O(listed pairs)."""
    Bp, Hp, nq, m = index.shape
    listed = torch.arange(m).view(1, 1, 1, m) < count.unsqueeze(-1)
    bh = torch.arange(Bp * Hp).view(Bp, Hp, 1, 1).expand(Bp, Hp, nq, m)[listed]
    qt = torch.arange(nq).view(1, 1, nq, 1).expand(Bp, Hp, nq, m)[listed]
    group = bh * nkv + index[listed].long()
    order = torch.argsort(group * nq + qt)
    group, qt = group[order], qt[order]
    counts = torch.bincount(group, minlength=Bp * Hp * nkv)
    starts = torch.cumsum(counts, 0) - counts
    width = max(1, int(counts.max()))
    out = torch.zeros(Bp * Hp * nkv, width, dtype=torch.int32)
    out[group, torch.arange(group.numel()) - starts[group]] = qt.to(torch.int32)
    return counts.to(torch.int32).view(Bp, Hp, nkv), out.view(Bp, Hp, nkv, width)


def _per_kv_head(tiles: torch.Tensor, Hkv: int) -> torch.Tensor:
    """Per-query-head tile counts ``[B', H', n]`` -> a dkdv task's, which walks every query
    head of its kv head's group: ``[B', Hkv, n]`` (or ``H' = 1`` kept)."""
    Bp, Hp, n = tiles.shape
    if Hp == 1:
        return tiles
    return tiles.view(Bp, Hkv, Hp // Hkv, n).sum(2)


# NOTE: the fused kernel runs B * HKV tasks; below this many per thread, two kernels balance better
# (stick-breaking's two kernels cost more, ``use_fused``)
FUSED_MIN_TASKS_PER_THREAD = 4
STICK_BREAKING_FUSED_MIN_TASKS_PER_THREAD = 1


def use_fused(region: AttentionRegion, tasks: int, learn: tuple[str, ...] = ()) -> bool:
    """One kernel over (b, hk) (five products per tile) when there are tasks enough for every
    thread, or when captured tensors learn (its per-task partial sums are B * HKV, not B * HKV
    times the kv tiles); a normalised pointwise map needs its row sums first, so it always
    takes two. Stick-breaking runs the sums of softplus per tile before either
    (``_stick_breaking_sums``) and takes the fused kernel once every thread has a task: its two
    kernels walk every tile's keys twice more (causal L=2048, 4 query heads, 2 threads: 2 or 4
    kv heads 88 ms fused against 116-119 on two kernels; 1 kv head 131 against 115)."""
    norm = region.normalizer
    if isinstance(norm, nodes.StickBreakingNorm):
        return bool(learn) or tasks >= STICK_BREAKING_FUSED_MIN_TASKS_PER_THREAD * torch.get_num_threads()
    if isinstance(norm, nodes.PointwiseNorm) and norm.normalize:
        return False
    return bool(learn) or tasks >= FUSED_MIN_TASKS_PER_THREAD * torch.get_num_threads()


def launch_backward(
    region: AttentionRegion, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lse: torch.Tensor,
    do: torch.Tensor, delta: torch.Tensor, tensors: dict[str, torch.Tensor], *, scale: float, q_offset: int,
    bias: float = 0.0, learn: tuple[str, ...] = (), shape: BackwardShape | None = None,
    tables: BlockTables | None = None,
) -> tuple[torch.Tensor, ...]:
    """(dq, dk, dv) in the inputs' dtypes, then the gradients of the ``learn`` tensors (float64
    sums; the caller casts them to each tensor's dtype). ``scale``
    includes ``score_scale``; ``delta`` is ``rowsum(dO * O) - dlse`` for softmax,
    ``rowsum(dO * O)`` for a normalised pointwise map, unused otherwise (float32
    ``[B, Hq, Lq]``); ``lse`` is the forward's (softmax only). ``tables``: the tiles to visit
    at ``shape``'s tile size when the mask alone does not say (routing), else the mask's."""
    B, Hq, Lq, D = q.shape
    Lkv, Dv = k.shape[2], v.shape[3]
    # NOTE: float16 / bfloat16 Q and dO as float32 copies, like K and V (``_tiles``): the dkdv
    # kernel reads every query tile once per kv tile that sees it, and one compile of the
    # kernels serves every input dtype; bfloat16 with pair dots is read as it is, as words
    shape = shape or BackwardShape(D=D, Dv=Dv)
    shape = dataclasses.replace(shape, pair_dots=uses_pair_dots(shape, q, k, v, do))
    dq_dtype, dk_dtype, dv_dtype = q.dtype, k.dtype, v.dtype
    if shape.pair_dots:  # rows as feature-pair words (S, dP) and by row pairs (dK, dV): nothing converted
        row_pairs = [launcher.key_pairs(q, 2), launcher.key_pairs(do, 3)]
        qc, doc = launcher.words(q), launcher.words(do)
    else:
        row_pairs = []
        qc, doc = launcher.dense(q.float()), launcher.dense(do.float())
    BN = shape.block_n
    nkv = -(-Lkv // BN)
    if tables is None:
        tables = block_tables_for(region, B, Hq, Lq, Lkv, (shape.block_m, BN), q_offset, tensors)
    tcount, tindex, fcount, findex = schedule.derived(tables, ("by kv tile", nkv), lambda: (
        *transpose_tables(tables.partial_count, tables.partial_index, nkv),
        *transpose_tables(tables.full_count, tables.full_index, nkv)))
    if shape.pair_dots:  # K by key pairs for dQ; the tiles as words for S and dP
        kp, kt, vt = launcher.key_pairs(k, 4), _pair_tiles(k, BN), _pair_tiles(v, BN)
    else:
        kp, kt = _tiles(k, BN)
        _, vt = _tiles(v, BN)
    lkp = nkv * BN  # keys padded to whole tiles: the rows of dk and dv
    extra = [launcher.as_buffer(tensors[spec.name]) for spec in captured_specs(region)]
    # NOTE: outside softmax ``lse`` is a row buffer: dq writes 1 / L_i there for dkdv.
    softmax = isinstance(region.normalizer, nodes.SoftmaxNorm)
    lse = launcher.dense(lse.float()) if softmax else torch.zeros(B, Hq, Lq, dtype=torch.float32)
    delta = launcher.dense(delta.float())
    launcher.set_threads()
    rows = -(-Lq // shape.block_m) * shape.block_m  # query rows padded to whole tiles
    stick_breaking = isinstance(region.normalizer, nodes.StickBreakingNorm)

    def sums() -> torch.Tensor:
        return _stick_breaking_sums(region, shape, qc, kt, vt, doc, lse, delta, tables, extra, rows,
                                    scale=scale, q_offset=q_offset, bias=bias, Lkv=Lkv)

    dk = torch.empty(B, k.shape[1], lkp, D, dtype=torch.float32)
    dv = torch.empty(B, k.shape[1], lkp, Dv, dtype=torch.float32)
    if use_fused(region, B * k.shape[1], learn):
        dq = torch.zeros(B, Hq, rows, D, dtype=torch.float32)
        scattered = tuple(n for n in learn if learned_loads(region.score, n))
        partials = [torch.zeros(B * k.shape[1], tensors[n].numel(), dtype=torch.float64) for n in scattered]
        walks = []
        if stick_breaking:  # CE, and each row's T carried up the kv tiles
            walks = [sums(), torch.zeros(B, Hq, rows, dtype=torch.float32)]
        launcher.kernel_function(render_backward(region, shape, "fused", scattered))(
            qc, kt, vt, doc, lse, delta, *row_pairs, dq, kp, dk, dv, *walks, tcount, tindex, fcount, findex,
            *extra, *partials, float(scale), int(q_offset), float(bias), int(Lkv),
        )
        dq = dq[:, :, :Lq] * scale
        return (dq.to(dq_dtype), dk[:, :, :Lkv].to(dk_dtype), dv[:, :, :Lkv].to(dv_dtype),
                *_learned_totals(learn, scattered, partials, tensors))
    dq = torch.empty(B, Hq, Lq, D, dtype=torch.float32)
    threads = torch.get_num_threads()
    walks = []
    if stick_breaking:  # CE, and T at each tile's first key (dq writes it, dkdv reads it)
        walks = [sums(), torch.empty(B, Hq, rows, nkv, dtype=torch.float32)]  # dq writes each TE dkdv reads
    launcher.kernel_function(render_backward(region, shape, "dq"))(  # its products need no row pairs
        qc, kt, vt, doc, lse, delta, dq, kp, *walks, *_per_query_tile(tables, B, Hq),
        *extra, float(scale), int(q_offset), float(bias), int(Lkv),
    )
    scattered = tuple(n for n in learn if learned_loads(region.score, n))  # per kv tile task
    partials = [torch.zeros(B * k.shape[1] * nkv, tensors[n].numel(), dtype=torch.float64) for n in scattered]
    launcher.kernel_function(render_backward(region, shape, "dkdv", scattered))(
        qc, kt, vt, doc, lse, delta, *row_pairs, dk, dv, *walks, tcount, tindex, fcount, findex,
        schedule.kv_task_order(tables, lambda: _per_kv_head(tcount + fcount, k.shape[1]), B, k.shape[1], threads),
        *extra, *partials, float(scale), int(q_offset), float(bias), int(Lkv),
    )
    return (dq.to(dq_dtype), dk[:, :, :Lkv].to(dk_dtype), dv[:, :, :Lkv].to(dv_dtype),
            *_learned_totals(learn, scattered, partials, tensors))


def _per_query_tile(tables: BlockTables, B: int, Hq: int) -> list[torch.Tensor]:
    """The forward's tables and their balanced task order: the arguments of a kernel whose tasks
    are query tiles (``dq``, ``sums``)."""
    return [launcher.dense(tables.partial_count), launcher.dense(tables.partial_index),
            launcher.dense(tables.full_count), launcher.dense(tables.full_index),
            schedule.task_order(tables, B, Hq, torch.get_num_threads())]


def _learned_totals(learn: tuple[str, ...], scattered: tuple[str, ...], partials: list[torch.Tensor],
                    tensors: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    """Each ``learn`` tensor's gradient from its per-task float64 partial sums, shaped like it
    (zeros for one the score does not read: a sink's share comes from torch)."""
    totals = {n: g.sum(0) for n, g in zip(scattered, partials)}
    return [totals.get(n, torch.zeros(tensors[n].numel(), dtype=torch.float64)).view(tensors[n].shape)
            for n in learn]


def _stick_breaking_sums(
    region: AttentionRegion, shape: BackwardShape, qc: torch.Tensor, kt: torch.Tensor, vt: torch.Tensor,
    doc: torch.Tensor, lse: torch.Tensor, delta: torch.Tensor, tables: BlockTables, extra: list,
    rows: int, *, scale: float, q_offset: int, bias: float, Lkv: int,
) -> torch.Tensor:
    """Stick-breaking's ``CE[b, h, row, kt]``: the sum of ``softplus(s)`` over the row's kept keys
    in the kv tiles after ``kt`` (the ``sums`` kernel sums each tile, on the dq tasks and tables;
    the suffix sums run here in float64). ``rows``: the query rows padded to tiles. CE is
    ``Lq x Lkv / BN`` floats: the tile sums are turned into it in place, a (batch, head) at a
    time, so the float64 sums never hold more than one head's."""
    B, Hq, Lq = lse.shape
    nkv = kt.shape[2]
    ce = torch.zeros(B, Hq, rows, nkv, dtype=torch.float32)
    launcher.kernel_function(render_backward(region, shape, "sums"))(
        qc, kt, vt, doc, lse, delta, ce, *_per_query_tile(tables, B, Hq),
        *extra, float(scale), int(q_offset), float(bias), int(Lkv),
    )
    for per_tile in ce.view(B * Hq, rows, nkv)[:, :Lq]:
        # the sum over the later tiles: the row's total less the sum up to this tile, in float64
        # (the difference of two large sums then loses nothing a float32 keeps)
        before = per_tile.cumsum(-1, dtype=torch.float64)
        per_tile.copy_(before.sub_(before[:, -1:].clone()).neg_())
    return ce


def row_shift_gradient(
    region: AttentionRegion, name: str, tensors: dict[str, torch.Tensor], dlse: torch.Tensor, q_offset: int,
) -> torch.Tensor | None:
    """``d loss / d tensor`` through the ``row_shift`` (float32, flat), or None when it reads none
    of it: ``lse_i = lse'_i + r_i`` while the output does not move with ``r_i``, so each row adds
    ``dlse_i * d r_i / d load`` at the load's index. O(B * Hq * Lq). Exact: ``sum_j dS_ij`` is
    ``dlse_i``, so the kernel's scatter need not carry ``d r_i`` on every score (which multiplied
    dS's float32 rounding by the row term's derivative, large where it grows with ``q_idx``)."""
    from attncc.ir.evaluate import evaluate

    loads = learned_loads(region.row_shift, name)
    if not loads:
        return None
    B, H, Lq = dlse.shape
    grid = {"b": torch.arange(B).view(B, 1, 1), "h": torch.arange(H).view(1, H, 1),
            "q_idx": (torch.arange(Lq) + q_offset).view(1, 1, Lq)}
    ctx = {n: t.detach() for n, t in tensors.items()}
    tensor = tensors[name]
    grad = torch.zeros(tensor.numel(), dtype=torch.float32)
    for load in loads:
        local = derivative(region.row_shift, load)
        if local is None:
            continue
        value = torch.broadcast_to(evaluate(local, grid, ctx, torch.float32), dlse.shape) * dlse
        flat = torch.zeros(dlse.shape, dtype=torch.int64)
        for d, index in enumerate(load.src[1:]):
            flat = flat + evaluate(index, grid, ctx).long() * math.prod(tensor.shape[d + 1:])
        grad.index_add_(0, flat.flatten(), value.flatten())
    return grad


def sink_gradient(sink: torch.Tensor, lse: torch.Tensor, rowdot: torch.Tensor, dlse: torch.Tensor) -> torch.Tensor:
    """``d loss / d sink_h = sum_{b,i} p_sink (dlse_i - rowsum(dO_i * O_i))``, ``p_sink = exp(sink_h - lse_i)``.

    The sink is one more logit of every row with no value: ``d o_i / d sink_h = -p_sink o_i``
    and ``d lse_i / d sink_h = p_sink``.
    """
    logit = sink.detach().float().view(1, -1, 1)
    # NOTE: a sink of -inf weighs 0, also on a dead row (lse = -inf there: exp(nan) otherwise)
    p_sink = torch.where(logit == float("-inf"), 0.0, torch.exp(logit - lse))
    return (p_sink * (dlse - rowdot)).sum((0, 2)).to(sink.dtype)


__all__ = [
    "FUSED_MIN_TASKS_PER_THREAD", "STICK_BREAKING_FUSED_MIN_TASKS_PER_THREAD", "backward_unsupported",
    "launch_backward", "row_shift_gradient", "sink_gradient",
    "transpose_tables", "use_fused",
]
