"""MultiResHashGrid(sparse=True): the table's gradient as coalesced sparse rows, equal to the
dense one and deterministic; LazyAdam against a float64 reference, Adam and SparseAdam."""
import itertools
import os

import pytest
import torch

import encoding
from conftest import encoder
from encoding import MultiResHashGrid
from lazy_adam import LazyAdam


def gradients(enc, x, create_graph=False):
    """(table gradient, x gradient) of a fixed weighted loss on enc(x)."""
    enc.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_()
    y = enc(x)
    weights = torch.linspace(-1, 1, y.shape[-1], dtype=y.dtype)
    (y * weights).square().sum().backward()
    return enc.embedding.weight.grad, x.grad


def pair(dim, **kwargs):
    """(dense, sparse) encodings with the same table."""
    dense = encoder(dim, 4, 2, 8, 4, 64, **kwargs)
    sparse = encoder(dim, 4, 2, 8, 4, 64, sparse=True, **kwargs)
    sparse.load_state_dict(dense.state_dict())
    return dense, sparse


def rows_of(grad):
    """The rows of a sparse gradient; checks they are sorted and unique (coalesced data)."""
    assert grad.is_sparse and grad.sparse_dim() == 1 and grad.dense_dim() == 1
    rows = grad._indices()[0]
    assert bool((rows[1:] > rows[:-1]).all())
    return rows


@pytest.mark.parametrize("implementation,interpolation,dim", list(itertools.product(
    ("fast", "device", "reference"), ("linear", "smoothstep", "nearest"), (2, 3))))
def test_sparse_gradient_equals_the_dense_one(implementation, interpolation, dim):
    torch.manual_seed(0)
    dense, sparse = pair(dim, implementation=implementation, interpolation=interpolation,
                         dtype=torch.float64)
    x = torch.rand(700, dim, dtype=torch.float64)
    x[5, 0] = float("nan")                        # a NaN point adds nothing
    grad_dense, x_dense = gradients(dense, x)
    grad_sparse, x_sparse = gradients(sparse, x)
    rows = rows_of(grad_sparse)
    # the touched rows are exactly the rows the points' corners read
    assert set(rows.tolist()) >= set(grad_dense.abs().sum(1).nonzero()[:, 0].tolist())
    torch.testing.assert_close(grad_sparse.to_dense(), grad_dense, rtol=1e-12, atol=1e-15)
    if interpolation != "nearest":
        torch.testing.assert_close(x_sparse, x_dense, rtol=0, atol=0)


@pytest.mark.parametrize("layout,grid_type", [("tcnn", "hash"), ("tcnn", "dense"),
                                              ("tcnn", "tiled"), ("paper", "dense")])
def test_sparse_on_tcnn_and_dense_grids(layout, grid_type):
    torch.manual_seed(1)
    for implementation in ("fast", "device"):
        dense, sparse = pair(2, layout=layout, grid_type=grid_type,
                             implementation=implementation)
        x = torch.rand(500, 2)
        torch.testing.assert_close(gradients(sparse, x)[0].to_dense(), gradients(dense, x)[0])


@pytest.mark.parametrize("kwargs", [dict(dim=2), dict(dim=3), dict(dim=2, layout="tcnn"),
                                    dict(dim=2, interpolation="nearest"),
                                    dict(dim=2, periodic=[True, False]),
                                    dict(dim=3, grid_type="dense", layout="tcnn")])
def test_rows_are_the_rows_of_the_reference_sparse_gradient(kwargs):
    torch.manual_seed(7)
    dim = kwargs.pop("dim")
    enc = encoder(dim, 4, 2, 8, 4, 64, sparse=True, implementation="reference", **kwargs)
    x = torch.rand(300, dim)
    x[0] = 1.0                                  # the upper edge
    enc(x).sum().backward()                     # the formula's lookups, one row each
    rows = enc.rows(x)
    assert rows.dim() == 1 and bool((rows[1:] > rows[:-1]).all())
    assert torch.equal(rows.long(), rows_of(enc.embedding.weight.grad.coalesce()))
    nan = x[:5].clone()
    nan[:, 0] = float("nan")                    # the forward reads its placeholder's rows
    enc.zero_grad()
    enc(nan).nan_to_num(0.0).sum().backward()   # (zero values, at the rows read)
    assert torch.equal(enc.rows(nan).long(), rows_of(enc.embedding.weight.grad.coalesce()))


