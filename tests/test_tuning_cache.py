"""The tuning cache: never a worse result, safe under concurrent writers and crashes, never fatal.

Each test uses its own database under ``tmp_path``. Expected contents are computed in the
test from what was written (the minimum time per key), never read back from the cache.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from attncc.autotune import cache as cache_module
from attncc.autotune.cache import CacheUnavailable, TuningCache, merge_json, move_aside_if_damaged, read_json
from attncc.autotune.keys import ShapeKey, TuningKey
from attncc.autotune.lookup import select_config
from attncc.autotune.records import Entry, Pin, TuningCacheWarning
from attncc.autotune.space import tvm_space

DEVICE = "cpu-00000000000000aa"
OTHER_DEVICE = "cpu-00000000000000bb"
FP = "a" * 64
SPACE = tvm_space()
SHAPE = ShapeKey.of(1, 4, 128, 64)
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _isolated(monkeypatch, tmp_path):
    monkeypatch.setenv("ATTNCC_CACHE_DIR", str(tmp_path / "cachedir"))
    monkeypatch.delenv("ATTNCC_CACHE_PATH", raising=False)
    monkeypatch.delenv("ATTNCC_TUNING", raising=False)


def key(shape: ShapeKey = SHAPE, device: str = DEVICE, fp: str = FP) -> TuningKey:
    return TuningKey(fp, "tvm", device, shape)


def config(i: int, shape: ShapeKey = SHAPE) -> dict:
    return SPACE.configs(shape)[i]


def select(cache: TuningCache, shape: ShapeKey = SHAPE) -> tuple[dict, str]:
    return select_config("tvm", SPACE, FP, torch.float32, shape, device=DEVICE, cache=cache)


# ---------------------------------------------------------------- never worse

def test_record_keeps_the_faster_entry_and_never_a_worse_one(tmp_path):
    cache = TuningCache(tmp_path / "t.sqlite")
    assert cache.record(Entry(key(), config(1), 2.0))
    assert not cache.record(Entry(key(), config(2), 3.0)), "a slower result must not replace a faster one"
    assert cache.get(key()).config == config(1)
    assert cache.record(Entry(key(), config(3), 1.5))
    assert (cache.get(key()).config, cache.get(key()).time_ms) == (config(3), 1.5)


def test_unverified_entry_never_replaces_a_verified_one(tmp_path):
    cache = TuningCache(tmp_path / "t.sqlite")
    cache.record(Entry(key(), config(1), 2.0, verified=True))
    assert not cache.record(Entry(key(), config(2), 0.1, verified=False))
    assert cache.get(key()).config == config(1)


def _writer(path: str, worker: int, rounds: int) -> None:
    cache = TuningCache(path)
    for k in range(rounds):
        shape = ShapeKey.of(1, 4, 2 ** (k % 6 + 4), 64)
        cache.record(Entry(key(shape, fp=f"f{k % 5}"), config(worker, shape), _time(worker, k)))


def _time(worker: int, k: int) -> float:
    return 1.0 + (worker * 7 + k * 3) % 11 + worker / 100


def test_concurrent_writers_keep_every_key_and_the_minimum_time(tmp_path):
    path = str(tmp_path / "t.sqlite")
    TuningCache(path).entries()  # create the schema once, as a first user would
    ctx = multiprocessing.get_context("fork")
    workers, rounds = 4, 30
    procs = [ctx.Process(target=_writer, args=(path, w, rounds)) for w in range(workers)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    expected: dict[TuningKey, float] = {}
    for w in range(workers):
        for k in range(rounds):
            shape = ShapeKey.of(1, 4, 2 ** (k % 6 + 4), 64)
            kk = key(shape, fp=f"f{k % 5}")
            expected[kk] = min(expected.get(kk, float("inf")), _time(w, k))
    got = {e.key: e.time_ms for e in TuningCache(path).entries()}
    assert got == expected


_KILL_CHILD = """
import sys
from attncc.autotune.cache import TuningCache
from attncc.autotune.keys import ShapeKey, TuningKey
from attncc.autotune.records import Entry
cache = TuningCache(sys.argv[1])
shape = ShapeKey.of(1, 4, 128, 64)
config = {"tile_q": 16, "tile_kv": 64, "vector": 16, "unroll": 1, "grain": 1}
print("ready", flush=True)
n = 0
while True:  # big transactions, so that the kill lands inside one
    cache.record_many([Entry(TuningKey(f"child{n}_{i}", "tvm", "cpu-00000000000000aa", shape), config, 1.0)
                       for i in range(2000)])
    n += 1
