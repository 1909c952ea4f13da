"""vtensor: an LLM serving engine whose KV memory is built on virtual tensors."""

__version__ = "0.1.0"
