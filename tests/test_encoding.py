"""MultiResHashGrid and Frequency against a float64 reference written from the formulas."""
import gc
import importlib.util
import itertools
import math

import pytest
import torch

import encoding
from encoding import Frequency, MultiResHashGrid



def raw(enc):
    """The autograd Function of `enc` as a function of (x, table), for gradcheck."""
    return lambda x, t: encoding._HashGridFunction.apply(x, t, torch.zeros(len(x), dtype=torch.bool), enc._grid(x.device))


PAPER_PRIMES = [1, 2654435761, 805459861, 3674653429, 2097192037, 1434869437, 2165219737]


def reference_primes(dim):
    """The documented rule, re-derived: axis d >= 7 takes the first prime >= (d * 2654435769 mod 2**32) | 1."""
    primes = PAPER_PRIMES[:dim]
    for d in range(7, dim):
        n = (d * 2654435769) % 2**32 | 1
        while any(n % k == 0 for k in range(2, math.isqrt(n) + 1)) or n in primes:
            n += 2
        primes.append(n)
    return primes


def reference_levels(dim, n_levels, log2_t, base, finest):
    """Paper layout: per level (cells per axis, rows, hashed), from N_l = floor(N_min * b**l)."""
    levels = []
    for level in range(n_levels):
        cells = []
        for d in range(dim):
            b_min = base[d] if isinstance(base, (list, tuple)) else base
            b_max = finest[d] if isinstance(finest, (list, tuple)) else finest
            growth = math.exp((math.log(b_max) - math.log(b_min)) / (n_levels - 1)) if n_levels > 1 else 1.0
            cells.append(math.floor(b_min * growth ** level + 1e-9))
        vertices = math.prod(c + 1 for c in cells)
        hashed = vertices > 2**log2_t
        levels.append((cells, 2**log2_t if hashed else vertices, hashed))
    return levels


def reference_encode(x, table, dim, n_levels, log2_t, base, finest, interpolation):
    """Plain loops over levels and corners, float64 torch ops (differentiable in x and table)."""
    primes = reference_primes(dim)
    outputs, offset = [], 0
    for cells, rows, hashed in reference_levels(dim, n_levels, log2_t, base, finest):
        n = torch.tensor(cells, dtype=torch.float64)
        pos = x * n

        def row(vertex):  # vertex: (P, dim) int64
            if hashed:
                h = torch.zeros(vertex.shape[0], dtype=torch.int64)
                for d in range(dim):
                    h = h ^ ((vertex[:, d] * primes[d]) % 2**32)
                return offset + h % rows
            index, stride = torch.zeros(vertex.shape[0], dtype=torch.int64), 1
            for d in range(dim):
                index = index + vertex[:, d] * stride
                stride *= cells[d] + 1
            return offset + index

        if interpolation == "nearest":
            outputs.append(table[row(torch.floor(pos + 0.5).long())])
        else:
            cell = torch.minimum(torch.floor(pos), n - 1)
            frac = pos - cell
            if interpolation == "smoothstep":
                frac = frac * frac * (3 - 2 * frac)
            level_out = 0
            for corner in itertools.product((0, 1), repeat=dim):
                c = torch.tensor(corner, dtype=torch.float64)
                weight = torch.prod(torch.where(c == 1, frac, 1 - frac), dim=-1, keepdim=True)
                level_out = level_out + weight * table[row((cell + c).long())]
            outputs.append(level_out)
        offset += rows
    return torch.cat(outputs, dim=-1)


def make(dim, interpolation="linear", n_levels=4, log2_t=10, base=2, finest=40, dtype=torch.float64, **kw):
    enc = MultiResHashGrid(dim, n_levels, 2, log2_t, base, finest, interpolation=interpolation, **kw).to(dtype)
    with torch.no_grad():  # features of order 1, so mistakes are visible at 1e-6
        enc.embedding.weight.uniform_(-1, 1)
    return enc


# A config per dim with dense and hashed levels both present.
CONFIGS = {1: (6, 5, 4, 300), 2: (5, 8, 3, 60), 3: (4, 9, 2, 24), 4: (3, 9, 2, 8),
           5: (3, 10, 2, 6), 6: (3, 10, 1, 4), 7: (2, 10, 1, 3), 8: (2, 11, 1, 3)}


