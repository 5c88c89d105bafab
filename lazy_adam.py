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
keeps the step it last moved at, and the steps it sat out are caught up in closed form (its
moments decayed, and their moves summed as a geometric series, see _skipped_moves): by
``catch_up(p, rows)`` for the rows the next forward reads,

    opt.catch_up(enc.embedding.weight, enc.rows(x))  # x's rows where Adam would have them
    loss = loss_fn(mlp(enc(x)), target)               # ... then backward and opt.step()

or else when a batch's gradient next touches the row, before its Adam step. A row touched
every step steps exactly as Adam's; with ``catch_up`` before each forward, every row is read
where Adam's run would have it (up to the closed form's bias correction and learning rate),
so the gradients are Adam's too.

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

    @torch.no_grad()
    def catch_up(self, p: torch.Tensor, rows: torch.Tensor) -> None:
        """Moves rows (R,) of p (a parameter stepped with sparse gradients) where Adam would
        have them now: the moves of the steps they sat out, as the next step would catch them
        up. Called before a forward that reads them (MultiResHashGrid.rows(x)), that forward
        reads the rows where Adam's would, not a few steps' momentum behind."""
        state = self.state.get(p, {})
        if int(state.get("lazy_step", -1)) != int(state.get("step", -2)):
            return                                      # the last step was not lazy: none due
        group = next(g for g in self.param_groups if any(q is p for q in g["params"]))
        rows, t = rows.long(), int(state["step"]) + 1
        m, v, last = _read_rows(state, rows)
        moves = _skipped_moves(group, m, v, last, t)
        _write_rows(state, rows, m, v, t - 1)
        _move_rows(p, rows, moves)

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
        if int(state.get("lazy_step", -1)) != t - 1:
            # the last step was not lazy (Adam's, or a dense gradient's): every row has moved
            state["row_step"] = torch.full(p.shape[:1], t - 1, dtype=torch.int32,
                                           device=p.device)
        state["lazy_step"] = torch.tensor(float(t))
        m, v, last = _read_rows(state, rows)
        moves = None
        # rows that sat out steps (none where catch_up ran before the forward; a GPU syncs here):
        # dense Adam moved them on those steps, by their decaying momentum
        if bool((last != t - 1).any()):
            moves = _skipped_moves(group, m, v, last, t)
        m.mul_(beta1).add_(g, alpha=1 - beta1)
        v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        _write_rows(state, rows, m, v, t)
        bias2_sqrt = math.sqrt(1 - beta2 ** t)
        step_size = group["lr"] * bias2_sqrt / (1 - beta1 ** t)
        update = m.div_(v.sqrt_().add_(group["eps"] * bias2_sqrt)).mul_(step_size)
        _move_rows(p, rows, update if moves is None else update.add_(moves))


def _read_rows(state: dict, rows: torch.Tensor):
    """(m, v, last): the rows' moments (R, ...) and the step each last moved at (R,)."""
    return tuple(state[key].index_select(0, rows) for key in ("exp_avg", "exp_avg_sq",
                                                              "row_step"))


def _write_rows(state: dict, rows: torch.Tensor, m: torch.Tensor, v: torch.Tensor,
                moved_at: int) -> None:
    """Writes the rows' moments back and marks them moved at step moved_at."""
    state["exp_avg"].index_copy_(0, rows, m)
    state["exp_avg_sq"].index_copy_(0, rows, v)
    state["row_step"].index_fill_(0, rows, moved_at)


def _move_rows(p: torch.Tensor, rows: torch.Tensor, move: torch.Tensor) -> None:
    """p[rows] -= move, rows unique (gather, subtract, scatter: index_add_ runs serially on a
    CPU, 4x slower)."""
    p.index_copy_(0, rows, p.index_select(0, rows).sub_(move))


SERIES_STEPS = 4096     # from k steps on, r^k and beta1^k are 0 in float32, beta2^k < 2e-18


def _skipped_moves(group: dict, m: torch.Tensor, v: torch.Tensor, last: torch.Tensor,
                   t: int) -> torch.Tensor:
    """The sum of the moves dense Adam made on rows (m, v: (R, ...) their moments; last (R,)
    the step each last moved at) on the k = t - 1 - last steps each sat out before step t;
    decays m and v by those steps, in place.

    Step last + i moves a row by lr sqrt(1 - b2^j) / (1 - b1^j) r^i u, j = last + i, with
    r = b1 / sqrt(b2) and u = m / sqrt(v) at its last move (eps aside): the sum over i is a
    geometric series, and the bias correction, smooth in j, is taken at the series' centroid
    (weights r^i) rather than at step t (early in a run it grows 2x within 200 steps). lr is
    the group's, the coming step's."""
    beta1, beta2 = group["betas"]
    dtype = torch.promote_types(m.dtype, torch.float32)
    k = (t - 1 - last).clamp_(max=SERIES_STEPS)
    decay1, decay2, series, centroid = _series(beta1, beta2, dtype, m.device)[k].unbind(1)
    j = (last + centroid).clamp_min_(1)
    size = (1 - beta2 ** j).sqrt_().div_(1 - beta1 ** j).mul_(series * group["lr"])
    shape = (-1,) + (1,) * (m.dim() - 1)
    eps = group["eps"] * math.sqrt(1 - beta2 ** t)
    moves = (m / (v.sqrt() + eps) * size.view(shape)).to(m.dtype)
    m.mul_(decay1.view(shape))
    v.mul_(decay2.view(shape))
    return moves


_SERIES = {}


def _series(beta1: float, beta2: float, dtype: torch.dtype, device: torch.device):
    """(SERIES_STEPS + 1, 4): for k = 0.. steps sat out, beta1^k, beta2^k, the sum of r^i for
    i = 1..k (r = beta1 / sqrt(beta2)) and the centroid of i under those weights (0 for k = 0),
    computed once in float64."""
    key = (beta1, beta2, dtype, device)
    if key not in _SERIES:
        k = torch.arange(SERIES_STEPS + 1, dtype=torch.float64)
        r = beta1 / math.sqrt(beta2)
        r_k = r ** k
        series = (1 - r_k) * (r / (1 - r))
        centroid = (1 - (k + 1) * r_k + k * r_k * r) / ((1 - r) * (1 - r_k)).clamp_min(1e-300)
        _SERIES[key] = torch.stack([beta1 ** k, beta2 ** k, series, centroid], 1).to(
            dtype=dtype, device=device)
    return _SERIES[key]


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
