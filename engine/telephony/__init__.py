"""Telephony helpers shared by the voice webhook and the bridge (no I/O here)."""
