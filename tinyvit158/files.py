"""The files the commands read and write, checked before any work is done.

- An input must be a regular file: a FIFO, a device or a socket would block ``open()``
  for ever (nobody writes to it), and a directory is said to be one.
- An output must not be an existing directory, must not lie under a file, and must not
  be (through any symbolic or hard link) a file the same command reads: no command
  ever writes over its own input.
- Outputs are written atomically (:func:`atomic_path`): to a hidden temporary file
  ``.NAME.XXXXXXXX.tmp`` in the same folder, renamed into place when complete. The
  temporary file is removed on every exit this process controls (an error, Ctrl-C,
  SIGTERM, SIGHUP); one left by a kill that cannot be caught (SIGKILL, a power cut) is
  reported by the next write to the same name.
"""

from __future__ import annotations

import contextlib
import os
import signal
import stat
import sys
import tempfile
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path

from tinyvit158.errors import TinyViTError

_KINDS = {stat.S_ISFIFO: "a FIFO (named pipe)", stat.S_ISCHR: "a character device", stat.S_ISBLK: "a block device",
          stat.S_ISSOCK: "a socket"}  # fmt: skip


def special_kind(mode: int) -> str | None:
    """What a non-regular, non-directory file is ("a FIFO (named pipe)", ...), else None."""
    return next((what for test, what in _KINDS.items() if test(mode)), None)


def input_problem(path: str | os.PathLike) -> str | None:
    """Why ``path`` cannot be read as a file (one phrase), or None when it is a regular file.
    Never opens the file, so a FIFO cannot block."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return "no such file"
    except NotADirectoryError:
        return "no such file (a parent is not a folder)"
    except OSError as e:
        return f"cannot be read ({e.strerror or type(e).__name__})"
    if stat.S_ISDIR(st.st_mode):
        return "is a directory, not a file"
    if stat.S_ISREG(st.st_mode) and st.st_size == 0:
        return "is an empty file"
    kind = special_kind(st.st_mode)
    if kind:
        return f"is {kind}, not a regular file (reading it could wait for ever)"
    return None


def check_input(path: str | os.PathLike) -> Path:
    """``path`` as a Path if it is a readable regular file; else one TinyViTError."""
    problem = input_problem(path)
    if problem:
        raise TinyViTError(f"{path}: {problem}")
    return Path(path)


def same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Whether two paths name one file: the same resolved path, or the same inode (a hard link)."""
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def check_output(path: str | os.PathLike, inputs: Iterable[str | os.PathLike] = (), flag: str = "--out") -> Path:
    """``path`` as a Path if a file can be written there without harm; else one TinyViTError.
    Also reports (on stderr) temporary files an earlier, killed write left beside it."""
    path = Path(path)
    for src in inputs:
        if same_file(path, src):
            raise TinyViTError(f"{flag} {path}: is the input {src} itself; writing it would destroy the input, "
                               "choose another file")  # fmt: skip
    try:
        mode = os.stat(path).st_mode
    except (FileNotFoundError, NotADirectoryError):
        mode = None
    if mode is not None and stat.S_ISDIR(mode):
        raise TinyViTError(f"{flag} {path}: is a directory; give the path of a file to write (e.g. {path / 'NAME'})")
    kind = special_kind(mode) if mode is not None else None
    if kind:
        raise TinyViTError(f"{flag} {path}: is {kind}, not a regular file")
    _check_parents(path, flag)
    report_stale(path)
    return path


def _check_parents(path: Path, flag: str) -> None:
    """The nearest existing parent of ``path`` must be a folder (else ``mkdir`` fails)."""
    parent = next((p for p in path.parents if p.exists()), None)
    if parent is not None and not parent.is_dir():
        raise TinyViTError(f"{flag} {path}: {parent} is a file, not a folder")


def check_output_folder(folder: str | os.PathLike, flag: str = "--out") -> Path:
    """``folder`` as a Path if it is, or can be made, a folder; else one TinyViTError."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise TinyViTError(f"{flag} {folder}: is a file, not a folder")
    _check_parents(folder, flag)
    return folder


def stale_temporaries(path: str | os.PathLike) -> list[Path]:
    """Temporary files of :func:`atomic_path` for ``path`` that are still lying beside it."""
    path = Path(path)
    try:
        return sorted(path.parent.glob(f".{path.name}.*.tmp"))
    except OSError:
        return []


def report_stale(path: str | os.PathLike) -> None:
    """One line on stderr naming the temporary files an interrupted write left for ``path``."""
    stale = stale_temporaries(path)
    if stale:
        size = sum(f.stat().st_size for f in stale if f.exists())
        names = ", ".join(f.name for f in stale[:3]) + (", ..." if len(stale) > 3 else "")
        print(f"note: {len(stale)} temporary file(s) beside {path} left by an interrupted write ({names}; "
              f"{size:,} bytes): safe to delete unless another write is running", file=sys.stderr)  # fmt: skip


class _Terminated(BaseException):
    """SIGTERM or SIGHUP arrived while a file was being written."""


@contextlib.contextmanager
def _signals_raise() -> Iterator[None]:
    """Within the block, SIGTERM and SIGHUP raise (so ``finally`` clauses run); restored after."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = {}

    def handler(signum, _frame):
        raise _Terminated(signum)

    for sig in (signal.SIGTERM, getattr(signal, "SIGHUP", None)):
        if sig is not None and signal.getsignal(sig) in (signal.SIG_DFL, None):
            old[sig] = signal.signal(sig, handler)
    try:
        yield
    except _Terminated as e:  # clean-up done: now die of the signal, as the default action would
        for sig, h in old.items():
            signal.signal(sig, h)
        old = {}
        os.kill(os.getpid(), e.args[0])
        raise SystemExit(128 + e.args[0]) from None
    finally:
        for sig, h in old.items():
            signal.signal(sig, h)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, mode: int | None = None) -> Iterator[Path]:
    """A temporary path to write; renamed to ``path`` when the block ends without error,
    removed on every exit this process controls. ``mode``: permission bits (umask applied)."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise TinyViTError(f"{path}: a parent of it is a file, not a folder") from None
    except OSError as e:
        raise TinyViTError(f"{path}: cannot make its folder ({e.strerror or e})") from None
    if path.is_dir():
        raise TinyViTError(f"{path}: is a directory; give a file name")
    with _signals_raise():
        try:
            fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        except OSError as e:
            raise TinyViTError(f"{path}: cannot write in {path.parent} ({e.strerror or e})") from None
        os.close(fd)
        try:
            yield Path(tmp)
            if mode is not None:
                os.chmod(tmp, mode & ~_umask())
            os.replace(tmp, path)
        except OSError as e:
            Path(tmp).unlink(missing_ok=True)
            raise TinyViTError(f"{path}: could not be written ({e.strerror or e})") from None
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes, mode: int | None = None) -> None:
    """Write ``data`` to ``path`` atomically and durably (:func:`atomic_path`, then fsync)."""
    with atomic_path(path, mode) as tmp, open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def shown(name: str | os.PathLike) -> str:
    """A file name as it can be printed on stdout whatever its encoding: bytes that are not
    valid UTF-8 (a Latin-1 name) appear as ``\\xe9``, characters stdout cannot encode as
    ``\\u2603``, instead of a UnicodeEncodeError."""
    text = os.fsencode(name).decode("utf-8", "backslashreplace")
    encoding = getattr(sys.stdout, "encoding", None) or "utf-8"
    try:
        return text.encode(encoding, "backslashreplace").decode(encoding)
    except LookupError:
        return text
