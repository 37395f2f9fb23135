"""Screens pushed over the dashboard: call detail, users, logs, help, dialogs."""
