"""Generated TVM kernels run on torch's OpenMP threads, not on TVM's own thread pool.

Why: after a parallel op (a projection's ``torch.mm``), torch's OpenMP workers spin on their
cores for a few milliseconds waiting for more work. A TVM kernel launched in that window runs
its tasks on TVM's threads, which then share the cores with the spinners: causal L=1024,
8 heads, 2 threads took 12.2 ms right after a ``torch.mm`` against 7.8 ms after itself. Run on
torch's OpenMP team, the kernel's tasks go to the very threads that spin, and TVM's pool (which
spins in its turn, slowing the next torch op) is never started.

How: a TVM module calls its parallel loops through the pointer ``__TVMBackendParallelLaunch``,
which TVM's runtime sets when the module is loaded; ``adopt`` points it at
``attncc_parallel_launch`` (``openmp_launch.c``), which starts a team with libgomp's
``GOMP_parallel`` and gives each member one of TVM's task ids. The C file is compiled once per
cache directory with the compiler TVM itself links modules with; libgomp's entry points are
bound from the copy torch loaded. Where any of this is missing (no OpenMP runtime in the
process, no compiler, a module kept only in memory) the module keeps TVM's pool, which is
correct, only exposed to the spinning. ``ATTNCC_THREAD_POOL=tvm`` keeps TVM's pool everywhere.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import warnings
from pathlib import Path

from attncc.codegen.tvm import sealed

POOL_ENV = "ATTNCC_THREAD_POOL"
SOURCE = Path(__file__).with_name("openmp_launch.c")
SYMBOL = "__TVMBackendParallelLaunch"
OPENMP_RUNTIMES = ("libgomp", "libiomp5", "libomp")  # each exports the GOMP_* entry points

_POINTERS: dict[str, tuple[ctypes.c_void_p, int]] = {}  # module path -> (its pointer, TVM's value)
_POOL: list[str] = []  # the pool chosen by select_pool, overriding the environment
_SHIMS: list[ctypes.CDLL] = []  # keeps the loaded launcher library alive


def pool() -> str:
    """``"openmp"`` (the default) or ``"tvm"``: whose threads run the kernels' parallel loops."""
    chosen = _POOL[0] if _POOL else os.environ.get(POOL_ENV, "openmp").strip().lower() or "openmp"
    if chosen not in ("openmp", "tvm"):
        raise ValueError(f"{POOL_ENV} must be 'openmp' or 'tvm', got {chosen!r}")
    return chosen


def openmp_runtime() -> str | None:
    """The path of the OpenMP runtime this process has loaded (torch's), from the memory map."""
    try:
        maps = Path("/proc/self/maps").read_text().splitlines()
    except OSError:
        return None
    for line in maps:
        path = line.split(maxsplit=5)[-1] if line.count(" ") >= 5 else ""
        if path.startswith("/") and Path(path).name.startswith(OPENMP_RUNTIMES):
            return path
    return None


@functools.cache
def launcher_address() -> int | None:
    """The address of ``attncc_parallel_launch``, bound to torch's OpenMP runtime; None where it
    cannot be built or bound (the modules then keep TVM's pool)."""
    import torch  # noqa: F401  (torch loads its OpenMP runtime)

    runtime = openmp_runtime()
    if runtime is None:
        return None
    try:
        shim = ctypes.CDLL(str(_built_shim()))
        omp = ctypes.CDLL(runtime, mode=getattr(os, "RTLD_NOLOAD", 0) | os.RTLD_LAZY)
        entry = [ctypes.cast(getattr(omp, name), ctypes.c_void_p)
                 for name in ("GOMP_parallel", "omp_get_thread_num", "omp_get_num_threads")]
    except (OSError, AttributeError, RuntimeError, ValueError) as err:
        warnings.warn(f"attncc: kernels keep TVM's thread pool (no OpenMP launcher: {err})", stacklevel=2)
        return None
    shim.attncc_bind(*entry)
    _SHIMS.append(shim)
    return ctypes.cast(shim.attncc_parallel_launch, ctypes.c_void_p).value



def _built_shim() -> Path:
    """The compiled ``openmp_launch.c`` in the cache directory, built atomically when missing or
    damaged (``sealed``)."""
    from tvm.support import cc

    from attncc.codegen.tvm.launcher import cache_dir

    source = SOURCE.read_bytes()
    path = cache_dir() / f"openmp_launch-{hashlib.sha256(source + sealed.MAGIC).hexdigest()[:16]}.so"
    if not sealed.intact(path):
        sealed.write(path, lambda tmp: cc.create_shared(tmp, [str(SOURCE)], options=["-O2"]))
    return path


def adopt(path: Path) -> bool:
    """Point the loaded module at ``path`` to the OpenMP launcher (when that is the pool in use);
    True when its parallel loops now run on torch's OpenMP threads."""
    try:
        lib = ctypes.CDLL(str(path), mode=getattr(os, "RTLD_NOLOAD", 0) | os.RTLD_LAZY)
        pointer = ctypes.c_void_p.in_dll(lib, SYMBOL)
    except (OSError, ValueError):  # not loaded from this path, or no parallel loop in it
        return False
    _POINTERS.setdefault(str(path), (pointer, pointer.value or 0))
    return _point(str(path))


def _point(path: str) -> bool:
    pointer, tvm_value = _POINTERS[path]
    address = launcher_address() if pool() == "openmp" else None
    pointer.value = address or tvm_value
    return address is not None


def select_pool(name: str | None) -> None:
    """Switch every loaded module (and later ones) to ``"openmp"`` or ``"tvm"``; None: back to
    the environment's choice. For A/B measurements in one process."""
    _POOL[:] = [] if name is None else [name]
    pool()  # validates
    for path in _POINTERS:
        _point(path)
