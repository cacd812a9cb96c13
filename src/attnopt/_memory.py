"""How much memory a device has free: a bound for allocations a user asked for but could not get."""

from __future__ import annotations

import os

import torch


def available_memory(device: torch.device) -> int:
    """Bytes free on the device: CUDA's free memory, or the kernel's MemAvailable on the host."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES"))
