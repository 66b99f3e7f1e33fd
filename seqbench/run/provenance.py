"""Environment snapshot stored with every run (env.json) and shown by ``seqbench env``."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

import torch

from seqbench.ops.gemm import GEMM

OPTIONAL_KERNELS = ("mamba_ssm", "causal_conv1d", "flash_attn", "triton")
_DISTRIBUTIONS = {
    "mamba_ssm": "mamba-ssm", "causal_conv1d": "causal-conv1d", "flash_attn": "flash-attn", "triton": "triton"
}


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], capture_output=True, text=True, timeout=10,
                             cwd=Path(__file__).resolve().parent)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def git_state() -> tuple[str | None, bool | None]:
    commit = _git("rev-parse", "HEAD")
    if commit is None:
        return None, None
    status = _git("status", "--porcelain", "--untracked-files=no")
    return commit, bool(status)


def resolve_device(name: str) -> torch.device:
    """'auto' -> cuda when available, else cpu. 'cuda' without a device is the user's error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' was requested but torch sees no CUDA device (use device: cpu or auto)")
    return torch.device(name)


def snapshot(device: torch.device | None = None, dtype: str | None = None, seed: int | None = None) -> dict:
    device = device or resolve_device("auto")
    commit, dirty = git_state()
    cuda = torch.cuda.is_available()
    return {
        "created_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if cuda else None,
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model(),
        "cpu_model": cpu_model(),
        "cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "interop_threads": torch.get_num_interop_threads(),
        "dtype": dtype,
        "seed": seed,
        "git_commit": commit,
        "git_dirty": dirty,
        "seqbench": _version("seqbench"),
        "cpu_float32_gemm": GEMM,
        "kernels": {name: _version(_DISTRIBUTIONS[name]) for name in OPTIONAL_KERNELS},
    }
