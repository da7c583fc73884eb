"""One writer per folder: a live holder refuses a second run at once, a dead one's lock is taken over."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from tlcm.errors import TLCMError
from tlcm.runlock import LOCK_NAME, RunLock, hold, lock_holder


def test_second_writer_refused_then_released(tmp_path):
    folder = tmp_path / "data"
    with hold(folder, what="data set", command="tlcm synthesize --out data") as first:
        info = json.loads((folder / LOCK_NAME).read_text())
        assert info["pid"] == os.getpid() and info["host"] == socket.gethostname()
        assert info["command"] == "tlcm synthesize --out data" and info["started"] <= time.time()
        with pytest.raises(TLCMError, match=rf"in use: pid {os.getpid()} on host") as err:
            RunLock(folder, what="data set").acquire()
        assert "tlcm synthesize --out data" in str(err.value) and "another --out" in str(err.value)
        assert lock_holder(folder) and str(os.getpid()) in lock_holder(folder)
        assert first.held
    assert not (folder / LOCK_NAME).exists()  # released and removed
    assert lock_holder(folder) is None
    with hold(folder):  # free again
        pass


def test_live_process_holds_then_dies_and_its_stale_lock_is_taken_over(tmp_path):
    folder = tmp_path / "run"
    code = ("import sys, time; from tlcm.runlock import hold; hold(sys.argv[1], command='holder').acquire(); "
            "print('held', flush=True); time.sleep(120)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(folder)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        with pytest.raises(TLCMError, match=rf"pid {proc.pid} on host .*\(holder\)"):
            hold(folder).acquire()
    finally:
        proc.send_signal(signal.SIGKILL)  # like kill -9: no cleanup, the lock file stays behind
        proc.wait()
    assert json.loads((folder / LOCK_NAME).read_text())["pid"] == proc.pid
    lock = hold(folder).acquire()
    try:
        assert lock.took_over["pid"] == proc.pid  # stale: its holder is gone
        assert json.loads((folder / LOCK_NAME).read_text())["pid"] == os.getpid()
    finally:
        lock.release()


def test_dead_pid_in_a_leftover_file_is_stale(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()  # a pid that no longer runs
    (tmp_path / LOCK_NAME).write_text(json.dumps({"pid": proc.pid, "host": socket.gethostname(), "started": 0}))
    with hold(tmp_path) as lock:
        assert lock.took_over["pid"] == proc.pid


def test_lock_written_on_another_host_is_not_taken_over_silently(tmp_path):
    (tmp_path / LOCK_NAME).write_text(json.dumps({"pid": 1, "host": "some-other-node", "started": time.time()}))
    with pytest.raises(TLCMError, match="another machine") as err:
        hold(tmp_path).acquire()
    assert "some-other-node" in str(err.value) and f"delete {tmp_path / LOCK_NAME}" in str(err.value)


def test_output_path_that_is_a_file_is_a_clear_error(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(TLCMError, match=r"--out .*f is a file"):
        hold(tmp_path / "f").acquire()
    with pytest.raises(TLCMError, match=r"is under .*f, which is a file"):
        hold(tmp_path / "f" / "sub", flag="--output-dir").acquire()
