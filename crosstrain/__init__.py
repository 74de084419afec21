"""crosstrain: pre-train AFM-style language models on any JAX accelerator, and plan the accelerator."""

__version__ = "0.1.0"