"""


def _child_rows(path: Path) -> int:
    try:
        conn = sqlite3.connect(path, timeout=5)
        try:
            return conn.execute("SELECT count(*) FROM entries WHERE fingerprint LIKE 'child%'").fetchone()[0]
        finally:
            conn.close()
    except sqlite3.Error:
        return 0


def test_kill_9_during_a_write_leaves_earlier_entries_and_whole_transactions(tmp_path):
    path = tmp_path / "t.sqlite"
    cache = TuningCache(path)
    cache.record(Entry(key(), config(4), 0.5))
    child = subprocess.Popen([sys.executable, "-c", _KILL_CHILD, str(path)], stdout=subprocess.PIPE, cwd=REPO)
    try:
        assert child.stdout.readline().strip() == b"ready"
        deadline = time.time() + 30
        while _child_rows(path) < 2000 and time.time() < deadline:  # one transaction committed...
            time.sleep(0.02)
        time.sleep(0.05)  # ...and the next one under way
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait(30)
    assert child.returncode == -signal.SIGKILL
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    conn.close()
    fresh = TuningCache(path)
    assert (fresh.get(key()).config, fresh.get(key()).time_ms) == (config(4), 0.5)
    children = [e for e in fresh.entries() if e.key.fingerprint.startswith("child")]
    assert len(children) >= 2000 and len(children) % 2000 == 0, "a killed transaction must leave nothing behind"
    assert fresh.record(Entry(key(), config(5), 0.25))  # and the cache still takes writes


# ---------------------------------------------------------------- damage is never fatal

def test_garbage_file_is_moved_aside_and_a_fresh_cache_starts(tmp_path):
    path = tmp_path / "t.sqlite"
    garbage = b"this is not a database\x00\xff" * 200
    path.write_bytes(garbage)
    cache = TuningCache(path)
    with pytest.warns(TuningCacheWarning, match="corrupt"):
        assert cache.entries() == []
    backups = list(tmp_path.glob("t.sqlite.corrupt-*"))
    assert [b.read_bytes() for b in backups if not b.name.endswith(("-wal", "-shm"))] == [garbage]
    assert cache.record(Entry(key(), config(1), 1.0))
    assert TuningCache(path).get(key()).config == config(1)


def test_malformed_pages_in_a_real_database_are_detected(tmp_path):
    path = tmp_path / "t.sqlite"
    cache = TuningCache(path)
    cache.record_many([Entry(key(fp=f"f{i}"), config(1), 1.0) for i in range(300)])
    cache.close()
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    data = bytearray(path.read_bytes())
    page = 4096
    data[2 * page:4 * page] = b"\xa5" * (2 * page)  # trash two b-tree pages, keep the header
    path.write_bytes(bytes(data))
    with pytest.warns(TuningCacheWarning, match="corrupt"):
        assert TuningCache(path).entries() == []
    assert list(tmp_path.glob("t.sqlite.corrupt-*"))


def test_corrupt_entry_is_skipped_with_one_warning_and_others_still_work(tmp_path):
    path = tmp_path / "t.sqlite"
    cache = TuningCache(path)
    cache.record(Entry(key(), config(1), 1.0))
    bad_shape = ShapeKey.of(1, 4, 512, 64)
    cache.record(Entry(key(bad_shape), config(2, bad_shape), 1.0))
    conn = sqlite3.connect(path)
    conn.execute("UPDATE entries SET config = '{not json' WHERE shape = ?", (bad_shape.tag,))
    conn.commit()
    conn.close()
    fresh = TuningCache(path)
    with pytest.warns(TuningCacheWarning, match="corrupt entry") as record:
        entries = fresh.entries()
        fresh.entries()
    assert [e.key for e in entries] == [key()]
    assert len([w for w in record if "corrupt entry" in str(w.message)]) == 1, "warn once"


def test_entry_with_a_config_outside_the_search_space_is_never_used(tmp_path):
    cache = TuningCache(tmp_path / "t.sqlite")
    cache.record(Entry(key(), {"tile_q": 3, "tile_kv": 64, "vector": 16, "unroll": 1, "grain": 1}, 0.1))
    with pytest.warns(TuningCacheWarning, match="not one of"):
        chosen, source = select(cache)
    assert chosen == SPACE.default_for(SHAPE) and source.startswith("default")


def test_unknown_schema_version_is_ignored_and_left_untouched(tmp_path):
    path = tmp_path / "t.sqlite"
    TuningCache(path).record(Entry(key(), config(1), 1.0))
    conn = sqlite3.connect(path)
    conn.execute("UPDATE meta SET value = '99' WHERE name = 'schema_version'")
    conn.commit()
    conn.close()
    cache = TuningCache(path)
    with pytest.warns(TuningCacheWarning, match="unknown schema version"):
        chosen, source = select(cache)
    assert chosen == SPACE.default_for(SHAPE) and source.startswith("default")
    with pytest.raises(CacheUnavailable, match="schema version"):  # not written into a newer attncc's file
        cache.record(Entry(key(), config(2), 0.1))
    conn = sqlite3.connect(path)
    assert conn.execute("SELECT value FROM meta").fetchone()[0] == "99"
    assert conn.execute("SELECT config FROM entries").fetchall() == [(json.dumps(config(1), sort_keys=True),)]


def test_unknown_schema_version_is_never_read_nor_modified_not_even_on_first_use(tmp_path):
    """The first use of another attncc's database listed its entries (the connection was returned
    although the cache had just been disabled), ``clear`` then deleted them, and opening it
    created this version's missing tables in it: "ignoring it" must mean ignoring it."""
    path = tmp_path / "t.sqlite"
    own = TuningCache(path)
    own.record(Entry(key(), config(1), 1.0))
    own.close()
    conn = sqlite3.connect(path)
    conn.execute("UPDATE meta SET value = '2' WHERE name = 'schema_version'")
    conn.execute("DROP TABLE pins")
    conn.commit()
    conn.close()
    before = path.read_bytes()
    cache = TuningCache(path)
    with pytest.warns(TuningCacheWarning, match="unknown schema version"):
        assert cache.entries() == []
    assert cache.get(key()) is None and cache.pins() == [] and cache.unusable() is not None
    with pytest.raises(CacheUnavailable, match="schema version"):
        cache.clear(pins=True)
    cache.close()
    assert path.read_bytes() == before
    conn = sqlite3.connect(path)
    assert conn.execute("SELECT count(*) FROM entries").fetchone()[0] == 1
    assert conn.execute("SELECT name FROM sqlite_master WHERE name = 'pins'").fetchall() == []
    conn.close()


