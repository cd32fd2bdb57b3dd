"""One writer per datagen output folder.

Cleanup of interrupted commits (``shards.clean_incomplete``) is only safe while
nobody else commits, so a run holds ``OUT/_onegen.lock`` from start to end.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import secrets
import socket
import time
from typing import Any

from datagen import shards
from orchestration.errors import DatagenError

LOCK = "_onegen.lock"
# A lock naming another host is trusted this long: whether that job is alive cannot be
# checked from here (and not every shared filesystem passes flock between hosts).
FOREIGN_LOCK_TTL_S = 24 * 3600


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunLock:
    """One writer per output folder: cleanup of interrupted commits is only safe when
    nobody else is committing.

    Local folders (also ``file://``): ``OUT/_onegen.lock`` is held with ``flock`` for the
    whole run. Taking it is atomic, and the kernel drops it when its process dies however
    it dies, so a lock file left by a killed job is stale exactly when its flock is free:
    a later run takes it over under that flock. On a filesystem that refuses flock, and
    on object stores, the file is created exclusively (``O_EXCL``, fsspec mode ``xb``);
    there a stale lock (this host, dead pid) is removed and created anew, and a backend
    that ignores ``xb`` leaves a window where two simultaneous starts can both win (the
    token read back after writing narrows it). Either way a run only ever removes the
    lock file that holds its own token, and a lock naming another host is honoured for
    a day, because its process cannot be checked from here."""

    def __init__(self, out: str):
        self.fs, root = shards.filesystem(out)
        self.local = shards.is_local(self.fs)
        self.path = f"{root}/{LOCK}"
        self.token = secrets.token_hex(16)
        self.fd: int | None = None

    # -- what the lock file says

    def _record(self) -> bytes:
        return json.dumps(
            {
                "pid": os.getpid(),
                "host": socket.gethostname(),
                "started": time.time(),
                "token": self.token,
            }
        ).encode()

    def _parse(self, data: bytes) -> dict[str, Any]:
        """The holder a lock file names; {} for an empty file (its writer died before
        writing). Anything else unreadable is not guessed at."""
        if not data.strip():
            return {}
        try:
            holder = json.loads(data)
        except (UnicodeDecodeError, json.JSONDecodeError):
            holder = None
        if not isinstance(holder, dict):
            raise DatagenError(
                f"{self.path}: the lock file is not readable; "
                f"remove {self.path} if no job is running"
            )
        return holder

    def _refuse_if_live(self, holder: dict[str, Any], flock_free: bool = False) -> None:
        """Raise if ``holder`` may still be running. On this host a pid is checked (a free
        flock proves it dead); another host's lock is honoured for a day."""
        if not holder:
            return
        who = f"host {holder.get('host')} pid {holder.get('pid')}"
        if holder.get("host") == socket.gethostname():
            pid = holder.get("pid")
            if not flock_free and isinstance(pid, int) and _pid_alive(pid):
                raise DatagenError(f"{self.path}: another datagen job ({who}) is writing here")
            return
        started = holder.get("started")
        age = time.time() - started if isinstance(started, (int, float)) else 0.0
        if age < FOREIGN_LOCK_TTL_S:
            raise DatagenError(
                f"{self.path}: held by {who}; remove {self.path} if that job is no longer running"
            )

    # -- local: flock

    def _same_file(self, fd: int) -> bool:
        """False when the path was removed or replaced between our open and our flock."""
        try:
            st = os.stat(self.path, follow_symlinks=False)
        except FileNotFoundError:
            return False
        return (st.st_dev, st.st_ino) == (os.fstat(fd).st_dev, os.fstat(fd).st_ino)

    def _try_flock(self) -> bool | None:
        """True: locked and ours; False: the path changed under us, try again; None: this
        filesystem refuses flock."""
        flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
        fd = os.open(self.path, flags, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = self._parse(_read_fd(fd))
                self._refuse_if_live(holder)
                raise DatagenError(f"{self.path}: another datagen job is writing here") from None
            except OSError as exc:
                if exc.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                    os.close(fd)
                    return None
                raise
            if not self._same_file(fd):
                os.close(fd)
                return False
            self._refuse_if_live(self._parse(_read_fd(fd)), flock_free=True)
            os.ftruncate(fd, 0)
            os.pwrite(fd, self._record(), 0)
            os.fsync(fd)
        except BaseException:
            with contextlib.suppress(OSError):
                os.close(fd)
            raise
        self.fd = fd
        return True

    # -- everywhere: exclusive create

    def _read(self) -> bytes | None:
        try:
            with self.fs.open(self.path, "rb") as fh:
                return fh.read()
        except FileNotFoundError:
            return None

    def _create_exclusive(self) -> bool:
        """Create the lock file, complete, only if there is none. Locally the record is
        written to a private name first and hard-linked into place (``link`` fails if the
        name exists), so no racer ever sees a half-written lock."""
        try:
            if self.local:
                tmp = f"{self.path}{shards.TMP_MARK}{self.token}"
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
                try:
                    with os.fdopen(fd, "wb") as fh:
                        fh.write(self._record())
                        fh.flush()
                        os.fsync(fh.fileno())
                    os.link(tmp, self.path)
                finally:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(tmp)
            else:
                with self.fs.open(self.path, "xb") as fh:
                    fh.write(self._record())
        except FileExistsError:
            return False
        return True

    def _acquire_exclusive(self) -> None:
        for _ in range(3):
            if self._create_exclusive():
                mine = self._read()
                if mine is not None and self._parse(mine).get("token") == self.token:
                    return
                raise DatagenError(
                    f"{self.path}: another datagen job took the lock at the same time"
                )
            seen = self._read()
            if seen is None:
                continue
            self._refuse_if_live(self._parse(seen))
            if self._read() == seen:  # still the stale lock we judged: remove, then race fairly
                with contextlib.suppress(FileNotFoundError):
                    self.fs.rm(self.path)
        raise DatagenError(
            f"{self.path}: could not take the lock; remove {self.path} if no job is running"
        )

    def __enter__(self) -> RunLock:
        if self.local:
            for _ in range(10):
                taken = self._try_flock()
                if taken:
                    return self
                if taken is None:
                    break
        self._acquire_exclusive()
        return self

    def __exit__(self, *exc: object) -> None:
        """Remove the lock file only while it still holds this run's token."""
        try:
            data = self._read()
            ours = data is not None and json.loads(data or b"{}").get("token") == self.token
            if ours and (self.fd is None or self._same_file(self.fd)):
                self.fs.rm(self.path)
        except (OSError, ValueError):
            pass  # a lock we cannot read back is not ours to remove
        finally:
            if self.fd is not None:
                os.close(self.fd)  # drops the flock
                self.fd = None


def _read_fd(fd: int) -> bytes:
    os.lseek(fd, 0, os.SEEK_SET)
    chunks = []
    while chunk := os.read(fd, 65536):
        chunks.append(chunk)
    return b"".join(chunks)
