"""PyTorch reference modules with official parameter names, used to prove JAX <-> PyTorch parity."""
