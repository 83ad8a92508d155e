"""What every command line of the project shares: one clear message and exit code 2 for a user's mistake
(the traceback only with ``--debug``), outputs checked writable before the work, files replaced whole.

A crash, a second run or a full disk never leaves a half-written file behind: everything the commands write
themselves goes through :func:`atomic_write` (a temporary file in the same folder, then a rename).
"""

from __future__ import annotations

import contextlib
import os
import socket
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO

__all__ = ["USER_ERRORS", "run_command", "check_writable_file", "check_writable_dir", "atomic_write", "write_whole"]

#: Errors that mean "the input, the config or the environment is wrong", not "the program is wrong". OSError
#: covers unreadable images ("image file is truncated"), missing or unwritable paths, a full disk.
USER_ERRORS = (ValueError, TypeError, KeyError, OSError, ImportError)


def free_port() -> int:
    """A TCP port free on the loopback address now, for a launch's rendezvous."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_command(
    prog: str, body: Callable[[], int], *, debug: bool | Callable[[], bool], where: str = "",
    quiet: Callable[[], bool] | None = None,
    debug_flag: str = "--debug",
) -> int:
    """``body()``; a user error becomes ``prog: error: ...`` on stderr and exit code 2 (re-raised when
    ``debug``, or ``debug()`` when it is a callable: a value known only once the body has read its
    configuration). ``where`` (e.g. ``" (rank 1)"``) says which process of several failed; ``quiet()`` true means
    another process reports this same error (the checks every rank makes alike), so this one only exits;
    ``debug_flag`` is the option that shows the traceback."""
    try:
        return body()
    except USER_ERRORS as e:
        if debug() if callable(debug) else debug:
            raise
        if quiet is not None and quiet():
            return 2
        message = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"{prog}: error{where}: {message}\n(run with {debug_flag} for the traceback)", file=sys.stderr, flush=True)
        return 2


def _probe(folder: Path, what: str) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-check-"):
            pass
    except OSError as e:
        raise ValueError(f"{what}: cannot write into {folder} ({e.strerror or e}); choose another path") from None


def check_writable_file(path: str | os.PathLike, what: str) -> Path:
    """Fail now, not after the work, if ``path`` cannot be written (its folder is created if missing)."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{what}: {path} is a folder; give a file path")
    _probe(path.parent, what)
    return path


def check_writable_dir(path: str | os.PathLike, what: str) -> Path:
    """Fail now, not after the work, if files cannot be written in the folder ``path`` (created if missing)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{what}: {path} exists and is not a folder")
    _probe(path, what)
    return path


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "w") -> Iterator[IO]:
    """Open a temporary file beside ``path``; on a clean exit it replaces ``path`` in one rename, on an error
    it is removed and ``path`` is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def write_whole(path: str | os.PathLike, data: str | bytes) -> Path:
    """Write ``data`` (text as UTF-8, or bytes) to ``path`` through :func:`atomic_write`; returns the path."""
    with atomic_write(path, "wb" if isinstance(data, bytes) else "w") as f:
        f.write(data)
    return Path(path)
