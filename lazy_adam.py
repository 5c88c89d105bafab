"""Adam with the paper's lazy step for sparse gradients (Müller et al. 2022, §4: "we skip
the Adam update of hash table entries whose gradient is zero"), as one optimizer.

    enc = MultiResHashGrid(2, sparse=True)          # the table's gradient: the touched rows
    opt = LazyAdam([{"params": mlp.parameters()}, {"params": enc.parameters()}],
                   betas=(0.9, 0.99), eps=1e-15, fused=True)

A parameter whose gradient is a sparse COO tensor of rows (``nn.Embedding(sparse=True)``'s
format) steps only those rows: their moments are gathered, updated as Adam updates them and
written back, and the rows move; the other rows, and their moments, stay as they are. Every
other parameter steps with ``torch.optim.Adam`` as configured (fused where asked). So a step's
cost follows the rows the batch touched, not the table's size.

Why not ``torch.optim.SparseAdam`` for the table next to a fused Adam for the rest: that is
two optimizers, which Lightning drives only in manual optimization, and two state dicts in a
checkpoint; this is one ``torch.optim.Adam`` whose state dict is Adam's (the same keys
``step``, ``exp_avg``, ``exp_avg_sq`` per parameter), so a run can resume with either kind of
gradient. The lazy rows follow Adam's formula (denominator sqrt(v / (1 - beta2^t)) + eps,
where SparseAdam has sqrt(v) + eps scaled; equal for the paper's eps = 1e-15), with the
step count t of the optimizer, and it writes fewer bytes than SparseAdam and runs faster on a
CPU (bench/step.py). Imports only torch.
"""
import math

import torch

__all__ = ["LazyAdam"]


class LazyAdam(torch.optim.Adam):
    """torch.optim.Adam (same arguments) whose parameters with a sparse gradient take the
    lazy step: only the gradient's rows (and their moments) change. Sparse gradients need
    amsgrad=False; weight_decay applies to the rows stepped."""

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        lazy = [(group, p) for group in self.param_groups for p in group["params"]
                if p.grad is not None and p.grad.is_sparse]
        grads = [p.grad for _, p in lazy]
        try:
            for _, p in lazy:           # Adam refuses sparse gradients: it skips these
                p.grad = None
            super().step()
        finally:
            for (_, p), grad in zip(lazy, grads):
                p.grad = grad
        for (group, p), grad in zip(lazy, grads):
            self._lazy_step(group, p, grad)
        return loss

    def _lazy_step(self, group: dict, p: torch.Tensor, grad: torch.Tensor) -> None:
        """Adam's update of the rows of p (R, ...) in grad (sparse, rows as its sparse dim)."""
        if group["amsgrad"]:
            raise ValueError("LazyAdam: sparse gradients need amsgrad=False")
        grad = _coalesced(grad)
        rows, g = grad._indices()[0], grad._values()
        if group["maximize"]:
            g = -g
        state = self.state[p]
        if not state:                                   # as Adam starts a parameter
            state["step"] = torch.tensor(0.0, dtype=torch.float32)
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        if state["step"].device.type != "cpu":          # (a fused Adam's, resumed)
            state["step"] = state["step"].cpu()
        state["step"] += 1
        if rows.numel() == 0:
            return
        beta1, beta2 = group["betas"]
        step = float(state["step"])
        if group["weight_decay"]:
            g = g.add(p.index_select(0, rows), alpha=group["weight_decay"])
        exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
        m = exp_avg.index_select(0, rows).lerp_(g, 1 - beta1)
        v = exp_avg_sq.index_select(0, rows).mul_(beta2).addcmul_(g, g, value=1 - beta2)
        exp_avg.index_copy_(0, rows, m)
        exp_avg_sq.index_copy_(0, rows, v)
        # Adam's m / (sqrt(v / b2) + eps) = sqrt(b2) m / (sqrt(v) + eps sqrt(b2)), b2 = 1 - beta2^t:
        # the same update in fewer passes over the rows
        bias2_sqrt = math.sqrt(1 - beta2 ** step)
        denom = v.sqrt_().add_(group["eps"] * bias2_sqrt)
        step_size = group["lr"] * bias2_sqrt / (1 - beta1 ** step)
        p.index_add_(0, rows, m.div_(denom), alpha=-step_size)        # (rows unique)


def _coalesced(grad: torch.Tensor) -> torch.Tensor:
    """grad, coalesced: flagged as such if its rows are already strictly increasing (what
    MultiResHashGrid(sparse=True) returns; autograd's accumulation into .grad drops the flag),
    else summed per row by torch."""
    if grad.is_coalesced():
        return grad
    rows = grad._indices()[0]
    if grad.sparse_dim() == 1 and bool((rows[1:] > rows[:-1]).all()):
        return grad._coalesced_(True)
    return grad.coalesce()
