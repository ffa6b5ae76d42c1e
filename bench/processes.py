"""The processes of a server under benchmark: its tree, its memory, its idle CPU, and
stopping all but the one under load (SIGSTOP/SIGCONT), for bench_serving.py and the
benchmarks built on it."""

from __future__ import annotations

import contextlib
import signal
import subprocess
import time

import psutil


def tree(process: subprocess.Popen) -> list[psutil.Process]:
    """The server and every process it started, the server first."""
    try:
        root = psutil.Process(process.pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def signal_all(members: list[psutil.Process], signal_number: int) -> None:
    for member in members:
        with contextlib.suppress(psutil.NoSuchProcess):
            member.send_signal(signal_number)


def freeze(process: subprocess.Popen) -> None:
    """SIGSTOP the server, then its workers (a supervisor stopped first cannot see a
    stopped worker as hung)."""
    signal_all(tree(process), signal.SIGSTOP)


def thaw(process: subprocess.Popen) -> None:
    """SIGCONT the workers first, so that a supervisor's pending health check finds
    them answering when it resumes."""
    signal_all(tree(process)[::-1], signal.SIGCONT)
    time.sleep(0.2)


def idle_cpu(processes: dict[str, subprocess.Popen], seconds: float = 5.0
             ) -> dict[str, float]:
    """Each server's CPU use while nobody sends it anything, in cores."""
    def cpu(members):
        total = 0.0
        for member in members:
            with contextlib.suppress(psutil.NoSuchProcess):
                total += sum(member.cpu_times()[:2])
        return total

    trees = {name: tree(process) for name, process in processes.items()}
    before = {name: cpu(members) for name, members in trees.items()}
    time.sleep(seconds)
    return {name: (cpu(members) - before[name]) / seconds for name, members in trees.items()}


def memory_mb(process: subprocess.Popen) -> list[float]:
    """Memory of the server and every process it started, MB each: the proportional
    set size (pages shared between forked processes counted once, split among them),
    so that a server that forks its workers is not charged twice for shared pages."""
    sizes = []
    for member in tree(process):
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            sizes.append(member.memory_full_info().pss / 2**20)
    return sorted(sizes, reverse=True)
