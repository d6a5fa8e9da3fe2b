"""Cache files that carry their own checksum, written atomically: a damaged one is rebuilt, never loaded.

Why: compiled modules are loaded with ``dlopen``. A truncated ``.so`` (a full disk, an interrupted
copy of a shared cache) maps pages past the file's end, and the process dies of SIGBUS at its
first call, with no Python exception to catch, and so does every later process until someone
deletes the file. So each file ends with a trailer, ``MAGIC`` and the SHA-256 of what precedes it
(the dynamic loader ignores bytes past the ELF's own), checked before the file is loaded. Files
are made group- and world-readable as the umask allows (``mkstemp`` makes them private), so that
users sharing a cache directory can load each other's modules.
"""

from __future__ import annotations

import functools
import hashlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

MAGIC = b"attncc-sealed-v1"
TRAILER_BYTES = len(MAGIC) + hashlib.sha256().digest_size


def intact(path: Path) -> bool:
    """Whether ``path`` ends with a trailer that matches its contents (False when missing, short,
    damaged or written without a trailer)."""
    try:
        data = path.read_bytes()
    except OSError:
        return False
    body, trailer = data[:-TRAILER_BYTES], data[-TRAILER_BYTES:]
    return len(data) > TRAILER_BYTES and trailer == MAGIC + hashlib.sha256(body).digest()


def write(path: Path, produce: Callable[[str], None]) -> None:
    """``produce(tmp)`` writes the file at a temporary path beside ``path``; the trailer is appended,
    the mode set, and the file moved into place in one step (readers see the old file or the whole
    new one). Raises what ``produce`` or the file system raise."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=path.suffix, dir=path.parent)
    os.close(fd)
    try:
        produce(tmp)
        with open(tmp, "rb+") as f:
            digest = hashlib.sha256(f.read()).digest()
            f.write(MAGIC + digest)
        os.chmod(tmp, 0o644 & ~_umask())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@functools.cache
def _umask() -> int:
    """The process's umask, read without setting it (``os.umask`` would, for a moment in which
    another thread's new files would be world-writable), where Linux reports it."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    current = os.umask(0o022)
    os.umask(current)
    return current
