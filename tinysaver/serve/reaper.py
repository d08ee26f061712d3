"""The local Ray head's reaper: ``python -m tinysaver.serve.reaper OWNER SESSION FOLDER``.

``tinysaver serve`` starts its own Ray with ``ray start --block`` in a session of its own. When the
command is killed with SIGKILL nothing of it runs again: the kernel's parent-death signal reaches
``ray start``, whose graceful stop left 22 processes running for 30-55 s, and its temp folder stayed.
This small process watches the command (OWNER, a pid) and, once it is gone, kills every process of
the node's SESSION at once and removes FOLDER. It exits on its own when the session is empty (the
command stopped the node itself). Linux only: it reads /proc. Nothing here imports Ray or torch.
"""
from __future__ import annotations

import os
import shutil
import signal
import sys
import time
from pathlib import Path

POLL_S = 0.5  # a kill -9 is acted on within this; each look scans /proc, the reaper's only work


def in_session(sid: int) -> list[int]:
    """The live processes of session ``sid`` (zombies left out), read from /proc; [] off Linux."""
    out = []
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()  # after the name, which may hold spaces
        except OSError:
            continue
        if int(fields[3]) == sid and fields[0] != "Z" and int(entry.name) != os.getpid():
            out.append(int(entry.name))
    return out


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie, killed but not yet reaped by its parent, does not)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def kill_session(sid: int, rounds: int = 5) -> None:
    """SIGKILL every process of session ``sid``, again while any is left (a stopping node restarts some)."""
    for _ in range(rounds):
        left = in_session(sid)
        if not left:
            return
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        time.sleep(POLL_S)


def watch(owner: int, sid: int, folder: Path) -> int:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C meant for the command is not for the reaper
    while alive(owner):
        if not in_session(sid):
            return 0  # the node was stopped by its command: nothing to reap
        time.sleep(POLL_S)
    kill_session(sid)
    shutil.rmtree(folder, ignore_errors=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    owner, sid, folder = (argv or sys.argv[1:])[:3]
    return watch(int(owner), int(sid), Path(folder))


__all__ = ["POLL_S", "in_session", "alive", "kill_session", "watch", "main"]


if __name__ == "__main__":
    raise SystemExit(main())