@pytest.mark.parametrize("interpolation", ["linear", "smoothstep", "nearest"])
@pytest.mark.parametrize("dim", range(1, 9))
def test_matches_float64_reference(dim, interpolation):
    n_levels, log2_t, base, finest = CONFIGS[dim]
    enc = make(dim, interpolation, n_levels, log2_t, base, finest)
    assert enc.hashed_levels and len(enc.hashed_levels) < n_levels or dim == 1
    x = torch.rand(300, dim, dtype=torch.float64, generator=torch.Generator().manual_seed(dim))
    x[0] = 0.0
    x[1] = 1.0  # the top edge interpolates onto the last vertex
    expected = reference_encode(x, enc.embedding.weight.detach(), dim, n_levels, log2_t, base, finest, interpolation)
    torch.testing.assert_close(enc(x), expected, atol=1e-6, rtol=0)


def test_resolutions_follow_the_paper_and_per_axis_values():
    enc = MultiResHashGrid(2, 16, 2, 19, 16, 8192)
    growth = math.exp(math.log(8192 / 16) / 15)
    assert enc.resolutions[0] == (16, 16) and enc.resolutions[-1] == (8192, 8192)
    assert [r[0] for r in enc.resolutions] == [math.floor(16 * growth**l + 1e-9) for l in range(16)]
    panorama = MultiResHashGrid(2, 8, 2, 16, 16, (28359, 10725))
    assert panorama.resolutions[-1] == (28359, 10725) and panorama.resolutions[0] == (16, 16)
    x = torch.rand(64, 2, dtype=torch.float64)
    enc2 = make(2, n_levels=3, log2_t=8, base=(2, 3), finest=(30, 9))
    expected = reference_encode(x, enc2.embedding.weight.detach(), 2, 3, 8, [2, 3], [30, 9], "linear")
    torch.testing.assert_close(enc2(x), expected, atol=1e-6, rtol=0)


def test_dense_levels_are_collision_free_and_exactly_sized():
    # A table whose row r holds r turns "nearest" lookups into a readout of the row index.
    enc = MultiResHashGrid(2, 4, 1, 12, 4, 64, interpolation="nearest").double()
    with torch.no_grad():
        enc.embedding.weight.copy_(torch.arange(enc.embedding.num_embeddings, dtype=torch.float64)[:, None])
    assert enc.hashed_levels == (3,)
    for level in range(3):
        n = enc.resolutions[level][0]
        assert enc.rows_per_level[level] == (n + 1) ** 2       # exactly the vertex count
        grid = torch.stack(torch.meshgrid(torch.arange(n + 1), torch.arange(n + 1), indexing="ij"), -1)
        vertices = grid.reshape(-1, 2).double() / n
        rows = enc(vertices)[:, level].long()
        offset = enc.level_offsets[level]
        assert rows.unique().numel() == (n + 1) ** 2          # distinct vertices, distinct rows
        assert rows.min() == offset and rows.max() == offset + (n + 1) ** 2 - 1
        # axis 0 fastest (row-major for an image whose x runs along a row)
        assert rows[1] - rows[0] == n + 1 and enc(torch.tensor([[1 / n, 0.0]], dtype=torch.float64))[0, level] == offset + 1


def test_hash_primes_rule():
    assert encoding.hash_primes(7) == PAPER_PRIMES
    assert encoding.hash_primes(10) == reference_primes(10)
    assert len(set(encoding.hash_primes(12))) == 12


def test_single_level_and_bad_configs():
    enc = make(3, n_levels=1, base=5, finest=5)
    x = torch.rand(10, 3, dtype=torch.float64)
    torch.testing.assert_close(enc(x), reference_encode(x, enc.embedding.weight.detach(), 3, 1, 10, 5, 5, "linear"))
    with pytest.raises(ValueError, match="interpolation"):
        MultiResHashGrid(2, interpolation="cubic")
    with pytest.raises(ValueError, match="finest_resolution"):
        MultiResHashGrid(2, finest_resolution=(8, 8, 8))
    with pytest.raises(ValueError, match="layout"):
        MultiResHashGrid(2, layout="ngp")