def test_entries_from_another_device_are_skipped_with_a_warning(tmp_path):
    cache = TuningCache(tmp_path / "t.sqlite")
    cache.record(Entry(key(device=OTHER_DEVICE), config(3), 0.1))
    with pytest.warns(TuningCacheWarning, match="only on other devices"):
        chosen, source = select(cache)
    assert chosen == SPACE.default_for(SHAPE) and source.startswith("default")


# ---------------------------------------------------------------- lookup order

def test_lookup_order_pin_then_exact_then_nearest_then_default(tmp_path, monkeypatch):
    cache = TuningCache(tmp_path / "t.sqlite")
    assert select(cache)[1] == f"default (no tuned entry for {SHAPE.tag} on {DEVICE})"

    near = ShapeKey.of(1, 4, 256, 64)
    far = ShapeKey.of(1, 4, 2048, 64)
    cache.record(Entry(key(far), config(7, far), 0.1))
    cache.record(Entry(key(near), config(5, near), 9.0))
    chosen, source = select(cache)
    assert chosen == config(5, near) and f"nearest bucket {near.tag}" in source, "nearest wins over faster-but-far"

    cache.record(Entry(key(), config(6), 5.0))
    chosen, source = select(cache)
    assert chosen == config(6) and source.startswith("tuned: exact key")

    cache.pin(Pin(FP, "tvm", "*", "*", config(9)))
    assert select(cache) == (config(9), f"pinned ({FP}/tvm/*/* in {cache.path})")
    cache.pin(Pin(FP, "tvm", DEVICE, SHAPE.tag, config(10)))
    assert select(cache)[0] == config(10), "the most specific pin wins"

    monkeypatch.setenv("ATTNCC_TUNING", "off")
    assert select(cache)[0] == config(10), "pins apply even with tuning off"
    cache.unpin(FP, "tvm", DEVICE, SHAPE.tag)
    cache.unpin(FP, "tvm")
    assert select(cache) == (SPACE.default_for(SHAPE), "default (ATTNCC_TUNING=off)")


