"""The ``attncc`` command line and the FILE:NAME loader behind it.

Outputs are checked against independent facts: the program loaded separately, the pass
report's own dumps, and block maps classified by brute force over the dense mask.
"""

from __future__ import annotations

import os
import re
import sys
import textwrap
from pathlib import Path

import click
import pytest
import torch
from click.testing import CliRunner

from attncc.cli import LAZY_COMMANDS, LazyGroup, main, module_exists
from attncc.loader import LoadError, load_all, load_variant
from attncc.testing import assert_close_to_reference, reference_outputs
from attncc.variant import Program

VARIANTS_FILE = textwrap.dedent(
    """
    import torch
    import attncc

    slopes = torch.linspace(0.1, 0.8, 4)

    @attncc.variant(mask=lambda b, h, q_idx, kv_idx: q_idx >= kv_idx)
    def alibi(score, b, h, q_idx, kv_idx):
        return score - slopes[h] * (q_idx - kv_idx).abs()

    def causal(b, h, q_idx, kv_idx):
        return q_idx >= kv_idx

    def window(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & (q_idx - kv_idx < 100)

    causal_var = attncc.variant(mask=causal)
    window_var = attncc.variant(mask=window)

    windows = torch.tensor([16, 40, 64, 100])

    def per_head_window(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & (q_idx - kv_idx < windows[h])

    moa_var = attncc.variant(mask=per_head_window)
    not_a_variant = 42
    """
)


@pytest.fixture
def variants_file(tmp_path):
    path = tmp_path / "my_variants.py"
    path.write_text(VARIANTS_FILE)
    return path


def invoke(*args: str):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


# ---- loader -----------------------------------------------------------------------------


def test_load_variant_returns_the_named_program(variants_file):
    var = load_variant(f"{variants_file}:alibi")
    assert isinstance(var, Program)
    assert var.name == "alibi"
    assert set(var.tensors) == {"slopes"}


def test_load_all_finds_every_program(variants_file):
    assert sorted(load_all(variants_file)) == ["alibi", "causal_var", "moa_var", "window_var"]


def test_two_files_with_the_same_stem_do_not_shadow_each_other(tmp_path):
    """Module names are unique per path, so ``a/model.py`` and ``b/model.py`` both load."""
    for folder, body in (("a", "q_idx >= kv_idx"), ("b", "q_idx <= kv_idx")):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "model.py").write_text(
            f"import attncc\nvar = attncc.variant(mask=lambda b, h, q_idx, kv_idx: {body})\n"
        )
    first = load_variant(f"{tmp_path / 'a' / 'model.py'}:var")
    second = load_variant(f"{tmp_path / 'b' / 'model.py'}:var")
    assert first.fingerprint != second.fingerprint


def test_loading_twice_imports_once_and_an_edited_file_afresh(tmp_path):
    path = tmp_path / "edited.py"
    path.write_text("import attncc\nvar = attncc.variant(mask=lambda b, h, q_idx, kv_idx: q_idx >= kv_idx)\n")
    first = load_variant(f"{path}:var")
    assert load_variant(f"{path}:var") is first
    path.write_text("import attncc\nvar = attncc.variant(mask=lambda b, h, q_idx, kv_idx: q_idx <= kv_idx)\n")
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert load_variant(f"{path}:var").fingerprint != first.fingerprint


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("no_colon_here", "expected FILE:NAME"),
        ("{dir}/missing.py:x", "does not exist"),
        ("{file}:nope", "NAME 'nope' is not defined"),
        ("{file}:not_a_variant", "is of type int, expected an attncc Variant"),
        ("{file}:1bad", "must be a Python identifier"),
    ],
)
def test_load_variant_errors_say_what_is_wrong(variants_file, spec, message):
    spec = spec.format(dir=variants_file.parent, file=variants_file)
    with pytest.raises(LoadError, match=message):
        load_variant(spec)


# ---- explain ------------------------------------------------------------------------------