def test_the_function_returns_a_coalesced_tensor_and_only_touched_rows():
    enc = MultiResHashGrid(2, 2, 2, 12, 4, 8, sparse=True)    # 2 dense levels: 25 + 81 rows
    seen = []
    enc.embedding.weight.register_hook(lambda g: seen.append(g.is_coalesced()))
    x = torch.tensor([[0.1, 0.1]])                  # one point: 4 corners per level
    grad = gradients(enc, x)[0]
    assert seen == [True]
    assert grad._nnz() == 8
    cells = [(0, 0), (1, 0), (0, 1), (1, 1)]
    # level 0: 4 cells per axis, vertex (0, 0)..(1, 1); level 1: 8 cells, vertex (0, 0)..
    expected = sorted([c + 5 * r for c, r in cells] + [25 + c + 9 * r for c, r in cells])
    assert rows_of(grad).tolist() == expected


def test_rows_are_summed_in_their_given_order():
    # float32: (1e8 + 1) - 1e8 is 0 in this order and 1 in others; a fixed order gives 0
    rows = torch.tensor([4, 2, 4, 4, 2])
    values = torch.tensor([[1e8], [3.0], [1.0], [-1e8], [0.5]])
    grad = encoding._coalesced_rows(rows, values, (6, 1), torch.float32)
    assert grad.is_coalesced()
    assert grad._indices().tolist() == [[2, 4]]
    assert grad._values().tolist() == [[3.5], [0.0]]
    empty = encoding._coalesced_rows(rows[:0], values[:0], (6, 1), torch.float64)
    assert empty._nnz() == 0 and empty.dtype == torch.float64


@pytest.mark.parametrize("implementation", ["fast", "device"])
def test_sparse_gradient_is_bit_identical_run_to_run_and_on_1_or_2_threads(implementation):
    torch.manual_seed(2)
    # a small table and many points: every row is summed from hundreds of contributions
    enc = encoder(2, 4, 2, 8, 4, 256, implementation=implementation, sparse=True)
    x = torch.rand(20000, 2)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2, 2, 1):
            torch.set_num_threads(n)
            grad = gradients(enc, x)[0]
            results.append((grad._indices().clone(), grad._values().clone()))
    finally:
        torch.set_num_threads(threads)
    for rows, values in results[1:]:
        assert torch.equal(rows, results[0][0])
        assert torch.equal(values, results[0][1])


@pytest.mark.parametrize("implementation", ["fast", "device", "reference"])
def test_second_order_is_unchanged(implementation):
    torch.manual_seed(3)
    dense, sparse = pair(2, implementation=implementation, dtype=torch.float64)
    x = torch.rand(300, 2, dtype=torch.float64)
    grads = []
    for enc in (dense, sparse):
        enc.zero_grad(set_to_none=True)
        xx = x.clone().requires_grad_()
        y = enc(xx)
        dx, = torch.autograd.grad(y.sum(), xx, create_graph=True)
        (y.square().mean() + (dx.norm(dim=-1) - 1).square().mean()).backward()
        grad = enc.embedding.weight.grad
        assert grad.is_sparse == enc.sparse       # second order's table gradient sparse too
        grads.append(grad.to_dense() if grad.is_sparse else grad)
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-10, atol=1e-14)


def test_compile_with_a_table_gradient_says_what_to_do():
    enc = MultiResHashGrid(2, 2, 2, 8, 4, 16, sparse=True)
    compiled = torch.compile(enc, fullgraph=True)
    x = torch.rand(16, 2)
    with pytest.raises(Exception, match=r"sparse=True\) has no torch.compile path"):
        compiled(x).sum().backward()
    with torch.no_grad():                       # no gradient: compiles as sparse=False
        torch.testing.assert_close(compiled(x), enc(x))
    torch._dynamo.reset()
    grad = gradients(torch.compile(enc), x)[0]   # without fullgraph: eagerly, sparse
    torch.testing.assert_close(grad.to_dense(), gradients(enc, x)[0].to_dense())


def test_sparse_flag_is_the_embeddings_and_checked():
    enc = MultiResHashGrid(2, 2, 2, 8, 4, 16)
    assert enc.sparse is False and enc.embedding.sparse is False
    enc.sparse = True
    assert enc.embedding.sparse is True           # what DDP reads to allreduce it sparse
    assert "sparse=True" in enc.extra_repr()
    with pytest.raises(ValueError, match="sparse must be a bool"):
        MultiResHashGrid(2, sparse=1)
    with pytest.raises(ValueError, match="sparse must be a bool"):
        enc.sparse = "yes"


