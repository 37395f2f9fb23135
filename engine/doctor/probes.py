"""Facts about this machine, one small function each, so tests can replace any of them.

Probes only measure; ``checks`` decides what the facts mean. Each probe answers quickly and
never raises for a missing feature: it reports the absence (None, False, a reason string).
"""

from __future__ import annotations

import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from engine.config import Settings, secret
from engine.paths import resolve_paths
from engine.telemetry import gpu


@dataclass(frozen=True)
class OsInfo:
    system: str
    """``Linux``, ``Darwin``, ``Windows``."""
    release: str
    description: str
    machine: str


@dataclass(frozen=True)
class CpuInfo:
    cores: int | None
    threads: int
    model: str
    avx2: bool | None
    """None where the question does not apply (ARM)."""
    apple_silicon: bool


@dataclass(frozen=True)
class MemoryInfo:
    total: int
    available: int


def os_info() -> OsInfo:
    system = platform.system()
    if system == "Linux":
        try:
            release = platform.freedesktop_os_release().get("PRETTY_NAME", "Linux")
        except OSError:
            release = "Linux"
        description = f"{release}, kernel {platform.release()}"
    elif system == "Darwin":
        description = f"macOS {platform.mac_ver()[0]}"
    else:
        description = f"{system} {platform.release()}"
    return OsInfo(system, platform.release(), description, platform.machine())


def _cpu_flags_and_model() -> tuple[set[str], str]:
    flags: set[str] = set()
    model = platform.processor() or platform.machine()
    if platform.system() == "Linux":
        try:
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "flags" and not flags:
                    flags = set(value.split())
                elif key == "model name":
                    model = value.strip()
        except OSError:
            pass
    elif platform.system() == "Darwin":
        for name in ("machdep.cpu.brand_string", "machdep.cpu.leaf7_features"):
            try:
                out = subprocess.run(["sysctl", "-n", name], capture_output=True, text=True, timeout=2).stdout.strip()
            except (OSError, subprocess.SubprocessError):
                continue
            if name.endswith("brand_string") and out:
                model = out
            else:
                flags |= {f.lower() for f in out.split()}
    return flags, model


def cpu_info() -> CpuInfo:
    import psutil

    flags, model = _cpu_flags_and_model()
    machine = platform.machine().lower()
    apple_silicon = platform.system() == "Darwin" and machine in ("arm64", "aarch64")
    x86 = machine in ("x86_64", "amd64", "i386", "i686")
    return CpuInfo(
        cores=psutil.cpu_count(logical=False),
        threads=os.cpu_count() or 1,
        model=model,
        avx2=("avx2" in flags) if x86 else None,
        apple_silicon=apple_silicon,
    )


def memory_info() -> MemoryInfo:
    import psutil

    vm = psutil.virtual_memory()
    return MemoryInfo(int(vm.total), int(vm.available))


def disk_free(path: Path) -> int:
    """Free bytes on the file system that holds ``path`` (its nearest existing parent)."""
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    return int(shutil.disk_usage(probe).free)


def gpus() -> gpu.GpuProbe:
    return gpu.probe()


def metal() -> bool:
    """Apple Metal (MPS) is there: Apple Silicon on macOS. Checked without importing torch."""
    return platform.system() == "Darwin" and platform.machine().lower() in ("arm64", "aarch64")


def portaudio() -> str | None:
    """None when PortAudio loads, else why not. ``sounddevice`` raises OSError on import when
    the C library is missing, so it is imported in a child to keep that out of this process."""
    code = "import sounddevice as s; print(s.get_portaudio_version()[1])"
    try:
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError) as exc:
        return f"cannot check: {exc}"
    if out.returncode == 0:
        return None
    lines = [line for line in out.stderr.strip().splitlines() if line.strip()]
    return lines[-1] if lines else "sounddevice failed to load"


def port_free(host: str, port: int) -> bool:
    """Whether a server could bind ``host:port`` now.

    With ``SO_REUSEADDR``, as asyncio's servers bind: a port that a stopped xswarm left in
    TIME_WAIT is free for them, so it is reported free here too (not "in use" for a minute)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        if os.name != "nt":  # on Windows SO_REUSEADDR would let two servers share the port
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def python_version() -> tuple[int, int, int]:
    return sys.version_info[:3]


def database_rtt(settings: Settings) -> tuple[str, float]:
    """(where, seconds for ``SELECT 1``); raises ``StoreError`` when unreachable."""
    from engine.store.db import Database

    with Database.from_settings(settings) as db:
        return db.target.describe(), db.ping()


def storage(settings: Settings) -> str:
    """Where objects go, after proving it answers; raises with the reason otherwise.

    Local: a file can be created in the storage folder. S3/R2: ``head_bucket`` with short
    timeouts and no retries, so a dead endpoint costs seconds, not minutes."""
    s3 = settings.s3
    if not s3.bucket:
        folder = resolve_paths().storage
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".doctor-"):
            pass
        return f"local folder {folder}"
    import boto3
    from botocore.config import Config

    client = boto3.client(
        "s3",
        endpoint_url=s3.endpoint_url,
        region_name=None if s3.region == "auto" and not s3.endpoint_url else s3.region,
        aws_access_key_id=secret(s3.access_key_id),
        aws_secret_access_key=secret(s3.secret_access_key),
        config=Config(connect_timeout=3, read_timeout=5, retries={"max_attempts": 1}),
    )
    client.head_bucket(Bucket=s3.bucket)
    return f"bucket {s3.bucket}" + (f" at {s3.endpoint_url}" if s3.endpoint_url else "")


def model_weights(settings: Settings) -> str | None:
    """Which MOSHI weights ``auto`` would load and where, or None. Asks the model code's own
    finder (``engine.models.checkpoints``, no torch import), so doctor and runtime agree."""
    from engine.models import checkpoints

    found = checkpoints.find_local(settings)
    if found is None:
        return None
    return f"{found.spec} weights at {found.location}" + (f" ({found.repo})" if found.repo else "")


@dataclass
class Probes:
    """The probes the doctor runs; tests pass their own functions for any of them."""

    os: Callable[[], OsInfo] = os_info
    cpu: Callable[[], CpuInfo] = cpu_info
    memory: Callable[[], MemoryInfo] = memory_info
    disk_free: Callable[[Path], int] = disk_free
    gpus: Callable[[], gpu.GpuProbe] = gpus
    metal: Callable[[], bool] = metal
    portaudio: Callable[[], str | None] = portaudio
    port_free: Callable[[str, int], bool] = port_free
    python: Callable[[], tuple[int, int, int]] = python_version
    database: Callable[[Settings], tuple[str, float]] = database_rtt
    storage: Callable[[Settings], str] = storage
    weights: Callable[[Settings], str | None] = model_weights
