"""Hybrid deployment: trainer and engine share the devices; weight sync and phase orchestration."""
