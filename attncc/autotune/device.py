"""Device fingerprints: a timing is only meaningful on the machine that measured it.

The fingerprint hashes what changes the best config: for a GPU its name, compute
capability, driver, CUDA and Triton versions; for a CPU its model, the SIMD flags that
code generators use and the thread count torch runs with. The readable description is
stored next to the hash in the cache so ``attncc cache ls`` can say which machine it was.
"""

from __future__ import annotations

import functools
import hashlib
import json
import platform
from typing import Any

import torch

SIMD_FLAGS = (
    "sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512dq",
    "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16", "amx_int8",
    "asimd", "asimdhp", "sve", "sve2", "sme",
)


@functools.cache
def _cpuinfo() -> dict[str, str]:
    """The first processor block of /proc/cpuinfo (empty where there is none); read once."""
    info: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if not line.strip():
                    if info:
                        break
                    continue
                name, _, value = line.partition(":")
                info.setdefault(name.strip(), value.strip())
    except OSError:
        pass
    return info


def cpu_description(threads: int | None = None) -> dict[str, Any]:
    info = _cpuinfo()
    flags = set((info.get("flags") or info.get("Features") or "").split())
    model = info.get("model name") or info.get("Model") or info.get("CPU part") or platform.processor()
    return {
        "kind": "cpu",
        "model": model or platform.machine(),
        "machine": platform.machine(),
        "simd": [f for f in SIMD_FLAGS if f in flags],
        "threads": int(threads if threads is not None else torch.get_num_threads()),
    }


def _triton_version() -> str | None:
    try:
        import triton
    except ImportError:
        return None
    return getattr(triton, "__version__", None)


def _driver_version() -> str | None:
    try:
        version = torch._C._cuda_getDriverVersion()  # an int like 12040
    except (AttributeError, RuntimeError):
        return None
    return f"{version // 1000}.{version % 1000 // 10}" if version else None


@functools.cache
def gpu_description(index: int) -> dict[str, Any]:
    major, minor = torch.cuda.get_device_capability(index)
    return {
        "kind": "cuda",
        "name": torch.cuda.get_device_name(index),
        "capability": f"{major}.{minor}",
        "driver": _driver_version(),
        "cuda": torch.version.cuda or torch.version.hip,
        "triton": _triton_version(),
    }


def describe(device: str | torch.device = "cpu") -> dict[str, Any]:
    """The readable facts the fingerprint hashes (the thread count is re-read on every call)."""
    device = torch.device(device)
    if device.type == "cpu":
        return cpu_description()
    if device.type == "cuda":
        return gpu_description(device.index if device.index is not None else torch.cuda.current_device())
    raise ValueError(f"device must be a cpu or cuda device, got {str(device)!r}")


def _hash(description_json: str) -> str:
    return hashlib.sha256(description_json.encode()).hexdigest()[:16]


def fingerprint_of(description: dict[str, Any]) -> str:
    """``"<kind>-<16 hex>"``: short, path- and key-safe, stable across runs."""
    return f"{description['kind']}-{_hash(json.dumps(description, sort_keys=True))}"


def fingerprint(device: str | torch.device = "cpu") -> str:
    """The fingerprint of ``device`` as it is configured now (thread count included)."""
    device = torch.device(device)
    threads = torch.get_num_threads() if device.type == "cpu" else None
    return _fingerprint(device, threads)


@functools.lru_cache(maxsize=16)
def _fingerprint(device: torch.device, threads: int | None) -> str:
    """Memoized on what can change in a process (the thread count): every kernel call asks."""
    return fingerprint_of(cpu_description(threads) if device.type == "cpu" else describe(device))


def gpu_limits(index: int = 0) -> dict[str, int]:
    """Per-block shared memory (opt-in) and registers, for ``space.triton_space``."""
    props = torch.cuda.get_device_properties(index)
    smem = getattr(props, "shared_memory_per_block_optin", 0) or getattr(props, "shared_memory_per_block", 49152)
    regs = getattr(props, "regs_per_multiprocessor", 65536)
    return {"smem_bytes": int(smem), "regs_per_sm": int(regs)}
