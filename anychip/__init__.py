"""anychip: vendor-neutral, fault-tolerant training for DeepSeek-style reasoning LLMs."""

__version__ = "0.1.0"
