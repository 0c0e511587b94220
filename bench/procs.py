"""What a server's processes cost, read from ``/proc``: CPU time and resident memory of every
process in its process group.

Every server the benches start runs in a session (and process group) of its own
(:func:`bench.load.start_server`, :func:`bench.peers.nchan.nchan_process`), so the group holds
all of its processes: the service and its SQLite writer process, nginx's master and worker.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["group_cpu_seconds", "group_pids", "group_rss_mib"]

_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
_PAGE_MIB = os.sysconf("SC_PAGE_SIZE") / (1024 * 1024)


def _stat_fields(pid: int) -> list[str] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    # After the command name (which may hold spaces and parentheses): state is field 3.
    return text.rsplit(")", 1)[1].split()


def group_pids(pgid: int) -> list[int]:
    """The live processes of process group ``pgid``."""
    found: list[int] = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        fields = _stat_fields(int(entry))
        # fields[0] is the state (field 3), fields[2] the process group (field 5).
        if fields is not None and int(fields[2]) == pgid:
            found.append(int(entry))
    return found


def group_cpu_seconds(pgid: int) -> float:
    """User + system CPU time of the group's live processes (utime and stime, fields 14-15)."""
    total = 0
    for pid in group_pids(pgid):
        fields = _stat_fields(pid)
        if fields is not None:
            total += int(fields[11]) + int(fields[12])
    return total / _CLOCK_TICKS


def group_rss_mib(pgid: int) -> float:
    """Resident memory of the group's live processes (``/proc/<pid>/statm``), in MiB."""
    pages = 0
    for pid in group_pids(pgid):
        try:
            pages += int(Path(f"/proc/{pid}/statm").read_text().split()[1])
        except (FileNotFoundError, ProcessLookupError, IndexError):
            continue
    return pages * _PAGE_MIB