# --- tcnn layout, cases computed by hand from tcnn's formulas -------------------------------

def tcnn_readout(enc, x):
    with torch.no_grad():
        enc.embedding.weight.copy_(torch.arange(enc.embedding.num_embeddings, dtype=torch.float64)[:, None])
    return enc(torch.tensor(x, dtype=torch.float64)).long().tolist()


def test_tcnn_offsets_rows_and_indices_by_hand():
    # base 16, per_level_scale 2: level 0 scale = 16 - 1 = 15, resolution 16, 16**2 = 256 rows
    # (a multiple of 8, <= T = 256): dense. Level 1: scale 31, resolution 32, 1024 > 256: hashed.
    enc = MultiResHashGrid(2, 2, 1, 8, 16, per_level_scale=2.0, interpolation="nearest", layout="tcnn").double()
    assert enc.resolutions == ((16, 16), (32, 32))
    assert enc.rows_per_level == (256, 256) and enc.level_offsets == (0, 256) and enc.hashed_levels == (1,)
    # x = (0.1, 0.7): level 0 pos = (0.1*15 + .5, 0.7*15 + .5) = (2.0, 11.0) -> dense 2 + 11*16 = 178.
    # level 1 pos = (3.6, 22.2) -> (3, 22): (3*1 ^ 22*2654435761 mod 2**32) mod 256 = 53, + offset 256.
    assert ((3 * 1) ^ (22 * 2654435761 % 2**32)) % 256 == 53
    assert tcnn_readout(enc, [[0.1, 0.7]]) == [[178, 256 + 53]]
    assert enc.tcnn_params().shape == (512,)


def test_tcnn_rows_round_up_to_multiple_of_8_and_wrap():
    # base 3: scale 2, resolution 3, 3**2 = 9 -> 16 rows (next multiple of 8); scale 5 (b = 2):
    # resolution 6, 36 -> 40 rows; scale 11: 144 rows; T = 2**7 = 128 caps level 2, hashed.
    enc = MultiResHashGrid(2, 3, 1, 7, 3, per_level_scale=2.0, interpolation="nearest", layout="tcnn").double()
    assert enc.rows_per_level == (16, 40, 128) and enc.level_offsets == (0, 16, 56)
    # x = (1, 0.5) at level 0: pos = (2.5, 1.5) -> vertex (2, 1): 2 + 1*3 = 5.
    assert tcnn_readout(enc, [[1.0, 0.5]])[0][0] == 5
    # Linear at x = (1, 0): pos (2.5, 0.5), cell (2, 0), frac (.5, .5): vertex 3 on axis 0 is past
    # the grid and tcnn wraps it: rows (2, 3, 2 + 3, 3 + 3) mod 16 = (2, 3, 5, 6), mean 4.
    linear = MultiResHashGrid(2, 3, 1, 7, 3, per_level_scale=2.0, layout="tcnn").double()
    assert tcnn_readout(linear, [[1.0, 0.0]])[0][0] == 4


def test_tcnn_scale_is_computed_in_float32_and_params_round_trip():
    enc = MultiResHashGrid(3, 5, 2, 12, 16, per_level_scale=1.5, layout="tcnn")
    for level in range(5):
        scale = torch.exp2(torch.tensor(level, dtype=torch.float32) * torch.log2(torch.tensor(1.5))) * 16 - 1
        assert enc.resolutions[level] == (math.ceil(scale.item()) + 1,) * 3
    params = torch.randn(enc.tcnn_params().numel())
    enc.load_tcnn_params(params)
    assert torch.equal(enc.tcnn_params(), params)
    assert torch.equal(enc.embedding.weight[enc.level_offsets[1]], params[2 * enc.level_offsets[1]:][:2])
    with pytest.raises(ValueError, match="expected"):
        enc.load_tcnn_params(params[:-1])
    with pytest.raises(ValueError, match="layout='tcnn'"):
        MultiResHashGrid(2).tcnn_params()


# --- gradients -------------------------------------------------------------------------------

