"""The one exception type users see.

Raise :class:`TLCMError` for anything a user can fix (a bad path, an empty prompt file, a step count out of range).
The message must name the problem *and* the fix. The CLI prints it without a traceback and exits with status 2.
Internal invariants stay ``assert``s: those are our bugs, and a traceback is what we want for them.
"""

from __future__ import annotations


class TLCMError(Exception):
    """A user-facing error whose message says what went wrong and what to do about it."""

    def __init__(self, problem: str, fix: str | None = None):
        self.problem = problem
        self.fix = fix
        super().__init__(problem if fix is None else f"{problem}\n  fix: {fix}")

    def __reduce__(self):  # pickled across processes (the demo's side stage) with its problem and fix apart
        return self.__class__, (self.problem, self.fix)


_OS_ERRORS = {  # errno name -> (what happened, what to do)
    "ENOSPC": ("disk full while writing {path}", "free space on that disk or write to another folder; re-running "
               "the same command resumes where it stopped"),
    "EDQUOT": ("disk quota exceeded while writing {path}", "free space or write to another folder"),
    "EACCES": ("permission denied: {path}", "choose a folder you can write to (or read from), or fix its "
               "permissions"),
    "EPERM": ("operation not permitted: {path}", "choose another path, or fix its permissions"),
    "EROFS": ("read-only file system: {path}", "write to a folder on a writable disk"),
    "ENOTDIR": ("part of {path} is a file, not a folder", "pass a path whose parent folders are folders"),
    "EISDIR": ("{path} is a folder where a file was expected", "pass a file path, or remove the folder"),
    "EEXIST": ("{path} already exists", "pass another path, or remove it"),
    "ENOENT": ("{path} does not exist", "check the path"),
    "ENAMETOOLONG": ("path too long: {path}", "use a shorter path"),
    "EMFILE": ("too many open files (at {path})", "raise the limit (ulimit -n) or use fewer DataLoader workers"),
    "EIO": ("input/output error at {path}: the disk or network file system failed", "check the disk, then re-run "
            "the same command (it resumes)"),
}
_OOM = ("out of memory", "can't allocate memory", "defaultcpuallocator", "cuda out of memory")
_DISK_FULL = ("no space left on device", "file write failed", "disk quota exceeded")


def describe_failure(err: BaseException) -> str | None:
    """One line naming what went wrong, with the path and a fix, for failures a user can act on (disk full, no
    permission, a path that is a file, out of memory); ``None`` for anything else (a bug: keep the traceback).
    Looks through the exception's causes, since libraries wrap ``OSError`` in their own types."""
    import errno as errno_mod

    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        text = str(err).lower()
        if isinstance(err, OSError) and err.errno is not None:
            name = errno_mod.errorcode.get(err.errno, "")
            path = err.filename if err.filename is not None else "(path not reported)"
            if err.filename2 is not None:
                path = f"{path} -> {err.filename2}"
            if name in _OS_ERRORS:
                what, fix = _OS_ERRORS[name]
                return f"{what.format(path=path)}\n  fix: {fix}"
            return f"{err.strerror or name}: {path}\n  fix: check the path and the disk"
        if isinstance(err, MemoryError) or type(err).__name__ == "OutOfMemoryError" or any(s in text for s in _OOM):
            return ("out of memory (" + (str(err).strip().splitlines() or [type(err).__name__])[0][:200] + ")\n"
                    "  fix: lower the batch size (--batch-size, or --set batch_size=N with gradient_accumulation_steps "
                    "to keep the effective batch), or use a smaller resolution or mixed precision")
        if any(s in text for s in _DISK_FULL):
            return ("writing a file failed, most likely because the disk is full ("
                    + str(err).strip().splitlines()[0][:200] + ")\n  fix: free space or write to another folder; "
                    "re-running the same command resumes where it stopped")
        err = err.__cause__ or err.__context__
    return None