def float64_lazy_adam(w, steps, lr, betas, eps, reads=None):
    """Adam on sparse rows in float64, one row and one skipped step at a time: [(rows, values)]
    -> w after. A row sat out the k steps since it last moved: on each, Adam would have decayed
    its moments and moved it by them; that happens when the row is next touched, or before
    step t if it is in reads[t - 1] (LazyAdam.catch_up), each skipped step's move with the
    bias correction of the step at the centroid of those k moves (weights (b1 / sqrt(b2))^i),
    eps and lr of step t; then the row takes its Adam step."""
    w, (b1, b2) = w.double().clone(), betas
    m, v = torch.zeros_like(w), torch.zeros_like(w)
    last = [0] * len(w)
    r = b1 / b2 ** 0.5

    def size(j):
        return lr * (1 - b2 ** j) ** 0.5 / (1 - b1 ** j)

    for t, (rows, values) in enumerate(steps, 1):
        eps_t = eps * (1 - b2 ** t) ** 0.5
        read = reads[t - 1].tolist() if reads is not None and t > 1 else []
        for row in read + rows.tolist():
            k = t - 1 - last[row]
            if k > 0:
                centroid = sum(i * r ** i for i in range(1, k + 1)) / sum(
                    r ** i for i in range(1, k + 1))
                for _ in range(k):
                    m[row], v[row] = b1 * m[row], b2 * v[row]
                    w[row] -= size(last[row] + centroid) * m[row] / (v[row].sqrt() + eps_t)
            last[row] = max(last[row], t - 1)
        for row, g in zip(rows.tolist(), values.double()):
            m[row] = b1 * m[row] + (1 - b1) * g
            v[row] = b2 * v[row] + (1 - b2) * g * g
            w[row] -= size(t) * m[row] / (v[row].sqrt() + eps_t)
            last[row] = t
    return w


def test_lazy_adam_equals_a_float64_reference_and_adam_where_every_row_steps():
    torch.manual_seed(4)
    w0, n_rows = torch.randn(60, 2), 60
    steps = []
    for _ in range(12):
        rows = torch.unique(torch.randint(0, n_rows, (15,)))
        steps.append((rows, torch.randn(len(rows), 2)))
    steps.append((torch.arange(n_rows), torch.randn(n_rows, 2)))     # all: everything caught up
    lazy, dense = torch.nn.Parameter(w0.clone()), torch.nn.Parameter(w0.clone())
    mlp = torch.nn.Linear(2, 2)
    mlp_copy = torch.nn.Linear(2, 2)
    mlp_copy.load_state_dict(mlp.state_dict())
    opts = [LazyAdam([{"params": [lazy]}, {"params": mlp.parameters()}], lr=1e-2,
                     betas=(0.9, 0.99), eps=1e-15),
            torch.optim.Adam([dense], lr=1e-2, betas=(0.9, 0.99), eps=1e-15),
            torch.optim.Adam(mlp_copy.parameters(), lr=1e-2, betas=(0.9, 0.99), eps=1e-15)]
    for rows, values in steps:
        grad = torch.sparse_coo_tensor(rows[None], values, (n_rows, 2), check_invariants=True)
        lazy.grad, dense.grad = grad.clone(), grad.to_dense()
        for p, q in zip(mlp.parameters(), mlp_copy.parameters()):
            p.grad = torch.ones_like(p)
            q.grad = torch.ones_like(q)
        for opt in opts:
            opt.step()
    reference = float64_lazy_adam(w0, steps, 1e-2, (0.9, 0.99), 1e-15)
    torch.testing.assert_close(lazy.detach().double(), reference, rtol=1e-6, atol=1e-7)
    # Adam's moments after the last step, where every row stepped: the same as dense Adam's
    state, dense_state = opts[0].state[lazy], opts[1].state[dense]
    for key in ("exp_avg", "exp_avg_sq"):
        torch.testing.assert_close(state[key], dense_state[key], rtol=1e-5, atol=1e-12)
    # the rows moved much as dense Adam moved them (the skipped steps' bias correction taken at
    # their centroid), far closer than skipping the steps (SparseAdam's step, the paper's)
    sparse_adam = torch.nn.Parameter(w0.clone())
    opt = torch.optim.SparseAdam([sparse_adam], lr=1e-2, betas=(0.9, 0.99), eps=1e-15)
    for rows, values in steps:
        sparse_adam.grad = torch.sparse_coo_tensor(rows[None], values, (n_rows, 2),
                                                   check_invariants=True)
        opt.step()
    error = (lazy - dense).abs().sum() / (dense - w0).abs().sum()
    skip_error = (sparse_adam - dense).abs().sum() / (dense - w0).abs().sum()
    assert error < 0.02 and skip_error > 25 * error, (error, skip_error)   # 0.0096, 0.53
    for p, q in zip(mlp.parameters(), mlp_copy.parameters()):   # the rest: Adam's step
        assert torch.equal(p, q)
    state = opts[0].state_dict()["state"][0]
    assert sorted(state) == ["exp_avg", "exp_avg_sq", "lazy_step", "row_step", "step"]
    assert int(state["step"]) == 13 and state["row_step"].tolist() == [13] * n_rows
    # resumed, also into a bfloat16 table: the step counts stay exact
    resumed = LazyAdam([{"params": [lazy.detach().bfloat16().requires_grad_()]},
                        {"params": mlp.parameters()}])
    opts[0].state[lazy]["row_step"][0] = 1001                 # (not a bfloat16 number)
    resumed.load_state_dict(opts[0].state_dict())
    row_step = resumed.state_dict()["state"][0]["row_step"]
    assert row_step.dtype == torch.int32 and row_step[0] == 1001


