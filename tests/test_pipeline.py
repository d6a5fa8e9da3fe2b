"""The whole pipeline on every example program: verified, and the same numbers after every pass.

Each program of ``examples/*.py`` goes through ``PIPELINE`` one pass at a time; after each
pass the verifier runs and the reference backend, on the plan of the graph so far, must
give what it gives on the plan of the untouched graph (outputs, and the lse for a single
softmax region) at the example's own sizes (its captured tensors are sized for them).
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

from attncc.codegen.reference.attention import run_plan
from attncc.ir.nodes import SoftmaxNorm
from attncc.ir.verify import verify
from attncc.passes.lower import graph_to_plan
from attncc.passes.manager import dump_text
from attncc.passes.pipeline import PIPELINE, compile_graph
from attncc.testing import assert_close_to_reference
from attncc.variant import Program

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _import(path: Path) -> ModuleType:
    name = f"attncc_test_example_{path.stem}"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def example_programs() -> list[tuple[str, ModuleType, Program]]:
    found = []
    for path in sorted(EXAMPLES.glob("*.py")):
        if path.name.startswith("_"):
            continue
        module = _import(path)
        for attr, value in vars(module).items():
            if isinstance(value, Program) and not attr.startswith("_"):
                found.append((f"{path.stem}:{attr}", module, value))
    return found


PROGRAMS = example_programs()
IDS = [name for name, _, _ in PROGRAMS]


def inputs_for(module: ModuleType, program: Program) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Random float64 operands at the example's sizes, and its captured tensors in float64."""
    sizes = vars(module)
    B, H, D = sizes.get("BATCH", 2), sizes.get("HEADS", 4), sizes.get("HEAD_DIM", 32)
    Hkv = sizes.get("KV_HEADS", H)
    Lq = sizes.get("Q_LEN", sizes.get("SEQ_LEN", 256))
    Lkv = sizes.get("KV_LEN", sizes.get("SEQ_LEN", 256))
    if not any(region.routing is not None for region in program.plan.regions):
        Lq, Lkv = Lq // 2, Lkv // 2  # NOTE: 2 shared cores; captures indexed by position stay in range
    gen = torch.Generator().manual_seed(0)
    roles = program.operand_roles()
    operands, tensors = {}, {n: (t.double() if t.is_floating_point() else t) for n, t in program.tensors.items()}
    for name, role in roles.items():
        if role == "q" or (role == "tensor" and name.startswith("q")):
            operands[name] = torch.randn(B, H, Lq, D, generator=gen, dtype=torch.float64)
        elif role in ("k", "v", "tensor"):
            operands[name] = torch.randn(B, Hkv, Lkv, D, generator=gen, dtype=torch.float64)
        elif role == "scalar":
            tensors[name] = torch.tensor(0.8, dtype=torch.float64)
    return operands, tensors


def outputs(plan, operands, tensors):
    lse = plan.combine is None and isinstance(plan.regions[0].normalizer, SoftmaxNorm)
    out = run_plan(plan, operands, tensors, scale=None, q_offset=0, return_lse=lse)
    return out if lse else (out, None)


@pytest.mark.skipif(not PROGRAMS, reason="no examples yet")
@pytest.mark.parametrize(("name", "module", "program"), PROGRAMS, ids=IDS)
def test_numbers_unchanged_after_every_pass(name: str, module: ModuleType, program: Program) -> None:
    operands, tensors = inputs_for(module, program)
    Lkv = next(iter(operands.values())).shape[2]
    graph = verify(program.ir)
    ref_out, ref_lse = outputs(graph_to_plan(graph), operands, tensors)
    for fn in PIPELINE:
        before = dump_text(graph)
        result = fn(graph)
        graph = verify(result.graph)
        if not result.modified:
            assert dump_text(graph) == before, f"{fn.__name__} changed the graph but said it did not"
            continue
        got_out, got_lse = outputs(graph_to_plan(graph), operands, tensors)
        assert_close_to_reference(got_out, ref_out, None, Lkv, what=f"{name} after {fn.__name__}")
        if ref_lse is not None:
            assert_close_to_reference(got_lse.double(), ref_lse.double(), None, Lkv, what=f"{name} lse after {fn.__name__}")


@pytest.mark.skipif(not PROGRAMS, reason="no examples yet")
@pytest.mark.parametrize(("name", "module", "program"), PROGRAMS, ids=IDS)
def test_compile_graph_reports_every_pass(name: str, module: ModuleType, program: Program) -> None:
    plan, report = compile_graph(program.ir)
    assert [n for n, _, _ in report.passes] == [fn.__name__ for fn in PIPELINE]
    assert len(report.dumps) == len(PIPELINE) + 1
    assert all(region.fused for region in plan.regions)


def _plan(stem: str, attr: str | None = None):
    path = EXAMPLES / f"{stem}.py"
    if not path.exists():
        pytest.skip(f"examples/{stem}.py not there")
    return getattr(_import(path), attr or stem).plan


def test_alibi_keeps_its_distance_whole() -> None:
    """The causal mask removes ``abs``; the distance is not split into row and column terms
    (``simplify.cancels_growth``)."""
    region = _plan("alibi").regions[0]
    assert str(region.score) == "score - (slopes[h] * (q_idx - kv_idx))"
    assert region.row_shift is None


def test_softcapping_folds_scale() -> None:
    region = _plan("softcapping").regions[0]
    assert str(region.score) == "tanh(score) * 20.0" and region.score_scale == pytest.approx(1 / 20)


def test_differential_attention_is_one_group() -> None:
    plan = _plan("differential_attention")
    assert len(plan.groups) == 1 and plan.groups[0].shared == ("v",)


def test_linear_examples_lowered() -> None:
    assert _plan("linear_attention").strategy == "linear_chunked"
    assert _plan("linear_attention", "linear_attention_bidirectional").strategy == "linear_global"
    assert _plan("lightning_attention").strategy == "linear_chunked"


def test_routing_examples_lowered() -> None:
    gate = _plan("moba").regions[0].gate
    assert gate is not None and gate.causal
    assert _plan("moh").regions[0].head_select is not None


def test_decode_split_on_softmax_examples() -> None:
    assert _plan("causal").decode_split is not None
    assert _plan("stick_breaking").decode_split is None
