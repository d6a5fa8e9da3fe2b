"""Compile generated kernels with TVM (llvm), cache them, and run them on torch tensors.

Modules are cached in memory and on disk under ``<cache dir>/tvm`` (``ATTNCC_CACHE_DIR`` or
the platform's user cache dir), keyed by the generated source (which holds the plan's
region, dims, dtype and knobs) and the target; sequence lengths, batch and head counts are
symbolic, so a new length reuses the module. Files are written atomically (temp file +
``os.replace``); a file that fails to load warns and is rebuilt. Torch tensors pass to the
module through DLPack, without copies when contiguous (but for the layouts a kernel reads:
float32 copies of half-precision K and V, V by key pairs for bfloat16 pair dots).
"""

from __future__ import annotations

import functools
import hashlib
import os
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from attncc.codegen.tvm import openmp, schedule, sealed
from attncc.codegen.tvm.kernels import KernelShape, captured_specs, render_forward
from attncc.passes.plan import AttentionRegion
from attncc.passes.sparsify import BlockTables

_MODULES: dict[str, Any] = {}
_FUNCTIONS: dict[str, Any] = {}  # source -> its module's ``attn`` (see kernel_function)
_LOCK = threading.Lock()
_THREADS: list[int] = []
STATS = {"compiled": 0, "loaded": 0, "memory_hits": 0}


def cache_dir() -> Path:
    """The modules' directory: ``tvm`` in attncc's cache directory (``$ATTNCC_CACHE_DIR``, else the
    user cache directory), where the tuning cache lives too."""
    from attncc.autotune.cache import cache_dir as attncc_cache_dir

    return attncc_cache_dir() / "tvm"


@functools.cache
def _host_cpu() -> str:
    from tvm.target import codegen

    return str(codegen.llvm_get_system_cpu())


def host_target() -> dict[str, str]:
    """The llvm target for this host's CPU (``-mcpu=native`` is refused by TVM's LLVM)."""
    return {"kind": "llvm", "mcpu": _host_cpu()}


@functools.cache
def host_has_feature(feature: str) -> bool:
    """Whether the kernels' target (``host_target``) has this LLVM CPU feature ("avx512f",
    "avx512bf16"): asked of LLVM for the target's CPU, which is what the code is compiled for,
    rather than of /proc/cpuinfo (an unknown CPU compiles as a generic one)."""
    import tvm
    from tvm.target import codegen

    return bool(codegen.target_has_features([feature], tvm.target.Target(host_target())))


@functools.cache
def transpose_lanes() -> int:
    """Block width of the in-register transposition of Q tiles (``KernelShape.transpose_lanes``)
    on this host: 8 with AVX-512, whose permutes take two vectors at once; 0 (strided reads)
    otherwise: on AVX2 (``mcpu=znver3`` on this Zen 4) the shuffles measured no faster."""
    return 8 if host_has_feature("avx512f") else 0


# NOTE: TVM sizes its thread pool once, from TVM_NUM_THREADS or its own count of physical
# cores, which is 1 on a 2-vCPU virtual machine; config_threadpool cannot grow the pool past
# that later. Allow every core before TVM creates the pool; set_threads then uses torch's count.
os.environ.setdefault("TVM_NUM_THREADS", str(os.cpu_count() or 1))
# NOTE: nor may TVM pin its pool's workers to cores: with torch's OpenMP threads beside them, a
# process whose main thread shared the pinned worker's core ran every small kernel in 8 ms
# instead of 0.3 (causal L=256, 4 heads; one process in two or three, by where the scheduler put
# the main thread), its threads taking turns on one core at each barrier.
os.environ.setdefault("TVM_BIND_THREADS", "0")


def set_threads() -> None:
    """TVM's pool follows ``torch.get_num_threads()`` (reconfigured when it changes)."""
    import tvm

    n = torch.get_num_threads()
    if _THREADS and _THREADS[0] == n:
        return
    tvm.get_global_func("runtime.config_threadpool")(0, n)
    _THREADS[:] = [n]


def module_key(source: str, target: dict[str, str]) -> str:
    """Memoized: hashing a kernel's source (kilobytes) cost about a tenth of a millisecond per
    launch (a str caches its own hash, so the memo lookup is cheap)."""
    memo = (source, tuple(sorted(target.items())))
    try:
        return _KEYS[memo]
    except KeyError:
        import tvm

        # NOTE: the seal's format is in the key: files of an older layout are never looked at
        text = repr((source, sorted(target.items()), tvm.__version__, sealed.MAGIC))
        key = _KEYS[memo] = hashlib.sha256(text.encode()).hexdigest()[:32]
        return key


