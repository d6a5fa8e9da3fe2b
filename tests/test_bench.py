"""``attncc bench``'s bookkeeping: the work it counts, the rounds it times and how it reads a target."""

from __future__ import annotations

import pytest
import torch

from attncc import bench


def _case(**samples: list[float]) -> bench.Case:
    case = bench.Case("window256", 2048, keep=bench._window)
    case.samples = dict(samples)
    case.results = {name: min(times) for name, times in samples.items()}
    return case


def test_kept_pairs_counts_the_mask_by_rows() -> None:
    """The rows are counted 1024 at a time; the total is the dense count."""
    for keep, L in ((bench._causal, 2500), (bench._window, 1500)):
        q, kv = torch.arange(L).view(-1, 1), torch.arange(L).view(1, -1)
        assert bench.kept_pairs(bench.Case("c", L, keep=keep)) == int(keep(q, kv).sum())
    assert bench.kept_pairs(bench.Case("dense", 300)) == 300 * 300


def test_paired_ratio_is_the_median_of_same_round_ratios() -> None:
    """A slow phase that hits both contenders of a round cancels in the pair; the minima need not."""
    case = _case(**{"attncc-tvm": [1.0, 2.0, 1.1], "flex-compiled": [2.0, 4.2, 2.0]})
    assert bench.paired_ratio(case, "flex-compiled") == 2.0  # the ratios 2.0, 2.1, 1.818...
    assert case.results["flex-compiled"] / case.results["attncc-tvm"] == 2.0
    assert bench.paired_ratio(case, "sdpa") is None


def test_targets_read_both_the_minima_and_the_paired_rounds() -> None:
    """``met`` follows the ratio of the minima; the paired median is printed beside it."""
    case = _case(**{"attncc-tvm": [10.0, 11.0, 12.0], "flex-compiled": [19.0, 25.0, 26.0],
                    "attncc-tvm causal": [40.0, 44.0, 48.0]})
    lines = bench.targets([case], mm=100.0)
    flex = next(line for line in lines if "FlexAttention" in line)
    assert "1.90 (target >= 2): NOT met (median of paired rounds: 2.17)" in flex
    light = next(line for line in lines if "speed of light" in line)
    work_ratio = bench.causal_work(2048) / case.work()
    assert f"{4.0 / work_ratio:.2f} (target >= 0.8)" in light
    assert f"(median of paired rounds: {4.0 / work_ratio:.2f})" in light


def test_run_case_keeps_every_round_and_the_minimum(monkeypatch) -> None:
    """Every contender is timed once per round (after its primer), the reference only in its first rounds."""
    calls: dict[str, int] = {"attncc-tvm": 0, "reference": 0}
    case = bench.Case("causal", 16, keep=bench._causal, reference=True)

    def contenders(c, q, k, v):
        def count(name):
            return lambda: calls.__setitem__(name, calls[name] + 1)
        return {name: count(name) for name in calls}

    monkeypatch.setattr(bench, "contenders", contenders)
    bench.run_case(case, repeats=4, echo=lambda line: None)
    assert case.rounds == 4
    assert len(case.samples["attncc-tvm"]) == 4
    assert len(case.samples["reference"]) == bench.REFERENCE_REPEATS
    assert calls == {"attncc-tvm": 1 + 2 * 4, "reference": 1 + bench.REFERENCE_REPEATS}
    assert case.results["attncc-tvm"] == min(case.samples["attncc-tvm"])


def _no_timing(monkeypatch) -> None:
    """Argument errors must come before any timing: the ``torch.mm`` baseline alone takes seconds."""

    def timed(*args, **kwargs):
        raise AssertionError("bench started timing before rejecting its arguments")

    monkeypatch.setattr(bench, "mm_gflops", timed)
    monkeypatch.setattr(bench, "run_case", timed)


def test_bench_rejects_zero_repeats(monkeypatch) -> None:
    """``--repeats 0`` used to reach ``min()`` of no timings inside ``mm_gflops``."""
    from click.testing import CliRunner

    _no_timing(monkeypatch)
    result = CliRunner().invoke(bench.bench, ["--quick", "--repeats", "0", "--only", "causal"])
    assert result.exit_code == 2, result.output
    assert "--repeats" in result.output


def test_bench_rejects_an_unknown_case_name_listing_the_cases(monkeypatch) -> None:
    """An unknown ``--only`` used to time the baseline, print an empty table and exit 0."""
    from click.testing import CliRunner

    _no_timing(monkeypatch)
    result = CliRunner().invoke(bench.bench, ["--quick", "--only", "nosuchcase", "--plot", "unused.png"])
    assert result.exit_code == 2, result.output
    assert "--only" in result.output and "nosuchcase" in result.output
    for name in ("causal", "window256", "document", "linear"):
        assert name in result.output
    with pytest.raises(ValueError, match="nosuchcase"):
        bench.run(True, 1, lambda line: None, only="nosuchcase")


def test_select_cases_keeps_every_case_of_the_name() -> None:
    cases = bench.build_cases(quick=True)
    assert bench.select_cases(cases, None) == cases
    chosen = bench.select_cases(cases, "causal")
    assert chosen and all(c.name == "causal" for c in chosen)


def test_plot_of_no_results_is_a_clear_error(tmp_path) -> None:
    """An empty selection used to divide by zero inside ``plot``."""
    with pytest.raises(ValueError, match="nothing to plot"):
        bench.plot([], str(tmp_path / "empty.png"))