_RECORD_CHILD = """
import sys
from attncc.autotune.cache import TuningCache
from attncc.autotune.keys import ShapeKey, TuningKey
from attncc.autotune.records import Entry
from attncc.autotune.space import tvm_space
shape = ShapeKey.of(1, 4, 128, 64)
config = tvm_space().configs(shape)[int(sys.argv[2])]
TuningCache(sys.argv[1]).record(Entry(TuningKey("a" * 64, "tvm", "cpu-00000000000000aa", shape), config, 1.0))
"""


def test_a_running_process_sees_another_process_s_writes(tmp_path, monkeypatch):
    """A lookup memoized in this process goes stale when another process tunes (``PRAGMA
    data_version``), at most ``EXTERNAL_CHECK_SECONDS`` later: a server picks up a fleet's cache."""
    cache = TuningCache(tmp_path / "t.sqlite")
    assert select(cache)[1].startswith("default")

    def child_records(i: int) -> None:
        subprocess.run([sys.executable, "-c", _RECORD_CHILD, str(cache.path), str(i)], check=True, cwd=REPO)

    monkeypatch.setattr(cache_module, "EXTERNAL_CHECK_SECONDS", 3600.0)
    select(cache)  # the check's clock starts
    child_records(6)
    assert select(cache)[1].startswith("default"), "within the interval the memo stands"
    monkeypatch.setattr(cache_module, "EXTERNAL_CHECK_SECONDS", 0.0)
    chosen, source = select(cache)
    assert chosen == config(6) and source.startswith("tuned: exact key")
    assert select(cache)[0] == config(6)


def test_nearest_bucket_never_crosses_head_dim_or_dtype(tmp_path):
    cache = TuningCache(tmp_path / "t.sqlite")
    wide = ShapeKey.of(1, 4, 128, 128)
    cache.record(Entry(key(wide), config(2, wide), 0.1))
    half = ShapeKey.of(1, 4, 128, 64, dtype="float16")
    cache.record(Entry(key(half), config(2, half), 0.1))
    assert select(cache)[1].startswith("default")


# ---------------------------------------------------------------- JSON

def test_export_import_round_trip(tmp_path):
    source = TuningCache(tmp_path / "a.sqlite")
    shapes = [ShapeKey.of(1, 4, 2 ** i, 64) for i in range(4, 9)]
    written = [Entry(key(s), config(i, s), 1.0 + i, trials=i, source="test", updated=100.0 + i)
               for i, s in enumerate(shapes)]
    source.record_many(written, {DEVICE: {"kind": "cpu", "model": "test"}})
    source.pin(Pin(FP, "tvm", "*", SHAPE.tag, config(0), note="repro"))
    source.export(tmp_path / "out.json")

    target = TuningCache(tmp_path / "b.sqlite")
    summary = target.import_json(tmp_path / "out.json")
    assert summary == {"stored": 5, "kept": 0, "pins": 1, "skipped": 0}
    assert target.entries() == sorted(written, key=lambda e: e.key.text)
    assert [p.to_json() for p in target.pins()] == [Pin(FP, "tvm", "*", SHAPE.tag, config(0), "repro").to_json()]
    assert target.devices() == {DEVICE: {"kind": "cpu", "model": "test"}}


