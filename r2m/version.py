"""The r2m release (written into checkpoints)."""

__version__ = "0.1.0"
