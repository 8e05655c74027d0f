"""Who may change an index folder, and which version a reader sees.

Layout of a folder (``indexes/<name>/``)::

    current          symbolic link to versions/v<N>: the published version, swapped atomically
    versions/v<N>/   immutable versions: index.faiss, passages.db, manifest.json, report.json,
                     bm25/ (the BM25 cache), .readers (readers' shared locks)
    index.faiss ...  links to current/<file>, for people and tools that open the files by name
    .lock            the writers' lock (`filelock`); .lock.owner says who holds it
    .work/<key>/     the work folder of the change holding the lock (resumable after a crash)

**Writers** (`writing`) take the lock for the whole change: a second writer waits ``wait``
seconds or fails at once with `IndexBusyError` naming the holder, before any work. Under the
lock a change verifies the current version (`rag.index.folder.verify`) and refuses a damaged
one, works in ``.work/<key>``, and `Writer.publish` renames the finished work folder to the next
version and swaps ``current`` to it. Versions no reader holds are removed afterwards.

**Readers** (`open_version`) resolve ``current`` once and open every file from that version's
folder, so they see exactly one version whatever lands meanwhile; a shared ``flock`` on the
version's ``.readers`` (`Pin`) keeps it on disk until they let go. `changed` is the cheap
per-request check (one ``readlink``) that long-lived readers use to follow new versions.

Folders written before versions existed (the files directly in the folder) are read as they are
and turned into this layout by their next change.

The locks are advisory ``flock`` locks: every `rag` process honours them; other programs that
write into the folder do not. On NFS, Linux emulates ``flock`` with NFS byte-range locks, which
other clients see (NFSv4, or v3 with lockd); a mount with ``nolock`` or ``local_lock=flock``
keeps them local to one machine, and then writers must run on one machine.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import shutil
import socket
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from rag.errors import (
    CheckpointError,
    ConfigError,
    CorpusError,
    IndexBusyError,
    IndexCorruptError,
    IndexNotFoundError,
)

log = logging.getLogger(__name__)
T = TypeVar("T")

CURRENT, VERSIONS, WORK, LOCK, OWNER, READERS = "current", "versions", ".work", ".lock", ".lock.owner", ".readers"
LINKED = ("index.faiss", "passages.db", "manifest.json", "report.json")  # links at the top of the folder

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: versions are not pinned, so old ones are never removed
    fcntl = None  # type: ignore[assignment]


@dataclass(frozen=True)
class Version:
    """A published version: its number (0: a folder in the layout before versions) and folder."""

    number: int
    path: Path

    @property
    def name(self) -> str:
        return version_name(self.number)


def version_name(number: int) -> str:
    return f"v{number:06d}"


def _number(name: str) -> int | None:
    return int(name[1:]) if name.startswith("v") and name[1:].isdigit() else None


def current_version(folder: str | Path) -> Version | None:
    """The published version of ``folder`` (one ``readlink``), or None when nothing is published."""
    folder = Path(folder)
    link = folder / CURRENT
    try:
        target = os.readlink(link)
    except FileNotFoundError:
        return Version(0, folder) if (folder / "manifest.json").is_file() else None
    except OSError as e:
        if e.errno == errno.EINVAL and link.is_dir():  # a copy that followed the link (cp -L, copytree)
            return Version(0, link)
        raise
    number = _number(Path(target).name)
    if number is None:
        raise IndexCorruptError(f"{link}: points to {target!r}, not to a version folder; restore the link "
                                f"(ln -sfn versions/vNNNNNN {link}) or rebuild the index")
    return Version(number, folder / target)


def changed(folder: Path, version: Version) -> bool:
    """Whether ``folder`` publishes another version than ``version`` (the per-request check)."""
    if version.path == folder:
        return os.path.lexists(folder / CURRENT)  # a folder of the old layout got its first change
    try:
        return os.readlink(folder / CURRENT) != f"{VERSIONS}/{version.name}"
    except OSError:
        return version.path != folder / CURRENT  # a copy whose `current` is a folder never changes


class Pin:
    """A reader's hold on one version folder (a shared flock on its ``.readers``): while any pin
    holds a version, no writer removes it. Released by `release`, or when garbage collected."""

    def __init__(self, version: Path):
        self.path = version
        self._fd: int | None = os.open(version / READERS, os.O_RDONLY)
        if fcntl is not None:
            fcntl.flock(self._fd, fcntl.LOCK_SH)

    def release(self, *, collect: bool = True) -> None:
        """Let go; ``collect``: remove the version if it is no longer published and no one holds it."""
        if self._fd is None:
            return
        os.close(self._fd)
        self._fd = None
        if collect:
            folder = self.path.parent.parent
            cur = current_version(folder) if folder.exists() else None
            if cur is not None and cur.path.resolve() != self.path.resolve():
                _remove_version(self.path)

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.release(collect=False)


def open_version(folder: str | Path, attempts: int = 50) -> tuple[Version, Pin | None]:
    """The published version of ``folder``, pinned (None for a folder of the old layout).

    Raises:
        IndexNotFoundError: nothing published (no build finished there).
    """
    folder = Path(folder)
    for _ in range(attempts):
        version = current_version(folder)
        if version is None:
            raise not_found(folder)
        if version.path in (folder, folder / CURRENT) or not (version.path / READERS).exists():
            return version, None  # the old layout, a version folder itself, or a copy: nothing to pin
        try:
            pin = Pin(version.path)
        except FileNotFoundError:
            continue  # removed between the readlink and the open: read the pointer again
        if (version.path / "manifest.json").is_file():
            return version, pin
        pin.release(collect=False)
    raise IndexCorruptError(f"{folder}: could not open a stable version in {attempts} tries (its versions are "
                            "being removed as they are published); run rag index verify on it")


def not_found(folder: Path) -> IndexNotFoundError:
    hint = ""
    if (folder / WORK).is_dir() and any((folder / WORK).iterdir()):
        hint = " (a build is in progress or was interrupted: run the same build again to resume)"
    return IndexNotFoundError(f"no index at {folder}: nothing published there{hint}; "
                              "build one with 'rag index build'")


def _remove_version(path: Path) -> bool:
    """Remove an unpublished version folder unless a reader holds it; True if removed."""
    if fcntl is None:  # pragma: no cover - no way to tell whether a reader holds it
        return False
    try:
        fd = os.open(path / READERS, os.O_RDWR)
    except FileNotFoundError:
        fd = None
    except OSError:
        return False  # read-only: leave it
    try:
        if fd is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return False  # a reader holds it; whoever lets go last removes it
        trash = path.with_name(f".trash-{path.name}-{os.getpid()}-{time.monotonic_ns()}")
        try:
            os.rename(path, trash)  # readers that pin it now find no manifest and read `current` again
        except FileNotFoundError:
            return False
        shutil.rmtree(trash, ignore_errors=True)
        return True
    finally:
        if fd is not None:
            os.close(fd)


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _owner_line(folder: Path, patience: float = 2.0) -> str:
    """Who holds the lock, from the owner file; the holder writes it just after it takes the
    lock, so a writer that loses a simultaneous start looks again for up to ``patience`` s."""
    deadline = time.monotonic() + patience
    while True:
        try:
            o = json.loads((folder / OWNER).read_text(encoding="utf-8"))
            return (f"'{o['command']}' (pid {o['pid']} on {o['host']}, since "
                    f"{time.strftime('%H:%M:%S', time.localtime(o['since']))})")
        except (OSError, ValueError, KeyError, TypeError):
            if time.monotonic() > deadline:
                return "another process"
            time.sleep(0.05)


class Writer:
    """The holder of a folder's lock: its current version, its work folder, publishing."""

    def __init__(self, folder: Path, op: str):
        self.folder, self.op = folder, op

    @property
    def current(self) -> Version | None:
        return current_version(self.folder)

    def work(self, key: str, *, copy_from: Version | None = None, fresh: bool = False) -> Path:
        """The work folder of change ``key``: the one a killed run of it left, else a new one
        (a copy of ``copy_from``: the store copied, the other files hard-linked, since they are
        only ever replaced by rename, never written in place). Work of other changes is removed:
        only the lock holder works here, so whoever made it is gone."""
        root = self.folder / WORK
        root.mkdir(exist_ok=True)
        for other in root.iterdir():
            if other.name != key or fresh:
                if other.name != key:
                    log.warning("removing %s, left by an interrupted change", other)
                shutil.rmtree(other, ignore_errors=True)
        work = root / key
        if work.exists():
            return work
        tmp = root / (key + ".tmp")  # never equal to a key: removed above when a copy was interrupted
        tmp.mkdir()
        if copy_from is not None:
            for f in copy_from.path.iterdir():
                if f.name == "passages.db":
                    shutil.copy2(f, tmp / f.name)  # SQLite writes in place: a real copy
                elif f.is_file() and f.name not in ("manifest.json", READERS) and not f.name.startswith(
                        ("passages.db-", ".")):
                    os.link(f, tmp / f.name)
        os.rename(tmp, work)
        return work

    def unpublished(self, key: str | None) -> Version | None:
        """A finished version of change ``key`` that a killed run renamed but did not publish;
        unpublished versions of other changes are removed (those changes never happened)."""
        cur = self.current
        found = None
        for v in self._versions():
            if cur is not None and v.number <= cur.number:
                continue
            if found is None and _manifest_key(v.path) == key:
                found = v
            else:
                log.warning("removing %s, an unpublished version of an interrupted change", v.path)
                _remove_version(v.path)
        return found

    def _versions(self) -> list[Version]:
        root = self.folder / VERSIONS
        if not root.is_dir():
            return []
        out = [Version(n, root / p.name) for p in root.iterdir() if (n := _number(p.name)) is not None]
        return sorted(out, key=lambda v: v.number)

    def next_number(self) -> int:
        cur = self.current
        return max([cur.number if cur else 0, *(v.number for v in self._versions())]) + 1

    def publish(self, work: Path, number: int) -> Version:
        """Rename the finished ``work`` to version ``number`` and make it current (one atomic
        rename of the ``current`` link); then remove the versions no reader holds."""
        (work / READERS).touch()
        root = self.folder / VERSIONS
        root.mkdir(exist_ok=True)
        target = root / version_name(number)
        os.rename(work, target)
        _fsync_dir(root)
        with contextlib.suppress(OSError):
            (self.folder / WORK).rmdir()  # when empty
        return self.make_current(Version(number, target))

    def make_current(self, version: Version) -> Version:
        old = self.current
        tmp = self.folder / f".{CURRENT}.tmp"
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        os.symlink(f"{VERSIONS}/{version.name}", tmp)
        os.replace(tmp, self.folder / CURRENT)
        for name in LINKED:  # once; a folder of the old layout has its files replaced by the links
            top = self.folder / name
            if not top.is_symlink():
                tmp = self.folder / f".{name}.tmp"
                with contextlib.suppress(FileNotFoundError):
                    tmp.unlink()
                os.symlink(f"{CURRENT}/{name}", tmp)
                os.replace(tmp, top)
        if old is not None and old.number == 0 and old.path == self.folder:
            shutil.rmtree(self.folder / "bm25", ignore_errors=True)
            for leftover in self.folder.glob("passages.db-*"):
                leftover.unlink()
        _fsync_dir(self.folder)
        self.collect()
        return version

    def collect(self) -> None:
        """Remove what no one needs: versions older than the current one that no reader holds,
        and the remains of removals that were interrupted."""
        cur = self.current
        for v in self._versions():
            if cur is not None and v.number < cur.number:
                _remove_version(v.path)
        for trash in (self.folder / VERSIONS).glob(".trash-*"):
            shutil.rmtree(trash, ignore_errors=True)

    def tidy(self) -> None:
        """Remove every work folder, unpublished version and old version no reader holds (a
        change with nothing to do, or one that failed on its input)."""
        self.unpublished(None)
        shutil.rmtree(self.folder / WORK, ignore_errors=True)
        self.collect()


