"""What every benchmark result records about its run (DESIGN.md section 6): the device, the
driver, the jax version, the date and the commit measured, one convention for all scripts."""

from __future__ import annotations

import datetime
import os
import re
import subprocess
from pathlib import Path

import jax

REPO = Path(__file__).resolve().parents[2]  # the checkout of an editable install; elsewhere git finds none


def _run(*cmd: str) -> str | None:
    try:
        return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, check=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def git_commit() -> str:
    """HEAD, with "-dirty" when tracked files differ from it; "unknown" outside a git checkout
    (a copy without .git, as on a lent GPU machine: pass --commit there)."""
    head = _run("git", "rev-parse", "HEAD")
    if head is None:
        return "unknown"
    return head + ("-dirty" if _run("git", "status", "--porcelain", "--untracked-files=no") else "")


def gpu_driver() -> str | None:
    out = _run("nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader")
    return out.splitlines()[0] if out else None


def run_info(benchmark: str, *, commit: str | None = None, device: str | None = None) -> dict[str, str | None]:
    """The leading fields of a result file; `device` defaults to jax's first device. XLA_FLAGS,
    where set, is recorded: it can change both sides of a comparison."""
    info = {
        "benchmark": benchmark,
        "device": device or jax.devices()[0].device_kind,
        "driver": gpu_driver(),
        "jax_version": jax.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": commit or git_commit(),
    }
    if os.environ.get("XLA_FLAGS"):
        info["xla_flags"] = os.environ["XLA_FLAGS"]
    return info


def device_tag(kind: str) -> str:
    """A short file-name tag for a device kind: "NVIDIA H100 80GB HBM3" -> "h100", "cpu" -> "cpu"."""
    found = re.search(r"\b([A-Z]+\d{2,4}[A-Z]?)\b", kind)
    return (found.group(1) if found else kind.split()[0]).lower()