_KEYS: dict[tuple[str, tuple], str] = {}


def compile_source(source: str, target: dict[str, str]) -> Any:
    """TVMScript text -> a runtime module exposing ``attn``."""
    import tvm

    func = tvm.script.from_source(source)
    return tvm.compile(func, target=tvm.target.Target(target))


def get_module(source: str) -> Any:
    """The compiled module for ``source``: from memory, else from disk, else compiled and saved."""
    target = host_target()
    key = module_key(source, target)
    with _LOCK:
        module = _MODULES.get(key)
        if module is not None:
            STATS["memory_hits"] += 1
            return module
        path = cache_dir() / f"{key}.so"
        module = _load(path)
        if module is None:
            module = compile_source(source, target)
            STATS["compiled"] += 1
            _save(module, path)
            reloaded = _load(path)
            module = reloaded if reloaded is not None else module
        else:
            STATS["loaded"] += 1
        _MODULES[key] = module
        return module


def kernel_function(source: str) -> Any:
    """The compiled ``attn`` of ``source`` (``get_module``), memoized by source: looking the
    function up in its module costs about 5 us, a tenth of a small call (a decoding step)."""
    function = _FUNCTIONS.get(source)
    if function is None:
        function = _FUNCTIONS[source] = get_module(source)["attn"]
    else:
        STATS["memory_hits"] += 1
    return function


def clear_memory_cache() -> None:
    """Forget the modules loaded in this process, the launches prepared with them (the next call
    loads them from disk again) and this thread's conversion workspace (``converted``)."""
    with _LOCK:
        _MODULES.clear()
        _FUNCTIONS.clear()
        _PREPARED.clear()
        _WORKSPACE.__dict__.pop("buffers", None)


def _load(path: Path) -> Any:
    import tvm

    if not path.exists():
        return None
    if not sealed.intact(path):
        warnings.warn(f"attncc: TVM module cache file {path} is damaged; recompiling", stacklevel=3)
        return None
    try:
        module = tvm.runtime.load_module(str(path))
        module["attn"]
    except Exception as err:
        warnings.warn(f"attncc: TVM module cache file {path} is unreadable ({err}); recompiling", stacklevel=3)
        return None
    openmp.adopt(path)
    return module


def _save(module: Any, path: Path) -> None:
    try:
        sealed.write(path, module.export_library)
    except Exception as err:
        warnings.warn(f"attncc: could not write TVM module cache {path} ({err})", stacklevel=3)


@dataclass(frozen=True, eq=False)
class Launch:
    """One forward kernel call with everything but its tensors decided: the compiled function, the
    tables in the kernel's layout, the task order and the scalar arguments (``prepare``).

    Why an object: ``forward.run_forward`` keeps one per call signature (``kept_launch``) and ``launch``
    one per bucket of decoding steps, so that a repeated call goes straight to the kernel. Right
    after a long kernel the host's caches are cold and deciding all this again took 0.2-0.3 ms, 2%
    of a 15 ms call (document mask, L=2048, 8 heads of 64).
    """

    attn: Any
    shape: KernelShape
    names: tuple[str, ...]  # the captured tensors the kernel reads, in argument order
    tables: tuple[torch.Tensor, ...]  # partial count, partial index, full count, full index, task order
    scalars: tuple[float | int, ...]  # scale, q_offset, bias (then Lkv, read off K at each call)
    chunks: tuple[int, ...]  # with chunked keys, KS and KC

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, tensors: dict[str, torch.Tensor],
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """(o in q's dtype, lse float32) of this call's tensors."""
        set_threads()
        B, Hq, Lq, _ = q.shape
        out = torch.empty(B, Hq, Lq, self.shape.Dv, dtype=q.dtype)
        lse = torch.empty(B, Hq, Lq, dtype=torch.float32)
        if self.shape.pair_dots:
            q, kp, vp = words(q), words(k), key_pairs(v, 1)
        else:
            q = dense(q)
            kp, vp = stage_kv(k, v, getattr(torch, self.shape.kv_type), strided=self.shape.kv_chunks)
        extra = [as_buffer(tensors[name]) for name in self.names]
        self.attn(q, kp, vp, out, lse, *self.tables, *extra, *self.scalars, int(k.shape[2]), *self.chunks)
        return out, lse


