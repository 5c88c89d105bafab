"""Adam whose step costs the rows a sparse gradient touched, not the table, as one optimizer.

    enc = MultiResHashGrid(2, sparse=True)          # the table's gradient: the touched rows
    opt = LazyAdam([{"params": mlp.parameters()}, {"params": enc.parameters()}],
                   betas=(0.9, 0.99), eps=1e-15, fused=True)

A parameter whose gradient is a sparse COO tensor of rows (``nn.Embedding(sparse=True)``'s
format) steps only those rows: their moments are gathered, updated and written back, and the
rows move; the other rows, and their moments, stay as they are this step. Every other
parameter steps with ``torch.optim.Adam`` as configured (fused where asked).

Lazy, and still Adam: on a step without a gradient, Adam decays a row's moments and moves the
row by them (momentum: about ten more steps' worth of movement after its last gradient, at
betas 0.9/0.99). Skipping those steps, as ``torch.optim.SparseAdam`` and the paper (Müller et
al. 2022, §4: "we skip the Adam update of hash table entries whose gradient is zero") do,
moves a rarely touched row about ten times less per touch than Adam moves it. Here each row
keeps the step it last moved at; when a batch touches it again, the steps it sat out are
caught up in closed form (its moments decayed, and their moves summed as a geometric series
with this step's learning rate and bias correction), then it takes its Adam step. A row
touched every step steps exactly as Adam's; a row the batches leave keeps its last few
steps' moves pending until it is touched again.

State dict: Adam's (``step``, ``exp_avg``, ``exp_avg_sq`` per parameter), plus for the sparse
ones ``row_step`` (int32 per row: the step it last moved at) and ``lazy_step`` (the last lazy
step: after any other step, a dense gradient's or a resumed ``torch.optim.Adam``'s, every row
has moved), so a run can resume with either kind of gradient or optimizer. Adam's denominator
sqrt(v / (1 - beta2^t)) + eps, with the optimizer's step count t. Imports only torch.
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

    def load_state_dict(self, state_dict: dict) -> None:
        """Adam's, with row_step (int32) and lazy_step kept as saved: Adam casts every other
        state to its parameter's dtype, which would round step counts (bfloat16)."""
        kept = {i: {k: s[k] for k in ("row_step", "lazy_step") if k in s}
                for i, s in state_dict["state"].items()}
        super().load_state_dict(state_dict)
        ids = [i for group in state_dict["param_groups"] for i in group["params"]]
        params = [p for group in self.param_groups for p in group["params"]]
        for i, p in zip(ids, params):
            for key, value in kept.get(i, {}).items():
                self.state[p][key] = value.to(p.device) if key == "row_step" else value.cpu()

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
        beta1, beta2 = group["betas"]
        t = int(state["step"])
        if group["weight_decay"]:
            g = g.add(p.index_select(0, rows), alpha=group["weight_decay"])
        exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
        if int(state.get("lazy_step", -1)) != t - 1:
            # the last step was not lazy (Adam's, or a dense gradient's): every row has moved
            state["row_step"] = torch.full(p.shape[:1], t - 1, dtype=torch.int32,
                                           device=p.device)
        state["lazy_step"] = torch.tensor(float(t))
        # the steps since each row last moved (this one included): dense Adam moved it on each
        # skipped one by its decaying momentum; that movement and decay are caught up here
        since = (t - state["row_step"].index_select(0, rows)).to(g.dtype)
        since = since.view(-1, *([1] * (g.dim() - 1)))
        m, v = exp_avg.index_select(0, rows), exp_avg_sq.index_select(0, rows)
        bias2_sqrt = math.sqrt(1 - beta2 ** t)
        eps = group["eps"] * bias2_sqrt
        r = beta1 / math.sqrt(beta2)                    # a skipped step's move, relative
        caught_up = m / (v.sqrt() + eps) * ((1 - r ** (since - 1)) * (r / (1 - r)))
        m.mul_(beta1 ** since).add_(g, alpha=1 - beta1)
        v.mul_(beta2 ** since).addcmul_(g, g, value=1 - beta2)
        exp_avg.index_copy_(0, rows, m)
        exp_avg_sq.index_copy_(0, rows, v)
        state["row_step"].index_fill_(0, rows, t)
        step_size = group["lr"] * bias2_sqrt / (1 - beta1 ** t)
        update = m.div_(v.sqrt_().add_(eps)).add_(caught_up)
        p.index_add_(0, rows, update, alpha=-step_size)               # (rows unique)


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
