"""Load attncc programs from Python files named on the command line (``FILE:NAME``).

The CLI commands ``explain`` and ``tune`` name a variant as ``path/to/file.py:NAME``; this
module imports the file by path, under a module name of its own so that two files with the
same stem never shadow each other, and checks that ``NAME`` really is an attncc program.
"""

from __future__ import annotations

import hashlib
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

from attncc.variant import Program


class LoadError(Exception):
    """A ``FILE:NAME`` spec that does not name an attncc program; the message says why."""


def split_spec(spec: str) -> tuple[Path, str]:
    """``"dir/file.py:NAME"`` -> (path, NAME); the last colon splits, so Windows drives survive."""
    if not isinstance(spec, str) or ":" not in spec:
        raise LoadError(f"expected FILE:NAME (e.g. examples/alibi.py:alibi), got {spec!r}")
    path, _, name = spec.rpartition(":")
    if not path or not name:
        raise LoadError(f"expected FILE:NAME with both parts non-empty, got {spec!r}")
    if not name.isidentifier():
        raise LoadError(f"NAME in FILE:NAME must be a Python identifier, got {name!r}")
    return Path(path), name


def _module_name(path: Path) -> str:
    """A module name unique to the file's absolute path and version (two ``model.py`` files do
    not collide; an edited file is imported afresh, an unchanged one is imported once)."""
    stat = path.stat()
    identity = f"{path.resolve()}\0{stat.st_mtime_ns}\0{stat.st_size}"
    digest = hashlib.sha256(identity.encode()).hexdigest()[:12]
    stem = "".join(c if c.isalnum() else "_" for c in path.stem)
    return f"attncc_user_{stem}_{digest}"


def import_file(path: str | Path) -> ModuleType:
    """Import a Python file by path; errors in the file propagate with their traceback."""
    path = Path(path)
    if not path.is_file():
        raise LoadError(f"FILE {str(path)!r} does not exist or is not a file")
    name = _module_name(path)
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise LoadError(f"FILE {str(path)!r} cannot be imported as Python (expected a .py file)")
    module = importlib.util.module_from_spec(spec)
    # NOTE: registered before exec so dataclasses and pickling inside the file find their module.
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


def load_variant(spec: str) -> Program:
    """The attncc Program (usually a Variant) named by ``"path/to/file.py:NAME"``."""
    path, name = split_spec(spec)
    module = import_file(path)
    if not hasattr(module, name):
        found = sorted(load_all(module))
        hint = f"; attncc programs in it: {', '.join(found)}" if found else "; it defines no attncc programs"
        raise LoadError(f"NAME {name!r} is not defined in {str(path)!r}{hint}")
    obj = getattr(module, name)
    if not isinstance(obj, Program):
        raise LoadError(
            f"{path!s}:{name} is of type {type(obj).__name__}, expected an attncc Variant or Program "
            "(made by @attncc.variant or attncc.GraphBuilder.build)"
        )
    return obj


def load_all(path: str | Path | ModuleType) -> dict[str, Program]:
    """Every attncc Program defined at module level in a file, by attribute name."""
    module = path if isinstance(path, ModuleType) else import_file(path)
    return {name: obj for name, obj in vars(module).items() if isinstance(obj, Program)}
