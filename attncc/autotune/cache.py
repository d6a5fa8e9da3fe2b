"""The tuning cache: a SQLite database per user, JSON files to ship, never a worse result.

SQLite in WAL mode with a busy timeout lets many processes read and write at once; every
write is one ``BEGIN IMMEDIATE`` transaction and an upsert that only replaces an entry with
a faster one, so a crash mid-write leaves the previous state and nothing tuned is ever
overwritten by a worse result. The schema version lives in the file name and in a ``meta``
table. A file that is not a database is moved aside to ``<name>.corrupt-<timestamp>`` and a
fresh one started; an unknown schema version disables the cache for this process (it
belongs to another attncc, which is never read nor modified). A disabled cache reads as
empty, and every write to it raises ``CacheUnavailable``: nothing is ever reported as stored
that was not. Caches shipped with a package are read-only JSON layers.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from attncc.autotune.keys import ShapeKey, TuningKey
from attncc.autotune.records import (
    FORMAT,
    FORMAT_VERSION,
    WILDCARD,
    Entry,
    Pin,
    config_problem,
    entry_from_json,
    pin_from_json,
    warn_once,
)
from attncc.autotune.shipping import merge_json, read_json, reset_shipped, shipped, write_json

__all__ = ["CacheUnavailable", "TuningCache", "cache_dir", "default_db_path", "merge_json", "move_aside_if_damaged",
           "read_json", "reset_shipped", "shipped"]

SCHEMA_VERSION = 1
_GENERATIONS: dict[str, int] = {}
_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS devices (device TEXT PRIMARY KEY, description TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS entries (
    fingerprint TEXT NOT NULL, backend TEXT NOT NULL, device TEXT NOT NULL, shape TEXT NOT NULL,
    config TEXT NOT NULL, time_ms REAL NOT NULL, trials INTEGER NOT NULL, source TEXT NOT NULL,
    verified INTEGER NOT NULL, updated REAL NOT NULL,
    PRIMARY KEY (fingerprint, backend, device, shape)
);
CREATE TABLE IF NOT EXISTS pins (
    fingerprint TEXT NOT NULL, backend TEXT NOT NULL, device TEXT NOT NULL, shape TEXT NOT NULL,
    config TEXT NOT NULL, note TEXT NOT NULL, created REAL NOT NULL,
    PRIMARY KEY (fingerprint, backend, device, shape)
);
"""
# NOTE: the WHERE clause is records.better(): verified beats unverified, then the faster wins.
_UPSERT = """
INSERT INTO entries VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
ON CONFLICT (fingerprint, backend, device, shape) DO UPDATE SET
    config = excluded.config, time_ms = excluded.time_ms, trials = excluded.trials,
    source = excluded.source, verified = excluded.verified, updated = excluded.updated
WHERE excluded.verified > entries.verified
   OR (excluded.verified = entries.verified AND excluded.time_ms < entries.time_ms)
"""


class CacheUnavailable(RuntimeError):
    """A write to a tuning cache that cannot store anything (unwritable, foreign schema, locked)."""


def cache_dir() -> Path:
    """``$ATTNCC_CACHE_DIR``, else the user cache directory (platformdirs)."""
    override = os.environ.get("ATTNCC_CACHE_DIR")
    if override:
        return Path(override).expanduser()
    return _user_cache_dir()


@functools.cache
def _user_cache_dir() -> Path:
    import platformdirs

    return Path(platformdirs.user_cache_dir("attncc", appauthor=False))


def default_db_path() -> Path:
    return cache_dir() / f"tuning.v{SCHEMA_VERSION}.sqlite"


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """An exclusive advisory lock (POSIX); recovery from corruption happens under it."""
    try:
        import fcntl
    except ImportError:  # NOTE: no fcntl (Windows): recovery is rare enough to run unlocked.
        yield
        return
    with open(path, "a+b") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _connect(path: Path) -> sqlite3.Connection:
    """A checked connection that has written nothing yet: the file may be another attncc's."""
    conn = sqlite3.connect(str(path), timeout=30.0, isolation_level=None)
    try:
        if conn.execute("PRAGMA quick_check").fetchone()[0] != "ok":
            raise sqlite3.DatabaseError("quick_check failed")
    except BaseException:
        conn.close()
        raise
    return conn


