"""Composer's side: the callback, and its construction from an llm-foundry YAML."""
