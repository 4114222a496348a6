"""What a figure was measured on: CPU, bf16 instructions, memory, torch, GPU.

Its own module so that the benches, the experiments and the comparison can all name the
machine without importing one another.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any


def machine() -> dict:
    """What the figures were measured on."""
    from opsd.dtypes import cpu_bf16_instructions

    info: dict[str, Any] = {"python": platform.python_version(), "cpus": os.cpu_count(),
                            "bf16_instructions": cpu_bf16_instructions()}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                info["mem_gib"] = round(int(line.split()[1]) / 2**20, 1)
                break
    except OSError:
        pass
    try:
        import torch

        info["torch"] = torch.__version__
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    return info
