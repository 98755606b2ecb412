"""Atomic file and directory writes: a reader sees the old content or the new, never half of either.

A run directory (METHOD.md §5) is written with :class:`atomic_dir`: everything goes into a fresh
sibling directory, which is renamed onto the final name only when the whole run succeeded. Single files
(reports, plots) go through :func:`atomic_write_text` / :func:`atomic_write_bytes`: write a sibling
temporary file, ``fsync`` it, then ``os.replace`` it onto the target.

Temporaries live in the *same* directory as the target because ``rename`` is atomic only within one
file system. They are created with ``O_EXCL`` / ``mkdir`` (not ``mkstemp`` / ``mkdtemp``) so they get
the usual umask-derived permissions instead of the private ``0o600`` / ``0o700``.

>>> import tempfile
>>> from pathlib import Path
>>> root = Path(tempfile.mkdtemp())
>>> with atomic_dir(root / "run", overwrite=False) as tmp:
...     _ = atomic_write_text(tmp / "a.txt", "hello")
>>> (root / "run" / "a.txt").read_text()
'hello'
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
from pathlib import Path
from types import TracebackType

from prunq.core.errors import PrunqError

__all__ = ["atomic_dir", "atomic_write_bytes", "atomic_write_text"]


def _sibling(path: Path, tag: str) -> Path:
    """A hidden, unlikely-to-collide name beside ``path`` (same directory, so same file system)."""
    return path.parent / f".{path.name}.{tag}-{secrets.token_hex(4)}"


def _fsync_path(path: str | os.PathLike[str]) -> None:
    """fsync a file or directory; best effort (not every platform/file system allows it)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_dir(directory: Path) -> None:
    """Make a rename inside ``directory`` durable."""
    _fsync_path(directory)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (temp file in the same directory, fsync, ``os.replace``).

    Parent directories are created. On any error the temporary file is removed and the old ``path``
    (if any) is left untouched. Returns ``path`` as a :class:`~pathlib.Path`.

    >>> import tempfile; from pathlib import Path
    >>> p = atomic_write_bytes(Path(tempfile.mkdtemp()) / "x.bin", b"\\x00\\x01")
    >>> p.read_bytes()
    b'\\x00\\x01'
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        tmp = _sibling(path, "tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            break
        except FileExistsError:  # pragma: no cover - 32 random bits collided
            continue
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    """Write ``text`` (UTF-8, newlines as given) to ``path`` atomically; see :func:`atomic_write_bytes`.

    >>> import tempfile; from pathlib import Path
    >>> atomic_write_text(Path(tempfile.mkdtemp()) / "r.md", "# hi\\n").read_text()
    '# hi\\n'
    """
    return atomic_write_bytes(path, text.encode("utf-8"))


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _fsync_tree(root: Path) -> None:
    """fsync every regular file under ``root`` so the renamed directory is complete on disk."""
    for dirpath, _dirnames, filenames in os.walk(root):
        for name in filenames:
            p = os.path.join(dirpath, name)
            if not os.path.islink(p):
                _fsync_path(p)
        _fsync_dir(Path(dirpath))


def _refuse(final: Path) -> PrunqError:
    return PrunqError(f"--out: {final} exists; pass --overwrite to replace it")


#: Files whose presence (as regular files holding a JSON object) marks a directory prunq wrote:
#: a run's manifest, a sweep's table.
RUN_MARKERS: tuple[tuple[str, str], ...] = (
    ("model.json", "format"), ("sweep.json", "rows"), ("prunq_hls.json", "totals"),
)


def is_prunq_run(path: Path) -> bool:
    """True when ``path`` is a real directory (not a link) holding a prunq run's manifest or a sweep's
    ``sweep.json`` (regular files, not links, with the keys prunq writes): what ``--overwrite`` may replace."""
    if path.is_symlink() or not path.is_dir():
        return False
    for name, key in RUN_MARKERS:
        f = path / name
        if f.is_symlink() or not f.is_file() or f.stat().st_size > 64 << 20:
            continue
        try:
            data = json.loads(f.read_text())
        except (ValueError, OSError, RecursionError):
            continue
        if isinstance(data, dict) and key in data:
            return True
    return False


def inside_run(run_dir: str | os.PathLike[str], *parts: str) -> Path:
    """``run_dir / parts`` for reading or writing a file of a run, refusing to follow a link out of it.

    Every component below ``run_dir`` must not be a symbolic link (a ``recipe.yaml`` linked to an SSH key
    would be copied into the report; a linked ``plots/`` would make prunq write anywhere). ``run_dir``
    itself is the user's choice and may be a link.

    >>> import tempfile; from pathlib import Path
    >>> d = Path(tempfile.mkdtemp()); (d / "secret").write_text("x"); (d / "run").mkdir()
    1
    >>> (d / "run" / "recipe.yaml").symlink_to(d / "secret")
    >>> inside_run(d / "run", "recipe.yaml")
    Traceback (most recent call last):
    ...
    prunq.core.errors.PrunqError: ...recipe.yaml: is a symbolic link; prunq does not follow links inside a run directory
    """
    path = Path(run_dir)
    for part in parts:
        path = path / part
        if path.is_symlink():
            raise PrunqError(f"{path}: is a symbolic link; prunq does not follow links inside a run directory")
    return path


def _not_a_run(final: Path) -> PrunqError:
    return PrunqError(
        f"--out: {final} exists and is not a prunq run directory (no model.json or sweep.json written by "
        "prunq); --overwrite only replaces prunq runs: choose another --out or remove it yourself"
    )


class _OutLock:
    """An exclusive, non-blocking ``flock`` on ``.<name>.lock`` beside ``final`` for the life of a run.

    The kernel drops the lock when the process dies (even by SIGKILL), so a stale lock never blocks a
    later run; the lock file is removed on release.
    """

    def __init__(self, final: Path) -> None:
        self.path = final.parent / f".{final.name}.lock"
        self.fd: int | None = None
        try:
            import fcntl
        except ImportError:  # pragma: no cover - not POSIX: no lock
            return
        final.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise PrunqError(f"--out: {final} is being written by another prunq run (lock {self.path})") from None
        self.fd = fd

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)
        finally:
            os.close(self.fd)  # closing releases the flock
            self.fd = None