def test_import_and_merge_never_replace_a_better_entry(tmp_path):
    local = TuningCache(tmp_path / "t.sqlite")
    other = ShapeKey.of(1, 4, 512, 64)
    local.record(Entry(key(), config(1), 1.0))
    local.pin(Pin(FP, "tvm", "*", "*", config(1), note="mine"))
    doc = {"format": "attncc-tuning-cache", "version": 1, "devices": {},
           "entries": [Entry(key(), config(2), 3.0).to_json(), Entry(key(other), config(2, other), 2.0).to_json()],
           "pins": [Pin(FP, "tvm", "*", "*", config(2), note="theirs").to_json()]}
    (tmp_path / "worse.json").write_text(json.dumps(doc))
    summary = local.import_json(tmp_path / "worse.json")
    assert summary["stored"] == 1 and summary["kept"] == 1
    assert local.get(key()).config == config(1)
    assert [p.note for p in local.pins()] == ["mine"], "an import never replaces a local pin"

    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps({**doc, "entries": [Entry(key(), config(3), 0.5).to_json()], "pins": []}))
    b.write_text(json.dumps({**doc, "entries": [Entry(key(), config(4), 0.7).to_json()], "pins": []}))
    merged = tmp_path / "merged.json"
    merge_json(merged, [a, b])
    merge_json(merged, [b])  # merging a worse file again changes nothing
    assert [(e.config, e.time_ms) for e in read_json(merged).entries] == [(config(3), 0.5)]


@pytest.mark.parametrize("text", ['{"important": "user data"}\n', '{"format": "attncc-tuning-cache", "vers'],
                         ids=["not-a-cache", "damaged-cache"])
def test_merge_never_overwrites_a_file_that_is_not_a_readable_tuning_cache(tmp_path, text):
    """Merging into a user's config.json (or a damaged cache) replaced it after only a warning."""
    source = tmp_path / "in.json"
    source.write_text(json.dumps({"format": "attncc-tuning-cache", "version": 1,
                                  "entries": [Entry(key(), config(1), 1.0).to_json()]}))
    out = tmp_path / "config.json"
    out.write_text(text)
    with pytest.raises(FileExistsError, match=r"config\.json exists and is not a readable attncc tuning cache"):
        merge_json(out, [source])
    assert out.read_text() == text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "in.json"]


def test_bad_json_entries_are_skipped_and_bad_files_never_fatal(tmp_path):
    good = Entry(key(), config(1), 1.0).to_json()
    bad_entries = [
        {**good, "time_ms": -1},
        {**good, "config": {"tile_q": {"__class__": "os.system"}}},
        {**good, "device": "../../etc"},
        {**good, "shape": "q128"},
        "not an object",
    ]
    path = tmp_path / "ship.json"
    path.write_text(json.dumps({"format": "attncc-tuning-cache", "version": 1, "entries": [good, *bad_entries]}))
    with pytest.warns(TuningCacheWarning):
        layer = read_json(path)
    assert [e.to_json() for e in layer.entries] == [good] and layer.skipped == len(bad_entries)

    for name, text in {"nan.json": '{"format": "attncc-tuning-cache", "version": 1, "entries": [NaN]}',
                       "garbage.json": "\x00\x01 not json", "future.json": json.dumps(
                           {"format": "attncc-tuning-cache", "version": 2, "entries": [good]})}.items():
        (tmp_path / name).write_text(text)
        with pytest.warns(TuningCacheWarning):
            assert read_json(tmp_path / name).entries == []


def test_shipped_caches_are_read_from_ATTNCC_CACHE_PATH(tmp_path, monkeypatch):
    ship = tmp_path / "shipped"
    ship.mkdir()
    doc = {"format": "attncc-tuning-cache", "version": 1, "entries": [Entry(key(), config(8), 0.3).to_json()]}
    (ship / "model.json").write_text(json.dumps(doc))
    monkeypatch.setenv("ATTNCC_CACHE_PATH", os.pathsep.join([str(ship), str(tmp_path / "missing.json")]))
    cache = TuningCache(tmp_path / "t.sqlite")
    with pytest.warns(TuningCacheWarning, match="does not exist"):
        chosen, source = select(cache)
    assert chosen == config(8) and str(ship / "model.json") in source
    cache.record(Entry(key(), config(9), 0.2))
    assert select(cache)[0] == config(9), "a faster local result beats the shipped one"


