"""``xswarm doctor``: this machine against xswarm's needs, and how many calls it can carry.

``run(settings, probes)`` returns a ``Report``; probes (``engine.doctor.probes``) gather the
facts and can be replaced in tests, checks (``engine.doctor.checks``) judge them, and
``engine.doctor.capacity`` turns memory into a call count.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from engine.config import Settings
from engine.doctor import capacity
from engine.doctor.checks import CHECKS, Check
from engine.doctor.probes import Probes

__all__ = ["Check", "Probes", "Report", "run"]


@dataclass(frozen=True)
class Report:
    checks: list[Check]
    capacity: dict[str, Any]

    @property
    def exit_code(self) -> int:
        """0 when every check passes (or is skipped), 1 with warnings, 2 with failures."""
        statuses = {c.status for c in self.checks}
        return 2 if "fail" in statuses else 1 if "warn" in statuses else 0

    def as_dict(self) -> dict[str, Any]:
        return {"checks": [asdict(c) for c in self.checks], "capacity": self.capacity}


def run(settings: Settings, probes: Probes | None = None, *, network: bool = False) -> Report:
    """``network``: also reach every configured provider (``engine.doctor.network``)."""
    probes = probes or Probes()
    checks: list[Check] = []
    for check in CHECKS:
        try:
            result = check(probes, settings)
            checks.extend([result] if isinstance(result, Check) else list(result))
        except Exception as exc:  # a broken probe is a finding, not a crash
            name = check.__name__.removeprefix("check_").replace("_", "-")
            checks.append(Check(name, "fail", f"check crashed: {type(exc).__name__}: {exc}", "report this as a bug"))
    if network:
        from engine.doctor.network import check_network

        checks.extend(check_network(settings))
    gpus = probes.gpus().gpus
    device = settings.model.device
    index = int(device.split(":", 1)[1]) if device.startswith("cuda:") and device[5:].isdigit() else 0
    chosen = next((g for g in gpus if g.index == index), gpus[0] if gpus else None)
    estimate = capacity.estimate(
        vram_free=chosen.memory_free if chosen else None,
        ram_available=probes.memory().available,
        context_steps=settings.model.context,
        weights=settings.model.weights,
        kv_cache=settings.model.kv_cache,
    )
    estimate["gpu"] = f"{chosen.index}: {chosen.name}" if chosen else None
    return Report(checks, estimate)
