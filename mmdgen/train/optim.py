"""The LM's optimiser: AdamW, its moments in fp32 (``torch.optim.AdamW``) or in bf16 (``BF16StateAdamW``).

``BF16StateAdamW`` keeps AdamW's two moments in bf16 (4 bytes per weight instead of 8) while the weights stay in
fp32: each step reads the moments into fp32, updates them and the weights there exactly as ``torch.optim.AdamW``
does (decoupled weight decay, bias corrections), and rounds the moments back to bf16 (to nearest). bf16 keeps 8
bits of mantissa: an update smaller than 1/256 of a moment is lost, which matters for ``beta2`` close to 1 (0.999:
the second moment then moves only on large gradients); the LM trainer's default 0.95 updates it by 5 % a step.
"""

from __future__ import annotations

import torch

MOMENTS = ("exp_avg", "exp_avg_sq")


class BF16StateAdamW(torch.optim.Optimizer):
    """AdamW with bf16 moments and fp32 (or any) weights; same arguments and param groups as torch.optim.AdamW."""

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2):
        if not lr >= 0 or not eps >= 0 or not weight_decay >= 0 or not all(0 <= b < 1 for b in betas):
            raise ValueError(f"BF16StateAdamW: lr {lr}, eps {eps}, weight_decay {weight_decay} must be >= 0 and "
                             f"betas {betas} within [0, 1)")
        super().__init__(params, {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for param in group["params"]:
                if param.grad is None:
                    continue
                state = self.state[param]
                if not state:
                    state["step"] = torch.zeros((), dtype=torch.float32)
                    for name in MOMENTS:
                        state[name] = torch.zeros_like(param, dtype=torch.bfloat16)
                state["step"] = state["step"] + 1  # a new tensor: a saved state dict keeps its count
                step = float(state["step"])
                grad = param.grad.float()
                exp_avg = state["exp_avg"].float().lerp_(grad, 1 - beta1)
                exp_avg_sq = state["exp_avg_sq"].float().mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                param.mul_(1 - group["lr"] * group["weight_decay"])
                denominator = (exp_avg_sq.sqrt() / (1 - beta2 ** step) ** 0.5).add_(group["eps"])
                param.addcdiv_(exp_avg.to(param.dtype), denominator.to(param.dtype),
                               value=-group["lr"] / (1 - beta1 ** step))
                state["exp_avg"].copy_(exp_avg)
                state["exp_avg_sq"].copy_(exp_avg_sq)
        return loss

    def load_state_dict(self, state_dict: dict) -> None:
        """torch.optim.Optimizer casts the saved moments to the weights' dtype: they go back to bf16 (exactly, as
        they were bf16 when saved)."""
        super().load_state_dict(state_dict)
        for state in self.state.values():
            for name in MOMENTS:
                if name in state:
                    state[name] = state[name].to(torch.bfloat16)


def adamw(groups: list[dict], lr: float, betas: tuple[float, float], state_dtype: str) -> torch.optim.Optimizer:
    """AdamW over ``groups`` (param groups with their weight decay), its moments in ``state_dtype``."""
    if state_dtype == "bf16":
        return BF16StateAdamW(groups, lr=lr, betas=betas)
    if state_dtype != "fp32":
        raise ValueError(f"optimizer_state must be fp32 or bf16, got {state_dtype!r}")
    return torch.optim.AdamW(groups, lr=lr, betas=betas)