def test_explain_prints_the_graph_and_plan(variants_file):
    result = invoke("explain", f"{variants_file}:alibi")
    assert result.exit_code == 0, result.output
    var = load_variant(f"{variants_file}:alibi")
    assert f"graph alibi fingerprint={var.fingerprint[:16]}" in result.output
    assert "q_idx >= kv_idx" in result.output
    assert "slopes[h]" in result.output
    assert "plan " in result.output


def test_explain_passes_prints_every_dump(variants_file):
    result = invoke("explain", f"{variants_file}:alibi", "--passes")
    assert result.exit_code == 0, result.output
    dumps = load_variant(f"{variants_file}:alibi").report.dumps
    if not dumps:
        assert "none recorded" in result.output
    previous = None
    for name, text in dumps:
        title = "input graph" if name == "input" else f"after {name}"
        shown = f"=== {title} === (unchanged)" if text == previous else f"=== {title} ===\n{text}"
        assert shown in result.output
        previous = text


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("{dir}/missing.py:x", "does not exist"),
        ("{file}:nope", "NAME 'nope' is not defined"),
        ("{file}:not_a_variant", "expected an attncc Variant or Program"),
        ("just_a_name", "expected FILE:NAME"),
    ],
)
def test_explain_bad_spec_is_a_clear_error(variants_file, spec, message):
    result = invoke("explain", spec.format(dir=variants_file.parent, file=variants_file))
    assert result.exit_code != 0
    assert "Error:" in result.output and message in result.output
    assert "Traceback" not in result.output


def test_explain_error_inside_the_file_is_reported_not_a_traceback(tmp_path):
    path = tmp_path / "broken.py"
    path.write_text("import attncc\nraise RuntimeError('boom in user code')\n")
    result = invoke("explain", f"{path}:x")
    assert result.exit_code != 0
    assert "RuntimeError: boom in user code" in result.output


def test_explain_bad_tile_names_the_option(variants_file):
    result = invoke("explain", f"{variants_file}:alibi", "--blocks", "128", "--tile", "0x4")
    assert result.exit_code != 0
    assert "--tile" in result.output


def brute_force_classes(mask_fn, L: int, tile: tuple[int, int], h: int = 0) -> torch.Tensor:
    """0 empty / 1 partial / 2 full per tile, from the dense mask over valid indices."""
    q_idx = torch.arange(L).view(L, 1)
    kv_idx = torch.arange(L).view(1, L)
    dense = mask_fn(0, h, q_idx, kv_idx).expand(L, L)
    nq, nkv = -(-L // tile[0]), -(-L // tile[1])
    classes = torch.zeros(nq, nkv, dtype=torch.int8)
    for i in range(nq):
        for j in range(nkv):
            block = dense[i * tile[0]:(i + 1) * tile[0], j * tile[1]:(j + 1) * tile[1]]
            classes[i, j] = 2 if block.all() else (1 if block.any() else 0)
    return classes


def parse_grid(output: str, header: str, rows: int) -> torch.Tensor:
    """The grid drawn under the slice header ``[all b, all h]`` (or ``[all b, h=2]``, ...)."""
    lines = output.splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip().startswith(header)) + 1
    grid = [line.strip() for line in lines[start:start + rows]]
    code = {".": 0, "+": 1, "#": 2}
    return torch.tensor([[code[c] for c in row] for row in grid], dtype=torch.int8)


def assert_sound(drawn: torch.Tensor, truth: torch.Tensor) -> None:
    assert drawn.shape == truth.shape
    assert not ((drawn == 0) & (truth != 0)).any(), "a tile with visible entries was drawn empty"
    assert not ((drawn == 2) & (truth != 2)).any(), "a tile with masked entries was drawn full"


def test_explain_blocks_causal_matches_brute_force(variants_file):
    """Causal at a tile multiple: diagonal tiles partial, below full, above empty, exactly."""
    L, tile = 256, (64, 64)
    result = invoke("explain", f"{variants_file}:causal_var", "--blocks", str(L), "--tile", "64x64")
    assert result.exit_code == 0, result.output
    assert "legend:" in result.output
    expected = brute_force_classes(lambda b, h, q, kv: q >= kv, L, tile)
    assert torch.equal(parse_grid(result.output, "[all b, all h]", expected.shape[0]), expected)


