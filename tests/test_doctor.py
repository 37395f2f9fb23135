"""The doctor's judgement and capacity arithmetic on faked facts, and its real probes where cheap."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from engine.config import load_settings
from engine.doctor import Probes, capacity, run
from engine.doctor import probes as real
from engine.doctor.probes import CpuInfo, MemoryInfo, OsInfo
from engine.telemetry.gpu import GpuInfo, GpuProbe

GIB = 1024**3
H100 = GpuInfo(0, "NVIDIA H100 80GB HBM3", 81559 * 1024**2, 500 * 1024**2, "570.86.15", 3.0, 31.0, 70.5, "12.8", (9, 0))


def healthy(**overrides: object) -> Probes:
    """A well-equipped Linux GPU box with every probe answering."""
    fields: dict[str, object] = dict(
        os=lambda: OsInfo("Linux", "6.8", "Ubuntu 24.04, kernel 6.8", "x86_64"),
        cpu=lambda: CpuInfo(16, 32, "AMD EPYC 9354", True, False),
        memory=lambda: MemoryInfo(128 * GIB, 120 * GIB),
        disk_free=lambda path: 500 * GIB,
        gpus=lambda: GpuProbe([H100]),
        metal=lambda: False,
        portaudio=lambda: None,
        port_free=lambda host, port: True,
        python=lambda: (3, 12, 4),
        database=lambda settings: ("/data/xswarm.db", 0.0004),
        storage=lambda settings: "local folder /data/storage",
        weights=lambda settings: "moshi weights at /models/moshiko",
    )
    fields.update(overrides)
    return Probes(**fields)  # type: ignore[arg-type]


@pytest.fixture
def all_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in {
        "TWILIO_ACCOUNT_SID": "AC123",
        "TWILIO_AUTH_TOKEN": "tw-secret",
        "STRIPE_API_KEY": "sk_secret",
        "STRIPE_WEBHOOK_SECRET": "whsec_secret",
        "SENDGRID_API_KEY": "SG.secret",
        "SENDGRID_WEBHOOK_PUBLIC_KEY": "MFkw",
        "ANTHROPIC_API_KEY": "sk-ant-secret",
        "XSWARM_S3_BUCKET": "b",
        "XSWARM_S3_ACCESS_KEY_ID": "AKIA",
        "XSWARM_S3_SECRET_ACCESS_KEY": "s3-secret",
        "TWILIO_FROM_NUMBER": "+14155550199",
        "SENDGRID_FROM_EMAIL": "assistant@example.com",
        "XSWARM_PUBLIC_URL": "https://hooks.example.com",
        "XSWARM_NOTIFY__LINK_SECRET": "link-secret",
        "XSWARM_NOTIFY__OPERATOR_EMAIL": "ops@example.com",
    }.items():
        monkeypatch.setenv(name, value)


def statuses(report) -> dict[str, str]:  # type: ignore[no-untyped-def]
    return {c.name: c.status for c in report.checks}


def test_a_healthy_box_passes_everything_and_never_shows_secrets(all_credentials: None) -> None:
    report = run(load_settings(), healthy())
    assert set(statuses(report).values()) == {"pass"}, [c for c in report.checks if c.status != "pass"]
    assert report.exit_code == 0
    text = json.dumps(report.as_dict())
    for value in (
        "tw-secret",
        "sk_secret",
        "whsec_secret",
        "SG.secret",
        "sk-ant-secret",
        "s3-secret",
        "AKIA",
        "link-secret",
    ):
        assert value not in text
    assert "TWILIO_AUTH_TOKEN set" in text or "TWILIO_ACCOUNT_SID, TWILIO_AUTH_TOKEN set" in text


def _expected_calls(free: int, weights: str, kv: str, context: int) -> int:
    """The documented formula, on the figures shipped in the package."""
    row = next(c for c in capacity.measured()["choices"] if (c["weights"], c["kv_cache"]) == (weights, kv))
    outside, _ = capacity.outside_allocator_bytes()
    kv_mib = row["kv_mib_per_call"] * context / row["context"]
    per_call = int((kv_mib + row["per_call_mib"] - row["kv_mib_per_call"]) * 1024**2)
    spare = free - outside - int(row["weights_gib"] * GIB) - int(row["fixed_mib"] * 1024**2)
    return spare // per_call


def test_capacity_uses_the_measured_figures(monkeypatch: pytest.MonkeyPatch) -> None:
    free = H100.memory_total - H100.memory_used
    cap = run(load_settings(), healthy()).capacity
    assert cap["weights"] == "bf16" and cap["kv_cache"] == "bf16" and cap["limited_by"] == "GPU memory"
    # The H100 80GB run held 32 calls and ran out of memory at 64.
    assert cap["calls"] == _expected_calls(free, "bf16", "bf16", 3000) and 32 <= cap["calls"] < 64
    assert cap["gpu"] == "0: NVIDIA H100 80GB HBM3"
    assert len(cap["choices"]) == 9 and cap["sources"]
    bf16 = next(c for c in cap["choices"] if c["weights"] == "bf16" and c["kv_cache"] == "bf16")
    assert bf16["measured"] and bf16["step_ms_p99"] is not None and bf16["roofline_4090_ms"] > 0
    monkeypatch.setenv("XSWARM_MODEL__CONTEXT", "750")
    short = run(load_settings(), healthy()).capacity
    assert short["calls"] == _expected_calls(free, "bf16", "bf16", 750) > 3 * cap["calls"]
    assert short["context_s"] == 60.0
    monkeypatch.delenv("XSWARM_MODEL__CONTEXT")
    small = GpuInfo(0, "RTX 4090", 24 * GIB, 0, "550", None, None, None)
    cap = run(load_settings(), healthy(gpus=lambda: GpuProbe([small]))).capacity
    # 14.7 GiB of bf16 weights and ~1.5 GiB per call at context 3000 leave room for a handful.
    assert cap["calls"] == _expected_calls(24 * GIB, "bf16", "bf16", 3000) and 3 <= cap["calls"] <= 6


def test_a_choice_without_a_gpu_run_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    measured = {(c["weights"], c["kv_cache"]) for c in capacity.measured()["choices"]}
    missing = [(w, k) for w in capacity.WEIGHT_KINDS for k in capacity.KV_KINDS if (w, k) not in measured]
    if not missing:
        pytest.skip("every choice has GPU figures")
    weights, kv = missing[0]
    monkeypatch.setenv("XSWARM_MODEL__WEIGHTS", weights)
    monkeypatch.setenv("XSWARM_MODEL__KV_CACHE", kv)
    cap = run(load_settings(), healthy()).capacity
    assert cap["calls"] is None and "not been measured" in cap["limited_by"]


def test_without_a_gpu_nothing_runs_in_real_time() -> None:
    report = run(load_settings(), healthy(gpus=lambda: GpuProbe([], "NVML unavailable: no driver")))
    gpu = next(c for c in report.checks if c.name == "gpu")
    assert gpu.status == "warn" and "no driver" in gpu.detail and gpu.fix
    assert report.capacity["calls"] == 0 and report.capacity["choices"] == []
    assert "no CUDA GPU" in report.capacity["limited_by"]
    assert report.exit_code == 1


def test_asking_for_cuda_without_a_gpu_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XSWARM_MODEL__DEVICE", "cuda")
    report = run(load_settings(), healthy(gpus=lambda: GpuProbe([], "no driver")))
    assert statuses(report)["gpu"] == "fail" and report.exit_code == 2


def test_apple_silicon_passes_through_metal() -> None:
    report = run(
        load_settings(),
        healthy(
            gpus=lambda: GpuProbe([], "no NVML on macOS"),
            metal=lambda: True,
            cpu=lambda: CpuInfo(10, 10, "Apple M2 Pro", None, True),
        ),
    )
    assert statuses(report)["gpu"] == "pass" and statuses(report)["cpu-features"] == "pass"


@pytest.mark.parametrize(
    ("probes", "name", "status", "words"),
    [
        (dict(port_free=lambda host, port: port != 9999), "port-supervisor", "fail", "9999 is in use"),
        (dict(python=lambda: (3, 10, 12)), "python", "fail", "3.10.12"),
        (dict(memory=lambda: MemoryInfo(2 * GIB, GIB)), "ram", "fail", "2.0 GiB total"),
        (dict(memory=lambda: MemoryInfo(12 * GIB, 10 * GIB)), "ram", "warn", "12.0 GiB"),
        (dict(disk_free=lambda path: GIB), "disk", "fail", "1.0 GiB free"),
        (dict(disk_free=lambda path: 10 * GIB), "disk", "warn", "10.0 GiB free"),
        (dict(cpu=lambda: CpuInfo(2, 2, "tiny", True, False)), "cpu", "warn", "2 threads"),
        (dict(cpu=lambda: CpuInfo(8, 8, "old", False, False)), "cpu-features", "warn", "no AVX2"),
        (dict(portaudio=lambda: "OSError: PortAudio library not found"), "portaudio", "warn", "library not found"),
        (
            dict(portaudio=lambda: "ModuleNotFoundError: No module named 'sounddevice'"),
            "portaudio",
            "warn",
            "sounddevice",
        ),
        (dict(weights=lambda settings: None), "model-weights", "warn", "no MOSHI moshiko"),
        (dict(database=lambda settings: ("http://db", 0.25)), "database", "warn", "250.0 ms"),
        (dict(os=lambda: OsInfo("Windows", "11", "Windows 11", "AMD64")), "os", "warn", "Windows 11"),
    ],
)
def test_each_finding_has_a_status_and_a_fix(probes: dict, name: str, status: str, words: str) -> None:
    report = run(load_settings(), healthy(**probes))
    check = next(c for c in report.checks if c.name == name)
    assert (check.status, words in check.detail, bool(check.fix)) == (status, True, True), check
    if "No module named" in check.detail:
        assert "xswarm[audio]" in check.fix
    assert report.exit_code == (2 if status == "fail" else 1)


def test_a_crashing_probe_is_a_failed_check_not_a_crash() -> None:
    def boom(settings: object) -> str:
        raise PermissionError("denied")

    def broken() -> OsInfo:
        raise RuntimeError("no os")

    report = run(load_settings(), healthy(storage=boom, os=broken))
    assert (
        statuses(report)["storage"] == "fail"
        and "PermissionError: denied" in next(c for c in report.checks if c.name == "storage").detail
    )
    assert statuses(report)["os"] == "fail"


def test_credentials_report_presence_only(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TWILIO_ACCOUNT_SID", "AC-visible-sid")
    monkeypatch.setenv("OPENAI_API_KEY", "sk-openai-secret")
    checks = {c.name: c for c in run(load_settings(), healthy()).checks}
    assert (
        checks["credentials-twilio"].status == "warn"
        and "TWILIO_AUTH_TOKEN missing" in checks["credentials-twilio"].detail
    )
    assert checks["credentials-llm"].status == "pass" and "OPENAI_API_KEY set" in checks["credentials-llm"].detail
    assert checks["credentials-stripe"].status == "warn" and "STRIPE_API_KEY" in checks["credentials-stripe"].fix
    assert checks["credentials-turso"].status == "pass"
    assert "AC-visible-sid" not in str(checks) and "sk-openai-secret" not in str(checks)


def test_notify_names_what_notifications_lack(monkeypatch: pytest.MonkeyPatch) -> None:
    assert {c.name: c for c in run(load_settings(), healthy()).checks}["notify"].status == "pass"  # nothing set up
    for name, value in {"TWILIO_ACCOUNT_SID": "AC1", "TWILIO_AUTH_TOKEN": "t", "SENDGRID_API_KEY": "SG.k"}.items():
        monkeypatch.setenv(name, value)
    check = {c.name: c for c in run(load_settings(), healthy()).checks}["notify"]
    assert check.status == "warn" and "TWILIO_FROM_NUMBER" in check.fix and "SENDGRID_FROM_EMAIL" in check.fix
    monkeypatch.setenv("SENDGRID_FROM_EMAIL", "a@example.com")
    check = {c.name: c for c in run(load_settings(), healthy()).checks}["notify"]
    assert "no one-click unsubscribe" in check.detail and "XSWARM_NOTIFY__OPERATOR_EMAIL" in check.fix


def test_real_probes_database_storage_and_ports(tmp_path: Path) -> None:
    settings = load_settings()
    where, rtt = real.database_rtt(settings)
    assert where.endswith("xswarm.db") and 0 < rtt < 1
    assert real.storage(settings).startswith("local folder")
    import socket

    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        assert real.port_free("127.0.0.1", held.getsockname()[1]) is False
    assert real.disk_free(tmp_path / "not" / "yet") > 0
    assert real.cpu_info().threads >= 1 and real.memory_info().total > 0
    assert isinstance(real.portaudio(), (str, type(None)))


def test_real_database_probe_fails_clearly_when_unreachable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TURSO_DATABASE_URL", "http://127.0.0.1:1")
    report = run(load_settings(), healthy(database=real.database_rtt))
    check = next(c for c in report.checks if c.name == "database")
    assert check.status == "fail" and "cannot open http://127.0.0.1:1" in check.detail


def test_real_s3_probe_against_a_local_s3_server(monkeypatch: pytest.MonkeyPatch) -> None:
    import boto3
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        for name, value in {
            "XSWARM_S3_ENDPOINT_URL": endpoint,
            "XSWARM_S3_BUCKET": "backups",
            "XSWARM_S3_ACCESS_KEY_ID": "test",
            "XSWARM_S3_SECRET_ACCESS_KEY": "test",
            "XSWARM_S3_REGION": "us-east-1",
        }.items():
            monkeypatch.setenv(name, value)
        with pytest.raises(Exception, match="404|Not Found"):
            real.storage(load_settings())
        boto3.client(
            "s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="test", aws_secret_access_key="test"
        ).create_bucket(Bucket="backups")
        assert real.storage(load_settings()) == f"bucket backups at {endpoint}"
    finally:
        server.stop()


def test_weights_probe_uses_the_model_codes_finder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from engine.models import checkpoints

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hub"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty-home"))
    assert real.model_weights(load_settings()) is None
    found = checkpoints.Found("moshi", tmp_path / "snap", "kyutai/moshiko-pytorch-bf16")
    monkeypatch.setattr(checkpoints, "find_local", lambda settings: found)
    described = real.model_weights(load_settings())
    assert described == f"moshi weights at {tmp_path / 'snap'} (kyutai/moshiko-pytorch-bf16)"
    check = next(
        c for c in run(load_settings(), healthy(weights=real.model_weights)).checks if c.name == "model-weights"
    )
    assert (check.status, check.detail) == ("pass", described)


def test_gpu_driver_and_cuda_minimums(all_credentials: None) -> None:
    """Driver 535+ and CUDA 12+ (system requirements): an older one fails with the fix."""
    old_driver = dataclasses.replace(H100, driver="525.147.05", cuda_version="12.0")
    report = run(load_settings(), healthy(gpus=lambda: GpuProbe([old_driver])))
    check = next(c for c in report.checks if c.name == "gpu-driver")
    assert check.status == "fail" and "driver 525.147.05 is older than 535" in check.detail and "535" in check.fix
    old_cuda = dataclasses.replace(H100, driver="535.54.03", cuda_version="11.8")
    check = next(
        c for c in run(load_settings(), healthy(gpus=lambda: GpuProbe([old_cuda]))).checks if c.name == "gpu-driver"
    )
    assert check.status == "fail" and "CUDA 11.8 is older than 12.0" in check.detail
    ok = next(c for c in run(load_settings(), healthy()).checks if c.name == "gpu-driver")
    assert ok.status == "pass" and ok.detail.startswith("driver 570.86.15, CUDA 12.8")


def test_compute_capability_and_bf16(all_credentials: None, monkeypatch: pytest.MonkeyPatch) -> None:
    t4 = dataclasses.replace(H100, index=1, name="Tesla T4", compute_capability=(7, 5))
    report = run(load_settings(), healthy(gpus=lambda: GpuProbe([H100, t4])))
    checks = {c.name: c for c in report.checks}
    assert checks["gpu-0-compute"].status == "pass" and "9.0, bf16 supported" in checks["gpu-0-compute"].detail
    assert checks["gpu-1-compute"].status == "fail" and "7.5, no bf16" in checks["gpu-1-compute"].detail
    assert report.exit_code == 2
    monkeypatch.setenv("XSWARM_MODEL", "echo")  # a box kept for the echo model only: a warning
    assert (
        next(
            c for c in run(load_settings(), healthy(gpus=lambda: GpuProbe([t4]))).checks if c.name == "gpu-1-compute"
        ).status
        == "warn"
    )


def test_no_gpu_means_no_driver_or_compute_rows() -> None:
    names = {c.name for c in run(load_settings(), healthy(gpus=lambda: GpuProbe([], "no NVIDIA driver"))).checks}
    assert "gpu" in names and not any(n.startswith(("gpu-driver", "gpu-0")) for n in names)


def test_the_real_gpu_probe_reports_capability_when_a_gpu_is_there() -> None:
    found = real.gpus()
    if not found.gpus:
        pytest.skip(f"no NVIDIA GPU here ({found.reason})")
    assert all(g.compute_capability is not None and g.compute_capability >= (3, 0) for g in found.gpus)
