"""tlcm.side_process: a function in a spawned process; its value, its error, or its death, back in the parent."""

import os
import time

import pytest

from tlcm.errors import TLCMError
from tlcm.side_process import SideProcess


def _add(a, b):
    return {"sum": a + b, "pid": os.getpid()}


def _refuse(problem, fix):
    raise TLCMError(problem, fix)


def _crash():
    os._exit(3)  # as the kernel's OOM killer would leave it: no exception, no message


def _unpicklable_error():
    class Local(Exception):  # a local class cannot be pickled
        pass

    raise Local("something odd")


def _bug():
    return {}["missing"]


def _sleep():
    time.sleep(60)


def test_result_comes_from_another_process():
    out = SideProcess("add", _add, 2, 3).result()
    assert out["sum"] == 5 and out["pid"] != os.getpid()


def test_a_user_error_keeps_its_problem_and_fix():
    with pytest.raises(TLCMError) as info:
        SideProcess("refuse", _refuse, "the prompt file is empty", "add prompts").result()
    assert info.value.problem == "the prompt file is empty" and info.value.fix == "add prompts"


def test_a_bug_keeps_its_type_and_the_childs_traceback():
    with pytest.raises(KeyError) as info:
        SideProcess("bug", _bug).result()
    assert any("_bug" in note for note in getattr(info.value, "__notes__", []))


def test_an_exception_that_does_not_pickle_still_says_what_happened():
    with pytest.raises(RuntimeError, match="Local: something odd"):
        SideProcess("odd", _unpicklable_error).result()


def test_a_dead_child_is_an_error_naming_the_stage_and_its_exit_code():
    with pytest.raises(TLCMError, match=r"crash stage died \(exit code 3\)"):
        SideProcess("crash", _crash).result()


def test_kill_stops_a_running_child():
    job = SideProcess("sleep", _sleep)
    t0 = time.perf_counter()
    job.kill()
    assert time.perf_counter() - t0 < 30 and not job._proc.is_alive()