@pytest.mark.parametrize("interpolation", ["linear", "smoothstep"])
@pytest.mark.parametrize("dim", [1, 2, 3])
def test_gradcheck_and_gradgradcheck(dim, interpolation):
    enc = make(dim, interpolation, n_levels=3, log2_t=6, base=2, finest=12)
    table = enc.embedding.weight
    x = torch.rand(6, dim, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 0.9 + 0.05
    x.requires_grad_(True)
    assert torch.autograd.gradcheck(raw(enc), (x, table))
    assert torch.autograd.gradgradcheck(raw(enc), (x, table))
    assert torch.autograd.gradcheck(enc, (x,))


def test_nearest_gradients():
    enc = make(2, "nearest", n_levels=3, log2_t=6, base=2, finest=12)
    x = torch.rand(6, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: raw(enc)(x, t), (enc.embedding.weight,))
    enc(x).sum().backward()
    assert torch.equal(x.grad, torch.zeros_like(x))


def test_eikonal_loss_backpropagates_like_the_reference():
    """(|grad_x f| - 1)^2 on an SDF: second-order gradients reach the tables and the MLP."""
    torch.manual_seed(0)
    dim, args = 3, (3, 7, 2, 16)
    enc = make(3, n_levels=3, log2_t=7, base=2, finest=16)
    mlp = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Softplus(), torch.nn.Linear(16, 1)).double()
    x = torch.rand(32, 3, dtype=torch.float64, requires_grad=True)

    def eikonal(features_fn):
        sdf = mlp(features_fn(x))
        (grad,) = torch.autograd.grad(sdf.sum(), x, create_graph=True)
        return ((grad.norm(dim=-1) - 1) ** 2).mean()

    # (the output bias does not change grad_x f, so it gets no gradient)
    params = [enc.embedding.weight, mlp[0].weight, mlp[0].bias, mlp[2].weight]
    loss = eikonal(enc)
    grads = torch.autograd.grad(loss, params)
    ref_loss = eikonal(lambda x: reference_encode(x, enc.embedding.weight, dim, *args, "linear"))
    ref_grads = torch.autograd.grad(ref_loss, params)
    torch.testing.assert_close(loss, ref_loss)
    assert grads[0].abs().sum() > 0
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want)


# --- inputs, shapes, dtypes, modules ---------------------------------------------------------