def prepare(
    region: AttentionRegion, shape: KernelShape, q: torch.Tensor, k: torch.Tensor, tables: BlockTables, *,
    scale: float, q_offset: int, bias: float, kv_chunk: int = 0,
) -> Launch:
    """The ``Launch`` of the forward kernel at ``shape`` on tensors shaped as ``q`` and ``k`` (only
    their shapes are read). ``kv_chunk``: with ``shape.kv_chunks``, the keys per chunk (q's batch
    is K's times the chunks per sequence)."""
    attn = kernel_function(render_forward(region, shape))
    B, Hq = q.shape[:2]
    chunks = (q.shape[0] // k.shape[0], kv_chunk) if shape.kv_chunks else ()
    tables = schedule.ragged_tile_partial(tables, kv_chunk or k.shape[2], shape.block_n)
    order = schedule.task_order(tables, B, Hq if shape.group == 1 else k.shape[1], torch.get_num_threads())
    kernel_tables = (dense(tables.partial_count), dense(tables.partial_index),
                     dense(tables.full_count), dense(tables.full_index), order)
    names = tuple(spec.name for spec in captured_specs(region))
    return Launch(attn, shape, names, kernel_tables, (float(scale), int(q_offset), float(bias)), chunks)


# NOTE: an entry holds the captured tensors it was prepared with, so that their ids, in its key,
# stay unique while it lives (as sparsify's tables of captured tensors do)
_PREPARED: dict[tuple, tuple[Launch, tuple[torch.Tensor, ...]]] = {}
PREPARED_KEPT = 64


def kept_launch(key: tuple, tensors: dict[str, torch.Tensor]) -> Launch | None:
    """The ``Launch`` kept under ``key`` (``forward.call_key``, or ``launch``'s) with these very
    captured tensors. Raises TypeError when the key does not hash."""
    found = _PREPARED.get(key)
    if found is None or len(found[1]) != len(tensors) or any(a is not b for a, b in zip(found[1], tensors.values())):
        return None
    STATS["memory_hits"] += 1
    return found[0]


def keep_launch(key: tuple, launch: Launch, tensors: dict[str, torch.Tensor]) -> None:
    """Keep ``launch`` for later calls under ``key`` (``kept_launch``); the oldest entry goes past
    ``PREPARED_KEPT``."""
    with _LOCK:
        if len(_PREPARED) >= PREPARED_KEPT:
            _PREPARED.pop(next(iter(_PREPARED)))
        _PREPARED[key] = (launch, tuple(tensors.values()))


def launch(
    region: AttentionRegion, shape: KernelShape, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    tensors: dict[str, torch.Tensor], tables: BlockTables, *, scale: float, q_offset: int, bias: float,
    kv_chunk: int = 0, keep: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the forward kernel once; returns (o in q's dtype, lse float32). ``keep``: the caller's
    tables are memoized (per bucket of decoding steps), so the ``Launch`` is kept per tables object
    and everything else ``prepare`` reads, and the steps of a decode reuse it; the key length
    matters only where a ragged last tile moves between the lists, without chunked keys. Tables
    built per call (routing) would only fill the memo."""
    if not keep:
        return prepare(region, shape, q, k, tables, scale=scale, q_offset=q_offset, bias=bias,
                       kv_chunk=kv_chunk)(q, k, v, tensors)
    key = ("launch", region, shape, tables, q.shape[:2], k.shape[:2], None if kv_chunk else k.shape[2], scale,
           q_offset, bias, kv_chunk, torch.get_num_threads())
    try:
        found = kept_launch(key, {})
    except TypeError:  # a payload that does not hash
        return launch(region, shape, q, k, v, tensors, tables, scale=scale, q_offset=q_offset, bias=bias,
                      kv_chunk=kv_chunk)
    if found is None:
        found = prepare(region, shape, q, k, tables, scale=scale, q_offset=q_offset, bias=bias, kv_chunk=kv_chunk)
        keep_launch(key, found, {})
    return found(q, k, v, tensors)


# NOTE: bytes; TVM's buffers assume their data this aligned (its kAllocAlignment) and move vectors
# with aligned instructions, which fault on less; torch's CPU allocator aligns to the same 64.
KERNEL_ALIGNMENT = 64


def aligned(t: torch.Tensor) -> bool:
    """Whether ``t``'s data starts where the kernels' buffers assume (``KERNEL_ALIGNMENT``)."""
    return t.data_ptr() % KERNEL_ALIGNMENT == 0


def dense(t: torch.Tensor) -> torch.Tensor:
    """``t`` contiguous and ``aligned``: a contiguous view at another offset (q, k or v unbound
    from one packed tensor, a NumPy array's memory) is copied. Such a view segfaulted the kernel."""
    t = t.contiguous()
    return t if aligned(t) else t.clone()


def stage_kv(k: torch.Tensor, v: torch.Tensor, dtype: torch.dtype, strided: bool = False,
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V as ``[B, Hkv, Lkv, D]`` in ``dtype``, the one the kernel reads them in
    (``KernelShape.kv_type``: their own, or float32 copies of float16 / bfloat16 ones): contiguous
    inputs of that dtype pass through without a copy; the kernel clamps reads past the last key
    instead of padding, and otherwise converts float16 / bfloat16 a tile at a time. ``strided``:
    the kernel takes any strides with contiguous features (a decoding step's slice of a
    preallocated cache, read in place). Converted copies go into this thread's workspace
    (``converted``), valid until its next call: the kernel is done with them when it returns."""
    def staged(t: torch.Tensor, slot: int) -> torch.Tensor:
        if t.dtype != dtype:  # NOTE: .to costs a microsecond even as a no-op
            t = converted(t, dtype, slot)
        return t if strided and t.stride(-1) == 1 and aligned(t) else dense(t)

    return staged(k, 0), staged(v, 1)


_WORKSPACE = threading.local()
WORKSPACE_MAX_BYTES = 32 * 2**20  # per buffer (K or V) and thread: 8 kv heads of 128 over 8192 keys in float32


def converted(t: torch.Tensor, dtype: torch.dtype, slot: int) -> torch.Tensor:
    """``t`` in ``dtype``, contiguous, written into buffer ``slot`` of this thread's workspace.

    Why: a fresh float32 copy of K or V is a new allocation of megabytes every call, which the C
    allocator maps and the kernel then faults in page by page: about 2000 minor page faults per
    call at L=2048 (8 heads of 64, bfloat16), 0.4-0.5 ms, 2% of the call. A buffer kept from the
    previous call is already mapped. Each thread keeps one buffer per slot, grown to the largest
    size it has needed up to ``WORKSPACE_MAX_BYTES`` (a larger copy is a fresh tensor: its kernel
    runs long enough for the faults not to matter; one buffer per slot and dtype);
    ``clear_memory_cache`` drops the calling thread's."""
    out = _workspace_buffer(t.numel(), dtype, slot).view(t.shape)
    out.copy_(t)
    return out


def _workspace_buffer(n: int, dtype: torch.dtype, slot: int) -> torch.Tensor:
    """``n`` elements of ``dtype`` from buffer ``slot`` of this thread's workspace (``converted``),
    or a fresh tensor past ``WORKSPACE_MAX_BYTES``."""
    if n * dtype.itemsize > WORKSPACE_MAX_BYTES:
        return torch.empty(n, dtype=dtype)
    buffers: dict[tuple[int, torch.dtype], torch.Tensor] = _WORKSPACE.__dict__.setdefault("buffers", {})
    buffer = buffers.get((slot, dtype))
    if buffer is None or buffer.numel() < n:
        buffer = buffers[slot, dtype] = torch.empty(n, dtype=dtype)
    return buffer[:n]


def words(t: torch.Tensor) -> torch.Tensor:
    """A bfloat16 ``[..., D]`` tensor (D even) as float32 ``[..., D / 2]`` words of feature pairs,
    without a copy when contiguous (pair dots, ``bf16_pairs``)."""
    t = dense(t)
    if t.storage_offset() % 2:  # NOTE: a storage not from torch's allocator (NumPy's) may start off the grid
        t = t.clone()
    return t.view(torch.float32)


def key_pairs(v: torch.Tensor, slot: int) -> torch.Tensor:
    """bfloat16 ``v [B, H, L, Dv]`` as float32 words ``[B, H, ceil(L / 2), Dv]``: word ``(p, c)``
    holds values ``2p`` and ``2p + 1`` of column ``c`` (a zero pads an odd length): rows by pairs,
    the layout the pair dots read where they sum over rows (``bf16_pairs``: the forward's V, the
    backward's Q, dO and K). One pass over the tensor, its size, into buffer ``slot`` of this
    thread's workspace (``converted``)."""
    B, H, L, Dv = v.shape
    half = L // 2
    out = _workspace_buffer(B * H * (L - half) * Dv * 2, torch.bfloat16, slot).view(B, H, L - half, Dv, 2)
    out[:, :, :half].copy_(v[:, :, : 2 * half].reshape(B, H, half, 2, Dv).transpose(-1, -2))
    if L % 2:
        out[:, :, half, :, 0].copy_(v[:, :, L - 1])
        out[:, :, half, :, 1].zero_()
    return out.view(B, H, L - half, Dv * 2).view(torch.float32)


def as_buffer(t: torch.Tensor) -> torch.Tensor:
    """A captured tensor as its kernel buffer: contiguous, bool as uint8, 0-d as one element."""
    t = dense(t.detach())
    t = t.reshape(1) if t.dim() == 0 else t
    return t.view(torch.uint8) if t.dtype == torch.bool else t
