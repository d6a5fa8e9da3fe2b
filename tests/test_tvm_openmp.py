"""Generated kernels run their parallel loops on torch's OpenMP team (``codegen/tvm/openmp.py``),
or on TVM's own pool when asked; both give the reference's results."""

from __future__ import annotations

import ctypes
import functools
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("tvm")

import attncc
from attncc import masks
from attncc.codegen.tvm import openmp
from attncc.testing import check_against_reference, random_qkv

pytestmark = pytest.mark.usefixtures("tvm_cache_dir")

qkv = functools.partial(random_qkv, B=2, Hq=4, Hkv=2, Lq=300, Lkv=300, D=32, Dv=32)


@functools.cache
def document_variant() -> attncc.Variant:
    docs = torch.arange(300) // 70
    return attncc.variant(mask=lambda b, h, q, kv: (docs[q] == docs[kv]) & (q >= kv))


@pytest.fixture
def threads():
    """Set torch's thread count for one test, restored after it."""
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)
    openmp.select_pool(None)


def last_team() -> int:
    return openmp._SHIMS[0].attncc_last_team()


def parallel_launch_pointers() -> set[int]:
    return {pointer.value for pointer, _ in openmp._POINTERS.values()}


def openmp_torch() -> bool:
    return "OpenMP" in torch.__config__.parallel_info()


@pytest.mark.parametrize("count", [1, 2, 3])
def test_kernels_run_on_torchs_openmp_team(threads, count: int) -> None:
    """With torch built on OpenMP (the PyPI wheels), every loaded module's parallel launch is the
    OpenMP launcher and a call runs on a team of ``torch.get_num_threads()`` threads."""
    if not openmp_torch():
        pytest.skip("this torch has no OpenMP runtime to share")
    threads(count)
    check_against_reference(document_variant(), *qkv(seed=count), backend="tvm")
    address = openmp.launcher_address()
    assert address is not None
    assert parallel_launch_pointers() == {address}
    assert last_team() == count


def test_tvm_pool_on_request(threads) -> None:
    """``select_pool("tvm")`` (as ``ATTNCC_THREAD_POOL=tvm``) gives every module back TVM's own
    launcher; results are unchanged, and ``select_pool(None)`` restores the default."""
    threads(2)
    program = attncc.variant(mask=masks.causal & masks.sliding_window(40))
    check_against_reference(program, *qkv(seed=5), backend="tvm")
    openmp.select_pool("tvm")
    tvm_pointers = parallel_launch_pointers()
    assert openmp.launcher_address() not in tvm_pointers
    assert all(tvm_pointers)  # TVM's runtime launcher, set when each module was loaded
    check_against_reference(program, *qkv(seed=6), backend="tvm")
    check_against_reference(document_variant(), *qkv(seed=7), backend="tvm")
    if openmp_torch():
        openmp.select_pool(None)
        assert parallel_launch_pointers() == {openmp.launcher_address()}


def test_pool_name_is_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(openmp.POOL_ENV, "gomp")
    with pytest.raises(ValueError, match="ATTNCC_THREAD_POOL must be 'openmp' or 'tvm', got 'gomp'"):
        openmp.pool()


def test_the_launcher_binds_the_openmp_runtime_torch_loaded() -> None:
    """The shim's libgomp entry points are those of the copy in this process's memory map, not a
    second runtime with a pool of its own."""
    if not openmp_torch():
        pytest.skip("this torch has no OpenMP runtime to share")
    runtime = openmp.openmp_runtime()
    assert runtime is not None
    assert openmp.launcher_address() is not None
    loaded = ctypes.CDLL(runtime)
    maps = open("/proc/self/maps").read()
    assert maps.count(runtime) >= 1
    assert sum(1 for line in maps.splitlines() if "/libgomp" in line and runtime not in line) == 0
    assert loaded.omp_get_max_threads() == torch.get_num_threads()


AFFINITY_PROBE = (
    "import os, glob, torch, attncc\n"
    "torch.set_num_threads(2)\n"
    "q = torch.randn(1, 2, 64, 16)\n"
    "attncc.variant(mask=attncc.masks.causal)(q, q, q, backend='tvm')\n"
    "print(sorted({open(t + '/status').read().split('Cpus_allowed_list:')[1].split()[0]\n"
    "              for t in glob.glob('/proc/self/task/*')}))\n"
)


@pytest.mark.skipif(not hasattr(os, "sched_getaffinity") or len(os.sched_getaffinity(0)) < 2,
                    reason="needs Linux and two CPUs to see a thread pinned to one")
@pytest.mark.parametrize("pool", ["openmp", "tvm"])
def test_no_thread_is_pinned_to_one_core(pool: str) -> None:
    """TVM would pin its pool's workers to cores; beside torch's OpenMP threads, a process whose
    main thread shared a pinned worker's core ran small kernels 25x slower (launcher's NOTE)."""
    env = {**os.environ, "ATTNCC_THREAD_POOL": pool, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    env.pop("TVM_BIND_THREADS", None)
    done = subprocess.run([sys.executable, "-c", AFFINITY_PROBE], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    allowed = done.stdout.strip().splitlines()[-1]
    assert len(eval(allowed)) == 1, f"threads with different CPU sets: {allowed}"