def test_catch_up_moves_the_rows_a_forward_reads_as_adam_would_have():
    torch.manual_seed(6)
    w0, n_rows = torch.randn(50, 2), 50
    steps = [(torch.unique(torch.randint(0, n_rows, (12,))), None) for _ in range(10)]
    steps = [(rows, torch.randn(len(rows), 2)) for rows, _ in steps]
    reads = [torch.unique(torch.randint(0, n_rows, (20,))) for _ in steps]
    lazy = torch.nn.Parameter(w0.clone())
    opt = LazyAdam([lazy], lr=1e-2, betas=(0.9, 0.99), eps=1e-15)
    opt.catch_up(lazy, reads[0])                # before any step: nothing is due
    assert torch.equal(lazy.detach(), w0)
    for (rows, values), read in zip(steps, reads):
        opt.catch_up(lazy, read.int())
        lazy.grad = torch.sparse_coo_tensor(rows[None], values, (n_rows, 2))
        opt.step()
    reference = float64_lazy_adam(w0, steps, 1e-2, (0.9, 0.99), 1e-15, reads)
    torch.testing.assert_close(lazy.detach().double(), reference, rtol=1e-6, atol=1e-7)
    assert not torch.allclose(reference, float64_lazy_adam(w0, steps, 1e-2, (0.9, 0.99), 1e-15))


def test_catch_up_before_the_forward_tracks_adam_on_a_fit():
    """Rows caught up before the forward are read where Adam's run has them, so their
    gradients are Adam's: the lazy fit stays far closer to Adam's than when they catch up at
    the step (a few steps' momentum behind when read)."""
    torch.manual_seed(0)
    image = torch.rand(64, 64)

    def fit(kind):
        torch.manual_seed(1)
        enc = MultiResHashGrid(2, 8, 2, 12, 4, 64, sparse=kind != "adam")
        head = torch.nn.Linear(16, 1)
        kw = dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-15)
        opt = (torch.optim.Adam if kind == "adam" else LazyAdam)(
            [{"params": enc.parameters()}, {"params": head.parameters()}], **kw)
        batches = torch.Generator().manual_seed(2)
        for _ in range(150):
            x = torch.rand(256, 2, generator=batches)
            if kind == "catch_up":
                opt.catch_up(enc.embedding.weight, enc.rows(x))
            pixels = (x * 63.999).long()
            loss = (head(enc(x))[:, 0] - image[pixels[:, 1], pixels[:, 0]]).square().mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        if kind != "adam":                      # every pending move made, to compare tables
            opt.catch_up(enc.embedding.weight, torch.arange(len(enc.embedding.weight)))
        return enc.embedding.weight.detach()

    adam = fit("adam")
    distance = {kind: float((fit(kind) - adam).norm() / adam.norm())
                for kind in ("at_step", "catch_up")}
    assert distance["catch_up"] < 0.25 * distance["at_step"], distance    # 0.0029, 0.023


