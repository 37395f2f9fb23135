"""Model names -> model classes, imported lazily so naming a model costs no torch import.

| spec | class |
|---|---|
| ``echo`` | ``engine.models.echo.EchoModel`` |
| ``synthetic:tiny`` / ``synthetic:small`` / ``synthetic:7b`` | ``engine.models.synthetic.SyntheticMoshi`` |
| ``moshi`` | ``engine.models.moshi_torch.MoshiModel`` (real weights) |
| ``moshi-mlx`` | ``engine.models.moshi_mlx.MlxMoshi`` (Apple Silicon) |
| ``auto`` | real weights when found, else ``echo`` with a plain message |
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

from engine.config import Settings
from engine.models.base import VoiceModel

_CLASSES = {
    "echo": ("engine.models.echo", "EchoModel"),
    "synthetic": ("engine.models.synthetic", "SyntheticMoshi"),
    "moshi": ("engine.models.moshi_torch", "MoshiModel"),
    "moshi-mlx": ("engine.models.moshi_mlx", "MlxMoshi"),
}


SYNTHETIC_SIZES = ("tiny", "small", "7b")
"""``synthetic:<size>``; here rather than in the synthetic module so a bad size is caught
when the spec is named, without importing torch."""


class ModelSpecError(ValueError):
    """An unknown model name, with the list of valid ones."""


@dataclass(frozen=True)
class Choice:
    """What ``auto`` (or an explicit name) resolved to, and why, for the CLI and the UI."""

    spec: str
    reason: str


def known() -> list[str]:
    """Every name ``model.name`` accepts, in ``_CLASSES`` order after ``auto``."""
    names = ["auto"]
    for family in _CLASSES:
        names += [f"{family}:{size}" for size in SYNTHETIC_SIZES] if family == "synthetic" else [family]
    return names


def _check_variant(spec: str) -> None:
    """Variants whose valid values are known without loading anything."""
    family, has_variant, variant = spec.partition(":")
    if family == "synthetic" and has_variant and variant not in SYNTHETIC_SIZES:
        raise ModelSpecError(
            f"unknown synthetic size {variant!r} in {spec!r}; valid sizes: {', '.join(SYNTHETIC_SIZES)}"
        )
    if family == "echo" and has_variant:
        raise ModelSpecError(f"the echo model has no variants (got {spec!r}); use 'echo'")


def resolve(spec: str, settings: Settings) -> Choice:
    """Turn ``auto`` into a concrete model name without importing torch."""
    if spec != "auto":
        family = spec.split(":", 1)[0]
        if family not in _CLASSES:
            raise ModelSpecError(f"unknown model {spec!r}; choose one of: {', '.join(known())}")
        _check_variant(spec)
        return Choice(spec, "chosen in settings")
    from engine.models import checkpoints  # light: filesystem checks only

    found = checkpoints.find_local(settings)
    if found is not None:
        return Choice(found.spec, f"weights found at {found.location}")
    return Choice("echo", "no MOSHI weights found (run `xswarm models pull`); serving the echo model")


def create(spec: str, settings: Settings, slots: int | None = None) -> VoiceModel:
    """Instantiate (not load) the model named by a concrete spec."""
    family, _, variant = spec.partition(":")
    if family not in _CLASSES:
        raise ModelSpecError(f"unknown model {spec!r}; choose one of: {', '.join(known())}")
    module_name, class_name = _CLASSES[family]
    cls = getattr(importlib.import_module(module_name), class_name)
    return cls.from_settings(settings, variant=variant or None, slots=slots)
