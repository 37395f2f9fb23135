"""What every benchmark script prints: the machine it ran on, and the one JSON report.

Figures from a shared or busy box mean little without the box, so each report carries the
same machine block (with the 1-minute load average at the end of the run). Standard library
only: ``benchmarks/engine.py`` must run on a bare GPU machine.
"""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path
from typing import Any


def machine() -> dict[str, Any]:
    """CPU count, Python, platform and the 1-minute load average, as the reports store them."""
    return {
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "load_avg_1m": round(os.getloadavg()[0], 2),
    }


def emit(report: dict[str, Any], out: Path | None = None, *, indent: int | None = None) -> None:
    """Print the report as one JSON document on stdout; with ``out``, write the same text there."""
    text = json.dumps(report, indent=indent)
    print(text)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text + "\n")
