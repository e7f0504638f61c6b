"""What the host machine has: RAM, memory available now, this process's peak RSS.

Standard library only, so the memory benchmark's children and the sweep read it without
importing anything heavy; one reader of ``/proc`` for all of them.
"""

from __future__ import annotations

import os
import platform
import resource
import subprocess
import sys


def proc_bytes(path: str, key: str) -> int | None:
    """A ``kB`` field of a /proc file (``/proc/meminfo``, ``/proc/self/status``) in bytes;
    None where the file or the key is missing (macOS, containers)."""
    try:
        with open(path) as fh:
            for line in fh:
                if line.startswith(f"{key}:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def physical_memory() -> int:
    """Bytes of RAM on this machine (Linux: /proc/meminfo; macOS: sysctl); 0 if unknown."""
    total = proc_bytes("/proc/meminfo", "MemTotal")
    if total is not None:
        return total
    if platform.system() == "Darwin":
        try:
            return int(subprocess.run(["sysctl", "-n", "hw.memsize"], capture_output=True,
                                      text=True, check=True).stdout.strip())
        except (OSError, ValueError, subprocess.CalledProcessError):
            return 0
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0


def available_memory() -> int:
    """Bytes available now (MemAvailable); half of physical memory where that is unknown."""
    available = proc_bytes("/proc/meminfo", "MemAvailable")
    return available if available is not None else physical_memory() // 2


def peak_rss() -> int:
    """This process's RSS high-water mark in bytes (VmHWM, which /proc/self/clear_refs can
    reset; ru_maxrss where /proc is missing: bytes on macOS, KiB elsewhere)."""
    hwm = proc_bytes("/proc/self/status", "VmHWM")
    if hwm is not None:
        return hwm
    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale
