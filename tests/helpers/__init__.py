"""Small importable helpers for the tests (a user's scoring functions)."""

# The per-step metric names DESIGN.md promises (TRL's names where TRL has one).
DESIGN_METRICS = {"loss", "grad_norm", "learning_rate", "rewards/chosen", "rewards/rejected", "rewards/margins",
                  "rewards/accuracies", "logps/chosen", "logps/rejected", "length/chosen", "length/rejected",
                  "length/margin_term"}
