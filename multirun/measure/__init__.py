"""Scoring the live model: probe passes, monitor evaluations, and the statistics of effects."""
