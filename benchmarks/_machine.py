"""Machine facts every benchmark result records."""
from __future__ import annotations

import os
import platform
import sys
from typing import Any


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), platform.processor())
    except OSError:
        return platform.processor()


def machine_facts(device: str = "cpu") -> dict[str, Any]:
    import torch

    try:
        import ray

        ray_version = ray.__version__
    except ImportError:  # e.g. a lent GPU machine with PyTorch only (benchmarks/paper_gpu.py)
        ray_version = "not installed"

    facts: dict[str, Any] = {
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "ray": ray_version,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": device,
        "cpu_model": _cpu_model(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),  # e.g. AVX2, AVX512: bf16 speed depends on it
        "loadavg_at_start": os.getloadavg(),
        "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        facts["gpu"] = torch.cuda.get_device_name(0)
    return facts
