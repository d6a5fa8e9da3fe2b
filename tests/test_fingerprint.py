"""Fingerprints: equal for equal variants (across processes), different when the result can differ.

A captured tensor's values are inputs, not part of the fingerprint; its shape and dtype are.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import attncc

ROOT = Path(__file__).resolve().parents[1]

BUILD = textwrap.dedent(
    """
    import torch, attncc
    slopes = torch.rand(4)
    doc_ids = torch.zeros(64, dtype=torch.int32)

    def alibi(score, b, h, q_idx, kv_idx):
        return score - slopes[h] * (q_idx - kv_idx).abs()

    def mask(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & (doc_ids[q_idx] == doc_ids[kv_idx])

    var = attncc.variant(alibi, mask=mask, normalizer=attncc.Softmax(sink=torch.zeros(4)),
                         routing=attncc.TopKBlocks(block=16, k=2))
    """
)


def _build_here() -> attncc.Variant:
    namespace: dict = {}
    exec(BUILD, namespace)
    return namespace["var"]


def test_fingerprint_is_stable_across_processes() -> None:
    script = BUILD + "\nprint(var.fingerprint)\n"
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT,
                            timeout=120, check=True)
    other = result.stdout.strip().splitlines()[-1]
    here = _build_here().fingerprint
    assert len(here) == 64 and int(here, 16) >= 0
    assert other == here


def test_fingerprint_equal_for_equal_variants_in_one_process() -> None:
    assert _build_here().fingerprint == _build_here().fingerprint


# ---- what changes it, what does not ---------------------------------------------------------

SLOPES = torch.rand(4)
TABLE = torch.zeros(4, 15)


def _fp(score=None, mask=None, normalizer="softmax", routing=None) -> str:
    return attncc.variant(score, mask=mask, normalizer=normalizer, routing=routing).fingerprint


def _causal(b, h, q, k):
    return q >= k


def _window(b, h, q, k):
    return (q - k).abs() <= 3


def _alibi(s, b, h, q, k):
    return s - SLOPES[h] * (q - k).abs()


def _softcap(s, b, h, q, k):
    return 30.0 * torch.tanh(s / 30.0)


BASE = {"score": _alibi, "mask": _causal, "normalizer": "softmax", "routing": None}
CHANGES = {
    "mask": {"mask": _window},
    "no_mask": {"mask": None},
    "mask_constant": {"mask": lambda b, h, q, k: q >= k - 1},
    "score": {"score": _softcap},
    "score_constant": {"score": lambda s, b, h, q, k: s - SLOPES[h] * (q - k).abs() * 1.0001},
    "no_score": {"score": None},
    "normalizer_sigmoid": {"normalizer": "sigmoid"},
    "normalizer_sigmoid_bias": {"normalizer": attncc.Sigmoid(bias=-2.0)},
    "normalizer_relu": {"normalizer": "relu"},
    "normalizer_pointwise_unnormalized": {"normalizer": attncc.Pointwise("relu", normalize=False)},
    "normalizer_stick_breaking": {"normalizer": "stick_breaking"},
    "normalizer_sink": {"normalizer": attncc.Softmax(sink=torch.zeros(4))},
    "routing_blocks": {"routing": attncc.TopKBlocks(block=16, k=2)},
    "routing_blocks_k": {"routing": attncc.TopKBlocks(block=16, k=3)},
    "routing_blocks_per": {"routing": attncc.TopKBlocks(block=16, k=2, per="query_block")},
    "routing_heads": {"routing": attncc.TopKHeads(2, torch.zeros(1, 8, 4))},
    "routing_blocks_causal": {"routing": attncc.TopKBlocks(block=16, k=2, causal=False)},
    "normalizer_pointwise_custom": {"normalizer": attncc.Pointwise(lambda s: torch.exp(s) * 0.5)},
    "normalizer_pointwise_custom_constant": {"normalizer": attncc.Pointwise(lambda s: torch.exp(s) * 0.25)},
    "normalizer_linear": {"score": None, "normalizer": attncc.Linear()},
    "normalizer_linear_relu": {"score": None, "normalizer": attncc.Linear("relu")},
    "normalizer_linear_unnormalized": {"score": None, "normalizer": attncc.Linear(normalize=False)},
    "normalizer_linear_callable": {"score": None, "normalizer": attncc.Linear(lambda x: torch.exp(x))},
    "normalizer_linear_decay": {"score": None, "normalizer": attncc.Linear(decay=torch.full((4,), 0.5))},
}


@pytest.mark.parametrize("change", sorted(CHANGES))
def test_fingerprint_differs_when_the_variant_differs(change: str) -> None:
    assert _fp(**{**BASE, **CHANGES[change]}) != _fp(**BASE)


def test_all_changes_are_pairwise_distinct() -> None:
    prints = {name: _fp(**{**BASE, **c}) for name, c in CHANGES.items()}
    assert len(set(prints.values())) == len(prints)


def _table_variant(table: torch.Tensor) -> str:
    return attncc.variant(lambda s, b, h, q, k: s + table[h, q - k + 7], mask=_causal).fingerprint


def test_captured_values_do_not_change_the_fingerprint() -> None:
    assert _table_variant(torch.zeros(4, 15)) == _table_variant(torch.randn(4, 15))


@pytest.mark.parametrize("other", [torch.zeros(4, 16), torch.zeros(8, 15), torch.zeros(4, 15, dtype=torch.float64),
                                   torch.zeros(4, 15, dtype=torch.float16)], ids=["len", "heads", "f64", "f16"])
def test_captured_shape_and_dtype_change_the_fingerprint(other: torch.Tensor) -> None:
    assert _table_variant(torch.zeros(4, 15)) != _table_variant(other)


def test_int_table_dtype_changes_the_fingerprint() -> None:
    def doc_variant(ids: torch.Tensor) -> str:
        return attncc.variant(mask=lambda b, h, q, k: ids[q] == ids[k]).fingerprint

    assert doc_variant(torch.zeros(32, dtype=torch.int32)) == doc_variant(torch.ones(32, dtype=torch.int32))
    assert doc_variant(torch.zeros(32, dtype=torch.int32)) != doc_variant(torch.zeros(32, dtype=torch.int64))


def test_sink_and_router_values_do_not_change_the_fingerprint() -> None:
    assert _fp(normalizer=attncc.Softmax(sink=torch.zeros(4))) == _fp(normalizer=attncc.Softmax(sink=torch.randn(4)))
    heads = lambda router: _fp(routing=attncc.TopKHeads(2, router))
    assert heads(torch.zeros(1, 8, 4)) == heads(torch.randn(1, 8, 4))
    assert heads(torch.zeros(1, 8, 4)) != heads(torch.zeros(1, 8, 8))


def test_fingerprint_ignores_function_names() -> None:
    def one(b, h, q, k):
        return q >= k

    def two(b, h, qi, ki):
        return qi >= ki

    assert attncc.variant(mask=one).fingerprint == attncc.variant(mask=two).fingerprint
