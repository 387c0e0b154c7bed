"""ilrdpo: Iterative Length-Regularized DPO for causal language models."""

__version__ = "0.1.0"
