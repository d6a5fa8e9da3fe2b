"""Compile rendered modules and launch them: source file in a cache dir, import, grid, call.

A module is rendered once per (region, kind, dtype) and written to
``$ATTNCC_CACHE_DIR/triton`` (default ``~/.cache/attncc/triton``) under the sha256 of its
source, then imported from that file, so Triton can read the kernel's source and
tracebacks point at real lines. Sequence lengths, ``q_offset`` and the scale are runtime
arguments (``do_not_specialize``): a new length reuses the compiled kernel.
"""

from __future__ import annotations

import hashlib
import importlib.util
import math
import os
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from attncc.codegen.triton import space
from attncc.codegen.triton.source import captured_specs, render_source
from attncc.ir import nodes
from attncc.passes.plan import AttentionRegion

Tensor = torch.Tensor
Tables = tuple[Tensor, Tensor, Tensor, Tensor]  # partial count, partial index, full count, full index

_MODULES: dict[tuple[str, str, str, tuple[str, ...]], ModuleType] = {}
_SOURCES: dict[tuple[str, str, str, tuple[str, ...]], str] = {}


def cache_dir() -> Path:
    root = os.environ.get("ATTNCC_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "attncc")
    path = Path(root) / "triton"
    path.mkdir(parents=True, exist_ok=True)
    return path


_KEYS: dict[int, tuple[AttentionRegion, str]] = {}
_TABLES: dict[tuple, Tables] = {}


def region_key(region: AttentionRegion) -> str:
    """The region's structural digest, memoised per object (it is hashed on every call)."""
    hit = _KEYS.get(id(region))
    if hit is not None and hit[0] is region:
        return hit[1]
    key = nodes.digest(region)
    _KEYS[id(region)] = (region, key)
    return key


def source(region: AttentionRegion, kind: str, dtype: str, learn: tuple[str, ...] = ()) -> str:
    key = (region_key(region), kind, dtype, learn)
    if key not in _SOURCES:
        _SOURCES[key] = render_source(region, kind, dtype, learn)
    return _SOURCES[key]


def module(region: AttentionRegion, kind: str, dtype: str, learn: tuple[str, ...] = ()) -> ModuleType:
    """The imported module for ``region`` (rendered, written and imported on first use)."""
    key = (region_key(region), kind, dtype, learn)
    if key in _MODULES:
        return _MODULES[key]
    text = source(region, kind, dtype, learn)
    digest = hashlib.sha256(text.encode()).hexdigest()[:24]
    path = cache_dir() / f"attncc_{kind}_{digest}.py"
    if not path.exists():
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(text)
        os.replace(tmp, path)
    spec = importlib.util.spec_from_file_location(f"attncc_triton_{kind}_{digest}", path)
    assert spec is not None and spec.loader is not None
    loaded = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(loaded)
    _MODULES[key] = loaded
    return loaded


def compiled_count() -> int:
    """How many modules were rendered and imported in this process (tests check reuse)."""
    return len(_MODULES)


# ---- sparsity tables --------------------------------------------------------------------


def block_tables(region: AttentionRegion, B: int, H: int, Lq: int, Lkv: int, tile: tuple[int, int], q_offset: int,
                 tensors: dict[str, Tensor], device: torch.device) -> Tables:
    """Query-major tables [B', H', nq(, max)] from the sparsity pass (all PARTIAL when it has no facts)."""
    # NOTE: tables depend on the mask's captured tensors' values: the cache key carries their
    # storage and version counter, so an in-place update recomputes them.
    # An inference tensor has no version counter: its tables are built on every call.
    reads = region.mask.inputs() if region.mask is not None else ()
    try:
        versions = tuple((spec.name, tensors[spec.name].data_ptr(), tensors[spec.name]._version) for spec in reads)
    except RuntimeError:
        versions = None
    key = (region_key(region), B, H, Lq, Lkv, tile, q_offset, str(device), versions)
    if versions is not None and key in _TABLES:
        return _TABLES[key]
    from attncc.passes.sparsify import block_tables_for

    t = block_tables_for(region, B, H, Lq, Lkv, tile, q_offset, tensors)
    tables = tuple(x.to(device=device, dtype=torch.int32) for x in
                   (t.partial_count, t.partial_index, t.full_count, t.full_index))
    if versions is not None:
        if len(_TABLES) > 256:
            _TABLES.clear()
        _TABLES[key] = tables  # type: ignore[assignment]
    return tables  # type: ignore[return-value]


def transpose_tables(tables: Tables, nkv: int) -> Tables:
    """Kv-major tables (which query tiles see each kv tile) for the dK/dV kernel."""
    pc, pi, fc, fi = tables
    Bp, Hp, nq = pc.shape
    kind = torch.zeros(Bp, Hp, nq, nkv + 1, dtype=torch.int8, device=pc.device)
    for count, index, value in ((pc, pi, 1), (fc, fi, 2)):
        valid = torch.arange(index.shape[-1], device=pc.device).view(1, 1, 1, -1) < count.unsqueeze(-1).long()
        target = torch.where(valid, index.long(), nkv)  # padding goes to a spare column
        kind.scatter_(3, target, torch.where(valid, value, 0).to(torch.int8))
    kind = kind[..., :nkv].transpose(2, 3)  # [B', H', nkv, nq]
    return tables_from_map(kind)


def tables_from_map(kind: Tensor) -> Tables:
    """Lists of PARTIAL (1) and FULL (2) column indices per row of a block map, ascending."""
    out = []
    for value in (1, 2):
        hit = kind == value
        count = hit.sum(-1).to(torch.int32)
        width = max(1, int(count.max()) if count.numel() else 1)
        cols = torch.arange(kind.shape[-1], device=kind.device).expand_as(kind)
        order = torch.where(hit, cols, kind.shape[-1]).sort(dim=-1).values[..., :width]
        out += [count.contiguous(), torch.where(order < kind.shape[-1], order, 0).to(torch.int32).contiguous()]
    return out[0], out[1], out[2], out[3]


def _expand(tables: Tables, B: int, H: int) -> Tables:
    """Broadcast B'/H' = 1 tables with stride 0; keep the index tables at least one wide."""
    pc, pi, fc, fi = tables
    if pi.shape[-1] == 0:
        pi = torch.zeros(*pi.shape[:-1], 1, dtype=torch.int32, device=pi.device)
    if fi.shape[-1] == 0:
        fi = torch.zeros(*fi.shape[:-1], 1, dtype=torch.int32, device=fi.device)
    pc, pi, fc, fi = (t.contiguous() for t in (pc, pi, fc, fi))
    return (pc.expand(B, H, -1), pi.expand(B, H, -1, -1), fc.expand(B, H, -1), fi.expand(B, H, -1, -1))


def _table_args(tables: Tables) -> list[Any]:
    pc, pi, fc, fi = tables
    return [pc, pi, fc, fi, *pc.stride(), *pi.stride()[:3], *fc.stride(), *fi.stride()[:3]]


# ---- arguments --------------------------------------------------------------------------


def sm_scale(region: AttentionRegion, scale: float | None, D: int) -> float:
    base = 1.0 / math.sqrt(D) if scale is None else float(scale)
    return base * (region.score_scale if region.score_scale is not None else 1.0)


def _captured_args(region: AttentionRegion, tensors: dict[str, Tensor], routing: list[Any] = ()) -> list[Any]:
    args: list[Any] = []
    for spec in captured_specs(region):
        t = tensors[spec.name]
        if t.dtype == torch.bool:
            t = t.view(torch.uint8)
        args += [t, *t.stride()]
    return args + list(routing)


def routing_args(region: AttentionRegion, q: Tensor, k: Tensor, tensors: dict[str, Tensor],
                 q_offset: int) -> list[Any]:
    """Run-time routing inputs: the TopKBlocks table and the TopKHeads weights (lower_routing)."""
    from attncc.passes import lower_routing

    args: list[Any] = []
    gate, heads = getattr(region, "gate", None), getattr(region, "head_select", None)
    if gate is not None:
        table = lower_routing.block_index_table(q, k, block=gate.block, k_top=gate.k, per=gate.per,
                                                causal=gate.causal, q_offset=q_offset).contiguous()
        row0 = q_offset if gate.per == "token" else q_offset // gate.block
        args += [table, table.stride(0), table.stride(1), table.stride(2), row0]
    if heads is not None:
        dense = head_weights(region, tensors, q.shape[1])
        args += [dense, *dense.stride()]
    return args


def head_weights(region: AttentionRegion, tensors: dict[str, Tensor], Hq: int) -> Tensor:
    """TopKHeads: ``[B, Hq, Lq]`` float32 weights, 0 where a token did not keep the head."""
    from attncc.passes import lower_routing

    heads = region.head_select
    kept, weights = lower_routing.head_selection(tensors[heads.router].detach(), heads.k)
    return lower_routing.head_weights_dense(kept, weights.float(), Hq)[..., 0].contiguous()


def _block_d(d: int) -> int:
    return max(16, 1 << max(d - 1, 0).bit_length())


def _launch_opts(config: space.Config) -> dict[str, int]:
    return {} if space.interpreted() else {"num_warps": config.num_warps, "num_stages": config.num_stages}


# ---- forward ----------------------------------------------------------------------------


def forward(region: AttentionRegion, q: Tensor, k: Tensor, v: Tensor, tensors: dict[str, Tensor], *,
            scale: float | None, q_offset: int, want_lse: bool, splits: int | None = None,
            config: space.Config | None = None) -> tuple[Tensor, Tensor]:
    """Run the fused forward; returns (o, lse) (lse float32 natural log; row sums for others).

    ``config``: tile sizes from the tuning cache (``select_config``), else ``space.default_config``.
    """
    if getattr(region, "linear", None) is not None:
        return forward_linear(region, q, k, v, tensors, q_offset=q_offset)
    B, Hq, Lq, D = q.shape
    Hkv, Lkv, Dv = k.shape[1], k.shape[2], v.shape[3]
    norm = region.normalizer
    softmax = isinstance(norm, nodes.SoftmaxNorm)
    kind = "split_kv" if splits is not None else "forward"
    config = config or space.default_config(D=D, Lq=Lq, Lkv=Lkv, kind=kind)
    n_splits = (splits or config.splits) if softmax and splits is not None else 1
    group = Hq // Hkv
    pack = pack_gqa(region, group, Lq, config.BLOCK_M)
    tile_m = config.BLOCK_M // group if pack else config.BLOCK_M
    tables = _expand(block_tables(region, B, Hq, Lq, Lkv, (tile_m, config.BLOCK_N), q_offset, tensors,
                                  q.device), B, Hq)
    mod = module(region, "forward", _dtype_name(q.dtype))
    split = n_splits > 1
    if split:
        o = torch.empty(n_splits, B, Hq, Lq, Dv, dtype=torch.float32, device=q.device)
        lse = torch.empty(n_splits, B, Hq, Lq, dtype=torch.float32, device=q.device)
    else:
        o = torch.empty(B, Hq, Lq, Dv, dtype=q.dtype, device=q.device)
        lse = torch.empty(B, Hq, Lq, dtype=torch.float32, device=q.device)
    sink = tensors[norm.sink.name] if softmax and norm.sink is not None else q
    sig_bias = sigmoid_bias(norm, Lkv)
    o_strides = o.stride()[-4:]
    l_strides = lse.stride()[-3:]
    grid = (triton_cdiv(Lq * group, config.BLOCK_M), B * Hkv, n_splits) if pack else \
        (triton_cdiv(Lq, config.BLOCK_M), B * Hq, n_splits)
    mod.attn_fwd[grid](
        q, k, v, o, lse, sink, *q.stride(), *k.stride(), *v.stride(), *o_strides, *l_strides,
        *_table_args(tables), o.stride(0) if split else 0, lse.stride(0) if split else 0, n_splits,
        Hq, Hq // Hkv, Lq, Lkv, q_offset, sm_scale(region, scale, D), sig_bias,
        *_captured_args(region, tensors, routing_args(region, q, k, tensors, q_offset)),
        D=D, DV=Dv, BLOCK_M=config.BLOCK_M, BLOCK_N=config.BLOCK_N, BLOCK_D=_block_d(D), BLOCK_DV=_block_d(Dv),
        WRITE_LSE=want_lse or split, SPLIT=split, PACK=pack, **_launch_opts(config),
    )
    if split:
        sink_t = tensors[norm.sink.name] if norm.sink is not None else None
        return merge_splits(o, lse, sink_t, q.dtype)
    return o, lse


def sigmoid_bias(norm: Any, Lkv: int) -> float:
    """Sigmoid attention's bias: given, or -ln(Lkv) with the full key length (SEMANTICS.md)."""
    if not isinstance(norm, nodes.SigmoidNorm):
        return 0.0
    return -math.log(Lkv) if norm.bias is None else float(norm.bias)


def forward_linear(region: AttentionRegion, q: Tensor, k: Tensor, v: Tensor, tensors: dict[str, Tensor], *,
                   q_offset: int) -> tuple[Tensor, Tensor]:
    """Chunked (causal) or global (unmasked) linear attention; the second output is unused."""
    B, Hq, Lq, D = q.shape
    Hkv, Lkv, Dv = k.shape[1], k.shape[2], v.shape[3]
    norm = region.normalizer
    chunk = 16 if space.interpreted() else min(64, max(16, region.linear.chunk))
    chunk = 1 << (chunk.bit_length() - 1)
    mod = module(region, "linear", _dtype_name(q.dtype))
    o = torch.empty(B, Hq, Lq, Dv, dtype=q.dtype, device=q.device)
    decay = tensors[norm.decay.name] if norm.decay is not None else q
    mod.attn_linear[(B * Hq,)](
        q, k, v, o, decay, *q.stride(), *k.stride(), *v.stride(), *o.stride(), Hq, Hq // Hkv, Lq, Lkv, q_offset,
        *_captured_args(region, tensors), D=D, DV=Dv, CHUNK=chunk, BLOCK_D=_block_d(D), BLOCK_DV=_block_d(Dv),
        **({} if space.interpreted() else {"num_warps": 8, "num_stages": 2}),
    )
    return o, torch.zeros(B, Hq, Lq, dtype=torch.float32, device=q.device)


def pack_gqa(region: AttentionRegion, group: int, Lq: int, block_m: int) -> bool:
    """Pack a GQA group's query heads into one tile (decoding-sized Lq, mask independent of h)."""
    if group == 1 or block_m % group or Lq * group > 4 * block_m:
        return False
    if getattr(region, "head_select", None) is not None:
        return False
    return region.mask is None or "h" not in region.mask.free_vars()


def merge_splits(o: Tensor, lse: Tensor, sink: Tensor | None, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """Log-sum-exp merge of split-KV partials; a sink enters once, here (SEMANTICS.md)."""
    parts = lse
    if sink is not None:
        sink_row = sink.float().view(1, 1, -1, 1).expand(1, lse.shape[1], -1, lse.shape[3])
        parts = torch.cat([lse, sink_row], dim=0)
    total = torch.logsumexp(parts, dim=0)
    safe = torch.where(torch.isfinite(total), total, 0.0)
    weights = torch.where(torch.isfinite(lse), torch.exp(lse - safe.unsqueeze(0)), 0.0)
    out = (weights.unsqueeze(-1) * o).sum(0)
    return out.to(dtype), total


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# ---- backward (softmax family) ----------------------------------------------------------


def backward(region: AttentionRegion, q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor, do: Tensor,
             tensors: dict[str, Tensor], *, scale: float | None, q_offset: int,
             dlse: Tensor | None = None, learn: tuple[str, ...] = ()) -> tuple[Tensor, ...]:
    """dq, dk, dv of softmax (sinks included: they only enter through lse), sigmoid, pointwise.

    ``dlse`` (a gradient flowing into the returned lse) enters as ``delta - dlse``, since
    ``d lse_i / d s_ij = p_ij``. ``learn`` names captured float tensors of the score function
    whose gradients are returned after dv, in that order.
    """
    B, Hq, Lq, D = q.shape
    Hkv, Lkv, Dv = k.shape[1], k.shape[2], v.shape[3]
    config = space.default_config(D=D, Lq=Lq, Lkv=Lkv, kind="backward")
    tile = (config.BLOCK_M, config.BLOCK_N)
    q_tables = block_tables(region, B, Hq, Lq, Lkv, tile, q_offset, tensors, q.device)
    kv_tables = transpose_tables(q_tables, triton_cdiv(Lkv, tile[1]))
    mod = module(region, "backward", _dtype_name(q.dtype), learn)
    do = do.contiguous() if do.stride(-1) != 1 else do
    norm = region.normalizer
    if getattr(region, "head_select", None) is not None:
        # NOTE: o = w * attn, so the attention sees do * w; delta = sum(attn * do * w) = sum(o * do).
        delta = (o.float() * do.float()).sum(-1)
        do = (do.float() * head_weights(region, tensors, Hq).unsqueeze(-1)).to(do.dtype)
    else:
        delta = (o.float() * do.float()).sum(-1)
    if isinstance(norm, nodes.PointwiseNorm) and not norm.normalize:
        delta = torch.zeros_like(delta)
    if dlse is not None:
        delta = delta - dlse.float()
    delta = delta.contiguous()
    lse = lse.float().contiguous()
    dq = torch.empty(B, Hq, Lq, D, dtype=torch.float32, device=q.device)
    dk_h = torch.empty(B, Hq, Lkv, D, dtype=torch.float32, device=q.device)
    dv_h = torch.empty(B, Hq, Lkv, Dv, dtype=torch.float32, device=q.device)
    grads = [torch.zeros(tensors[name].shape, dtype=torch.float32, device=q.device) for name in learn]
    grad_args = [x for g in grads for x in (g, *g.stride())]
    routing = routing_args(region, q, k, tensors, q_offset)
    common = [Hq, Hq // Hkv, Lq, Lkv, q_offset, sm_scale(region, scale, D), sigmoid_bias(norm, Lkv),
              *_captured_args(region, tensors, routing), *grad_args]
    if isinstance(norm, nodes.StickBreakingNorm):
        return _backward_stick_breaking(mod, q, k, v, do, delta, common, _expand(q_tables, B, Hq), tile, config)
    meta = dict(D=D, DV=Dv, BLOCK_M=tile[0], BLOCK_N=tile[1], BLOCK_D=_block_d(D), BLOCK_DV=_block_d(Dv),
                **_launch_opts(config))
    mod.attn_bwd_dkdv[(triton_cdiv(Lkv, tile[1]), B * Hq)](
        q, k, v, do, lse, delta, dk_h, dv_h, *q.stride(), *k.stride(), *v.stride(), *do.stride(),
        *dk_h.stride(), *dv_h.stride(), *_table_args(_expand(kv_tables, B, Hq)), *common, **meta,
    )
    mod.attn_bwd_dq[(triton_cdiv(Lq, tile[0]), B * Hq)](
        q, k, v, do, lse, delta, dq, *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dq.stride(),
        *_table_args(_expand(q_tables, B, Hq)), *common, **meta,
    )
    group = Hq // Hkv
    dk = dk_h.view(B, Hkv, group, Lkv, D).sum(2)
    dv = dv_h.view(B, Hkv, group, Lkv, Dv).sum(2)
    learned = [g.to(tensors[name].dtype) for g, name in zip(grads, learn, strict=True)]
    return (dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), *learned)


def _backward_stick_breaking(mod: ModuleType, q: Tensor, k: Tensor, v: Tensor, do: Tensor, delta: Tensor,
                             common: list[Any], tables: Tables, tile: tuple[int, int],
                             config: space.Config) -> tuple[Tensor, ...]:
    """One kernel over query tiles; dK/dV of each query head are added atomically, then summed per group."""
    B, Hq, Lq, D = q.shape
    Hkv, Lkv, Dv = k.shape[1], k.shape[2], v.shape[3]
    dq = torch.empty(B, Hq, Lq, D, dtype=torch.float32, device=q.device)
    dk_h = torch.zeros(B, Hq, Lkv, D, dtype=torch.float32, device=q.device)
    dv_h = torch.zeros(B, Hq, Lkv, Dv, dtype=torch.float32, device=q.device)
    mod.attn_bwd_sb[(triton_cdiv(Lq, tile[0]), B * Hq)](
        q, k, v, do, delta, dq, dk_h, dv_h, *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dq.stride(),
        *dk_h.stride(), *dv_h.stride(), *_table_args(tables), *common,
        D=D, DV=Dv, BLOCK_M=tile[0], BLOCK_N=tile[1], BLOCK_D=_block_d(D), BLOCK_DV=_block_d(Dv),
        **_launch_opts(config),
    )
    group = Hq // Hkv
    dk = dk_h.view(B, Hkv, group, Lkv, D).sum(2)
    dv = dv_h.view(B, Hkv, group, Lkv, Dv).sum(2)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)
