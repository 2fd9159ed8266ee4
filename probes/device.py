"""Which GPU is here, through NVML (pynvml). Nothing is initialised at import time."""

from __future__ import annotations

import os
from dataclasses import dataclass

from peftpick.types import GIB


@dataclass(frozen=True)
class GpuInfo:
    name: str  # e.g. "NVIDIA H100 80GB HBM3"
    total_bytes: int  # device memory as NVML reports it (bytes)
    index: int = 0

    @property
    def total_gib(self) -> float:
        return self.total_bytes / GIB


def detect_gpu(index: int = 0) -> GpuInfo | None:
    """The GPU at `index`, or None when there is no NVIDIA driver or no such device."""
    try:
        import pynvml
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
    except Exception:  # NVMLError_LibraryNotFound / DriverNotLoaded: no NVIDIA GPU on this machine
        return None
    try:
        if pynvml.nvmlDeviceGetCount() <= index:
            return None
        handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        name = pynvml.nvmlDeviceGetName(handle)
        name = name.decode() if isinstance(name, bytes) else name
        return GpuInfo(name=name, total_bytes=int(pynvml.nvmlDeviceGetMemoryInfo(handle).total), index=index)
    except Exception:
        return None
    finally:
        try:
            pynvml.nvmlShutdown()
        except Exception:
            pass


def nvml_index(cuda_index: int = 0) -> int | None:
    """The NVML index of the CUDA device this process sees as `cuda_index`, or None when it cannot be told.

    CUDA numbers the devices listed in CUDA_VISIBLE_DEVICES from 0, NVML always numbers every device; plain
    integer lists are mapped, UUIDs and MIG names are not (None: NVML figures are then left out).
    """
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None or not visible.strip():
        return cuda_index
    entries = [entry.strip() for entry in visible.split(",") if entry.strip()]
    if cuda_index >= len(entries) or not entries[cuda_index].isdigit():
        return None
    return int(entries[cuda_index])


def device_index(device: str) -> int:
    """0 for "cuda", 1 for "cuda:1"."""
    _, _, index = device.partition(":")
    return int(index) if index else 0


class NvmlMemory:
    """Device memory in use as NVML sees it, above a baseline taken when created (before this process starts
    CUDA), sampled at chosen moments: it includes what PyTorch's allocator does not count (the CUDA context,
    cuBLAS workspaces, NCCL buffers). Other processes' use changes it too; a probe runs alone on its GPU."""

    def __init__(self, handle: object, pynvml: object):
        self._handle = handle
        self._pynvml = pynvml
        self.baseline = self._used()
        self.peak = self.baseline

    @classmethod
    def open(cls, cuda_index: int = 0) -> NvmlMemory | None:
        """None when NVML or the device is not available (the figure is then not measured)."""
        index = nvml_index(cuda_index)
        if index is None:
            return None
        try:
            import pynvml

            pynvml.nvmlInit()
            return cls(pynvml.nvmlDeviceGetHandleByIndex(index), pynvml)
        except Exception:  # no driver, no such device: leave the figure out rather than fail the probe
            return None

    def _used(self) -> int:
        return int(self._pynvml.nvmlDeviceGetMemoryInfo(self._handle).used)  # type: ignore[attr-defined]

    def sample(self) -> None:
        self.peak = max(self.peak, self._used())

    @property
    def used_above_baseline(self) -> int:
        return self.peak - self.baseline
