"""A run as a whole: its parts, its directory's files, the model and the Trainer of ``multirun train``."""
