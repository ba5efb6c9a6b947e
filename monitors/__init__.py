"""Monitors: score experiment probes on the live model."""