def test_lazy_adam_steps_only_touched_rows_and_is_adam_for_rows_touched_every_step():
    torch.manual_seed(5)
    w0 = torch.randn(40, 3)
    lazy, dense = torch.nn.Parameter(w0.clone()), torch.nn.Parameter(w0.clone())
    opts = [LazyAdam([lazy], lr=1e-2, betas=(0.9, 0.99), eps=1e-15),
            torch.optim.Adam([dense], lr=1e-2, betas=(0.9, 0.99), eps=1e-15)]
    every, some = torch.arange(10), torch.tensor([20, 25])
    for t in range(7):          # `some` skips steps, and is touched at the last one
        rows = torch.cat([every, some]) if t % 3 == 0 else every
        values = torch.randn(len(rows), 3)
        lazy.grad = torch.sparse_coo_tensor(rows[None], values, (40, 3), check_invariants=True)
        dense.grad = torch.zeros(40, 3).index_put_((rows,), values)
        for opt in opts:
            opt.step()
    torch.testing.assert_close(lazy[every], dense[every], rtol=1e-6, atol=1e-7)
    assert torch.equal(lazy.detach()[30:], w0[30:])        # never touched: never moved
    # `some` caught up (its skipped steps moved with a later step's bias correction), then a
    # dense gradient's step (Adam's: every row moves), then lazy steps touching it: its moves
    # are Adam's, nothing moved twice
    offset = (lazy - dense).detach()[some]
    for t in range(3):
        values = torch.randn(40, 3)
        rows = torch.arange(40) if t == 0 else some
        lazy.grad = (values if t == 0 else
                     torch.sparse_coo_tensor(rows[None], values[rows], (40, 3)))
        dense.grad = torch.zeros(40, 3).index_put_((rows,), values[rows])
        for opt in opts:
            opt.step()
    torch.testing.assert_close((lazy - dense)[some], offset, rtol=0, atol=1e-6)


def test_lazy_adam_trains_the_encoding_as_adam_does():
    torch.manual_seed(5)
    dense, sparse = pair(2)
    lazy = LazyAdam(sparse.parameters(), lr=1e-2, betas=(0.9, 0.99), eps=1e-15)
    reference = torch.optim.Adam(dense.parameters(), lr=1e-2, betas=(0.9, 0.99), eps=1e-15)
    x = torch.rand(400, 2)
    for _ in range(3):          # the same points: every row a step touches, every step touches
        for enc, opt in ((dense, reference), (sparse, lazy)):
            opt.zero_grad()
            enc(x).square().sum().backward()
            opt.step()
    assert sparse.embedding.weight.grad.is_sparse
    # (steps of ~1e-2 on weights of ~1e-4: float32 rounding of two formulas)
    torch.testing.assert_close(sparse.embedding.weight, dense.embedding.weight, rtol=1e-5,
                               atol=1e-7)


# --- train.py --table_optimizer ---------------------------------------------------------------

def grad_layouts():
    """A Lightning callback recording the tables' gradient layout at every optimizer step."""
    import lightning.pytorch as pl

    class Record(pl.Callback):
        def __init__(self):
            self.layouts, self.caught_up = [], []

        def on_before_optimizer_step(self, trainer, module, optimizer):
            table = module.field.encoder.embedding.weight
            self.layouts.append(table.grad.layout)
            state = optimizer.state.get(table, {})
            if table.grad.is_sparse and "row_step" in state:   # (from the second step)
                # every row the gradient holds was moved up to the last step before the forward
                rows = table.grad.coalesce().indices()[0]
                self.caught_up.append(bool((state["row_step"][rows] == state["step"]).all()))
    return Record()


def test_sparse_adam_steps_only_touched_rows_and_resumes_either_way(tmp_path):
    import yaml
    import train
    record = grad_layouts()
    first = train.main(["-i", str(_write_waves(tmp_path)), "--root", str(tmp_path / "logs"),
                        "--accelerator", "cpu", "--batch_size", "256", "--max_steps", "10",
                        "--val_every", "10", "--table_optimizer", "sparse_adam",
                        "--finest_resolution", "2048", "--log2_hashmap_size", "12"],
                       callbacks=[record])
    assert record.layouts == [torch.sparse_coo] * 10 and record.caught_up == [True] * 9
    saved = torch.load(first["checkpoint"], weights_only=True)
    state = saved["optimizer_states"][0]
    table = saved["state_dict"]["field.encoder.embedding.weight"]
    table_state = next(s for s in state["state"].values() if s["exp_avg"].shape == table.shape)
    assert int(table_state["step"]) == 10
    # lazy: rows no batch touched have no moments; the fine hashed levels have many
    untouched = (table_state["exp_avg_sq"] == 0).all(1)
    assert 0.05 < untouched.float().mean() < 0.95
    assert (table_state["exp_avg"][untouched] == 0).all()
    assert (table[untouched].abs() <= 1e-4).all()          # still as initialised
    config = yaml.safe_load(open(os.path.join(first["log_dir"], "config.yaml")))
    assert config["table_optimizer"] == "sparse_adam"
    for optimizer, steps in (("sparse_adam", 20), ("adam", 30)):   # Adam's state either way
        more = train.main(["-i", str(tmp_path / "waves.png"), "--root", str(tmp_path / "logs"),
                           "--accelerator", "cpu", "--batch_size", "256", "--max_steps",
                           str(steps), "--val_every", "10", "--table_optimizer", optimizer,
                           "--finest_resolution", "2048", "--log2_hashmap_size", "12",
                           "--ckpt", first["checkpoint"]])
        assert more["steps"] == steps and more["psnr"] > first["psnr"]
        first = more


