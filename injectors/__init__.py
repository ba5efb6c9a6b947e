"""Injectors: one module per payload kind, turning payload packages into token sequences."""
