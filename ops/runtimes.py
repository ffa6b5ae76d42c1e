"""Which container runtime works here: Docker or Podman, and how to call it.

A runtime works when its `info` succeeds: a `docker` client without an engine does
not. `python -m ops.image runtime` prints the one `make image` and `make deploy` would
use, or why none works.

Like the rest of ops/, the standard library only: no torch, no pipeline/.
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass

RUNTIMES = ("docker", "podman")


class ContainerError(RuntimeError):
    """A container runtime, build or run that failed; the message says which and why."""


@dataclass(frozen=True)
class Runtime:
    """A container runtime's command line: `docker` or `podman`."""

    name: str

    def command(self, *args: str) -> list[str]:
        if self.name == "podman" and shutil.which("runc"):
            # crun, podman's usual default, refuses cgroup set-ups that runc accepts
            return ["podman", "--runtime", "runc", *args]
        return [self.name, *args]

    def run(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        """Run a runtime command; ContainerError with its last error lines if it fails."""
        try:
            result = subprocess.run(self.command(*args), capture_output=True, text=True,
                                    timeout=timeout, stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            raise ContainerError(f"`{self.name} {args[0]}` took over {timeout:.0f} s") from None
        if result.returncode != 0:
            raise ContainerError(f"`{self.name} {' '.join(args[:2])}` failed "
                                 f"({result.returncode}): {last_lines(result.stderr)}")
        return result

    def has_image(self, image: str) -> bool:
        return subprocess.run(self.command("image", "inspect", image), capture_output=True,
                              stdin=subprocess.DEVNULL).returncode == 0


def last_lines(text: str, count: int = 5) -> str:
    return "\n".join(text.strip().splitlines()[-count:]) or "no output"


def why_not(name: str) -> str | None:
    """None when runtime `name` can run containers here, else the reason it cannot."""
    if shutil.which(name) is None:
        return f"{name}: not installed"
    try:
        result = subprocess.run(Runtime(name).command("info"), capture_output=True,
                                text=True, timeout=30, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        return f"{name}: `{name} info` did not answer in 30 s"
    if result.returncode != 0:
        return f"{name}: `{name} info` failed ({last_lines(result.stderr, 1)})"
    return None


def find_runtime(choice: str = "auto") -> Runtime:
    """The runtime `choice` names, or for "auto" the first of docker, podman that works;
    ContainerError with every reason when none does."""
    candidates = RUNTIMES if choice == "auto" else (choice,)
    if choice not in (*RUNTIMES, "auto"):
        raise ContainerError(f"unknown container runtime {choice!r}: "
                             f"choose auto, {', '.join(RUNTIMES)}")
    reasons = []
    for name in candidates:
        reason = why_not(name)
        if reason is None:
            return Runtime(name)
        reasons.append(reason)
    raise ContainerError("no container runtime works (" + "; ".join(reasons) + ")")
