"""A local submitit task's parent: runs the task as its child and logs the signal that ended it.

submitit's local controller drops its tasks' exit status, so without this parent a trial killed by
the kernel (out of memory) or by `kill -9` reads as a job that left no result, for no known reason.
"""

from __future__ import annotations

import ctypes
import signal
import subprocess
import sys

KILLED = "recsys: the trial's process was killed by signal "
FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)
HINTS = {
    signal.SIGKILL: "out of memory, see dmesg; or kill -9",
    signal.SIGABRT: "aborted in native code, e.g. a failed allocation",
    signal.SIGSEGV: "a crash in native code",
}


def killed_by(signum: int) -> str:
    """The line the log gets: signal number, name and the likely cause."""
    try:
        name = signal.Signals(signum).name
    except ValueError:
        name = "a real-time signal"
    hint = HINTS.get(signum)
    return f"{KILLED}{signum} ({name}{': ' + hint if hint else ''})"


def _die_with_parent() -> None:
    """The task is killed with this parent (PR_SET_PDEATHSIG), as it was without it."""
    ctypes.CDLL(None).prctl(1, signal.SIGKILL)


def main() -> int:
    """Run `python ARGS` (the submitit task), forward the controller's signals, log a kill."""
    linux = sys.platform.startswith("linux")
    child = subprocess.Popen(
        [sys.executable, *sys.argv[1:]], preexec_fn=_die_with_parent if linux else None
    )
    for signum in FORWARDED:
        signal.signal(signum, lambda s, _: child.send_signal(s))
    code = child.wait()
    if code >= 0:
        return code
    print(killed_by(-code), file=sys.stderr, flush=True)
    return 128 - code


if __name__ == "__main__":
    sys.exit(main())
