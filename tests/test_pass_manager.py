"""The pass manager: purity, verification after each pass, timing, dumps, facts, and the registry."""

from __future__ import annotations

import pytest
import torch

import attncc
from attncc.ir.graph import AttentionGraph
from attncc.ir.verify import VerifyError
from attncc.passes import PASS_MODULES, get_all_passes
from attncc.passes.manager import PassResult, attach, dump_text, facts_of, run_passes
from attncc.passes.pipeline import PIPELINE, compile_graph

slopes = torch.tensor([0.5, 0.25])


def causal(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


def alibi(score, b, h, q_idx, kv_idx):
    return score - slopes[h] * (q_idx - kv_idx)


def graph() -> AttentionGraph:
    return attncc.variant(alibi, mask=causal).ir


# ---- the registry (xDSL get_all_passes and its name check) ------------------------------


def test_registry_names_mirror_modules() -> None:
    """Every registered pass is the function of the same name in the module of that name."""
    passes = get_all_passes()
    assert len(set(passes)) == len(passes)
    for name, fn in passes.items():
        assert fn.__name__ == name
        assert fn.__module__ == f"attncc.passes.{name}"
        assert name in PASS_MODULES


def test_pipeline_passes_are_registered() -> None:
    registered = set(get_all_passes().values())
    assert all(fn in registered for fn in PIPELINE)
    names = [fn.__name__ for fn in PIPELINE]
    assert len(names) == len(set(names))


# ---- running ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(get_all_passes()))
def test_every_pass_is_pure(name: str) -> None:
    """A pass returns a new graph; the input's payloads and facts are untouched."""
    g = graph()
    before = dump_text(g)
    result = get_all_passes()[name](g)
    assert isinstance(result, PassResult)
    assert dump_text(g) == before


def test_report_times_and_dumps_every_pass() -> None:
    plan, report = compile_graph(graph())
    assert [name for name, _, _ in report.passes] == [fn.__name__ for fn in PIPELINE]
    assert all(seconds >= 0 for _, seconds, _ in report.passes)
    assert [name for name, _ in report.dumps] == ["input"] + [fn.__name__ for fn in PIPELINE]
    simplified = dict(report.dumps)["simplify"]
    assert "score - (slopes[h] * (q_idx - kv_idx))" in simplified  # abs dropped under the causal mask
    assert plan.regions[0].row_shift is None


def test_verifier_runs_after_each_pass() -> None:
    """A pass that breaks an invariant is caught right after it, not at lowering."""

    def break_outputs(g: AttentionGraph) -> PassResult:
        out = g.copy()
        out.outputs = []
        return PassResult(out, True)

    with pytest.raises(VerifyError, match="no outputs"):
        run_passes(graph(), [break_outputs])


def test_pass_must_return_pass_result() -> None:
    def wrong(g: AttentionGraph) -> AttentionGraph:
        return g

    with pytest.raises(TypeError, match="expected PassResult"):
        run_passes(graph(), [wrong])  # type: ignore[list-item]


def test_dump_env_prints_to_stderr(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("ATTNCC_DUMP_IR", "1")
    compile_graph(graph())
    err = capsys.readouterr().err
    for fn in PIPELINE:
        assert f"attncc IR after {fn.__name__}" in err


def test_no_dump_by_default(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.delenv("ATTNCC_DUMP_IR", raising=False)
    compile_graph(graph())
    assert capsys.readouterr().err == ""


# ---- facts ---------------------------------------------------------------------------


def test_attach_copies() -> None:
    g = graph()
    (attn,) = g.attention_nodes()
    out = attach(g, attn, answer=42)
    assert facts_of(out, attn) == {"answer": 42} and facts_of(g, attn) == {}
    assert facts_of(attach(out, None, strategy="tiled")) == {"strategy": "tiled"}


def test_plan_fingerprint_includes_facts() -> None:
    """``score * 2`` and ``score * 3`` simplify to the same IR but different ``score_scale``."""
    two = attncc.variant(lambda score, b, h, q_idx, kv_idx: score * 2.0).plan
    three = attncc.variant(lambda score, b, h, q_idx, kv_idx: score * 3.0).plan
    assert two.regions[0].score == three.regions[0].score
    assert (two.regions[0].score_scale, three.regions[0].score_scale) == (2.0, 3.0)
    assert two.fingerprint != three.fingerprint
    again = attncc.variant(lambda score, b, h, q_idx, kv_idx: score * 2.0).plan
    assert again.fingerprint == two.fingerprint


def test_plan_fingerprint_is_stable_across_processes() -> None:
    """The tuning cache keys on it: facts (sparsity included) must not render memory addresses."""
    import subprocess
    import sys

    code = (
        "import torch, attncc\n"
        "ids = torch.arange(64) // 16\n"
        "var = attncc.variant(lambda s, b, h, q, kv: s * 2.0,"
        " mask=lambda b, h, q, kv: (ids[q] == ids[kv]) & (q >= kv))\n"
        "print(var.plan.fingerprint)\n"
    )
    runs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
            for _ in range(2)}
    assert len(runs) == 1 and len(runs.pop().strip()) == 64