def test_explain_blocks_window_is_sound(variants_file):
    """A tile drawn empty has no visible entry and a tile drawn full has no masked one."""
    L, tile = 200, (32, 16)
    result = invoke("explain", f"{variants_file}:window_var", "--blocks", str(L), "--tile", "32x16")
    assert result.exit_code == 0, result.output
    truth = brute_force_classes(lambda b, h, q, kv: (q >= kv) & (q - kv < 100), L, tile)
    assert_sound(parse_grid(result.output, "[all b, all h]", truth.shape[0]), truth)


def test_explain_blocks_draws_one_map_per_head_when_the_mask_reads_h(variants_file):
    """MoA-style ``windows[h]``: H is taken from the captured tensor, each head drawn soundly."""
    L, tile = 256, (32, 32)
    result = invoke("explain", f"{variants_file}:moa_var", "--blocks", str(L), "--tile", "32")
    assert result.exit_code == 0, result.output
    windows = [16, 40, 64, 100]
    for h, w in enumerate(windows):
        truth = brute_force_classes(lambda b, hh, q, kv, w=w: (q >= kv) & (q - kv < w), L, tile)
        assert_sound(parse_grid(result.output, f"[all b, h={h}]", truth.shape[0]), truth)


def test_explain_blocks_mask_reading_h_directly_asks_for_heads(tmp_path):
    path = tmp_path / "heads.py"
    path.write_text("import attncc\nvar = attncc.variant(mask=lambda b, h, q_idx, kv_idx: (q_idx >= kv_idx) & (h > 0))\n")
    result = invoke("explain", f"{path}:var", "--blocks", "128")
    assert result.exit_code != 0 and "--heads" in result.output
    result = invoke("explain", f"{path}:var", "--blocks", "128", "-H", "2", "--tile", "64")
    assert result.exit_code == 0, result.output
    truth = brute_force_classes(lambda b, h, q, kv: (q >= kv) & (h > 0), 128, (64, 64), h=0)
    assert_sound(parse_grid(result.output, "[all b, h=0]", 2), truth)


def test_explain_source_shows_the_automatic_backend(variants_file):
    from attncc.codegen import registry

    result = invoke("explain", f"{variants_file}:alibi", "--source")
    assert result.exit_code == 0, result.output
    var = load_variant(f"{variants_file}:alibi")
    expected = registry.choose(None, var.plan, torch.zeros(1, 1, 128, 64)).backend.name
    assert f"=== source: backend {expected} (" in result.output


def test_explain_source_renders_triton_without_a_gpu(variants_file):
    """Rendering needs no device: a CPU-only machine can read the Triton kernel it would run."""
    pytest.importorskip("triton", reason="the triton package is not installed (pip install -e '.[triton]')")
    result = invoke("explain", f"{variants_file}:alibi", "--source", "--backend", "triton")
    assert result.exit_code == 0, result.output
    assert "=== source: backend triton (requested;" in result.output
    assert "@triton.jit" in result.output


EXAMPLE_FILES = sorted(p for p in (Path(__file__).resolve().parents[1] / "examples").glob("*.py")
                       if p.name != "__init__.py")


@pytest.mark.parametrize("path", EXAMPLE_FILES, ids=[p.stem for p in EXAMPLE_FILES])
def test_explain_every_example(path):
    """Every program of every example explains, with its block map, from the command line."""
    programs = load_all(path)
    assert programs, f"{path.name} defines no attncc program"
    for name, program in programs.items():
        result = invoke("explain", f"{path}:{name}", "--blocks", "128")
        assert result.exit_code == 0, result.output
        assert f"fingerprint={program.fingerprint[:16]}" in result.output
        assert result.output.count("\nregion %") == len(program.plan.regions)


# ---- demo ---------------------------------------------------------------------------------


def test_demo_runs_every_variant_and_passes():
    result = invoke("demo")
    assert result.exit_code == 0, result.output
    for name in ("causal", "alibi", "window", "softcap", "sigmoid", "document"):
        assert name in result.output
    assert "FAIL" not in result.output
    assert result.output.count("OK") >= 6


