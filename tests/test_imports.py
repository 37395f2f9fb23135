"""Dependency rules, checked in fresh interpreters (docs/architecture.md, "Import rules"):

- ``engine`` and ``webhooks`` never import ``textual`` or ``xswarm_tui``, nor torch/moshi/mlx
  (those live behind ``engine/models``, imported lazily);
- ``webhooks`` never imports ``engine.models``;
- ``engine.models.registry`` and ``engine.models.base`` load no weights code;
- ``xswarm --help`` (and every sub-command's) imports none of torch, moshi, mlx, textual.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

_IMPORT_ALL = textwrap.dedent(
    """
    import importlib, json, pkgutil, sys, traceback
    package, skip = sys.argv[1], tuple(sys.argv[2:])
    failed = {}
    names = [package]
    root = importlib.import_module(package)
    for info in pkgutil.walk_packages(root.__path__, package + "."):
        if not (skip and info.name.startswith(skip)):
            names.append(info.name)
    for name in names:
        try:
            importlib.import_module(name)
        except Exception:
            failed[name] = traceback.format_exc(limit=3)
    print(json.dumps({"imported": names, "failed": failed, "modules": sorted(sys.modules)}))
    """
)


def _import_everything(package: str, *skip: str) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", _IMPORT_ALL, package, *skip], capture_output=True, text=True, cwd=ROOT, timeout=120
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def _offenders(modules: list[str], banned: tuple[str, ...]) -> list[str]:
    return sorted(m for m in modules if any(m == b or m.startswith(b + ".") for b in banned))


@pytest.mark.parametrize(
    ("package", "skip", "banned"),
    [
        ("engine", ("engine.models",), ("textual", "xswarm_tui", "torch", "moshi", "mlx")),
        ("webhooks", (), ("textual", "xswarm_tui", "torch", "moshi", "mlx", "engine.models")),
    ],
)
def test_packages_stay_light(package: str, skip: tuple[str, ...], banned: tuple[str, ...]) -> None:
    result = _import_everything(package, *skip)
    assert not result["failed"], "\n".join(f"{k}:\n{v}" for k, v in result["failed"].items())
    if package == "engine":
        assert "engine.store.db" in result["imported"] and "engine.doctor" in result["imported"]
    assert _offenders(result["modules"], banned) == []


def test_engine_models_registry_is_light() -> None:
    """The registry and the slot interface are imported by the runtime; weights code is not."""
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            "import json, sys, engine.models.registry, engine.models.base; print(json.dumps(sorted(sys.modules)))",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert _offenders(json.loads(result.stdout), ("textual", "xswarm_tui", "torch", "moshi", "mlx")) == []


def test_cli_help_imports_no_heavy_packages() -> None:
    script = textwrap.dedent(
        """
        import json, sys
        from xswarm_tui.cli import app, main
        names = sorted(c.name or c.callback.__name__ for c in app.registered_commands)
        helps = [["--help"]] + [[name, "--help"] for name in names]
        helps += [[g.name, "--help"] for g in app.registered_groups]
        for argv in helps:
            sys.argv = ["xswarm", *argv]
            try:
                main()
            except SystemExit as exc:
                assert exc.code in (0, None), (argv, exc.code)
        print(json.dumps(sorted(sys.modules)))
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    modules = json.loads(out.stdout.strip().splitlines()[-1])
    assert _offenders(modules, ("torch", "moshi", "textual", "mlx")) == []
