"""Telephony helpers shared by the voice webhook, the bridge and call control."""
