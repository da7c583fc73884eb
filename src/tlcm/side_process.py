"""Run one function in a second (spawned) process beside the main one, and get its result or its error back.

The demo uses it to evaluate the teacher while the students train: on a 2-core CPU, two single-threaded stages side
by side finish in about half the time of one stage on two threads (the toy networks are too small for intra-op
threads to pay). ``spawn`` rather than ``fork``: a forked copy of a process that already ran torch can deadlock on
its OpenMP pool.

Why not ``concurrent.futures``: a pool worker killed by the kernel (out of memory) leaves ``multiprocessing.Pool``
waiting forever, and ``ProcessPoolExecutor`` cannot kill a running task when the main process fails. Here the parent
sees a dead child at once (the pipe closes) and :meth:`SideProcess.kill` stops one that is no longer wanted.
"""

from __future__ import annotations

import multiprocessing
import traceback
from collections.abc import Callable

from tlcm.errors import TLCMError


def _child(conn, fn: Callable, args: tuple) -> None:
    try:
        result = fn(*args)
    except BaseException as err:  # noqa: BLE001 - everything goes back to the parent, which re-raises it
        text = traceback.format_exc()
        try:
            conn.send(("error", err, text))
        except Exception:  # an exception that does not pickle: its text still tells what happened
            conn.send(("error", RuntimeError(f"{type(err).__name__}: {err}"), text))
    else:
        conn.send(("ok", result, None))
    finally:
        conn.close()


class SideProcess:
    """``fn(*args)`` in a spawned process; :meth:`result` waits for it. ``fn``, ``args`` and the result must pickle
    (``fn`` a module-level function)."""

    def __init__(self, name: str, fn: Callable, *args):
        ctx = multiprocessing.get_context("spawn")
        self.name = name
        self._recv, send = ctx.Pipe(duplex=False)
        self._proc = ctx.Process(target=_child, args=(send, fn, args), name=f"tlcm {name}", daemon=True)
        self._proc.start()
        send.close()  # the child holds the only writing end: its death closes the pipe

    def result(self):
        """The function's return value; its exception re-raised here (with the child's traceback as a note)."""
        try:
            status, value, text = self._recv.recv()
        except EOFError:
            self._proc.join()
            raise TLCMError(f"the process running the {self.name} stage died (exit code {self._proc.exitcode}) "
                            "before it finished",
                            "re-run the same command (finished work is kept); if it dies again, check free memory "
                            "or run the stages one after another (--workers 1)") from None
        finally:
            self._recv.close()
        self._proc.join()
        if status == "error":
            if text and hasattr(value, "add_note") and not isinstance(value, TLCMError):
                value.add_note(f"in the side process ({self.name}):\n{text}")
            raise value
        return value

    def kill(self) -> None:
        """Stop the child if it still runs (the main process failed: its work is not wanted now)."""
        if self._proc.is_alive():
            self._proc.terminate()
        self._proc.join()
