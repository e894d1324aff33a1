"""evejax: encoder-free vision-language models (EVE, HoVLE, De-focus Attention Networks) in JAX/Flax."""

__version__ = "0.1.0"