def test_demo_exit_status_is_nonzero_when_a_check_fails(monkeypatch):
    """The demo is a smoke test: a result off the reference must turn into a failing exit status."""
    from attncc import demo

    def shifted_reference(program, operands, **kwargs):
        ref64, lowp = reference_outputs(program, operands, **kwargs)
        return ref64 + 1.0, lowp

    monkeypatch.setattr(demo, "reference_outputs", shifted_reference)
    result = invoke("demo", "--length", "32", "--repeats", "1")
    assert result.exit_code == 1
    assert "FAIL" in result.output


# ---- the lazy command registry ----------------------------------------------------------


def test_help_lists_builtin_commands_and_every_contributed_command_that_exists():
    result = invoke("--help")
    assert result.exit_code == 0, result.output
    assert "demo" in result.output and "explain" in result.output
    for name, target in LAZY_COMMANDS.items():
        listed = any(line.split()[:1] == [name] for line in result.output.splitlines() if line.startswith("  "))
        assert listed == module_exists(target.partition(":")[0]), name


def test_lazy_group_omits_missing_modules_and_reports_broken_ones(tmp_path, monkeypatch):
    (tmp_path / "attncc_cli_plugin_ok.py").write_text(
        "import click\n@click.command()\ndef hello():\n    'Say hello.'\n    click.echo('hello from plugin')\n"
    )
    (tmp_path / "attncc_cli_plugin_broken.py").write_text("raise ImportError('needs a missing dependency')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    group = LazyGroup(
        name="t",
        lazy_commands={
            "hello": "attncc_cli_plugin_ok:hello",
            "ghost": "attncc_no_such_module_anywhere:cmd",
            "broken": "attncc_cli_plugin_broken:cmd",
        },
    )
    runner = CliRunner()
    help_result = runner.invoke(group, ["--help"])
    assert help_result.exit_code == 0, help_result.output
    assert "hello" in help_result.output and "Say hello." in help_result.output
    assert "ghost" not in help_result.output
    assert "broken" in help_result.output and "unavailable" in help_result.output
    assert runner.invoke(group, ["hello"]).output == "hello from plugin\n"
    ghost = runner.invoke(group, ["ghost"])
    assert ghost.exit_code != 0 and "No such command" in ghost.output
    broken = runner.invoke(group, ["broken"])
    assert broken.exit_code != 0 and "needs a missing dependency" in broken.output
    for module in ("attncc_cli_plugin_ok", "attncc_cli_plugin_broken"):
        sys.modules.pop(module, None)


def test_main_is_a_click_group():
    assert isinstance(main, click.Group)


# ---- README and CI stay true --------------------------------------------------------------

ROOT = Path(__file__).resolve().parents[1]


def readme_blocks(language: str) -> list[str]:
    text = (ROOT / "README.md").read_text()
    return re.findall(rf"```{language}\n(.*?)```", text, flags=re.S)


def test_readme_test_command_is_what_ci_runs():
    """README's second set-up command and .ci/run must run the same tests."""
    commands = [block.strip() for block in readme_blocks("bash")]
    assert len(commands) == 2, commands
    assert commands[0].endswith("&& attncc demo")
    test_command = commands[1].split("&&")[-1].strip()
    ci = (ROOT / ".ci" / "run").read_text()
    assert f'TEST_COMMAND="{test_command}"' in ci


def test_readme_example_runs(capsys):
    """The 10-line example must run as printed, and its output must match the reference."""
    (example,) = readme_blocks("python")
    namespace: dict = {}
    exec(compile(example, "README.md", "exec"), namespace)
    assert "graph alibi" in capsys.readouterr().out
    var, q, k, v, o = (namespace[n] for n in ("alibi", "q", "k", "v", "o"))
    ref64, _ = reference_outputs(var, {"q": q, "k": k, "v": v})
    assert_close_to_reference(o, ref64, None, k.shape[2])


def test_readme_lists_every_example_that_exists():
    text = (ROOT / "README.md").read_text()
    listed = set(re.findall(r"`(examples/\w+\.py)`", text))
    present = {f"examples/{p.name}" for p in EXAMPLE_FILES}
    assert listed == present
