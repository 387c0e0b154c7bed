"""The divergence guard of a training round: it stops the round before a diverged model can be saved."""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable

import torch

from ilrdpo.engines import local_norm
from ilrdpo.errors import TrainingDiverged


class DivergenceGuard:
    """Stops a round before a diverged model can be saved. After optimizer step s:

    - the loss, the gradient norm or any trainable weight is not finite;
    - the loss exceeds LOSS_FACTOR x max(median of the last WINDOW steps' losses, the step's loss at
      the reference (its pairs' loss with a zero log-ratio margin: under IPO a pair whose length
      term raises its target starts high, and a batch of them after easy ones is no divergence), 1), or the
      gradient norm (before clipping) exceeds GRAD_FACTOR x max(their median, the clipping norm:
      saturated pairs give near-zero gradients, and one unsaturated pair must not look like an
      explosion against them); both from step
      MIN_HISTORY + 1 on, so a round's first noisy steps set the history;
    - the trainable weights' norm moved by more than DRIFT x its starting value: fine-tuning
      moves weights by a small fraction of their size, a diverged step by orders of magnitude.

    The factors are loose on purpose: a false alarm costs a whole round, a miss costs a model.
    """

    WINDOW, MIN_HISTORY = 20, 5
    LOSS_FACTOR, GRAD_FACTOR, DRIFT = 20.0, 100.0, 1.0

    def __init__(self, params: list[torch.nn.Parameter], loss_scaling: bool = False, grad_floor: float = 1.0,
                 norm: Callable[[list[torch.nn.Parameter]], float] = local_norm) -> None:
        self.grad_floor = grad_floor
        self.params = params
        self.norm = norm  # the engine's: sharded weights are summed over processes
        self.loss_scaling = loss_scaling  # float16: an overflowing step is skipped by the scaler
        self.start_norm = self._norm()
        self.losses: list[float] = []
        self.grads: list[float] = []

    def _norm(self) -> float:
        return self.norm(self.params)

    @staticmethod
    def stop(step: int, what: str) -> None:
        raise TrainingDiverged(f"training diverged at step {step}: {what}; stopped before saving, "
                               "the last good model is kept (lower train.learning_rate)")

    def check_loss(self, step: int, loss: float) -> None:
        """Before the optimizer step: a non-finite loss never reaches the weights."""
        if not math.isfinite(loss):
            self.stop(step, f"non-finite loss ({loss})")

    def check(self, step: int, loss: float, grad_norm: float, loss_at_reference: float = 0.0) -> None:
        """After the optimizer step."""
        def stop(what: str) -> None:
            self.stop(step, what)

        if not math.isfinite(grad_norm):
            if self.loss_scaling:
                return  # the scaler skipped this step and lowers its scale
            stop(f"non-finite gradient norm ({grad_norm})")
        if len(self.losses) >= self.MIN_HISTORY:
            median = max(statistics.median(self.losses[-self.WINDOW:]), 1.0)
            loss_ref = max(median, loss_at_reference)
            if loss > self.LOSS_FACTOR * loss_ref:
                what = "recent median" if loss_ref == median else "its loss at the reference"
                stop(f"loss {loss:.4g} > {self.LOSS_FACTOR:g} x {loss_ref:.4g} ({what})")
            grad_ref = max(statistics.median(self.grads[-self.WINDOW:]), self.grad_floor)
            if grad_norm > self.GRAD_FACTOR * grad_ref:
                stop(f"gradient norm {grad_norm:.4g} > {self.GRAD_FACTOR:g} x {grad_ref:.4g} (recent median)")
        norm = self._norm()
        if not math.isfinite(norm):
            stop("non-finite weights")
        if abs(norm - self.start_norm) > self.DRIFT * self.start_norm:
            stop(f"weight norm {norm:.4g} moved more than {self.DRIFT:g} x its start {self.start_norm:.4g}")
        self.losses.append(loss)
        self.grads.append(grad_norm)
