"""Widgets grouped by domain: calls, telemetry, events feed."""
