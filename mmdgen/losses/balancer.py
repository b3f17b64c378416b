"""EnCodec's loss balancer.

The balancer makes each weight a fraction of the gradient that reaches the decoder output rather than
a factor on a loss: every balanced loss's gradient with respect to the output is rescaled to
``total_norm * weight / sum(weights)`` of unit norm (its norm tracked by an EMA), then the sum flows
back through the model once. Losses outside it (commitment, the independence loss) backpropagate as
usual with their plain weights.
"""

from __future__ import annotations

import torch


class Balancer:
    """EnCodec's gradient balancer over losses that depend on one ``output`` tensor:
    ``output.backward(balancer.gradient(losses, output)[0])``."""

    def __init__(self, weights: dict[str, float], total_norm: float = 1.0, ema_decay: float = 0.999,
                 epsilon: float = 1e-12):
        if not weights or any(w < 0 for w in weights.values()) or sum(weights.values()) <= 0:
            raise ValueError(f"balancer weights must be non-negative with a positive sum, got {weights}")
        self.weights, self.total_norm, self.decay, self.eps = dict(weights), total_norm, ema_decay, epsilon
        self.norm_ema: dict[str, float] = {}
        self.ema_steps: dict[str, float] = {}

    def _ema(self, name: str, value: float) -> float:
        """Bias-corrected EMA of a loss's gradient norm."""
        self.norm_ema[name] = self.decay * self.norm_ema.get(name, 0.0) + value
        self.ema_steps[name] = self.decay * self.ema_steps.get(name, 0.0) + 1.0
        return self.norm_ema[name] / self.ema_steps[name]

    def gradient(self, losses: dict[str, torch.Tensor], output: torch.Tensor
                 ) -> tuple[torch.Tensor, dict[str, float]]:
        """The balanced gradient to send into ``output`` (the graph is kept for that backward), and each
        loss's own gradient norm."""
        unknown = set(losses) - set(self.weights)
        if unknown:
            raise ValueError(f"no balancer weight for {sorted(unknown)}")
        total_weight = sum(self.weights[name] for name in losses)
        combined = torch.zeros_like(output)
        norms = {}
        for name, loss in losses.items():
            (grad,) = torch.autograd.grad(loss, output, retain_graph=True)
            norms[name] = float(grad.norm())
            scale = self.total_norm * self.weights[name] / total_weight / (self._ema(name, norms[name]) + self.eps)
            combined.add_(grad, alpha=scale)
        return combined, norms

    def state_dict(self) -> dict:
        return {"norm_ema": dict(self.norm_ema), "ema_steps": dict(self.ema_steps)}

    def load_state_dict(self, state: dict) -> None:
        self.norm_ema, self.ema_steps = dict(state["norm_ema"]), dict(state["ema_steps"])
