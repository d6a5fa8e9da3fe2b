"""Shared test set-up: every test starts from the same torch random state, so failures reproduce;
TVM test modules each get a private kernel cache."""

from __future__ import annotations

import os

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def tvm_cache_dir(tmp_path_factory: pytest.TempPathFactory):
    """A private TVM module cache for one test module (the disk-cache tests read it); a module
    opts in with ``pytestmark = pytest.mark.usefixtures("tvm_cache_dir")``."""
    from attncc.codegen.tvm import launcher

    old = os.environ.get("ATTNCC_CACHE_DIR")
    path = tmp_path_factory.mktemp("attncc-cache")
    os.environ["ATTNCC_CACHE_DIR"] = str(path)
    launcher.clear_memory_cache()
    yield path
    if old is None:
        os.environ.pop("ATTNCC_CACHE_DIR", None)
    else:
        os.environ["ATTNCC_CACHE_DIR"] = old


@pytest.fixture
def kernel_shapes(monkeypatch: pytest.MonkeyPatch):
    """``set(module, name, value)``: patch what the TVM kernel shapes are decided from (a host
    question such as ``launcher.transpose_lanes``); the memoized shapes, compiled functions and
    prepared launches are forgotten now and after the test."""
    from attncc.codegen.tvm import forward, launcher

    def forget() -> None:
        forward._kernel_shape.cache_clear()
        launcher.clear_memory_cache()

    def set_(module, name: str, value) -> None:
        monkeypatch.setattr(module, name, value)
        forget()

    yield set_
    forget()


@pytest.fixture
def without_pair_dots(kernel_shapes):
    """bfloat16 calls take the float32 conversion paths even on a host with AVX-512 BF16 (where
    they would multiply by pairs, ``attncc.codegen.tvm.bf16_pairs``)."""
    from attncc.codegen.tvm import forward

    kernel_shapes(forward, "uses_pair_dots", lambda *args: False)
