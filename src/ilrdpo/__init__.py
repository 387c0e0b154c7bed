"""ilrdpo: Iterative Length-Regularized DPO for causal language models.

    import ilrdpo
    ilrdpo.train_pairs(config, pairs=...)          # one round of LR-DPO on preference pairs
    ilrdpo.run(config, prompts=..., scorer=...)   # the iterative loop
    ilrdpo.evaluate_model(model, prompts, baseline=...)  # win rate and LC win rate

See ilrdpo.api; the loss itself is ilrdpo.loss.preference_loss.
"""

__version__ = "0.1.0"

__all__ = ["evaluate_model", "make_config", "run", "train_pairs"]
_API = set(__all__)


def __getattr__(name: str):
    # Lazy: `import ilrdpo` (and so the CLI's start-up) does not pay for torch until it is used.
    if name in _API:
        from ilrdpo import api

        return getattr(api, name)
    raise AttributeError(f"module 'ilrdpo' has no attribute {name!r}")