def _write_waves(tmp_path):
    import numpy as np
    from PIL import Image
    y, x = np.mgrid[0:48, 0:80]
    image = (127 + 100 * np.sin(x / 7.0)[..., None] * np.cos(y / 5.0)[..., None]
             * np.array([1.0, 0.5, -0.7])).astype(np.uint8)
    Image.fromarray(image).save(tmp_path / "waves.png")
    return tmp_path / "waves.png"


def test_the_default_table_optimizer_follows_the_device_and_the_bytes():
    import train
    from field import FieldConfig
    # the Tokyo-half grid: 8.0 M parameters at T = 2^19, 117 M at 2^24; Tokyo: 158 M at 2^24
    small, large = (FieldConfig(28359, 10725, 3, log2_hashmap_size=t,
                                finest_resolution=[14179, 5362]) for t in (19, 24))
    tokyo = FieldConfig(56718, 21450, 3, log2_hashmap_size=24, finest_resolution=[28359, 10725])
    k = train.SPARSE_PARAMS_PER_LOOKUP
    assert 11.9 <= k <= 13.6      # the crossovers bench/step.py counts at batch 2^18 and 2^16
    assert train.default_table_optimizer("gpu", small, 2**16) == "adam"
    assert train.default_table_optimizer("gpu", large, 2**16) == "sparse_adam"   # 1.18, 2.14 GB
    assert train.default_table_optimizer("gpu", large, 2**18) == "adam"          # 4.14, 2.94 GB
    assert train.default_table_optimizer("gpu", tokyo, 2**16) == "sparse_adam"
    assert train.default_table_optimizer("gpu", tokyo, 2**18) == "adam"          # 9.4 per lookup
    assert train.default_table_optimizer("cpu", large, 2**18) == "adam"


DDP_SCRIPT = """
import sys, torch
import lightning.pytorch as pl
import train

class Dump(pl.Callback):
    layouts = []

    def on_train_start(self, trainer, module):
        self.initial = {k: v.clone() for k, v in module.field.state_dict().items()}

    def on_before_optimizer_step(self, trainer, module, optimizer):
        self.layouts.append(str(module.field.encoder.embedding.weight.grad.layout))

    def on_train_end(self, trainer, module):
        torch.save(dict(initial=self.initial, final=module.field.state_dict(),
                        layouts=self.layouts), f"{sys.argv[1]}/rank{trainer.global_rank}.pt")

train.main(sys.argv[2:], callbacks=[Dump()])
"""


def test_ddp_two_cpu_processes_allreduce_the_sparse_gradients(tmp_path):
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    script = tmp_path / "ddp_sparse.py"
    script.write_text(DDP_SCRIPT)
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, str(script), str(tmp_path), "-i", str(_write_waves(tmp_path)),
           "--root", str(tmp_path / "logs"), "--accelerator", "cpu", "--devices", "2",
           "--strategy", "ddp", "--max_steps", "5", "--batch_size", "512", "--val_every", "5",
           "--table_optimizer", "sparse_adam"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert ranks[0]["layouts"] == ranks[1]["layouts"] == ["torch.sparse_coo"] * 5
    # each rank draws its own pixels: equal weights mean the gradients were allreduced
    for key, final in ranks[0]["final"].items():
        assert torch.equal(final, ranks[1]["final"][key]), key
    table = "encoder.embedding.weight"
    assert not torch.equal(ranks[0]["final"][table], ranks[0]["initial"][table])