def _manifest_key(path: Path) -> str | None:
    try:
        return json.loads((path / "manifest.json").read_text(encoding="utf-8")).get("change_key")
    except (OSError, ValueError, AttributeError):
        return None


@contextlib.contextmanager
def writing(folder: str | Path, op: str, *, wait: float = 0.0, create: bool = False) -> Iterator[Writer]:
    """Hold ``folder``'s writer lock for one change.

    Args:
        op: what the change is (shown to a writer that has to wait).
        wait: seconds to wait for another writer (0: fail at once; negative: wait as long as it takes).
        create: make the folder if it does not exist (builds, imports).

    Raises:
        IndexBusyError: another writer held the lock for ``wait`` seconds.
        IndexNotFoundError: the folder does not exist and ``create`` is false.
    """
    from filelock import FileLock, Timeout

    folder = Path(folder)
    if (folder / "shards.json").is_file():
        raise ConfigError(f"{folder} is a sharded folder: change its shards (rag index commands do; in Python, "
                          "rag.index.shards.each_shard(folder, lambda shard: upsert(shard, ...)))")
    made = create and not folder.exists()
    while True:
        if create:
            folder.mkdir(parents=True, exist_ok=True)
        elif not folder.is_dir():
            raise not_found(folder)
        lock = FileLock(str(folder / LOCK), timeout=wait if wait >= 0 else -1)
        try:
            lock.acquire()
        except Timeout:
            waited = f" for {wait:g} s" if wait > 0 else ""
            raise IndexBusyError(f"{folder} is being changed by {_owner_line(folder)}; nothing was done{waited}. "
                                 "Run the command again when it finishes, or pass --wait SECONDS to wait for it"
                                 ) from None
        if (folder / LOCK).exists():
            break
        lock.release()  # the holder we waited for removed the folder (its first build failed): again
    try:
        owner = {"command": " ".join(["rag", *sys.argv[1:]]) if sys.argv and "rag" in sys.argv[0] else op,
                 "op": op, "pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}
        tmp = folder / f"{OWNER}.{os.getpid()}"
        tmp.write_text(json.dumps(owner), encoding="utf-8")
        os.replace(tmp, folder / OWNER)  # whole or absent to a writer that reads it
        writer = Writer(folder, op)
        try:
            yield writer
        except (CorpusError, ConfigError, CheckpointError):  # bad input or checkpoints: no use to a rerun
            shutil.rmtree(folder / WORK, ignore_errors=True)
            if made and writer.current is None:  # a first build that failed leaves nothing behind
                for name in (OWNER, LOCK):
                    with contextlib.suppress(OSError):
                        (folder / name).unlink()
                with contextlib.suppress(OSError):
                    folder.rmdir()
            raise
    finally:
        with contextlib.suppress(OSError):
            (folder / OWNER).unlink()
        lock.release()


def open_consistent(folder: str | Path, opener: Callable[[Path], T],
                    attempts: int = 20) -> tuple[T, Version, Pin | None]:
    """``opener(version folder)`` on the published version of ``folder``, pinned: every file it
    opens belongs to that one version, whatever is published meanwhile."""
    folder = Path(folder)
    for _ in range(attempts):
        version, pin = open_version(folder)
        try:
            opened = opener(version.path)
        except BaseException:
            if pin is not None:
                pin.release(collect=False)
            raise
        if version.path == folder and changed(folder, version):
            continue  # the old layout's first change landed while we read its files: read the new version
        return opened, version, pin
    raise IndexCorruptError(f"{folder}: changed during every one of {attempts} opens; try again")