def _schema_version(conn: sqlite3.Connection) -> str | None:
    """The ``meta`` table's schema version, read without writing (None for a new database)."""
    if conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'meta'").fetchone() is None:
        return None
    row = conn.execute("SELECT value FROM meta WHERE name = 'schema_version'").fetchone()
    return None if row is None else str(row[0])


def _backup_path(path: Path) -> Path:
    return path.with_name(f"{path.name}.corrupt-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}")


def _move_aside(path: Path) -> Path:
    """Rename ``path`` and its WAL files to ``<name>.corrupt-<timestamp>-<pid>``; returns the new name."""
    backup = _backup_path(path)
    for suffix in ("", "-wal", "-shm"):
        source = Path(str(path) + suffix)
        if source.exists():
            os.replace(source, Path(str(backup) + suffix))
    return backup


def _damage(path: Path) -> str | None:
    """Why the SQLite file at ``path`` is damaged (None when it is sound, absent or only unreachable)."""
    if not path.is_file():
        return None
    try:
        conn = _connect(path)
    except sqlite3.OperationalError:
        return None  # NOTE: locked or unreadable is not damage; whoever opens it next reports that.
    except sqlite3.DatabaseError as err:
        return str(err)
    conn.close()
    return None


def move_aside_if_damaged(path: str | Path, what: str) -> Path | None:
    """Move a damaged SQLite file (not a database, failed quick check) aside with a warning, so that
    a fresh one starts in its place, as the tuning cache does with its own; returns the backup.

    Other stores in the cache directory (the Optuna studies) use it: a damaged file must not
    block every later run with a raw ``DatabaseError``.
    """
    path = Path(path)
    if _damage(path) is None:
        return None
    with _file_lock(path.with_name(path.name + ".lock")):
        problem = _damage(path)  # NOTE: another process may have moved it while we waited for the lock.
        if problem is None:
            return None
        backup = _move_aside(path)
    warn_once(f"corrupt:{path}", f"{what} {path} is damaged ({problem}); moved it to {backup} and started a fresh one")
    return backup