class atomic_dir:  # noqa: N801 - used like a function: ``with atomic_dir(out, overwrite) as tmp:``
    """Build a directory in a fresh sibling temp dir and move it onto ``final`` only on success.

    * ``final`` exists and not ``overwrite``: :class:`~prunq.core.errors.PrunqError` is raised at once, by the
      constructor, before any work (and checked again when the directory is committed).
    * The body raises: the temp dir is removed, the exception propagates, ``final`` is untouched.
    * The body succeeds: files are fsynced, an old ``final`` (only if ``overwrite``) is moved aside, the
      temp dir is renamed to ``final`` and the old one is deleted -- so the old run is removed only
      after the new one is complete, and restored if the rename fails.

    Paths written inside the body should be relative to the yielded temp dir (a report's links are).

    >>> import tempfile; from pathlib import Path
    >>> out = Path(tempfile.mkdtemp()) / "run"
    >>> try:
    ...     with atomic_dir(out, overwrite=False) as tmp:
    ...         _ = (tmp / "half.txt").write_text("x")
    ...         raise RuntimeError("training diverged")
    ... except RuntimeError:
    ...     pass
    >>> out.exists(), list(out.parent.iterdir())
    (False, [])
    """

    def __init__(self, final: str | os.PathLike[str], overwrite: bool = False) -> None:
        self.final = Path(final)
        self.overwrite = overwrite
        self.tmp: Path | None = None
        self._lock: _OutLock | None = None
        self._check()
        self._lock = _OutLock(self.final)  # a second run aimed at the same --out stops here, at once
        self._remove_stale()

    def _remove_stale(self) -> None:
        """Temporaries of an earlier writer of ``final`` that was killed (SIGKILL leaves them): with the
        lock held no other writer of ``final`` is alive. Only prunq's own names are touched."""
        pattern = re.compile(rf"\.{re.escape(self.final.name)}(\.work)?\.(tmp|old)-[0-9a-f]{{8}}")  # the run's, its work dir's
        parent = self.final.parent
        if not parent.is_dir():
            return
        for p in parent.iterdir():
            if pattern.fullmatch(p.name) and p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)

    def close(self) -> None:
        """Give up: release the lock without writing (a run that failed before its files were written)."""
        self._release()

    def _release(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def __del__(self) -> None:
        self._release()

    def _check(self) -> None:
        if not (self.final.exists() or self.final.is_symlink()):
            return
        if not self.overwrite:
            raise _refuse(self.final)
        if not is_prunq_run(self.final):  # never delete what prunq did not write
            raise _not_a_run(self.final)

    def __enter__(self) -> Path:
        self._check()
        self.final.parent.mkdir(parents=True, exist_ok=True)
        while True:
            tmp = _sibling(self.final, "tmp")
            try:
                tmp.mkdir()  # 0o777 & ~umask, like any directory the user creates
                break
            except FileExistsError:  # pragma: no cover - 32 random bits collided
                continue
        self.tmp = tmp
        return tmp

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        assert self.tmp is not None, "atomic_dir.__exit__ without __enter__"
        tmp, self.tmp = self.tmp, None
        try:
            if exc_type is not None:
                shutil.rmtree(tmp, ignore_errors=True)
                return None  # re-raise
            try:
                self._commit(tmp)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            return None
        finally:
            self._release()

    def _commit(self, tmp: Path) -> None:
        final = self.final
        _fsync_tree(tmp)
        if final.exists() or final.is_symlink():
            self._check()  # appeared, or changed, while we were working
            old = _sibling(final, "old")
            os.rename(final, old)
            try:
                os.rename(tmp, final)
            except BaseException:
                os.rename(old, final)
                raise
            _fsync_dir(final.parent)
            _remove(old)
        else:
            os.rename(tmp, final)
            _fsync_dir(final.parent)
