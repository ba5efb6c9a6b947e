"""Putting a step's spans into the batch: row mapping, token overwrite, embedding noise."""
