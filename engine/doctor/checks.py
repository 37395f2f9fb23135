"""What the facts mean: each check is pass, warn or fail, with a one-line fix.

Thresholds are xswarm's needs: the runtime, the database and the servers run anywhere with
Python 3.11+; real-time MOSHI needs a CUDA GPU (or Apple Silicon through MLX) and enough
memory for its 7B weights; local audio calls need PortAudio.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Literal

from engine.config import Settings
from engine.doctor.capacity import WEIGHTS_BYTES
from engine.doctor.probes import Probes
from engine.paths import resolve_paths

Status = Literal["pass", "warn", "fail", "skip"]
GIB = 1024**3
MIN_DRIVER = 535
"""NVIDIA driver branch the system requirements ask for (CUDA 12 wheels need 525+; 535 is the
long-term branch they were tested on)."""
MIN_CUDA = (12, 0)
BF16_CAPABILITY = (8, 0)
"""Ampere and newer have bf16 tensor cores; older cards emulate it far slower than real time."""


@dataclass(frozen=True)
class Check:
    name: str
    status: Status
    detail: str
    fix: str = ""


def _gib(n: int | float) -> str:
    return f"{n / GIB:.1f} GiB"


def check_os(p: Probes, s: Settings) -> Check:
    info = p.os()
    if info.system in ("Linux", "Darwin"):
        return Check("os", "pass", f"{info.description} ({info.machine})")
    return Check(
        "os",
        "warn",
        f"{info.description} ({info.machine}) is untested",
        "run xswarm on Linux or macOS (WSL2 on Windows)",
    )


def check_cpu(p: Probes, s: Settings) -> Check:
    cpu = p.cpu()
    detail = f"{cpu.model}: {cpu.cores or '?'} cores, {cpu.threads} threads"
    if cpu.threads < 4:
        return Check("cpu", "warn", detail, "use 4+ threads: audio resampling, servers and the database share them")
    return Check("cpu", "pass", detail)


def check_cpu_features(p: Probes, s: Settings) -> Check:
    cpu = p.cpu()
    if cpu.apple_silicon:
        return Check("cpu-features", "pass", "Apple Silicon")
    if cpu.avx2:
        return Check("cpu-features", "pass", "AVX2")
    if cpu.avx2 is None:
        return Check(
            "cpu-features",
            "warn",
            "not x86 and not Apple Silicon: CPU kernels untested",
            "use an x86-64 CPU with AVX2 or Apple Silicon",
        )
    return Check(
        "cpu-features",
        "warn",
        "no AVX2: CPU audio and model code run much slower",
        "use a CPU with AVX2 (Intel Haswell / AMD Zen or newer)",
    )


def check_ram(p: Probes, s: Settings) -> Check:
    mem = p.memory()
    detail = f"{_gib(mem.total)} total, {_gib(mem.available)} available"
    if mem.total < 4 * GIB:
        return Check("ram", "fail", detail, "xswarm needs at least 4 GiB of RAM")
    if mem.total < WEIGHTS_BYTES["bf16"] + 2 * GIB:
        return Check(
            "ram",
            "warn",
            detail,
            f"MOSHI 7B bf16 stages {_gib(WEIGHTS_BYTES['bf16'])} of weights in RAM: use 16+ GiB, or int8",
        )
    return Check("ram", "pass", detail)


def check_disk(p: Probes, s: Settings) -> Check:
    data = resolve_paths().data
    free = p.disk_free(data)
    detail = f"{_gib(free)} free at {data}"
    if free < 2 * GIB:
        return Check("disk", "fail", detail, "free disk space: the database, logs and backups need room")
    if free < 20 * GIB:
        return Check("disk", "warn", detail, "keep 20+ GiB free: MOSHI weights are ~16 GB, plus backups and recordings")
    return Check("disk", "pass", detail)


def check_gpu(p: Probes, s: Settings) -> Check:
    found = p.gpus()
    if found.gpus:
        parts = [
            f"{g.index}: {g.name}, {_gib(g.memory_total)} ({_gib(g.memory_free)} free), driver {g.driver}"
            + (f", CUDA {g.cuda_version}" if g.cuda_version else "")
            for g in found.gpus
        ]
        return Check("gpu", "pass", "; ".join(parts))
    if p.metal():
        return Check("gpu", "pass", "Apple Metal (Apple Silicon GPU, unified memory): use model moshi-mlx")
    wants_gpu = s.model.device.startswith("cuda")
    return Check(
        "gpu",
        "fail" if wants_gpu else "warn",
        f"no GPU ({found.reason}); MOSHI on CPU is far slower than real time, so `auto` serves the echo model",
        "install the NVIDIA driver on a CUDA GPU box"
        + ("" if wants_gpu else ", or use this box for tests and the echo model"),
    )


def _version(text: str | None) -> tuple[int, ...] | None:
    try:
        return tuple(int(part) for part in (text or "").split(".")[:2])
    except ValueError:
        return None


def check_gpu_driver(p: Probes, s: Settings) -> Iterator[Check]:
    """NVIDIA driver 535+ and CUDA 12+ (the driver's own supported CUDA version)."""
    found = p.gpus().gpus
    if not found:
        return
    driver, cuda = found[0].driver, found[0].cuda_version
    problems = []
    version = _version(driver)
    if version is None or version[0] < MIN_DRIVER:
        problems.append(f"driver {driver} is older than {MIN_DRIVER}")
    cuda_version = _version(cuda)
    if cuda_version is None or cuda_version < MIN_CUDA:
        problems.append(f"CUDA {cuda or 'unknown'} is older than {MIN_CUDA[0]}.{MIN_CUDA[1]}")
    detail = f"driver {driver}, CUDA {cuda or 'unknown'}"
    if problems:
        yield Check(
            "gpu-driver",
            "fail",
            f"{detail}: {'; '.join(problems)}",
            f"install NVIDIA driver {MIN_DRIVER} or newer (CUDA {MIN_CUDA[0]} comes with it), then reboot",
        )
    else:
        yield Check("gpu-driver", "pass", f"{detail} (needs {MIN_DRIVER}+ and CUDA {MIN_CUDA[0]}+)")


def check_gpu_compute(p: Probes, s: Settings) -> Iterator[Check]:
    """Each card's compute capability, and whether it computes in bf16 (what MOSHI runs in)."""
    for g in p.gpus().gpus:
        name = f"gpu-{g.index}-compute"
        if g.compute_capability is None:
            yield Check(name, "warn", f"{g.name}: compute capability unknown", "update the NVIDIA driver")
            continue
        cc = ".".join(map(str, g.compute_capability))
        if g.compute_capability >= BF16_CAPABILITY:
            yield Check(name, "pass", f"{g.name}: compute capability {cc}, bf16 supported")
        else:
            yield Check(
                name,
                "warn" if s.model.name == "echo" else "fail",
                f"{g.name}: compute capability {cc}, no bf16 (needs 8.0, Ampere or newer)",
                "use an Ampere or newer GPU (A10, A100, L4, H100 …): MOSHI computes in bf16, int8 weights too",
            )


def check_portaudio(p: Probes, s: Settings) -> Check:
    problem = p.portaudio()
    if problem is None:
        return Check("portaudio", "pass", "PortAudio loads: local audio calls available")
    fix = (
        "install the audio extra: pip install 'xswarm[audio]' (bash .ci/setup does)"
        if "No module named" in problem
        else "install it: apt install libportaudio2 (Debian/Ubuntu) or brew install portaudio (macOS)"
    )
    return Check(
        "portaudio", "warn", f"PortAudio unavailable ({problem}); phone calls work, local microphone calls do not", fix
    )


def check_ports(p: Probes, s: Settings) -> Iterator[Check]:
    host = s.server.host
    for what, port, key in (
        ("bridge", s.server.bridge_port, "bridge_port"),
        ("supervisor", s.server.supervisor_port, "supervisor_port"),
        ("webhooks", s.server.webhooks_port, "webhooks_port"),
    ):
        name = f"port-{what}"
        if port == 0:
            yield Check(name, "pass", f"{what} server turned off (port 0)")
        elif p.port_free(host, port):
            yield Check(name, "pass", f"{host}:{port} free for the {what} server")
        else:
            yield Check(
                name,
                "fail",
                f"{host}:{port} is in use",
                f"stop what holds it (ss -ltnp | grep {port}) or set server.{key}",
            )


def check_python(p: Probes, s: Settings) -> Check:
    version = p.python()
    text = ".".join(map(str, version))
    if version[:2] < (3, 11):
        return Check("python", "fail", f"Python {text}", "install Python 3.11, 3.12 or 3.13")
    if version[:2] > (3, 13):
        return Check(
            "python", "warn", f"Python {text}: libsql wheels exist for 3.11 to 3.13", "use Python 3.11 to 3.13"
        )
    return Check("python", "pass", f"Python {text}")


def check_database(p: Probes, s: Settings) -> Check:
    try:
        where, rtt = p.database(s)
    except Exception as exc:
        return Check(
            "database",
            "fail",
            f"unreachable: {exc}",
            "check TURSO_DATABASE_URL / TURSO_AUTH_TOKEN, or unset them to use the local file",
        )
    detail = f"{where} answers in {rtt * 1000:.1f} ms"
    if rtt > 0.1:
        return Check(
            "database",
            "warn",
            detail,
            "a database this far away slows every webhook: move it closer or use the local file",
        )
    return Check("database", "pass", detail)


def check_storage(p: Probes, s: Settings) -> Check:
    try:
        return Check("storage", "pass", f"{p.storage(s)} is writable")
    except Exception as exc:
        where = f"bucket {s.s3.bucket}" if s.s3.bucket else "the local storage folder"
        fix = (
            "check XSWARM_S3_ENDPOINT_URL, the bucket name and its keys"
            if s.s3.bucket
            else "make the data folder writable"
        )
        return Check("storage", "fail", f"{where} unreachable: {type(exc).__name__}: {exc}", fix)


_PROVIDERS: list[tuple[str, str, list[tuple[str, str, str]]]] = [
    # (check name, what it enables, [(section, field, environment name)])
    (
        "credentials-twilio",
        "phone calls and SMS",
        [("twilio", "account_sid", "TWILIO_ACCOUNT_SID"), ("twilio", "auth_token", "TWILIO_AUTH_TOKEN")],
    ),
    (
        "credentials-stripe",
        "billing",
        [("stripe", "api_key", "STRIPE_API_KEY"), ("stripe", "webhook_secret", "STRIPE_WEBHOOK_SECRET")],
    ),
    (
        "credentials-sendgrid",
        "email",
        [
            ("sendgrid", "api_key", "SENDGRID_API_KEY"),
            ("sendgrid", "webhook_public_key", "SENDGRID_WEBHOOK_PUBLIC_KEY"),
        ],
    ),
    (
        "credentials-llm",
        "SMS and email replies",
        [("llm", "anthropic_api_key", "ANTHROPIC_API_KEY"), ("llm", "openai_api_key", "OPENAI_API_KEY")],
    ),
    (
        "credentials-s3",
        "off-box backups",
        [
            ("s3", "bucket", "XSWARM_S3_BUCKET"),
            ("s3", "access_key_id", "XSWARM_S3_ACCESS_KEY_ID"),
            ("s3", "secret_access_key", "XSWARM_S3_SECRET_ACCESS_KEY"),
        ],
    ),
    (
        "credentials-turso",
        "a shared remote database",
        [("database", "url", "TURSO_DATABASE_URL"), ("database", "auth_token", "TURSO_AUTH_TOKEN")],
    ),
]


def check_credentials(p: Probes, s: Settings) -> Iterator[Check]:
    """Which provider credentials are set; their values are never read into the report."""
    for name, enables, keys in _PROVIDERS:
        present = {env: getattr(getattr(s, section), field) is not None for section, field, env in keys}
        have = [env for env, ok in present.items() if ok]
        missing = [env for env, ok in present.items() if not ok]
        either = name == "credentials-llm"  # one LLM provider is enough
        if name == "credentials-turso" and not have:
            yield Check(name, "pass", "not set: the embedded database file is used")
        elif not missing or (either and have):
            yield Check(name, "pass", f"{', '.join(have)} set")
        elif not have:
            yield Check(name, "warn", f"not set: {enables} off", f"set {(' or ' if either else ' and ').join(missing)}")
        else:
            yield Check(
                name,
                "warn",
                f"{', '.join(have)} set but {', '.join(missing)} missing: {enables} off",
                f"set {' and '.join(missing)}",
            )


def check_notify(p: Probes, s: Settings) -> Check:
    """What notifications can do with these settings (``engine.notify``); names, never values."""
    gaps: list[tuple[str, str]] = []
    if s.twilio.account_sid and s.twilio.auth_token and not s.twilio.from_number:
        gaps.append(("SMS notifications off: no number to send from", "set TWILIO_FROM_NUMBER"))
    if s.sendgrid.api_key and not s.sendgrid.from_email:
        gaps.append(("email notifications off: no sender address", "set SENDGRID_FROM_EMAIL"))
    email = bool(s.sendgrid.api_key and s.sendgrid.from_email)
    if email and not (s.notify.link_secret and s.server.public_url):
        gaps.append(("emails carry no one-click unsubscribe", "set XSWARM_NOTIFY__LINK_SECRET and XSWARM_PUBLIC_URL"))
    if email and not s.notify.operator_email:
        gaps.append(("voicemails from strangers tell no one", "set XSWARM_NOTIFY__OPERATOR_EMAIL"))
    if gaps:
        return Check("notify", "warn", "; ".join(g for g, _ in gaps), "; ".join(f for _, f in gaps))
    channels = [c for c, on in (("SMS", s.twilio.from_number and s.twilio.auth_token), ("email", email)) if on]
    return Check("notify", "pass", f"notifications by {' and '.join(channels)}" if channels else "no channel set up")


def check_weights(p: Probes, s: Settings) -> Check:
    found = p.weights(s)
    if found is not None:
        return Check("model-weights", "pass", found)
    return Check(
        "model-weights",
        "warn",
        f"no MOSHI {s.model.variant} weights found ({s.model.weights} asked for); `auto` falls back to the echo model",
        "download them: xswarm models pull (or set model.weights_path)",
    )


CHECKS: list[Callable[[Probes, Settings], Check | Iterator[Check]]] = [
    check_os,
    check_cpu,
    check_cpu_features,
    check_ram,
    check_disk,
    check_gpu,
    check_gpu_driver,
    check_gpu_compute,
    check_portaudio,
    check_ports,
    check_python,
    check_database,
    check_storage,
    check_credentials,
    check_notify,
    check_weights,
]