@contextlib.contextmanager
def _transaction(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield conn
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


# NOTE: how stale a running process's view of another process's tuning writes may get, in seconds
EXTERNAL_CHECK_SECONDS = 1.0


class TuningCache:
    """One SQLite tuning database plus, for lookups, the shipped JSON caches."""

    def __init__(self, path: str | Path | None = None, *, shipped: bool = True) -> None:
        self.path = Path(path) if path is not None else default_db_path()
        self.use_shipped = shipped
        self._local = threading.local()  # NOTE: one connection per thread and process (sqlite3's rule)
        self.disabled: str | None = None

    def __repr__(self) -> str:
        return f"<TuningCache {self.path}>"

    @property
    def generation(self) -> tuple[int, int]:
        """Changes with every write to this database: lookups memoized on it go stale. Writes by
        this process bump a counter; another process's commits (``attncc tune``, an import) show
        in SQLite's ``PRAGMA data_version``, read at most every ``EXTERNAL_CHECK_SECONDS`` (a
        lookup is memoized to cost about a microsecond; the pragma costs a few)."""
        return _GENERATIONS.get(str(self.path), 0), self._external_version()

    def _external_version(self) -> int:
        """This thread's connection's ``data_version`` as last read, counted from its value when
        the connection opened (values of different connections are not comparable, and
        connections are per thread). Counted from 0, opening the connection inside a call moved
        the generation with nothing written, and the next identical call missed every memo."""
        seen = getattr(self._local, "seen", None)
        now = time.monotonic()
        if seen is not None and now - seen[0] < EXTERNAL_CHECK_SECONDS:
            return seen[1]
        version = seen[1] if seen is not None else 0
        conn = getattr(self._local, "conn", None)
        if conn is not None and self._local.pid == os.getpid():
            try:
                version = conn.execute("PRAGMA data_version").fetchone()[0] - self._local.base
            except sqlite3.DatabaseError:
                pass
        self._local.seen = (now, version)
        return version

    # ------------------------------------------------------------ connection and recovery
    def unusable(self) -> str | None:
        """Why this cache can store nothing (None when it can); opens it to find out."""
        self._db()
        return self.disabled

    def _db(self) -> sqlite3.Connection | None:
        """The connection for this process (None when the cache is disabled)."""
        if self.disabled:
            return None
        conn = getattr(self._local, "conn", None)
        if conn is not None and self._local.pid == os.getpid():
            return conn
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            conn = self._open_checked()
        except (OSError, sqlite3.OperationalError) as err:
            warn_once(f"unusable:{self.path}", f"tuning cache {self.path} cannot be opened ({err}); using defaults")
            self.disabled = str(err)
            return None
        if self.disabled:  # NOTE: another attncc's schema: this connection must not read it either.
            conn.close()
            return None
        try:
            base = conn.execute("PRAGMA data_version").fetchone()[0]
        except sqlite3.DatabaseError:
            base = 0
        self._local.conn, self._local.pid, self._local.base = conn, os.getpid(), base
        return conn

    def _open_checked(self) -> sqlite3.Connection:
        try:
            conn = _connect(self.path)
            self._init_schema(conn)
            return conn
        except sqlite3.OperationalError:
            raise
        except sqlite3.DatabaseError:
            pass
        with _file_lock(self.path.with_name(self.path.name + ".lock")):
            try:  # NOTE: another process may have recovered it while we waited for the lock.
                conn = _connect(self.path)
            except sqlite3.OperationalError:
                raise
            except sqlite3.DatabaseError as err:
                self._quarantine(err)
                conn = _connect(self.path)
        self._init_schema(conn)
        return conn

    def _quarantine(self, err: Exception) -> None:
        backup = _move_aside(self.path)
        warn_once(f"corrupt:{self.path}",
                  f"tuning cache {self.path} is corrupt ({err}); moved it to {backup} and started a fresh one")

    def _init_schema(self, conn: sqlite3.Connection) -> None:
        """Set up a new or own-version database; another version's is left exactly as it is (the
        version is read before anything is written, even the journal mode) and disables the cache."""
        version = _schema_version(conn)
        if version in (None, str(SCHEMA_VERSION)):
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            with _transaction(conn):
                version = _schema_version(conn)  # NOTE: again under the write lock: a racing writer may have set it.
                if version in (None, str(SCHEMA_VERSION)):
                    for statement in filter(str.strip, _SCHEMA.split(";")):
                        conn.execute(statement)
                if version is None:
                    conn.execute("INSERT INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
                    version = str(SCHEMA_VERSION)
        if version != str(SCHEMA_VERSION):
            self.disabled = f"unknown schema version {version!r}, this attncc uses {SCHEMA_VERSION}"
            warn_once(f"schema:{self.path}", f"tuning cache {self.path} has unknown schema version {version!r} "
                      f"(this attncc uses {SCHEMA_VERSION}); ignoring it")

    def _query(self, sql: str, args: tuple = ()) -> list[tuple]:
        """Rows of a read; a damaged or locked database reads as empty (warned once)."""
        conn = self._db()
        if conn is None:
            return []
        try:
            return conn.execute(sql, args).fetchall()
        except sqlite3.DatabaseError as err:
            warn_once(f"read:{self.path}:{err}", f"tuning cache {self.path}: read failed ({err}); skipping it")
            return []

    def _write(self, statements: list[tuple[str, tuple]]) -> int:
        """Run statements in one transaction; returns the rows changed. Raises CacheUnavailable when
        nothing can be stored: a 0 here read as "the cache kept a better result"."""
        conn = self._db()
        if conn is None:
            raise CacheUnavailable(f"tuning cache {self.path} cannot store anything ({self.disabled})")
        changed = 0
        try:
            with _transaction(conn):
                for sql, args in statements:
                    changed += conn.execute(sql, args).rowcount
        except sqlite3.DatabaseError as err:  # read-only file, locked past the timeout, disk full, malformed
            raise CacheUnavailable(f"tuning cache {self.path}: nothing was stored ({err})") from err
        _GENERATIONS[str(self.path)] = _GENERATIONS.get(str(self.path), 0) + 1
        return changed

    def close(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None and self._local.pid == os.getpid():
            conn.close()
        self._local.conn = None

    # ------------------------------------------------------------ entries
    def record(self, entry: Entry, device_description: dict[str, Any] | None = None) -> bool:
        """Store ``entry`` unless the cache already holds a better one; True when stored, False when
        the cache kept a better one, CacheUnavailable when it can store nothing."""
        if problem := config_problem(entry.config):
            raise ValueError(f"entry.config: {problem}")
        statements = [(_UPSERT, _row(entry))]
        if device_description is not None:
            statements.append(("INSERT OR REPLACE INTO devices VALUES (?, ?)",
                               (entry.key.device, json.dumps(device_description, sort_keys=True))))
        return self._write(statements) > 0 and self._stored_is(entry)

    def record_many(self, entries: list[Entry], devices: dict[str, dict[str, Any]] | None = None) -> int:
        """Store many entries in one transaction (all or none), each only where it is better."""
        for entry in entries:
            if problem := config_problem(entry.config):
                raise ValueError(f"entry {entry.key.text}: config: {problem}")
        statements = [(_UPSERT, _row(e)) for e in entries]
        statements += [("INSERT OR IGNORE INTO devices VALUES (?, ?)", (d, json.dumps(desc, sort_keys=True)))
                       for d, desc in (devices or {}).items()]
        return self._write(statements)

    def _stored_is(self, entry: Entry) -> bool:
        stored = self.get(entry.key)
        return stored is not None and stored.config == entry.config and stored.time_ms == entry.time_ms

    def _entry(self, row: tuple) -> Entry | None:
        fingerprint, backend, device, shape, config, time_ms, trials, source, verified, updated = row
        try:
            config = json.loads(config)
        except (TypeError, ValueError):
            config = None
        data = {"fingerprint": fingerprint, "backend": backend, "device": device, "shape": shape,
                "config": config, "time_ms": time_ms, "trials": trials, "source": source,
                "verified": bool(verified), "updated": updated}
        entry = entry_from_json(data, str(self.path))
        if isinstance(entry, str):
            warn_once(f"entry:{self.path}:{fingerprint}/{backend}/{device}/{shape}",
                      f"tuning cache {self.path}: skipping corrupt entry {fingerprint}/{backend}/{device}/{shape}: "
                      f"{entry}")
            return None
        return entry

    def get(self, key: TuningKey) -> Entry | None:
        rows = self._query("SELECT * FROM entries WHERE fingerprint=? AND backend=? AND device=? AND shape=?",
                           (key.fingerprint, key.backend, key.device, key.shape.tag))
        return self._entry(rows[0]) if rows else None

    def entries(self, fingerprint: str | None = None, backend: str | None = None,
                device: str | None = None) -> list[Entry]:
        """Valid local entries, filtered by whichever fields are given."""
        where, args = _filters(fingerprint=fingerprint, backend=backend, device=device)
        rows = self._query(f"SELECT * FROM entries{where} ORDER BY fingerprint, backend, device, shape", args)
        return [e for e in map(self._entry, rows) if e is not None]

    def candidates(self, fingerprint: str, backend: str, device: str) -> list[Entry]:
        """Local and shipped entries for one variant, backend and device (lookup's input)."""
        found = self.entries(fingerprint, backend, device)
        if self.use_shipped:
            found += [e for e in shipped().entries if (e.key.fingerprint, e.key.backend, e.key.device)
                      == (fingerprint, backend, device)]
        return found

    def devices(self) -> dict[str, dict[str, Any]]:
        out = {}
        for device, description in self._query("SELECT device, description FROM devices"):
            with contextlib.suppress(TypeError, ValueError):
                out[device] = json.loads(description)
        return out

    def clear(self, pins: bool = False) -> int:
        """Delete every entry (and every pin with ``pins=True``); returns rows deleted."""
        statements = [("DELETE FROM entries", ())] + ([("DELETE FROM pins", ())] if pins else [])
        return self._write(statements)

    # ------------------------------------------------------------ pins
    def pin(self, pin: Pin) -> None:
        if problem := config_problem(pin.config):
            raise ValueError(f"--config: {problem}")
        row = (pin.fingerprint, pin.backend, pin.device, pin.shape, json.dumps(pin.config, sort_keys=True),
               pin.note, time.time())
        self._write([("INSERT OR REPLACE INTO pins VALUES (?, ?, ?, ?, ?, ?, ?)", row)])

    def unpin(self, fingerprint: str, backend: str, device: str = WILDCARD, shape: str = WILDCARD) -> int:
        return self._write([("DELETE FROM pins WHERE fingerprint=? AND backend=? AND device=? AND shape=?",
                             (fingerprint, backend, device, shape))])

    def pins(self, fingerprint: str | None = None, backend: str | None = None) -> list[Pin]:
        where, args = _filters(fingerprint=fingerprint, backend=backend)
        out = []
        for fp, backend_, device, shape, config, note, _ in self._query(f"SELECT * FROM pins{where}", args):
            try:
                config = json.loads(config)
            except (TypeError, ValueError):
                config = None
            pin = pin_from_json({"fingerprint": fp, "backend": backend_, "device": device, "shape": shape,
                                 "config": config, "note": note}, str(self.path))
            if isinstance(pin, str):
                warn_once(f"pin:{self.path}:{fp}/{backend_}/{device}/{shape}",
                          f"tuning cache {self.path}: skipping corrupt pin {fp}/{backend_}/{device}/{shape}: {pin}")
                continue
            out.append(pin)
        return out

    def find_pin(self, key: TuningKey) -> Pin | None:
        """The most specific pin matching ``key``: local pins first, then shipped ones."""
        for layer in (self.pins(key.fingerprint, key.backend), shipped().pins if self.use_shipped else []):
            matching = [p for p in layer if p.matches(key)]
            if matching:
                return max(matching, key=Pin.specificity)
        return None

    # ------------------------------------------------------------ JSON
    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT, "version": FORMAT_VERSION, "devices": self.devices(),
            "entries": [e.to_json() for e in self.entries()], "pins": [p.to_json() for p in self.pins()],
        }

    def export(self, path: str | Path) -> int:
        """Write every local entry and pin as JSON (atomically); returns the entry count."""
        doc = self.to_json()
        write_json(path, doc)
        return len(doc["entries"])

    def import_json(self, path: str | Path) -> dict[str, int]:
        """Merge a JSON cache into the database: better entries win, local pins are kept."""
        layer = read_json(path)
        before = {e.key: e for e in self.entries()}
        self.record_many(layer.entries, layer.devices)
        after = {e.key: e for e in self.entries()}
        stored = sum(1 for k, e in after.items() if before.get(k) != e)
        local_pins = {p.text for p in self.pins()}
        new_pins = [p for p in layer.pins if p.text not in local_pins]
        for pin in new_pins:
            self.pin(pin)
        return {"stored": stored, "kept": len(layer.entries) - stored, "pins": len(new_pins),
                "skipped": layer.skipped}


def _row(entry: Entry) -> tuple:
    k = entry.key
    return (k.fingerprint, k.backend, k.device, k.shape.tag, json.dumps(entry.config, sort_keys=True),
            float(entry.time_ms), int(entry.trials), entry.source, int(entry.verified), entry.updated or time.time())


def _filters(**fields: str | None) -> tuple[str, tuple]:
    given = {k: v for k, v in fields.items() if v is not None}
    if not given:
        return "", ()
    return " WHERE " + " AND ".join(f"{k}=?" for k in given), tuple(given.values())


def parse_shape_or_wildcard(text: str) -> str:
    if text == WILDCARD:
        return text
    return ShapeKey.parse(text).tag
