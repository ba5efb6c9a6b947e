"""Payload kinds: registries, payload packages, and experiments prepared from a config."""