def test_bad_inputs_clamping_and_nan():
    enc = make(2)
    with pytest.raises(TypeError, match=r"floating-point tensor of shape \(\.\.\., 2\)"):
        enc(torch.zeros(4, 2, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"expects x of shape \(\.\.\., 2\), got \(4, 3\)"):
        enc(torch.zeros(4, 3, dtype=torch.float64))
    x = torch.tensor([[-0.5, 1.5], [0.3, float("nan")], [float("inf"), 0.2]], dtype=torch.float64)
    out = enc(x)
    torch.testing.assert_close(out[0], enc(torch.tensor([[0.0, 1.0]], dtype=torch.float64))[0])
    assert torch.isnan(out[1]).all() and not torch.isnan(out[[0, 2]]).any()
    torch.testing.assert_close(out[2], enc(torch.tensor([[1.0, 0.2]], dtype=torch.float64))[0])
    x = x.requires_grad_(True)
    enc(x)[[0, 2]].sum().backward()
    assert torch.isfinite(enc.embedding.weight.grad).all() and torch.isfinite(x.grad).all()
    assert enc(torch.zeros(0, 2, dtype=torch.float64)).shape == (0, enc.output_dim)


@pytest.mark.parametrize("shape", [(), (5,), (2, 3, 4)])
def test_batch_shapes(shape):
    enc = make(3)
    x = torch.rand(*shape, 3, dtype=torch.float64)
    out = enc(x)
    assert out.shape == (*shape, enc.output_dim)
    torch.testing.assert_close(out.reshape(-1, enc.output_dim), enc(x.reshape(-1, 3)))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_tables(dtype):
    enc = make(2, dtype=torch.float32)
    x = torch.rand(100, 2)
    expected = enc(x)
    enc = enc.to(dtype)
    out = enc(x)  # float32 positions, half-precision features
    assert out.dtype == dtype and enc(x.to(dtype)).dtype == dtype
    torch.testing.assert_close(out.float(), expected, atol=2e-2, rtol=2e-2)
    out.float().sum().backward()
    assert enc.embedding.weight.grad.dtype == dtype
    assert enc.resolutions == make(2).resolutions and enc(torch.rand(4, 2)).isfinite().all()


def test_float32_matches_float64():
    enc64 = make(3, n_levels=6, log2_t=12, base=4, finest=300)
    enc32 = make(3, n_levels=6, log2_t=12, base=4, finest=300, dtype=torch.float32)
    enc32.load_state_dict(enc64.state_dict())
    x = torch.rand(500, 3)
    # float32 positions x * N carry ~N * 2**-24 of error; features here span [-1, 1]
    torch.testing.assert_close(enc32(x).double(), enc64(x.double()), atol=1e-4, rtol=0)


def test_autocast_and_state_dict():
    enc = make(2, dtype=torch.float32)
    mlp = torch.nn.Linear(enc.output_dim, 3)
    x = torch.rand(16, 2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = mlp(enc(x))
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert enc.embedding.weight.grad is not None
    assert list(enc.state_dict()) == ["embedding.weight"]
    other = make(2, dtype=torch.float32)
    other.load_state_dict(enc.state_dict())
    torch.testing.assert_close(other(x), enc(x))


def test_compile_matches_eager():
    enc = make(2, n_levels=4, log2_t=8, base=4, finest=64, dtype=torch.float32)
    compiled = torch.compile(enc, fullgraph=True)
    x = torch.rand(256, 2)
    eager_out = enc(x)
    eager_out.square().sum().backward()
    eager_grad = enc.embedding.weight.grad.clone()
    enc.zero_grad()
    out = compiled(x)
    out.square().sum().backward()
    torch.testing.assert_close(out, eager_out)
    torch.testing.assert_close(enc.embedding.weight.grad, eager_grad)


@pytest.mark.skipif(encoding._table_grad_op is None, reason="torch.library.custom_op needs torch >= 2.4")
def test_a_second_copy_of_the_file_shares_the_custom_op():
    spec = importlib.util.spec_from_file_location("encoding_copy", encoding.__file__)
    copy = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(copy)      # registers nothing new, and does not fail
    enc = make(2, n_levels=3, log2_t=6, base=2, finest=20, dtype=torch.float32)
    x, grad_out = torch.rand(40, 2), torch.randn(40, enc.output_dim)
    nan, table, grid = torch.zeros(40, dtype=torch.bool), enc.embedding.weight.detach(), enc._grid(x.device)
    tensors, flat = encoding._flatten_grid(grid)
    expected = encoding._encode_backward(x, table, nan, grid, grad_out, False, True)[1]
    torch.testing.assert_close(copy._table_grad_op(x, table, nan, grad_out, tensors, flat, "linear"), expected)


def test_frequency_encoding():
    enc = Frequency(2, n_levels=3)
    x = torch.tensor([[0.25, 0.5]], dtype=torch.float64)
    expected = []
    for value in (0.25, 0.5):
        expected += [math.sin(2**k * math.pi * value) for k in range(3)]
        expected += [math.cos(2**k * math.pi * value) for k in range(3)]
    torch.testing.assert_close(enc(x), torch.tensor([expected], dtype=torch.float64))
    assert enc.output_dim == 12 and enc(torch.rand(2, 3, 2)).shape == (2, 3, 12)
    with pytest.raises(ValueError):
        enc(torch.rand(4, 3))


def test_chunked_passes_match_one_pass():
    enc = make(3, n_levels=4, log2_t=9, base=3, finest=50)
    x = torch.rand(50, 3, dtype=torch.float64, requires_grad=True)
    enc.chunk_size = 10**9
    one_pass = enc(x)
    (grad_one,) = torch.autograd.grad(one_pass.square().sum(), x)
    enc.chunk_size = 7
    for lookups in (10**6, 14, 1):   # all levels of a group per pass, two, one
        enc.CPU_LOOKUPS_PER_PASS = lookups
        chunked = enc(x)
        (grad_chunked,) = torch.autograd.grad(chunked.square().sum(), x)
        torch.testing.assert_close(chunked, one_pass)
        torch.testing.assert_close(grad_chunked, grad_one)
    small = make(2, n_levels=2, log2_t=5, base=2, finest=6)
    small.chunk_size = 2
    small.CPU_LOOKUPS_PER_PASS = 2
    x2 = torch.rand(5, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradgradcheck(raw(small), (x2, small.embedding.weight))


def test_output_layout_and_gradients_in_any_layout():
    """Eager output has the strides of a transposed (output_dim, N) matrix; the gradient may
    arrive in that layout (from nn.Linear), row-major (an elementwise loss) or strided."""
    enc = make(2, n_levels=5, log2_t=8, base=3, finest=40)
    enc.CPU_LOOKUPS_PER_PASS = 64   # several passes per level
    x = torch.rand(300, 2, dtype=torch.float64, requires_grad=True)
    out = enc(x)
    assert out.t().is_contiguous()
    linear = torch.nn.Linear(enc.output_dim, 3, dtype=torch.float64)
    row_major = torch.randn(300, enc.output_dim, dtype=torch.float64)
    losses = {
        "linear": lambda y: linear(y).square().sum(),
        "row-major": lambda y: (y * row_major).sum(),
        "strided": lambda y: (y[:, ::2] * row_major[:, ::2]).sum() + y[::3].sum(),
        "in place": lambda y: y.relu_().square().sum(),   # the output is not a view
    }
    for name, loss in losses.items():
        grads = torch.autograd.grad(loss(enc(x)), (x, enc.embedding.weight))
        reference = reference_encode(x, enc.embedding.weight, 2, 5, 8, 3, 40, "linear")
        expected = torch.autograd.grad(loss(reference), (x, enc.embedding.weight))
        for got, want in zip(grads, expected):
            torch.testing.assert_close(got, want, msg=name)


def test_no_reference_cycles():
    """Cycles would hold every pass's temporaries (hundreds of MB) until the GC runs."""
    enc = make(3, n_levels=4, log2_t=9, base=3, finest=50, dtype=torch.float32)
    x = torch.rand(2000, 3, requires_grad=True)
    gc.collect()
    gc.disable()
    try:
        enc(x).square().sum().backward()
        with torch.no_grad():
            enc(x)
        assert gc.collect() == 0
    finally:
        gc.enable()


def reference_tcnn(x, table, dim, n_levels, log2_t, base, per_level_scale):
    """tcnn's HashGrid from its published formulas: float32 scale, +0.5 offset, rows padded to
    a multiple of 8 and capped at T, dense index (axis 0 fastest) modulo rows, else the hash."""
    outputs, offset = [], 0
    for level in range(n_levels):
        scale = (torch.exp2(torch.tensor(level, dtype=torch.float32) * torch.log2(torch.tensor(per_level_scale)))
                 * base - 1).item()
        resolution = math.ceil(scale) + 1
        rows = min(-(-resolution**dim // 8) * 8, 2**log2_t)
        hashed = resolution**dim > rows
        pos = x * scale + 0.5
        cell = torch.floor(pos)
        frac = pos - cell
        level_out = 0
        for corner in itertools.product((0, 1), repeat=dim):
            vertex = (cell + torch.tensor(corner, dtype=torch.float64)).long()
            if hashed:
                index = torch.zeros(len(x), dtype=torch.int64)
                for d in range(dim):
                    index = index ^ ((vertex[:, d] * PAPER_PRIMES[d]) % 2**32)
            else:
                index = sum(vertex[:, d] * resolution**d for d in range(dim))
            weight = torch.prod(torch.where(torch.tensor(corner) == 1, frac, 1 - frac), dim=-1, keepdim=True)
            level_out = level_out + weight * table[offset + index % rows]
        outputs.append(level_out)
        offset += rows
    return torch.cat(outputs, dim=-1)


@pytest.mark.parametrize("dim", [2, 3])
def test_tcnn_layout_matches_its_formulas(dim):
    enc = make(dim, n_levels=4, log2_t=9, base=6, finest=None, per_level_scale=1.7, layout="tcnn")
    assert enc.hashed_levels and len(enc.hashed_levels) < 4
    x = torch.rand(200, dim, dtype=torch.float64)
    x[0], x[1] = 0.0, 1.0
    expected = reference_tcnn(x, enc.embedding.weight.detach(), dim, 4, 9, 6, 1.7)
    torch.testing.assert_close(enc(x), expected, atol=1e-6, rtol=0)