def test_default_cache_lives_in_ATTNCC_CACHE_DIR(tmp_path):
    cache = TuningCache()
    cache.record(Entry(key(), config(1), 1.0))
    assert cache.path.parent == tmp_path / "cachedir" and cache.path.name == "tuning.v1.sqlite"
    assert (tmp_path / "cachedir" / "tuning.v1.sqlite").exists()


def test_shipped_caches_are_found_through_the_entry_point_without_importing_the_package(tmp_path, monkeypatch):
    import importlib.metadata

    from attncc.autotune import cache as cache_module

    package = tmp_path / "site" / "modelpkg"
    (package / "tuning").mkdir(parents=True)
    (package / "__init__.py").write_text("raise RuntimeError('a shipped cache must not execute code')\n")
    doc = {"format": "attncc-tuning-cache", "version": 1, "entries": [Entry(key(), config(11), 0.3).to_json()]}
    (package / "tuning" / "cache.json").write_text(json.dumps(doc))
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    point = importlib.metadata.EntryPoint("modelpkg", "modelpkg.tuning", "attncc.tuning_caches")
    monkeypatch.setattr(importlib.metadata, "entry_points",
                        lambda group=None: [point] if group == "attncc.tuning_caches" else [])
    cache_module.reset_shipped()
    try:
        chosen, source = select(TuningCache(tmp_path / "t.sqlite"))
    finally:
        cache_module.reset_shipped()
    assert chosen == config(11) and str(package / "tuning" / "cache.json") in source
    assert "modelpkg" not in sys.modules


def test_one_cache_object_serves_several_threads(tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    cache = TuningCache(tmp_path / "t.sqlite")
    cache.record(Entry(key(), config(1), 1.0))
    with ThreadPoolExecutor(4) as pool:
        found = list(pool.map(lambda i: cache.get(key()), range(8)))
        pool.map(lambda i: cache.record(Entry(key(fp=f"t{i}"), config(i), 1.0)), range(8))
    assert all(e is not None and e.config == config(1) for e in found)
    assert {e.key.fingerprint for e in cache.entries()} == {FP} | {f"t{i}" for i in range(8)}


def test_unusable_cache_directory_means_defaults_not_a_crash(tmp_path, monkeypatch):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    monkeypatch.setenv("ATTNCC_CACHE_DIR", str(blocker / "cache"))
    cache = TuningCache()
    with pytest.warns(TuningCacheWarning, match="cannot be opened"):
        chosen, source = select(cache)
    assert chosen == SPACE.default_for(SHAPE) and source.startswith("default")


def test_every_write_to_an_unusable_cache_raises_instead_of_reporting_nothing_stored_as_kept(tmp_path, monkeypatch):
    """``record`` returned False (read as "the cache kept a better result") and ``pin``/``clear``
    returned quietly when the cache could store nothing."""
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    monkeypatch.setenv("ATTNCC_CACHE_DIR", str(blocker / "cache"))
    cache = TuningCache()
    with pytest.warns(TuningCacheWarning, match="cannot be opened"):
        assert cache.unusable() is not None
    writes = [lambda: cache.record(Entry(key(), config(1), 1.0)),
              lambda: cache.record_many([Entry(key(), config(1), 1.0)]),
              lambda: cache.pin(Pin(FP, "tvm", "*", "*", config(1))),
              lambda: cache.unpin(FP, "tvm"),
              lambda: cache.clear(pins=True)]
    for write in writes:
        with pytest.raises(CacheUnavailable, match=re.escape(f"tuning cache {blocker / 'cache'}")):
            write()


def test_a_damaged_sqlite_store_is_moved_aside_and_a_sound_or_missing_one_left_alone(tmp_path):
    sound = tmp_path / "sound.sqlite"
    conn = sqlite3.connect(sound)
    conn.execute("CREATE TABLE t (x)")
    conn.commit()
    conn.close()
    assert move_aside_if_damaged(sound, "store") is None and sound.exists()
    assert move_aside_if_damaged(tmp_path / "missing.sqlite", "store") is None
    damaged = tmp_path / "damaged.sqlite"
    damaged.write_bytes(b"garbage\n")
    with pytest.warns(TuningCacheWarning, match=r"store .*damaged\.sqlite is damaged"):
        backup = move_aside_if_damaged(damaged, "store")
    assert not damaged.exists() and backup.read_bytes() == b"garbage\n"
