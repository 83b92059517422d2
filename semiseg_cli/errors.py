"""The one exception type for bad user input, and the did-you-mean hint its messages carry.

Anything the user can fix (a missing file, a recipe typo, a corrupt image, a full disk) raises `UserError`;
the CLI prints its message as one line and exits with code 2. Everything else is a bug and keeps its
traceback. `Interrupted` is the Ctrl-C / SIGTERM that the CLI turns into one line and exit 128 + signal.
"""
from __future__ import annotations

import contextlib
import difflib
import errno
import os
import signal
from pathlib import Path


class UserError(Exception):
    """Bad input the user can fix: printed as one line, exit code 2."""


class Interrupted(BaseException):
    """SIGINT or SIGTERM (raised by the CLI's handlers): the CLI prints `line` (or a generic one) and exits
    with 128 + `signum` (130, 143).

    A BaseException, like KeyboardInterrupt, so `except Exception` never swallows it and `finally` blocks
    (the run lock) run; not a KeyboardInterrupt itself, because typer turns those into a silent return
    value. Code that can say what it kept (the trainer: "last.pt saved; continue with ...") sets `line`."""

    def __init__(self, signum: int = signal.SIGINT, line: str | None = None):
        super().__init__(signum, line)
        self.signum, self.line = int(signum), line

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


def signal_in_forked_child(signum: int) -> None:
    """What a handler of the CLI's process does when it runs in a forked child (a DataLoader worker, which
    inherits Python's handlers): Ctrl-C, sent to the whole process group, is left to the parent, which
    stops its workers; SIGTERM ends the child as it would without the handler (torch's workers install
    their own)."""
    if signum == signal.SIGTERM:
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)


def expect_workers_to_die() -> None:
    """Called when a stop signal arrives: a SIGTERM sent to the whole process group (systemd, a batch
    scheduler) also ends the DataLoader workers, and torch's SIGCHLD handler would then raise "worker killed
    by signal" in the middle of a step; once stopping, their end is expected. (Handlers run in the main
    thread, where signal.signal may be called.)"""
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)


def did_you_mean(word: str, options) -> str:
    """Return ' (did you mean X?)' for the closest option, or '' if nothing is close."""
    close = difflib.get_close_matches(str(word), [str(o) for o in options], n=1, cutoff=0.5)
    return f" (did you mean {close[0]!r}?)" if close else ""


def unknown_name(what: str, name: str, options) -> UserError:
    """The error for a name missing from a registry: the nearest valid one and the full list."""
    return UserError(f"unknown {what} {name!r}{did_you_mean(name, options)}; choose one of: {', '.join(map(str, options))}")


def check_output_dir(path: str | Path, flag: str = "--out") -> None:
    """Refuse, before any work, an output folder that cannot be written: a file, a path under a file, or
    a folder (the nearest existing one above a new path) this user cannot write into."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UserError(f"{flag} {path}: is a file, not a folder; pass a folder (or a new path) to {flag}")
    existing = path.absolute()
    while not existing.exists() and existing != existing.parent:  # the nearest existing ancestor
        existing = existing.parent
    if not existing.is_dir():
        raise UserError(f"{flag} {path}: {existing} is a file, so no folder can be made under it; choose another {flag}")
    if not os.access(existing, os.W_OK | os.X_OK):  # also False on a read-only file system
        raise UserError(f"{flag} {path}: {existing} is not writable (permissions or a read-only file system); "
                        f"choose another {flag}")


def check_output_file(path: str | Path, flag: str = "--out") -> None:
    """Refuse, before any work, an output file that cannot be written: an existing folder, or a path whose
    folder cannot be made or written (check_output_dir's rules)."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{flag} {path}: is a folder; pass a file name")
    check_output_dir(path.parent, flag)


# errno -> how a failed write is described (the rest stay internal errors with their traceback)
_WRITE_ERRORS = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded",
                 errno.EROFS: "read-only file system", errno.EACCES: "permission denied", errno.EPERM: "permission denied"}


def write_error_line(e: OSError, path: str | Path | None, atomic: bool = True) -> str | None:
    """One line for an OSError the user can fix while writing `path` (None: unknown file), or None when
    `e` is another error. Atomic writes (io.write_atomic) leave the previous file and no temp file."""
    what = _WRITE_ERRORS.get(e.errno)
    if what is None:
        return None
    if path is None:
        return f"{what} while writing a file ({e.strerror}); no partial file was left; fix it and run again"
    path = Path(path)
    if not atomic:
        kept = "what it held before is kept"
    elif path.exists():
        kept = f"the previous {path.name} is intact"
    else:
        kept = "no partial file was left"
    fix = "free some space" if e.errno in (errno.ENOSPC, errno.EDQUOT) else "choose a writable folder"
    return f"{what} writing {path}; {kept}; {fix} and run again"


@contextlib.contextmanager
def writing(path: str | Path, atomic: bool = True):
    """Turn a full disk, a read-only folder or a refused permission while writing `path` into a UserError
    (see `write_error_line`); other OSErrors pass unchanged."""
    try:
        yield
    except OSError as e:
        line = write_error_line(e, path, atomic)
        if line is None:
            raise
        raise UserError(line) from None
