"""multirun: many controlled pretraining experiments in one Composer streaming run."""

__version__ = "0.1.0"
