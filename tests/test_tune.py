"""The tuner: finds the fastest correct config, resumes, warm-starts, respects pins, never crashes.

Uses ``attncc.autotune.fake.FakeBackend``: it computes the true output with the reference
backend and sleeps for a config-dependent time, with one config that fails to "compile" and
faster configs that give wrong answers (the reference check must exclude them).
"""

from __future__ import annotations

import json
import math
import sqlite3
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import attncc
from attncc.autotune import commands
from attncc.autotune.cache import TuningCache, read_json
from attncc.autotune.fake import BEST, FakeBackend
from attncc.autotune.keys import ShapeKey, TuningKey
from attncc.autotune.lookup import device_for, select_config
from attncc.autotune.records import Entry, Pin, TuningCacheWarning
from attncc.autotune.space import SearchSpace
from attncc.autotune.study import backend_space, make_operands, tune_key, tune_program
from attncc.codegen import registry

causal = attncc.variant(mask=lambda b, h, q_idx, kv_idx: q_idx >= kv_idx, name="causal")
SHAPE = (1, 2, 64, 16)
FAST = {"warmup": 1, "repeats": 2, "progress": False}


@pytest.fixture(autouse=True)
def _isolated(monkeypatch, tmp_path):
    monkeypatch.setenv("ATTNCC_CACHE_DIR", str(tmp_path / "cachedir"))
    monkeypatch.delenv("ATTNCC_CACHE_PATH", raising=False)
    monkeypatch.delenv("ATTNCC_TUNING", raising=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # NOTE: timings on a shared 2-core machine are meaningless with spinning threads
    yield
    torch.set_num_threads(threads)


def _key(backend: FakeBackend, shape: tuple = SHAPE) -> TuningKey:
    operands = make_operands(causal, shape, torch.float32, "cpu")
    return TuningKey(causal.plan.fingerprint, backend.name, device_for("fake", None),
                     ShapeKey.from_tensors(operands["q"], operands["k"], operands["v"]))


def _select(backend: FakeBackend, shape: tuple = SHAPE) -> tuple[dict, str]:
    return select_config("fake", backend.search_space, causal.plan.fingerprint, torch.float32,
                         _key(backend, shape).shape, cache=TuningCache())


def test_exhaustive_budget_finds_the_fastest_correct_config_and_records_it():
    backend = FakeBackend(unit_ms=3.0)  # steps of 3 ms: far above the noise of a shared machine
    [result] = tune_program(causal, backend, [SHAPE], torch.float32, budget=24, warmup=1, repeats=3, progress=False)
    assert result.best_config == BEST, "wrong-but-faster configs must never win"
    assert {"tile": 64, "unroll": 4, "wrong": False} in backend.calls, "the failing config was tried"
    assert result.trials == 11  # 24 valid configs - 12 wrong - 1 that fails to compile
    assert result.default_ms > result.best_ms
    assert result.confirmed is not None and result.confirmed[0] > result.confirmed[1] and result.speedup > 1.5
    assert result.stored and TuningCache().get(result.key).config == BEST
    chosen, source = _select(backend)
    assert chosen == BEST and source.startswith("tuned: exact key")


def test_small_budget_stops_at_the_budget_and_is_no_worse_than_the_default():
    backend = FakeBackend()
    [result] = tune_program(causal, backend, [SHAPE], torch.float32, budget=5, seed=3, **FAST)
    assert result.trials == 5
    assert result.best_ms <= result.default_ms
    assert result.best_config["wrong"] is False


def test_rerun_resumes_and_never_measures_a_config_twice():
    backend = FakeBackend()
    tune_program(causal, backend, [SHAPE], torch.float32, budget=3, confirm=False, **FAST)
    first = [json.dumps(c, sort_keys=True) for c in backend.calls]
    backend.calls.clear()
    [result] = tune_program(causal, backend, [SHAPE], torch.float32, budget=6, confirm=False, **FAST)
    assert result.trials == 6
    assert not set(first) & {json.dumps(c, sort_keys=True) for c in backend.calls}
    backend.calls.clear()
    tune_program(causal, backend, [SHAPE], torch.float32, budget=6, confirm=False, **FAST)
    assert backend.calls == [], "a finished study runs nothing"


def test_new_shape_warm_starts_from_the_nearest_tuned_bucket():
    backend = FakeBackend()
    tuned = {"tile": 16, "unroll": 4, "wrong": False}
    TuningCache().record(Entry(_key(backend), tuned, 1.0, trials=10))
    tune_program(causal, backend, [(1, 2, 128, 16)], torch.float32, budget=2, **FAST)
    distinct = list(dict.fromkeys(json.dumps(c, sort_keys=True) for c in backend.calls))
    default = backend.search_space.default_for(_key(backend).shape)
    assert distinct == [json.dumps(default, sort_keys=True), json.dumps(tuned, sort_keys=True)]


def test_tuning_never_changes_a_pinned_choice():
    backend = FakeBackend()
    key = _key(backend)
    pinned = {"tile": 8, "unroll": 4, "wrong": False}
    TuningCache().pin(Pin(key.fingerprint, "fake", key.device, key.shape.tag, pinned, note="repro"))
    [result] = tune_program(causal, backend, [SHAPE], torch.float32, budget=24, **FAST)
    assert result.pinned and result.best_config["wrong"] is False
    chosen, source = _select(backend)
    assert chosen == pinned and source.startswith("pinned")
    assert [p.config for p in TuningCache().pins()] == [pinned]


def test_interrupted_tuning_keeps_its_best_and_resumes():
    backend = FakeBackend()
    key = _key(backend)
    operands = make_operands(causal, SHAPE, torch.float32, "cpu")
    calls = []

    def runner(config):
        calls.append(config)
        if len(calls) == 3 * 4:  # inside the fourth trial
            raise KeyboardInterrupt
        return backend.run(causal.plan, operands, causal.tensors, scale=None, q_offset=0, return_lse=False,
                           config=config)

    with pytest.raises(KeyboardInterrupt):
        tune_key(key, backend.search_space, runner, 8, warmup=1, repeats=2, progress=False)
    stored = TuningCache().get(key)
    assert stored is not None and stored.trials >= 1
    result = tune_key(key, backend.search_space, runner, 8, warmup=1, repeats=2, progress=False)
    assert result.trials == 8 and result.best_ms <= stored.time_ms


def test_a_backend_that_always_fails_is_pruned_not_fatal():
    key = TuningKey("b" * 64, "fake", "cpu-00000000000000aa", ShapeKey.of(1, 2, 64, 16))

    def broken(config):
        raise RuntimeError("nothing compiles")

    result = tune_key(key, FakeBackend().search_space, broken, 4, warmup=1, repeats=1, progress=False)
    assert result.best_config is None and math.isnan(result.best_ms) and not result.stored
    assert TuningCache().get(key) is None


def test_a_decoding_shape_is_tuned_with_its_queries_at_the_end_of_the_keys(monkeypatch):
    """``BxHxLqxLkvxD`` with Lq < Lkv is a decoding step. At q_offset 0 a causal query sees only
    key 0, so the study timed and checked a nearly empty problem instead of the step."""
    backend = FakeBackend(unit_ms=0.01)
    offsets = []
    run = backend.run

    def recording(*args, q_offset, **kwargs):
        offsets.append(q_offset)
        return run(*args, q_offset=q_offset, **kwargs)

    monkeypatch.setattr(backend, "run", recording)
    [result] = tune_program(causal, backend, [(1, 2, 1, 64, 16)], torch.float32, budget=2, confirm=False, **FAST)
    assert offsets and set(offsets) == {64 - 1}
    assert result.trials == 2, "the reference check must use the runner's offset (else every config is wrong)"


def test_a_result_the_cache_cannot_store_is_returned_and_never_reported_as_stored(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    cache = TuningCache(blocker / "t.sqlite")
    with pytest.warns(TuningCacheWarning, match="cannot be opened"):
        [result] = tune_program(causal, FakeBackend(unit_ms=0.01), [SHAPE], torch.float32, budget=2, cache=cache,
                                confirm=False, **FAST)
    assert not result.stored and "cannot store anything" in result.unstored
    assert result.entry is not None and (result.entry.config, result.entry.time_ms) == (result.best_config,
                                                                                        result.best_ms)


def test_a_damaged_study_file_is_moved_aside_and_tuning_starts_afresh(tmp_path):
    """A garbage ``optuna.v1.sqlite`` in the cache directory failed every ``attncc tune``."""
    study_file = tmp_path / "cachedir" / "optuna.v1.sqlite"
    study_file.parent.mkdir()
    study_file.write_bytes(b"garbage\n")
    with pytest.warns(TuningCacheWarning, match="Optuna study storage .* moved it to"):
        [result] = tune_program(causal, FakeBackend(unit_ms=0.01), [SHAPE], torch.float32, budget=2, confirm=False,
                                **FAST)
    assert result.trials == 2 and result.stored
    backups = [p for p in study_file.parent.glob("optuna.v1.sqlite.corrupt-*") if not p.name.endswith(("-wal", "-shm"))]
    assert [p.read_bytes() for p in backups] == [b"garbage\n"]


def test_an_explicit_storage_that_cannot_be_opened_is_an_error_naming_it(tmp_path):
    shared = tmp_path / "shared.sqlite"
    shared.write_bytes(b"garbage\n")
    with pytest.raises(RuntimeError, match=r"shared\.sqlite cannot be opened .*--storage"):
        tune_program(causal, FakeBackend(unit_ms=0.01), [SHAPE], torch.float32, budget=1, confirm=False,
                     storage=f"sqlite:///{shared}", **FAST)
    assert shared.read_bytes() == b"garbage\n", "a storage other workers may share is never moved"


def test_problem_for_every_shape_rejects_only_a_config_no_bucket_accepts():
    space = SearchSpace({"a": (4, 6, 64), "b": (2, 4)}, lambda c, s: c["a"] % c["b"] == 0 and c["a"] <= s.q_len)
    assert space.problem_for_every_shape({"a": 64, "b": 4}) is None, "valid for long queries only is still valid"
    assert "every shape" in space.problem_for_every_shape({"a": 6, "b": 4})
    assert "a=5 is not one of" in space.problem_for_every_shape({"a": 5, "b": 4})


def test_bad_budget_is_a_clear_error():
    with pytest.raises(ValueError, match="budget"):
        tune_key(_key(FakeBackend()), FakeBackend().search_space, lambda c: None, 0, progress=False)


# ---------------------------------------------------------------- command line

VARIANT_FILE = """
import attncc
causal = attncc.variant(mask=lambda b, h, q_idx, kv_idx: q_idx >= kv_idx, name="causal")
"""


def test_cli_tune_then_cache_commands(tmp_path, monkeypatch):
    backend = FakeBackend()
    monkeypatch.setattr(commands, "load_backend", lambda name, device: backend)
    monkeypatch.setitem(registry.BACKEND_MODULES, "fake", "attncc.autotune.fake")  # pins name known backends
    source = tmp_path / "model.py"
    source.write_text(VARIANT_FILE)
    runner = CliRunner()
    out = tmp_path / "ship.json"
    result = runner.invoke(commands.tune, env={"COLUMNS": "250"}, args=[f"{source}:causal", "--shapes", "1x2x64x16", "--budget", "3",
                                           "--warmup", "1", "--repeats", "2", "--no-progress", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "bh2_q64_kv64_d16_dv16_g1_float32" in result.output
    shipped = read_json(out).entries
    assert len(shipped) == 1 and shipped[0].trials == 3

    ls = runner.invoke(commands.cache, ["ls"], env={"COLUMNS": "250"})
    assert ls.exit_code == 0 and "1 entries" in ls.output
    fingerprint = shipped[0].key.fingerprint
    show = runner.invoke(commands.cache, ["show", fingerprint[:10]])
    assert show.exit_code == 0 and json.loads(show.output)["entries"][0]["config"] == shipped[0].config

    pin = runner.invoke(commands.cache, ["pin", f"{source}:causal", "--backend", "fake",
                                         "--config", json.dumps({"tile": 16, "unroll": 1, "wrong": False})])
    assert pin.exit_code == 0, pin.output
    assert [p.shape for p in TuningCache().pins()] == ["*"]
    bad = runner.invoke(commands.cache, ["pin", f"{source}:causal", "--config", "{not json"])
    assert bad.exit_code != 0 and "--config" in bad.output
    removed = runner.invoke(commands.cache, ["pin", f"{source}:causal", "--backend", "fake", "--remove"])
    assert removed.exit_code == 0 and TuningCache().pins() == []
    assert runner.invoke(commands.cache, ["pin", f"{source}:causal", "--backend", "fake",
                                          "--config", json.dumps({"tile": 16, "unroll": 1, "wrong": False})]).exit_code == 0

    exported = tmp_path / "export.json"
    assert runner.invoke(commands.cache, ["export", str(exported)]).exit_code == 0
    cleared = runner.invoke(commands.cache, ["clear", "--yes", "--pins"])
    assert cleared.exit_code == 0 and TuningCache().entries() == [] and TuningCache().pins() == []
    imported = runner.invoke(commands.cache, ["import", str(exported)])
    assert imported.exit_code == 0, imported.output
    assert [e.config for e in TuningCache().entries()] == [shipped[0].config] and len(TuningCache().pins()) == 1

    merged = tmp_path / "merged.json"
    assert runner.invoke(commands.cache, ["merge", str(merged), str(out), str(exported)]).exit_code == 0
    assert [e.time_ms for e in read_json(merged).entries] == [shipped[0].time_ms]


def _tune_args(tmp_path: Path, *extra: str) -> list[str]:
    source = tmp_path / "model.py"
    source.write_text(VARIANT_FILE)
    return [f"{source}:causal", "--shapes", "1x2x64x16", "--budget", "2", "--warmup", "1", "--repeats", "1",
            "--no-progress", "--storage", f"sqlite:///{tmp_path / 'optuna.sqlite'}", *extra]


def _unusable_cache_dir(tmp_path: Path, monkeypatch, kind: str) -> Path:
    """Points ATTNCC_CACHE_DIR at a cache that can store nothing; returns the database path.
    (Tests run as root, which ignores permissions: a path under a file stands for an unwritable one.)"""
    if kind == "unwritable":
        blocker = tmp_path / "a_file"
        blocker.write_text("not a directory")
        monkeypatch.setenv("ATTNCC_CACHE_DIR", str(blocker / "cache"))
        return blocker / "cache" / "tuning.v1.sqlite"
    cache = TuningCache()
    cache.record(Entry(_key(FakeBackend()), BEST, 1.0))
    cache.close()
    conn = sqlite3.connect(cache.path)
    conn.execute("UPDATE meta SET value = '2' WHERE name = 'schema_version'")
    conn.commit()
    conn.close()
    return cache.path


def test_cli_tune_with_an_unwritable_cache_ships_the_measured_results_and_says_the_cache_stored_none(
        tmp_path, monkeypatch):
    """It said "cache kept a better result" and wrote an --out without entries, exiting 0."""
    backend = FakeBackend(unit_ms=0.01)
    monkeypatch.setattr(commands, "load_backend", lambda name, device: backend)
    database = _unusable_cache_dir(tmp_path, monkeypatch, "unwritable")
    runner = CliRunner()
    nothing = runner.invoke(commands.tune, _tune_args(tmp_path))
    assert nothing.exit_code != 0 and f"tuning cache {database} cannot store results" in nothing.output
    assert backend.calls == [], "with nowhere to keep the results, fail before tuning"
    out = tmp_path / "ship.json"
    result = runner.invoke(commands.tune, _tune_args(tmp_path, "--out", str(out)))
    assert result.exit_code == 0, result.output
    assert "NOT stored" in result.output and "kept a better result" not in result.output
    assert "could not store 1 result(s)" in result.output
    [shipped] = read_json(out).entries
    assert shipped.trials == 2 and shipped.config in backend.calls


def test_cli_tune_refuses_an_out_file_that_is_not_a_tuning_cache_before_tuning(tmp_path, monkeypatch):
    backend = FakeBackend(unit_ms=0.01)
    monkeypatch.setattr(commands, "load_backend", lambda name, device: backend)
    out = tmp_path / "config.json"
    out.write_text('{"important": "user data"}')
    result = CliRunner().invoke(commands.tune, _tune_args(tmp_path, "--out", str(out)))
    assert result.exit_code != 0 and f"{out} exists and is not a readable attncc tuning cache" in result.output
    assert out.read_text() == '{"important": "user data"}' and backend.calls == []


@pytest.mark.parametrize("device", ["foo", "cuda:99"] + ([] if torch.cuda.is_available() else ["cuda"]))
def test_cli_tune_on_a_device_that_is_not_here_names_the_option(tmp_path, device):
    result = CliRunner().invoke(commands.tune, _tune_args(tmp_path, "--device", device))
    assert result.exit_code != 0 and "--device" in result.output and repr(device) in result.output


@pytest.mark.parametrize("kind", ["unwritable", "foreign-schema"])
def test_cache_commands_that_write_fail_naming_a_cache_that_cannot_store(tmp_path, monkeypatch, kind):
    """import, pin and clear reported success while nothing was stored (or, on another attncc's
    database, clear deleted its rows)."""
    database = _unusable_cache_dir(tmp_path, monkeypatch, kind)
    doc = tmp_path / "in.json"
    doc.write_text(json.dumps({"format": "attncc-tuning-cache", "version": 1,
                               "entries": [Entry(_key(FakeBackend()), BEST, 0.5).to_json()]}))
    tvm_config = json.dumps({"block_m": 64, "block_n": 64, "rows": 4, "vector": 16})
    runner = CliRunner()
    for args in (["import", str(doc)], ["pin", "abc/tvm/*/*", "--config", tvm_config],
                 ["pin", "abc/tvm/*/*", "--remove"], ["clear", "--yes", "--pins"]):
        result = runner.invoke(commands.cache, args)
        assert result.exit_code != 0, (args, result.output)
        assert f"tuning cache {database} cannot store anything" in result.output, (args, result.output)
    if kind == "foreign-schema":
        conn = sqlite3.connect(database)
        assert conn.execute("SELECT count(*) FROM entries").fetchone()[0] == 1
        conn.close()


def test_cache_merge_refuses_to_overwrite_a_file_that_is_not_a_tuning_cache(tmp_path):
    runner = CliRunner()
    source = tmp_path / "in.json"
    assert runner.invoke(commands.cache, ["export", str(source)]).exit_code == 0
    out = tmp_path / "config.json"
    out.write_text('{"important": "user data"}')
    result = runner.invoke(commands.cache, ["merge", str(out), str(source)])
    assert result.exit_code != 0 and f"{out} exists and is not a readable attncc tuning cache" in result.output
    assert out.read_text() == '{"important": "user data"}'


@pytest.mark.parametrize(("config", "message"), [
    ({"block_m": 33, "block_n": 16, "rows": 2, "vector": 16}, "block_m=33 is not one of"),
    ({"block_m": 128, "block_n": 16, "rows": 6, "vector": 16}, "attncc.codegen.tvm.space.fits"),
])
def test_cache_pin_for_every_shape_refuses_a_config_no_shape_can_use(tmp_path, config, message):
    """Only the knob names were compared: such a pin was stored, then ignored at every lookup."""
    source = tmp_path / "model.py"
    source.write_text(VARIANT_FILE)
    runner = CliRunner()
    for target in ("abc/tvm/*/*", f"{source}:causal"):
        result = runner.invoke(commands.cache, ["pin", target, "--config", json.dumps(config)])
        assert result.exit_code != 0 and message in result.output and "--config" in result.output, result.output
    assert TuningCache().pins() == []


def test_cache_pin_takes_a_usable_config_and_refuses_an_unknown_backend():
    runner = CliRunner()
    usable = json.dumps({"block_m": 128, "block_n": 128, "rows": 8, "vector": 32})
    assert runner.invoke(commands.cache, ["pin", "abc/tvm/*/*", "--config", usable]).exit_code == 0
    unknown = runner.invoke(commands.cache, ["pin", "abc/nosuchbackend/*/*", "--config", '{"a": 1}'])
    assert unknown.exit_code != 0 and "'nosuchbackend'" in unknown.output
    assert all(repr(name) in unknown.output for name in registry.BACKEND_MODULES)
    assert [p.backend for p in TuningCache().pins()] == ["tvm"]


def test_cli_rejects_bad_shapes_and_missing_targets(tmp_path):
    runner = CliRunner()
    bad = runner.invoke(commands.tune, ["x.py:v", "--shapes", "1x2x3"])
    assert bad.exit_code != 0 and "BxHxLxD" in bad.output
    none = runner.invoke(commands.tune, ["--shapes", "1x2x64x16"])
    assert none.exit_code != 0 and "--all-examples" in none.output
    missing = runner.invoke(commands.tune, [str(tmp_path / "nope.py:v"), "--shapes", "1x2x64x16"])
    assert missing.exit_code != 0 and "does not exist" in missing.output


# ---------------------------------------------------------------- the real CPU backend

def _tvm_backend():
    from attncc.codegen import registry

    backend = registry.load("tvm")
    if isinstance(backend, str):
        return None
    try:
        backend_space(backend, causal.plan)
    except ValueError:
        return None
    return backend


@pytest.mark.slow
def test_tvm_backend_tunes_and_beats_or_matches_its_default():
    backend = _tvm_backend()
    if backend is None:
        pytest.skip("attncc.codegen.tvm has no BACKEND with a search space yet")
    [result] = tune_program(causal, backend, [(1, 2, 128, 32)], torch.float32, budget=3, **FAST)
    assert result.trials == 3 and result.best_ms <= result.default_ms
    space = backend_space(backend, causal.plan)
    chosen, source = select_config("tvm", space, causal.plan.fingerprint, torch.float32, result.key.shape,
                                   cache=TuningCache())
    assert chosen == result.best_config and source.startswith("tuned")


assert Path(__file__).name == "test_tune.py"
