"""Machine telemetry: GPUs through NVML (``gpu``); the doctor and the TUI's GPU panel share it."""
