"""One writer per folder: a lock file holding pid, host, start time and command, released when the process ends.

Every command that writes a folder (``synthesize``, ``encode-images``, ``distill``, ``evaluate``, ``demo``,
``toy build``) holds ``FOLDER/.tlcm.lock`` while it runs, so a second run into the same folder fails at once with a
message naming the holder instead of interleaving its files with the first one's.

Mutual exclusion is an ``flock`` on the lock file: the kernel drops it when the holder dies (even by ``kill -9``),
so a lock left by a dead process is stale by construction and the next run takes it over. The file's JSON content
(pid, host, start time, command) is only for the message. Where ``flock`` is unsupported the content decides: a
holder on this host whose pid is gone is stale. A lock written on *another* host is never taken over silently
(we cannot see that host's processes): the message names the host and says to delete the file if that run is gone.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
import sys
import time
from pathlib import Path

from tlcm.errors import TLCMError

LOCK_NAME = ".tlcm.lock"

try:  # POSIX; elsewhere the pid-file fallback below applies
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _read(path: Path) -> dict:
    try:
        data = json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def describe_holder(info: dict) -> str:
    if not info:
        return "another process (no details recorded)"
    started = info.get("started")
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)) if isinstance(started, (int, float)) else "?"
    text = f"pid {info.get('pid')} on host {info.get('host')!r} since {since}"
    if info.get("command"):
        text += f" ({info['command']})"
    return text


def check_output_folder(folder: str | Path, flag: str = "--out") -> None:
    """A clear error for an output path that is a file, or under a file, or not writable."""
    folder = Path(folder).expanduser()
    for parent in [folder, *folder.parents]:
        if parent.exists():
            if not parent.is_dir():
                where = "is a file" if parent == folder else f"is under {parent}, which is a file"
                raise TLCMError(f"{flag} {folder} {where}", f"pass a folder path for {flag} (it is created if missing)")
            if not os.access(parent, os.W_OK | os.X_OK):
                what = folder if parent == folder else f"{parent} (to create {folder})"
                raise TLCMError(f"{flag}: no permission to write in {what}",
                                f"choose a folder you can write to for {flag}, or fix the folder's permissions")
            return


class RunLock:
    """``FOLDER/.tlcm.lock``; use :func:`hold` (a context manager) or :meth:`acquire` / :meth:`release`."""

    def __init__(self, folder: str | Path, *, what: str = "run", flag: str = "--out", command: str | None = None):
        self.folder = Path(folder).expanduser()
        self.path = self.folder / LOCK_NAME
        self.what, self.flag = what, flag
        self.command = command if command is not None else _command_line()
        self._fd: int | None = None
        self._created = False
        self.took_over: dict | None = None  # the stale holder's info, when one was replaced

    @property
    def held(self) -> bool:
        return self._fd is not None

    def _refuse(self, info: dict, other_host: bool = False) -> TLCMError:
        holder = describe_holder(info)
        if other_host:
            return TLCMError(
                f"{self.folder} is locked by {holder}: another machine may be writing this {self.what}",
                f"wait for that run to finish; if it is no longer running, delete {self.path} and re-run")
        return TLCMError(f"{self.folder} is in use: {holder} is writing this {self.what}",
                         f"wait for it to finish (or stop it), or pass another {self.flag}")

    def acquire(self) -> RunLock:
        if self.held:
            return self
        check_output_folder(self.folder, self.flag)
        self._created = not self.folder.exists()
        self.folder.mkdir(parents=True, exist_ok=True)
        for _ in range(20):  # retried only when the file was replaced between open() and flock()
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            try:
                locked = self._lock_fd(fd)
            except BaseException:
                os.close(fd)
                raise
            if not locked:
                os.close(fd)
                continue
            self._fd = fd
            self._write_info()
            return self
        raise TLCMError(f"could not lock {self.path}: it keeps being replaced", "retry; is another tool deleting it?")

    def _lock_fd(self, fd: int) -> bool:
        """Lock ``fd``; False if the path now names another file. Raises for a live holder (the caller closes
        ``fd`` unless this returns True)."""
        info = _read(self.path)
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise self._refuse(_read(self.path)) from None
            except OSError as err:
                if err.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                    raise
                return self._pidfile_check(fd, info)  # a file system without flock
            try:  # the holder may have released and unlinked the file after our open(): start again
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if not same:
                return False
            info = _read(self.path)
            if info and info.get("host") != socket.gethostname() and info.get("pid") is not None:
                # flock is free, but the recorded holder ran elsewhere: on a file system whose locks are local to
                # each machine that proves nothing about it
                raise self._refuse(info, other_host=True)
            self.took_over = info or None
            return True
        return self._pidfile_check(fd, info)  # pragma: no cover - no fcntl

    def _pidfile_check(self, fd: int, info: dict) -> bool:
        pid, host = info.get("pid"), info.get("host")
        if pid is not None:
            if host != socket.gethostname():
                raise self._refuse(info, other_host=True)
            if pid != os.getpid() and _pid_alive(int(pid)):
                raise self._refuse(info)
        self.took_over = info or None
        return True

    def _write_info(self) -> None:
        info = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(), "what": self.what,
                "command": self.command}
        data = (json.dumps(info) + "\n").encode()
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, data, 0)
        os.fsync(self._fd)

    def release(self) -> None:
        if self._fd is None:
            return
        with contextlib.suppress(FileNotFoundError):
            if os.fstat(self._fd).st_ino == os.stat(self.path).st_ino:
                os.unlink(self.path)  # unlink while still holding the lock; a waiter re-checks the inode
        os.close(self._fd)
        self._fd = None
        if self._created:  # a run refused before writing anything leaves no empty folder behind
            with contextlib.suppress(OSError):
                self.folder.rmdir()  # only succeeds when empty

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def lock_holder(folder: str | Path) -> str | None:
    """Who holds ``folder``'s lock right now (for ``--dry-run``), or None; creates nothing."""
    path = Path(folder).expanduser() / LOCK_NAME
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        if fcntl is None:  # pragma: no cover
            info = _read(path)
            return describe_holder(info) if info.get("pid") and _pid_alive(int(info["pid"])) else None
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return describe_holder(_read(path))
        except OSError:
            return None
        return None
    finally:
        os.close(fd)


def hold(folder: str | Path, *, what: str = "run", flag: str = "--out", command: str | None = None) -> RunLock:
    """``with hold(folder): ...``: one writer per folder (see the module docstring)."""
    return RunLock(folder, what=what, flag=flag, command=command)


def _command_line() -> str:
    argv = sys.argv[:]
    if argv and argv[0].endswith(("tlcm", "cli.py", "__main__.py")):
        argv[0] = "tlcm"
    return " ".join(argv)[:500]


def acquire_on_main(folder: str | Path, state, **kwargs) -> RunLock | None:
    """Under ``accelerate launch``: the main process takes the lock and every process learns whether it could, so a
    refused run stops on all ranks instead of leaving the others waiting at a barrier. ``state`` is an accelerate
    ``PartialState``/``Accelerator`` or anything with ``num_processes``/``is_main_process``."""
    lock, message = None, None
    if state.is_main_process:
        lock = RunLock(folder, **kwargs)
        try:
            lock.acquire()
        except TLCMError as err:
            if state.num_processes <= 1:
                raise
            message = [err.problem, err.fix]
    if state.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        shared = broadcast_object_list([message], from_process=0)
        message = shared[0]
        if message is not None:
            raise TLCMError(*message)
    return lock
