"""NVIDIA GPUs through NVML (``nvidia-ml-py``): name, memory, driver, load, temperature, power.

NVML is initialised once per process and kept (initialising costs tens of milliseconds; the
TUI samples every second). Without a driver or GPU ``probe()`` returns no GPUs and says why,
so callers can show the reason instead of an error. Figures NVML cannot give for a card
(some report no power or temperature) are None.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import asdict, dataclass
from typing import Any

log = logging.getLogger("xswarm.telemetry")


@dataclass(frozen=True)
class GpuInfo:
    index: int
    name: str
    memory_total: int
    """Bytes."""
    memory_used: int
    """Bytes, by every process on the card."""
    driver: str
    util_percent: float | None
    temp_c: float | None
    power_w: float | None
    cuda_version: str | None = None
    """The newest CUDA version the driver supports (``12.8``)."""
    compute_capability: tuple[int, int] | None = None
    """(major, minor): 8.0 and up (Ampere) compute in bf16."""

    @property
    def memory_free(self) -> int:
        return max(0, self.memory_total - self.memory_used)

    def as_dict(self) -> dict[str, Any]:
        """The form ``SystemSampled.gpus`` carries."""
        return asdict(self)


@dataclass(frozen=True)
class GpuProbe:
    gpus: list[GpuInfo]
    reason: str | None = None
    """Why ``gpus`` is empty (no driver, no device, NVML error); None when GPUs were found."""


_lock = threading.Lock()
_state: dict[str, Any] = {}


def _nvml() -> Any:
    """The initialised ``pynvml`` module; raises RuntimeError with the reason otherwise."""
    with _lock:
        if "error" in _state:
            raise RuntimeError(_state["error"])
        if "module" not in _state:
            try:
                import pynvml

                pynvml.nvmlInit()
            except ImportError:
                _state["error"] = "nvidia-ml-py is not installed"
            except Exception as exc:  # pynvml.NVMLError_*: no library, no driver, no device
                _state["error"] = f"NVML unavailable: {exc}"
            else:
                _state["module"] = pynvml
            if "error" in _state:
                log.info("no NVIDIA GPUs: %s", _state["error"])
                raise RuntimeError(_state["error"])
        return _state["module"]


def _optional(fn: Any, *args: Any) -> Any:
    try:
        return fn(*args)
    except Exception:
        return None


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def probe() -> GpuProbe:
    """Every NVIDIA GPU NVML can see, or none and the reason."""
    try:
        nvml = _nvml()
    except RuntimeError as exc:
        return GpuProbe([], str(exc))
    try:
        count = nvml.nvmlDeviceGetCount()
        driver = _text(nvml.nvmlSystemGetDriverVersion())
    except Exception as exc:
        return GpuProbe([], f"NVML error: {exc}")
    cuda = _optional(nvml.nvmlSystemGetCudaDriverVersion_v2)
    cuda_version = f"{cuda // 1000}.{cuda % 1000 // 10}" if isinstance(cuda, int) else None
    gpus = []
    for index in range(count):
        try:
            handle = nvml.nvmlDeviceGetHandleByIndex(index)
            memory = nvml.nvmlDeviceGetMemoryInfo(handle)
            name = _text(nvml.nvmlDeviceGetName(handle))
        except Exception as exc:
            log.warning("GPU %d unreadable: %s", index, exc)
            continue
        util = _optional(nvml.nvmlDeviceGetUtilizationRates, handle)
        temp = _optional(nvml.nvmlDeviceGetTemperature, handle, nvml.NVML_TEMPERATURE_GPU)
        power_mw = _optional(nvml.nvmlDeviceGetPowerUsage, handle)
        capability = _optional(nvml.nvmlDeviceGetCudaComputeCapability, handle)
        gpus.append(
            GpuInfo(
                index=index,
                name=name,
                memory_total=int(memory.total),
                memory_used=int(memory.used),
                driver=driver,
                util_percent=float(util.gpu) if util is not None else None,
                temp_c=float(temp) if temp is not None else None,
                power_w=power_mw / 1000 if power_mw is not None else None,
                cuda_version=cuda_version,
                compute_capability=(int(capability[0]), int(capability[1])) if capability else None,
            )
        )
    return GpuProbe(gpus, None if gpus else "NVML found no GPUs")
