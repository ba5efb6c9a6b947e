"""The ``example-slogans`` payload package (``payload.yaml`` and ``items.jsonl`` next to this file)."""
