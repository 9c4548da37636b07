"""The harness: a benchmark harness for adapter (parameter-efficient fine-tuning) methods."""

__version__ = "0.1.0"
