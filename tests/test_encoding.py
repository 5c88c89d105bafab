"""MultiResHashGrid and Frequency against a float64 reference written from the formulas."""
import gc
import importlib.util
import itertools
import math
import re

import pytest
import torch

import encoding
from conftest import encoder, n_passes
from encoding import Frequency, MultiResHashGrid



def raw(enc):
    """enc (any implementation) as a function of (x, table), for gradcheck."""
    return lambda x, t: torch.func.functional_call(enc, {"embedding.weight": t}, (x,))


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


def reference_levels(dim, n_levels, log2_t, base, finest, periodic=None):
    """Paper layout: per level (cells per axis, rows, hashed), from N_l = floor(N_min * b**l);
    a periodic axis stores N_l vertices (vertex N_l is vertex 0), others N_l + 1."""
    periodic = periodic or (False,) * dim
    levels = []
    for level in range(n_levels):
        cells = []
        for d in range(dim):
            b_min = base[d] if isinstance(base, (list, tuple)) else base
            b_max = finest[d] if isinstance(finest, (list, tuple)) else finest
            growth = math.exp((math.log(b_max) - math.log(b_min)) / (n_levels - 1)) if n_levels > 1 else 1.0
            cells.append(math.floor(b_min * growth ** level + 1e-9))
        vertices = math.prod(c if p else c + 1 for c, p in zip(cells, periodic))
        hashed = vertices > 2**log2_t
        levels.append((cells, 2**log2_t if hashed else vertices, hashed))
    return levels


def reference_encode(x, table, dim, n_levels, log2_t, base, finest, interpolation, periodic=None):
    """Plain loops over levels and corners, float64 torch ops (differentiable in x and table)."""
    primes = reference_primes(dim)
    periodic = periodic or (False,) * dim
    outputs, offset = [], 0
    for cells, rows, hashed in reference_levels(dim, n_levels, log2_t, base, finest, periodic):
        n = torch.tensor(cells, dtype=torch.float64)
        pos = x * n

        def row(vertex):  # vertex: (P, dim) int64
            wrap = torch.tensor(periodic)
            vertex = torch.where(wrap, vertex % torch.tensor(cells), vertex)
            if hashed:
                h = torch.zeros(vertex.shape[0], dtype=torch.int64)
                for d in range(dim):
                    h = h ^ ((vertex[:, d] * primes[d]) % 2**32)
                return offset + h % rows
            index, stride = torch.zeros(vertex.shape[0], dtype=torch.int64), 1
            for d in range(dim):
                index = index + vertex[:, d] * stride
                stride *= cells[d] if periodic[d] else cells[d] + 1
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
    enc = encoder(dim, n_levels, 2, log2_t, base, finest, interpolation=interpolation, **kw).to(dtype)
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


# --- the formula functions, against hand-computed values -----------------------------------

def test_resolution_formulas_by_hand():
    enc = MultiResHashGrid(1, 6, 2, 20, 16, 512)            # b = exp(ln(512 / 16) / 5) = 2
    assert enc.per_level_scale[0] == pytest.approx(2.0)
    assert [n for n, in enc.resolutions] == [16, 32, 64, 128, 256, 512]     # N_min * b**l
    assert MultiResHashGrid(1, 1, 2, 8, 5, 9).per_level_scale == (1.0,)     # one level: b = 1
    enc = MultiResHashGrid(1, 3, 2, 8, 3, per_level_scale=1.5)
    assert [n for n, in enc.resolutions] == [3, 4, 6]                # floor(4.5), floor(6.75)
    # exp/log round-off lands 16 * b**15 a hair below 8192; the paper means 8192
    assert MultiResHashGrid(1, 16, 2, 8, 16, 8192).resolutions[-1] == (8192,)
    # tcnn: exp2(l * log2(b)) * N_min - 1 (exact here), then ceil + 1 vertices
    assert [encoding._tcnn_scale(16, 2.0, level) for level in range(3)] == [15.0, 31.0, 63.0]
    # float32 at every step, b included: 1.1**7 * 3 - 1 in float32 is not its float64 value
    scale = encoding._tcnn_scale(3, 1.1, 7)
    f32 = torch.exp2(7 * torch.log2(torch.tensor(1.1, device="cpu"))) * 3 - 1   # float32
    assert scale == f32.item() and scale != 1.1**7 * 3 - 1 and abs(scale - (1.1**7 * 3 - 1)) < 1e-5


def test_row_formulas_by_hand():
    def rows(base, dim, layout, grid_type, levels=1, growth=2.0):   # T = 128
        plan = encoding._plan_levels((float(base),) * dim, (growth,) * dim, levels, 7, layout,
                                     grid_type, (False,) * dim)
        return [level.rows for level in plan]
    # paper: every vertex ((N + 1)**D) if they fit in T or the grid is dense, else T
    assert rows(2, 2, "paper", "hash") == [9] and rows(199, 1, "paper", "hash") == [128]
    assert rows(199, 1, "paper", "dense") == [200]
    # tcnn (N_min**D vertices at level 0): the next multiple of 8, at most T when hashed
    assert rows(3, 2, "tcnn", "hash") == [16] and rows(12, 2, "tcnn", "hash") == [128]
    assert rows(12, 2, "tcnn", "dense") == [144]                 # not capped by T
    assert rows(3, 19, "tcnn", "dense") == [1162261472]          # 3**19 up to a multiple of 8
    assert rows(50000, 2, "tcnn", "dense") == [2**31]            # at most 2**31
    assert rows(9, 2, "tcnn", "tiled", 2) == [81, 81]            # at most N_min**D (18**2 at l=1)
    dense = MultiResHashGrid(3, 1, 2, 19, (2, 3, 4), (2, 3, 4))       # V = (3, 4, 5) vertices
    assert dense._level_groups[0].mult.view(-1).tolist() == [1, 3, 12]  # axis 0 fastest


def test_weight_formulas_by_hand():
    frac = torch.tensor([0.25], dtype=torch.float64)
    high, slope = encoding._upper_weight(frac, "linear")
    assert (high.item(), slope) == (0.25, None)
    high, slope = encoding._upper_weight(frac, "smoothstep")
    # S(t) = t^2 (3 - 2t) = 0.15625, S'(t) = 6t(1 - t) = 1.125
    assert (high.item(), slope.item()) == (0.15625, 1.125)


def formula_rows(enc, level, x, scale, float32):
    """The module docstring's formulas in Python numbers, per point and cell corner: (rows,
    weights) of `level` of enc for x (n, D) -> {corner: ([row] * n, [weight] * n)}; float32:
    tcnn's positions rounded as its float32 fmaf."""
    dim, nearest, tcnn = enc.input_dim, enc.interpolation == "nearest", enc.layout == "tcnn"
    resolution, rows, offset = enc.resolutions[level], enc.rows_per_level[level], enc.level_offsets[level]
    vertices = [n if tcnn or p else n + 1 for n, p in zip(resolution, enc.periodic)]
    strides = [math.prod(vertices[:d]) for d in range(dim)]
    primes, hashed = encoding.hash_primes(dim), level in enc.hashed_levels
    result = {}
    for corner in range(1 if nearest else 2**dim):
        corner_rows, corner_weights = [], []
        for point in x.tolist():
            index, weight = 0, 1.0
            for d in range(dim):
                pos = point[d] * scale[d] + (0.5 if tcnn or nearest else 0.0)
                if tcnn and float32:    # fmaf: one rounding of the exact product and sum
                    pos = float(torch.tensor(pos, dtype=torch.float32))
                cell = math.floor(pos) if tcnn else min(math.floor(pos), resolution[d] - (not nearest))
                frac, bit = pos - cell, (corner >> d) & 1
                vertex = (cell + bit) % resolution[d] if enc.periodic[d] else cell + bit
                index = index ^ (vertex * primes[d] % 2**32) if hashed else index + vertex * strides[d]
                s = frac * frac * (3 - 2 * frac) if enc.interpolation == "smoothstep" else frac
                weight *= s if bit else 1 - s
            corner_rows.append(offset + index % rows)
            corner_weights.append(weight)
        result[corner] = (corner_rows, corner_weights)
    return result


SHORTCUT_CASES = {
    # hashed levels whose axis-0 vertices reach T (no direct term) and below it (direct)
    "hashed 1-D": (1, dict(n_levels=3, log2_hashmap_size=4, base_resolution=6, finest_resolution=40)),
    "hashed 3-D": (3, dict(n_levels=4, log2_hashmap_size=7, base_resolution=2, finest_resolution=30)),
    "dense 2-D smoothstep": (2, dict(n_levels=3, log2_hashmap_size=12, base_resolution=3, finest_resolution=20,
                                     interpolation="smoothstep")),
    "periodic": (2, dict(n_levels=4, log2_hashmap_size=6, base_resolution=3, finest_resolution=30,
                         periodic=(True, False))),
    "periodic nearest": (2, dict(n_levels=3, log2_hashmap_size=6, base_resolution=3, finest_resolution=30,
                                 periodic=(False, True), interpolation="nearest")),
    "tcnn hash": (2, dict(n_levels=4, log2_hashmap_size=6, base_resolution=3, per_level_scale=1.7, layout="tcnn")),
    "tcnn dense": (2, dict(n_levels=3, base_resolution=3, per_level_scale=1.5, layout="tcnn", grid_type="dense")),
    "tcnn tiled": (2, dict(n_levels=3, log2_hashmap_size=6, base_resolution=3, per_level_scale=1.7, layout="tcnn",
                           grid_type="tiled")),
}


@pytest.mark.parametrize("case", list(SHORTCUT_CASES))
def test_corner_rows_and_weights_equal_the_formulas(case):
    """_axis_terms and _corners take shortcuts: the upper vertex's term from the lower one's by
    one add, int32 products with each prime's low 32 bits as a signed number, axis 0's term
    without a product (and without the mask where its vertices stay below T, the offset added
    first), tcnn's fmaf through float64, the tcnn dense wrap after the XOR/sum. Every corner's
    row and weight must be the formulas', in int32 and in int64 (the CPU branch's threaded
    gathers), with the level offsets folded in or not."""
    dim, kwargs = SHORTCUT_CASES[case]
    enc = MultiResHashGrid(dim, **kwargs)
    x = torch.rand(23, dim, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    x[0], x[1] = 0.0, 1.0
    x[2, 0] = 0.25
    for dtype in (torch.float64, torch.float32):
        for group in enc._level_groups:
            n_levels = group.stop - group.start
            scales = group.scale[:, :, 0].t().double().tolist()       # float32 scales, per level
            expected = [formula_rows(enc, group.start + g, x.to(dtype).double(), scales[g], dtype == torch.float32)
                        for g in range(n_levels)]
            for index_dtype, offset in ((None, group.offset), (torch.int64, group.offset), (None, None)):
                terms, fracs, weights = encoding._axis_terms(x.to(dtype).t().contiguous(), group, 0, n_levels,
                                                            offset, index_dtype)
                corners = list(encoding._corners(terms, weights, group, 0, n_levels, offset))
                assert sorted(c for c, _, _ in corners) == list(range(len(expected[0])))
                for corner, index, weight in corners:
                    assert index.dtype == (index_dtype or group.offset.dtype)
                    for g in range(n_levels):
                        want_rows, want_weights = expected[g][corner]
                        base = group.rows_start if offset is not None else enc.level_offsets[group.start + g]
                        assert (index[g] + base).tolist() == want_rows, (case, corner, g)
                        if weight is not None:
                            torch.testing.assert_close(weight[g].double(), torch.tensor(want_weights, dtype=torch.float64),
                                                       atol=1e-5 if dtype == torch.float32 else 1e-12, rtol=0)


def test_level_plan_by_hand():
    # paper, 2-D, N = 2, 4, 8 (b = 2), T = 16: (N + 1)**2 = 9 rows dense, then 25, 81 > 16 hashed
    levels = encoding._plan_levels((2.0, 2.0), (2.0, 2.0), 3, 4, "paper", "hash", (False, False))
    assert [lv.resolution for lv in levels] == [(2, 2), (4, 4), (8, 8)]
    assert [(lv.rows, lv.offset, lv.hashed) for lv in levels] == [(9, 0, False), (16, 9, True),
                                                                   (16, 25, True)]
    enc = MultiResHashGrid(2, 3, 1, 4, 2, 8)
    assert enc.rows_per_level == (9, 16, 16) and enc.level_offsets == (0, 9, 25)
    assert enc.hashed_levels == (1, 2)


def test_dtype_casts_keep_the_index_buffers():
    enc = MultiResHashGrid(2, 4, 2, 8, 4, per_level_scale=1.37, layout="tcnn")
    before = {name: buffer.clone() for name, buffer in enc.named_buffers()}
    for cast in (torch.nn.Module.half, torch.nn.Module.double, lambda m: m.to(torch.bfloat16)):
        cast(enc)
        for name, buffer in enc.named_buffers():
            assert buffer.dtype == before[name].dtype and torch.equal(buffer, before[name]), name
    assert list(enc.state_dict()) == ["embedding.weight"]


# --- robustness: invalid configs fail at construction, big tables initialise once ----------

def test_base_resolution_below_one_is_rejected():
    for base in (0.5, (2, 0.9), 0):
        with pytest.raises(ValueError, match="base_resolution"):
            MultiResHashGrid(2, 4, 2, 8, base, 64)
    with pytest.raises(ValueError, match="base_resolution"):
        MultiResHashGrid(2, 4, 2, 8, 0.5, per_level_scale=2.0, layout="tcnn")
    enc = MultiResHashGrid(2, 3, 2, 8, 1, 8)             # 1 cell at the coarsest level is fine
    assert enc.resolutions[0] == (1, 1) and enc(torch.rand(5, 2)).isfinite().all()


def test_table_is_initialised_once_uniformly(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("nn.Embedding's default init ran (minutes on a 2**31-row table)")

    monkeypatch.setattr(torch.nn.init, "normal_", refuse)
    torch.manual_seed(0)
    weight = MultiResHashGrid(2, 4, 2, 12, 4, 64).embedding.weight.detach()
    assert weight.abs().max() <= 1e-4 and weight.min() < -0.9e-4 and weight.max() > 0.9e-4
    assert abs(weight.mean().item()) < 1e-5 and weight.dtype == torch.float32


def test_dimension_limit():
    with pytest.raises(ValueError, match=r"2\*\*40 cell corners.*nearest"):
        MultiResHashGrid(40, 2, 1, 8, 2, 4)
    with pytest.raises(ValueError, match="dim=16"):
        MultiResHashGrid(17, 2, 1, 8, 2, 4, interpolation="smoothstep")
    MultiResHashGrid(16, 1, 1, 8, 1, 1)                   # the largest interpolated dim
    enc = MultiResHashGrid(40, 2, 1, 8, 2, 4, interpolation="nearest")   # one vertex per point
    assert enc(torch.rand(10, 40)).shape == (10, 2)


@pytest.mark.parametrize("kwargs", [dict(), dict(log2_hashmap_size=12, finest_resolution=(40, 90)),
                                    dict(per_level_scale=1.5, layout="tcnn", n_features_per_level=4)])
def test_table_shape_without_allocating(kwargs):
    enc = MultiResHashGrid(2, **kwargs)
    assert MultiResHashGrid.table_shape(2, **kwargs) == tuple(enc.embedding.weight.shape)
    # over 10 levels of 2**31 rows (160+ GiB of float32 pairs) are planned, not allocated
    rows, features = MultiResHashGrid.table_shape(3, 16, 2, 31, 16, 2**20)
    assert features == 2 and rows > 10 * 2**31
    with pytest.raises(ValueError, match="base_resolution"):
        MultiResHashGrid.table_shape(2, base_resolution=0.5)


def test_meta_device_construction_then_to_empty():
    with torch.device("meta"):
        enc = MultiResHashGrid(2, 4, 2, 8, 3, per_level_scale=1.7, layout="tcnn")
    assert enc.embedding.weight.is_meta
    enc.to_empty(device=torch.empty(0).device)          # the default device
    reference = MultiResHashGrid(2, 4, 2, 8, 3, per_level_scale=1.7, layout="tcnn")
    enc.load_state_dict(reference.state_dict())
    x = torch.rand(64, 2)
    assert torch.equal(enc(x), reference(x))


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


SECOND_ORDER_CASES = {"paper": {}, "periodic": dict(periodic=(True, False)), "tcnn": dict(layout="tcnn")}


@pytest.mark.parametrize("case", list(SECOND_ORDER_CASES))
@pytest.mark.parametrize("interpolation", ["linear", "smoothstep", "nearest"])
@pytest.mark.parametrize("implementation", ["fast", "device", "reference"])
def test_second_order_gradgradcheck(implementation, interpolation, case, monkeypatch):
    """The second-order path (_HashGridBackward) in float64, chunked (3 points per pass):
    "nearest" has no x-derivative, linear and smoothstep their cross and diagonal terms."""
    enc = make(2, interpolation, n_levels=3, log2_t=5, base=2, finest=12,
               implementation=implementation, **SECOND_ORDER_CASES[case])
    if implementation == "device":
        device_branch(enc, monkeypatch)   # (its check: no CPU speed trick runs)
    enc._chunk_size = 3
    x = torch.rand(5, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) * 0.9 + 0.05
    x.requires_grad_(True)
    assert torch.autograd.gradgradcheck(raw(enc), (x, enc.embedding.weight))


def test_third_order_falls_back_to_autograd():
    """The second-order step's own backward, differentiated again (third order), through
    autograd of its plain ops: gradgradcheck of grad_x."""
    enc = make(2, "smoothstep", n_levels=2, log2_t=5, base=2, finest=6)
    x = torch.rand(3, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(2)) * 0.9 + 0.05
    weights = torch.randn(3, enc.output_dim, dtype=torch.float64, generator=torch.Generator().manual_seed(3))

    def grad_x(x, table):
        (g,) = torch.autograd.grad((raw(enc)(x, table) * weights).sum(), x, create_graph=True)
        return g
    assert torch.autograd.gradgradcheck(grad_x, (x.requires_grad_(True), enc.embedding.weight))


@pytest.mark.parametrize("implementation", ["fast", "device"])
def test_eikonal_step_with_a_nan_point(implementation, monkeypatch):
    """A NaN point in an eikonal step: NaN features, and every gradient as without the point
    (even where the gradient arriving at its grad_x is not zero)."""
    torch.manual_seed(0)
    enc = make(3, "smoothstep", n_levels=3, log2_t=7, base=2, finest=16)
    if implementation == "device":
        device_branch(enc, monkeypatch, 4)
    enc._chunk_size = 4
    mlp = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Softplus(), torch.nn.Linear(8, 1)).double()
    x = torch.rand(9, 3, dtype=torch.float64)
    x_nan = x.clone()
    x_nan[4, 1] = float("nan")
    keep = [i for i in range(9) if i != 4]

    def step(points):
        enc.zero_grad()
        mlp.zero_grad()
        points = points.clone().requires_grad_(True)
        y = enc(points)
        (g,) = torch.autograd.grad(mlp(torch.where(y.isnan(), 0.0, y)).sum(), points, create_graph=True)
        ((g - 1) ** 2).sum().backward()
        # (the output bias does not change g: no gradient)
        return y, g, points.grad, [p.grad.clone() for p in (enc.embedding.weight, mlp[0].weight, mlp[0].bias, mlp[2].weight)]

    y, g, x_grad, grads = step(x_nan)
    y_want, g_want, x_grad_want, grads_want = step(x[keep])
    assert y[4].isnan().all() and torch.equal(g[4], torch.zeros(3, dtype=torch.float64))
    assert torch.equal(x_grad[4], torch.zeros(3, dtype=torch.float64))
    torch.testing.assert_close(y[keep], y_want)
    torch.testing.assert_close(g[keep], g_want)
    torch.testing.assert_close(x_grad[keep], x_grad_want)
    for got, want in zip(grads, grads_want):
        torch.testing.assert_close(got, want)


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


@pytest.mark.skipif(not hasattr(torch._dynamo.config, "trace_autograd_ops"),
                    reason="dynamo traces torch.autograd.grad from torch 2.9 on")
def test_compiled_eikonal_step_matches_eager():
    """torch.compile(fullgraph=True) of a whole eikonal step, autograd.grad inside: the loss and
    the gradients of eager (there x's gradient goes through the traced ops, which AOTAutograd
    differentiates twice; a custom Function it differentiates once)."""
    torch.manual_seed(0)
    enc = make(3, "smoothstep", n_levels=3, log2_t=7, base=2, finest=16)
    mlp = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Softplus(), torch.nn.Linear(16, 1)).double()
    x = torch.rand(64, 3, dtype=torch.float64)

    def eikonal(points):
        (g,) = torch.autograd.grad(mlp(enc(points)).sum(), points, create_graph=True)
        return ((g.norm(dim=-1) - 1) ** 2).mean()

    results = []
    for step in (eikonal, torch.compile(eikonal, fullgraph=True)):
        enc.zero_grad()
        mlp.zero_grad()
        points = x.clone().requires_grad_(True)
        with torch._dynamo.config.patch(trace_autograd_ops=True):
            loss = step(points)
        loss.backward()
        results.append([loss, points.grad, enc.embedding.weight.grad, mlp[0].weight.grad])
    assert results[0][2].abs().sum() > 0
    for got, want in zip(*results[::-1]):
        torch.testing.assert_close(got, want)


@pytest.mark.skipif(encoding._table_grad_op is None, reason="torch.library.custom_op needs torch >= 2.4")
def test_a_second_copy_of_the_file_shares_the_custom_op():
    spec = importlib.util.spec_from_file_location("encoding_copy", encoding.__file__)
    copy = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(copy)      # registers nothing new, and does not fail
    enc = make(2, n_levels=3, log2_t=6, base=2, finest=20, dtype=torch.float32)
    x, grad_out = torch.rand(40, 2), torch.randn(40, enc.output_dim)
    table = enc.embedding.weight
    (expected,) = torch.autograd.grad((enc(x) * grad_out).sum(), table)
    tensors, ints = encoding._LevelGroup.op_args(enc._level_groups)
    nan = torch.zeros(40, dtype=torch.bool)
    got = copy._table_grad_op(x, table.detach(), nan, grad_out, tensors, ints, "linear")
    torch.testing.assert_close(got, expected)


def test_frequency_encoding():
    enc = Frequency(2, n_levels=3)
    x = torch.tensor([[0.25, 0.5]], dtype=torch.float64)
    expected = []
    for value in (0.25, 0.5):
        expected += [math.sin(2**k * math.pi * value) for k in range(3)]
        expected += [math.cos(2**k * math.pi * value) for k in range(3)]
    torch.testing.assert_close(enc(x), torch.tensor([expected], dtype=torch.float64))
    assert enc.output_dim == 12 and enc(torch.rand(2, 3, 2)).shape == (2, 3, 12)
    with pytest.raises(ValueError, match=r"Frequency\(dim=2\) expects x of shape \(\.\.\., 2\)"):
        enc(torch.rand(4, 3))
    with pytest.raises(TypeError, match="Frequency expects a floating-point tensor.*got list"):
        enc([[0.5, 0.5]])


def test_chunked_passes_match_one_pass():
    enc = make(3, n_levels=4, log2_t=9, base=3, finest=50)
    x = torch.rand(50, 3, dtype=torch.float64, requires_grad=True)
    enc._chunk_size = 10**9
    assert n_passes(enc, 50) == 2                   # a dense and a hashed group of 2 levels
    one_pass = enc(x)
    (grad_one,) = torch.autograd.grad(one_pass.square().sum(), x)
    enc._chunk_size = 7
    for lookups, passes in ((10**6, 16), (14, 16), (1, 32)):   # 8 chunks; 2 levels a pass, 1
        enc._cpu_lookups = lookups
        assert n_passes(enc, 50) == passes
        chunked = enc(x)
        (grad_chunked,) = torch.autograd.grad(chunked.square().sum(), x)
        torch.testing.assert_close(chunked, one_pass)
        torch.testing.assert_close(grad_chunked, grad_one)
    small = make(2, n_levels=2, log2_t=5, base=2, finest=6)
    small._chunk_size = 2
    small._cpu_lookups = 2
    x2 = torch.rand(5, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradgradcheck(raw(small), (x2, small.embedding.weight))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_cpu_passes_on_any_thread_count(threads, dtype):
    """CPU passes split each gather among the intra-op threads and scatter the table gradient
    one level per thread (passes of `threads` levels: at 3 threads, a pass of 3 dense levels
    of 16, 36 and 121 rows, through overlapping view rows): the results must not depend on
    the thread count, nor on point counts that do not divide among the threads."""
    enc = make(2, n_levels=5, log2_t=8, base=3, finest=40, dtype=dtype)   # dense and hashed
    enc._cpu_lookups = 128   # several passes per level
    x = torch.rand(301, 2, dtype=dtype)
    weights = torch.randn(301, enc.output_dim, dtype=torch.float64)
    table = enc.embedding.weight
    reference = reference_encode(x.double(), table.double(), 2, 5, 8, 3, 40, "linear")
    (expected,) = torch.autograd.grad((reference * weights).sum(), table)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        out = enc(x)
        (got,) = torch.autograd.grad((out.double() * weights).sum(), table)
    finally:
        torch.set_num_threads(before)
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else {}
    torch.testing.assert_close(out.double(), reference.detach(), **tol)
    torch.testing.assert_close(got.double(), expected.double(), **tol)


@pytest.mark.parametrize("implementation", ["fast", "device"])
@pytest.mark.parametrize("feature_major", [False, True])
def test_output_layout_and_gradients_in_any_layout(feature_major, implementation):
    """The output is row-major (.view works, as on any module's output), or with
    feature_major=True has the strides of a transposed (output_dim, N) matrix; either way the
    gradient may arrive in that layout (from nn.Linear), row-major (an elementwise loss) or
    strided."""
    enc = make(2, n_levels=5, log2_t=8, base=3, finest=40, implementation=implementation,
               feature_major=feature_major)
    enc._cpu_lookups = enc._device_lookups = 64   # several passes per level
    x = torch.rand(300, 2, dtype=torch.float64, requires_grad=True)
    out = enc(x)
    assert out.t().is_contiguous() if feature_major else out.is_contiguous()
    if not feature_major:
        torch.testing.assert_close(out.view(-1), out.reshape(-1))
        torch.testing.assert_close(enc(x.view(20, 15, 2)).view(20, 15, -1), out.view(20, 15, -1))
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


def reference_tcnn(x, table, dim, n_levels, log2_t, base, per_level_scale, grid_type="hash"):
    """tcnn's Grid encodings from their published formulas: float32 scale, +0.5 offset, rows
    padded to a multiple of 8 and capped at T (hash) or base**dim (tiled), dense index (axis 0
    fastest) modulo rows, else the hash."""
    outputs, offset = [], 0
    for level in range(n_levels):
        scale = (torch.exp2(torch.tensor(level, dtype=torch.float32, device="cpu")
                            * torch.log2(torch.tensor(per_level_scale, device="cpu"))) * base - 1).item()
        resolution = math.ceil(scale) + 1
        rows = min(-(-resolution**dim // 8) * 8, 2**31)
        rows = {"hash": min(rows, 2**log2_t), "dense": rows, "tiled": min(rows, base**dim)}[grid_type]
        hashed = grid_type == "hash" and resolution**dim > rows
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


@pytest.mark.parametrize("interpolation", ["linear", "nearest"])
@pytest.mark.parametrize("grid_type", ["dense", "tiled"])
@pytest.mark.parametrize("dim", [2, 3])
def test_dense_and_tiled_grids_match_tcnn_formulas(dim, grid_type, interpolation):
    enc = make(dim, interpolation, n_levels=3, log2_t=4, base=5, finest=None, per_level_scale=1.6,
               layout="tcnn", grid_type=grid_type)
    assert not enc.hashed_levels
    x = torch.rand(200, dim, dtype=torch.float64)
    x[0], x[1] = 0.0, 1.0
    if interpolation == "nearest":
        expected = reference_tcnn_nearest(x, enc, dim, 5, 1.6, grid_type)
    else:
        expected = reference_tcnn(x, enc.embedding.weight.detach(), dim, 3, 4, 5, 1.6, grid_type)
    torch.testing.assert_close(enc(x), expected, atol=1e-6, rtol=0)
    if interpolation == "linear" and dim == 2:    # (3-D: thousands of table entries to perturb)
        assert torch.autograd.gradcheck(raw(enc), (x[2:6].requires_grad_(), enc.embedding.weight))


def reference_tcnn_nearest(x, enc, dim, base, per_level_scale, grid_type):
    """Nearest in tcnn: the vertex floor(x * scale + 0.5), dense index modulo rows."""
    table, outputs = enc.embedding.weight.detach(), []
    for level in range(enc.n_levels):
        scale = (torch.exp2(torch.tensor(level, dtype=torch.float32, device="cpu")
                            * torch.log2(torch.tensor(per_level_scale, device="cpu"))) * base - 1).item()
        resolution = math.ceil(scale) + 1
        vertex = torch.floor(x * scale + 0.5).long()
        index = sum(vertex[:, d] * resolution**d for d in range(dim))
        outputs.append(table[enc.level_offsets[level] + index % enc.rows_per_level[level]])
    return torch.cat(outputs, dim=-1)


def test_dense_grid_rows_and_indices_by_hand():
    # base 3, b = 2, 2-D: level 0 scale 2, 3 vertices per axis, 9 -> 16 rows; level 1 scale 5,
    # 6 per axis, 36 -> 40 rows: every vertex, never capped by T (here 2**4 = 16)
    enc = MultiResHashGrid(2, 2, 1, 4, 3, per_level_scale=2.0, interpolation="nearest",
                           layout="tcnn", grid_type="dense").double()
    assert enc.resolutions == ((3, 3), (6, 6)) and enc.rows_per_level == (16, 40)
    assert enc.level_offsets == (0, 16) and enc.hashed_levels == ()
    # x = (1, 0.5): level 0 pos (2.5, 1.5) -> vertex (2, 1) -> 2 + 1 * 3 = 5;
    # level 1 pos (5.5, 3.0) -> (5, 3) -> 5 + 3 * 6 = 23, + offset 16
    assert tcnn_readout(enc, [[1.0, 0.5]]) == [[5, 16 + 23]]


def test_tiled_grid_rows_and_indices_by_hand():
    # base 4, b = 2, 2-D: resolutions 4, 8, 16 per axis, rows min(res**2, 4**2) = 16 each
    enc = MultiResHashGrid(2, 3, 1, 19, 4, per_level_scale=2.0, interpolation="nearest",
                           layout="tcnn", grid_type="tiled").double()
    assert enc.resolutions == ((4, 4), (8, 8), (16, 16))
    assert enc.rows_per_level == (16, 16, 16) and enc.level_offsets == (0, 16, 32)
    # x = (0.5, 0.75): level 1 scale 7: pos (4.0, 5.75) -> vertex (4, 5) -> 4 + 5 * 8 = 44,
    # mod 16 = 12 (tcnn wraps the whole index, not each axis: that would give 0 + 1 * 4 = 4);
    # level 2 scale 15: pos (8.0, 11.75) -> (8, 11) -> 8 + 11 * 16 = 184, mod 16 = 8
    # level 0 scale 3: pos (2.0, 2.75) -> (2, 2) -> 2 + 2 * 4 = 10
    assert tcnn_readout(enc, [[0.5, 0.75]]) == [[10, 16 + 12, 32 + 8]]
    with pytest.raises(ValueError, match="tiled"):
        MultiResHashGrid(2, grid_type="tiled")                    # paper layout: no tiles
    with pytest.raises(ValueError, match="tiled"):
        MultiResHashGrid(2, base_resolution=4.5, per_level_scale=2.0, layout="tcnn", grid_type="tiled")
    with pytest.raises(ValueError, match="32-bit"):
        MultiResHashGrid(3, 2, 1, 19, 1700, per_level_scale=2.0, layout="tcnn", grid_type="dense")


def test_paper_layout_dense_grid():
    enc = MultiResHashGrid(2, 3, 2, 4, 4, 16, grid_type="dense")
    assert enc.rows_per_level == (25, 81, 289) and enc.hashed_levels == ()
    with pytest.raises(ValueError, match="grid_type"):
        MultiResHashGrid(2, grid_type="sparse")


# instant-ngp's configs/image/base.json, its "encoding" block, as written there
INSTANT_NGP_IMAGE_ENCODING = {
    "otype": "HashGrid",
    "n_levels": 16,
    "n_features_per_level": 2,
    "log2_hashmap_size": 24,
    "base_resolution": 16,
}


def test_instant_ngp_image_config():
    with torch.device("meta"):    # 139,810,048 rows: planned, not allocated
        enc = MultiResHashGrid.from_tcnn_config(2, INSTANT_NGP_IMAGE_ENCODING)
    # per_level_scale defaults to 2: scale 16 * 2**l - 1, resolution 16 * 2**l vertices per
    # axis; (16 * 2**l)**2 rows while that fits in 2**24 (levels 0-8), then 2**24 hashed
    assert enc.resolutions == tuple((16 * 2**l,) * 2 for l in range(16))
    expected_rows = [256 * 4**l for l in range(9)] + [2**24] * 7
    assert list(enc.rows_per_level) == expected_rows and enc.hashed_levels == tuple(range(9, 16))
    assert list(enc.level_offsets) == [sum(expected_rows[:l]) for l in range(16)]
    assert enc.embedding.weight.shape == (139810048, 2) and enc.output_dim == 32
    assert enc.interpolation == "linear" and enc.layout == "tcnn" and enc.grid_type == "hash"


def test_tcnn_config_defaults_and_round_trip():
    enc = MultiResHashGrid.from_tcnn_config(3, {"otype": "HashGrid", "log2_hashmap_size": 12})
    assert (enc.n_levels, enc.n_features_per_level, enc.log2_hashmap_size) == (16, 2, 12)
    assert enc.base_resolution == 16 and enc.per_level_scale == (2.0,) * 3
    assert enc.tcnn_config() == {"otype": "Grid", "type": "Hash", "n_levels": 16,
                                 "n_features_per_level": 2, "base_resolution": 16,
                                 "per_level_scale": 2.0, "interpolation": "Linear",
                                 "hash": "CoherentPrime", "log2_hashmap_size": 12}
    # tcnn's DenseGrid default: per_level_scale = exp(ln(256 / base) / (n_levels - 1)), float32
    dense = MultiResHashGrid.from_tcnn_config(2, {"otype": "DenseGrid", "n_levels": 4, "base_resolution": 4})
    f32 = torch.exp(torch.log(torch.tensor(256 / 4, device="cpu")) / 3).item()
    assert dense.grid_type == "dense" and dense.per_level_scale == (f32,) * 2
    # n_features instead of n_levels; case-insensitive names
    grid = MultiResHashGrid.from_tcnn_config(2, {"otype": "grid", "type": "TILE", "n_features": 8,
                                                 "n_features_per_level": 4, "base_resolution": 8,
                                                 "interpolation": "smoothstep"})
    assert (grid.grid_type, grid.n_levels, grid.interpolation) == ("tiled", 2, "smoothstep")
    for config in ({"otype": "Grid", "type": "Tiled", "n_levels": 3, "n_features_per_level": 4,
                    "base_resolution": 8, "per_level_scale": 1.5, "interpolation": "Smoothstep",
                    "hash": "CoherentPrime"},
                   {"otype": "Grid", "type": "Dense", "n_levels": 2, "n_features_per_level": 1,
                    "base_resolution": 3, "per_level_scale": 1.25, "interpolation": "Nearest",
                    "hash": "CoherentPrime"},
                   dict(enc.tcnn_config())):
        built = MultiResHashGrid.from_tcnn_config(2, config)
        assert built.tcnn_config() == config
        again = MultiResHashGrid.from_tcnn_config(2, built.tcnn_config())
        assert (again.rows_per_level, again.resolutions) == (built.rows_per_level, built.resolutions)
    params = torch.randn(grid.tcnn_params().numel())
    grid.load_tcnn_params(params)
    assert torch.equal(grid.tcnn_params(), params)
    with pytest.raises(ValueError, match="one integer base_resolution"):
        MultiResHashGrid(2, base_resolution=(16, 8), per_level_scale=2.0, layout="tcnn").tcnn_config()
    with pytest.raises(ValueError, match="layout='tcnn'"):
        MultiResHashGrid(2).tcnn_config()


@pytest.mark.parametrize("config, name", [
    ({"otype": "HashGrid", "hash": "Prime"}, "'Prime'"),
    ({"otype": "HashGrid", "n_dims_to_encode": 3}, "n_dims_to_encode=3"),
    ({"otype": "HashGrid", "n_dims_to_encode": 0}, "n_dims_to_encode=0"),
    ({"otype": "HashGrid", "dims_to_encode_begin": 1}, "dims_to_encode_begin"),
    ({"otype": "Frequency", "n_frequencies": 12}, "not a grid encoding: otype 'Frequency'"),
    ({"otype": "OneBlob", "n_bins": 16}, "not a grid encoding: otype 'OneBlob'"),
    ({"otype": "Composite", "nested": []}, "pass one of its nested grid configs"),
    ({"n_levels": 4}, "not a grid encoding: otype None"),
    ({"encoding": {"otype": "Identity"}, "network": {}}, "not a grid encoding: otype 'Identity'"),
    ({"otype": "Grid", "type": "Sparse"}, "'Sparse'"),
    ({"otype": "HashGrid", "interpolation": "Cubic"}, "'Cubic'"),
    ({"otype": "HashGrid", "stochastic_interpolation": True}, "stochastic_interpolation"),
    ({"otype": "HashGrid", "fixed_point_pos": True}, "fixed_point_pos"),
    ({"otype": "HashGrid", "n_features": 32, "n_levels": 16}, "n_features and n_levels"),
    ({"otype": "HashGrid", "n_features": 7}, "n_features=7"),
    ({"otype": "HashGrid", "base_resolution": 16.5}, "base_resolution"),
    ({"otype": "DenseGrid", "n_levels": 1}, "per_level_scale"),
    ({"otype": "HashGrid", "per_level_scale": "2"}, "per_level_scale must be a number, got '2'"),
    ({"otype": "HashGrid", "per_level_scale": float("nan")}, "must be a number, got nan"),
])
def test_unsupported_tcnn_configs_name_the_problem(config, name):
    with pytest.raises(ValueError, match=re.escape(name)):
        MultiResHashGrid.from_tcnn_config(2, config)


# tiny-cuda-nn's samples/mlp_learning_an_image_pytorch.py reads this whole file (data/config_hash.json)
TCNN_SAMPLE_CONFIG = {
    "loss": {"otype": "RelativeL2"},
    "optimizer": {"otype": "Adam", "learning_rate": 1e-2, "beta1": 0.9, "beta2": 0.99,
                  "epsilon": 1e-15, "l2_reg": 1e-6},
    "encoding": {"otype": "HashGrid", "n_levels": 16, "n_features_per_level": 2,
                 "log2_hashmap_size": 15, "base_resolution": 16, "per_level_scale": 1.5,
                 "fixed_point_pos": False},
    "network": {"otype": "FullyFusedMLP", "activation": "ReLU", "output_activation": "None",
                "n_neurons": 64, "n_hidden_layers": 2},
}


def test_tcnn_whole_config_takes_its_encoding():
    whole = MultiResHashGrid.from_tcnn_config(2, TCNN_SAMPLE_CONFIG)
    alone = MultiResHashGrid.from_tcnn_config(2, TCNN_SAMPLE_CONFIG["encoding"])
    assert whole.tcnn_config() == alone.tcnn_config()
    assert whole.tcnn_config()["per_level_scale"] == 1.5 and whole.output_dim == 32
    assert whole.rows_per_level == alone.rows_per_level


def test_tcnn_n_dims_to_encode_is_a_composite_nested_grid():
    """tcnn's Composite gives a nested encoding with n_dims_to_encode = n the first n of its
    input dimensions (DOCUMENTATION.md, "Composite": 3 spatial dims to one encoding, the rest to
    the next): the module encodes n dims and takes x[..., :n], exactly as the grid without the
    key built for n inputs."""
    nested = {"otype": "HashGrid", "n_dims_to_encode": 3, "n_levels": 4, "log2_hashmap_size": 10,
              "base_resolution": 4, "per_level_scale": 2.0}
    grid = MultiResHashGrid.from_tcnn_config(5, nested).double()
    plain = MultiResHashGrid.from_tcnn_config(3, {k: v for k, v in nested.items()
                                                  if k != "n_dims_to_encode"}).double()
    assert grid.input_dim == 3 and grid.tcnn_config() == plain.tcnn_config()
    params = torch.rand(plain.tcnn_params().numel(), dtype=torch.float64)
    grid.load_tcnn_params(params)
    plain.load_tcnn_params(params)
    x = torch.rand(100, 5, dtype=torch.float64)
    torch.testing.assert_close(grid(x[..., :3]), plain(x[..., :3]), rtol=0, atol=0)
    reference = reference_tcnn(x[:, :3], grid.embedding.weight, 3, 4, 10, 4, 2.0)
    torch.testing.assert_close(grid(x[..., :3]), reference)
    with pytest.raises(ValueError, match=r"expects x of shape \(\.\.\., 3\)"):
        grid(x)                      # the rest is the next encoding's, not this module's


def test_upstream_published_calls_run_as_written():
    """Ending2015a/hash-grid-encoding's README and train.py, their calls as they stand (the
    README's two typos aside: torch.rand(..., dtpye=) and enc_input.output_dim, a tensor's,
    raise with upstream's own module too), so code written for upstream drops in."""
    import encoding as encoding_module    # upstream: `import encoding`
    # README.md, "How To Use"
    enc = encoding_module.MultiResHashGrid(2)  # 2D image data
    enc = encoding_module.MultiResHashGrid(3)  # 3D data
    dim = 3
    batch_size = 100
    input = torch.rand((batch_size, dim), dtype=torch.float32)
    enc_input = enc(input)
    assert enc.output_dim == 32 and enc_input.shape == (batch_size, enc.output_dim)
    assert enc_input.view(-1).shape == (batch_size * 32,)       # .view, as on any module
    # upstream's defaults: 16 levels of 2 features, T = 2**15, N 16..512
    reference = reference_encode(input.double(), enc.embedding.weight.double(), 3, 16, 15, 16,
                                 512, "linear")
    torch.testing.assert_close(enc_input.double(), reference, atol=1e-6, rtol=1e-5)
    enc = enc.to(dtype=torch.float64)
    assert enc.embedding.weight.dtype == torch.float64
    # train.py: ToyNet(dim=2, enc_method=..., enc_kwargs=...) with its command-line defaults
    a = dict(n_levels=16, n_features_per_level=2, log2_hashmap_size=15, base_resolution=16,
             finest_resolution=8192)
    for enc_method, enc_kwargs in (("freq", dict(n_levels=a["n_levels"])),
                                   ("hashgrid", dict(
                                       n_levels=a["n_levels"],
                                       n_features_per_level=a["n_features_per_level"],
                                       log2_hashmap_size=a["log2_hashmap_size"],
                                       base_resolution=a["base_resolution"],
                                       finest_resolution=a["finest_resolution"]))):
        dim = 2
        if enc_method == "freq":
            enc = encoding_module.Frequency(dim, **enc_kwargs)
            assert enc.output_dim == 2 * 16 * 2
        else:
            enc = encoding_module.MultiResHashGrid(dim, **enc_kwargs)
            assert enc.output_dim == 32 and enc.resolutions[-1] == (8192, 8192)
        mlp = torch.nn.Sequential(torch.nn.Linear(enc.output_dim, 64), torch.nn.ReLU(inplace=True),
                                  torch.nn.Linear(64, 64), torch.nn.ReLU(inplace=True),
                                  torch.nn.Linear(64, 3))
        x = torch.as_tensor(torch.rand(65536 // 64, 2), dtype=torch.float32)
        y = mlp(enc(x))
        ((y - torch.rand_like(y)) ** 2.0).mean().backward()
        assert all(p.grad is not None for p in mlp.parameters())
        if enc_method == "freq":
            k = torch.arange(16, dtype=torch.float64)
            angles = x.double()[:, :, None] * (2.0 ** k) * math.pi              # (N, 2, 16)
            torch.testing.assert_close(enc(x.double()), torch.cat(
                (angles.sin(), angles.cos()), -1).flatten(1))
        else:
            assert enc.embedding.weight.grad.abs().sum() > 0


# --- periodic axes ----------------------------------------------------------------------------

PERIODIC_CASES = [(1, (True,)), (2, (True, False)), (2, (False, True)), (3, (True, False, True))]


@pytest.mark.parametrize("interpolation", ["linear", "smoothstep", "nearest"])
@pytest.mark.parametrize("dim, periodic", PERIODIC_CASES)
def test_periodic_matches_float64_reference(dim, periodic, interpolation):
    n_levels, log2_t, base, finest = CONFIGS[dim]
    enc = make(dim, interpolation, n_levels, log2_t, base, finest, periodic=periodic)
    assert enc.periodic == periodic and enc.hashed_levels and 0 not in enc.hashed_levels
    # a dense level stores N vertices along a periodic axis, N + 1 along the others
    cells = enc.resolutions[0]
    assert enc.rows_per_level[0] == math.prod(c if p else c + 1 for c, p in zip(cells, periodic))
    x = torch.rand(300, dim, dtype=torch.float64, generator=torch.Generator().manual_seed(dim))
    x[0], x[1] = 0.0, 1.0
    x[2, 0], x[3, 0] = 1.0, 1 - 1e-12
    expected = reference_encode(x, enc.embedding.weight.detach(), dim, n_levels, log2_t, base, finest,
                                interpolation, periodic)
    torch.testing.assert_close(enc(x), expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("interpolation", ["linear", "smoothstep"])
def test_periodic_gradients_across_the_seam(interpolation):
    enc = make(2, interpolation, n_levels=3, log2_t=6, base=2, finest=12, periodic=(True, False))
    assert enc.hashed_levels
    # points in the last cell (whose upper vertex is vertex 0) and in the first one
    x = torch.tensor([[0.004, 0.3], [0.996, 0.3], [0.02, 0.71], [0.985, 0.55]], dtype=torch.float64,
                     requires_grad=True)
    assert torch.autograd.gradcheck(raw(enc), (x, enc.embedding.weight))
    assert torch.autograd.gradgradcheck(raw(enc), (x, enc.embedding.weight))


@pytest.mark.parametrize("interpolation", ["linear", "smoothstep", "nearest"])
def test_periodic_axis_is_continuous_at_every_level(interpolation):
    enc = make(3, interpolation, n_levels=4, log2_t=9, base=3, finest=50, periodic=(False, True, False))
    assert enc.hashed_levels and len(enc.hashed_levels) < 4
    x = torch.rand(100, 3, dtype=torch.float64)

    def along(value, axis=1):
        moved = x.clone()
        moved[:, axis] = value
        return moved

    # every level's features (all output_dim of them) agree at x = 0 and x = 1, and just
    # inside the seam from both sides
    torch.testing.assert_close(enc(along(0.0)), enc(along(1.0)), atol=1e-12, rtol=0)
    torch.testing.assert_close(enc(along(1e-9)), enc(along(1 - 1e-9)), atol=1e-6, rtol=0)
    assert not torch.allclose(enc(along(0.0, axis=0)), enc(along(1.0, axis=0)))   # not periodic
    if interpolation == "smoothstep":   # continuous derivatives too
        weights = torch.randn(enc.output_dim, dtype=torch.float64)

        def d_dx(value):
            point = along(value).requires_grad_(True)
            (grad,) = torch.autograd.grad((enc(point) * weights).sum(), point)
            return grad

        torch.testing.assert_close(d_dx(1e-10), d_dx(1 - 1e-10), atol=1e-4, rtol=0)


def test_periodic_options():
    enc = MultiResHashGrid(2, 3, 2, 10, 4, 16, periodic=True)
    assert enc.periodic == (True, True) and enc.rows_per_level[0] == 16
    assert MultiResHashGrid(2).periodic == (False, False)
    with pytest.raises(ValueError, match="periodic"):
        MultiResHashGrid(2, periodic=(True,))
    with pytest.raises(ValueError, match="layout='paper'"):
        MultiResHashGrid(2, per_level_scale=2.0, layout="tcnn", periodic=True)


# --- the device branch (GPUs, torch.compile), forced on a CPU ---------------------------------

def device_branch(enc, monkeypatch, chunk_size=None):
    """enc, set to take the device branch on this CPU (chunk_size points per pass if set); the
    CPU branch's packing must not run."""
    enc._device_branch, enc._chunk_size = True, chunk_size

    def no_packing(rows, dtype):
        raise AssertionError("a CPU speed trick ran in the device branch")

    monkeypatch.setattr(encoding, "_pack", no_packing)
    return enc


@pytest.mark.parametrize("interpolation", ["linear", "smoothstep", "nearest"])
@pytest.mark.parametrize("chunk_size", [None, 7])
def test_device_branch_forward_and_backward(interpolation, chunk_size, monkeypatch):
    dim, (n_levels, log2_t, base, finest) = 3, CONFIGS[3]
    enc = device_branch(make(dim, interpolation, n_levels, log2_t, base, finest), monkeypatch, chunk_size)
    assert enc.hashed_levels and len(enc.hashed_levels) < n_levels
    x = torch.rand(50, dim, dtype=torch.float64, requires_grad=True)
    table = enc.embedding.weight
    out = enc(x)
    expected = reference_encode(x, table, dim, n_levels, log2_t, base, finest, interpolation)
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=0)
    weights = torch.randn_like(out)
    grads = torch.autograd.grad((out * weights).sum(), (x, table))
    expected_grads = torch.autograd.grad((expected * weights).sum(), (x, table), allow_unused=True)
    for got, want in zip(grads, expected_grads):   # ("nearest": no gradient to x)
        torch.testing.assert_close(got, torch.zeros_like(got) if want is None else want,
                                   atol=1e-6, rtol=0)


def test_device_branch_gradgradcheck(monkeypatch):
    # chunked: 2 points per pass
    enc = device_branch(make(2, "smoothstep", n_levels=3, log2_t=5, base=2, finest=12), monkeypatch, 2)
    x = torch.rand(4, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(raw(enc), (x, enc.embedding.weight))
    assert torch.autograd.gradgradcheck(raw(enc), (x, enc.embedding.weight))


def test_device_branch_tcnn_periodic_and_float32(monkeypatch):
    x = torch.rand(50, 2, dtype=torch.float64)
    # float32 tables, no grad (the branch a GPU's inference runs) against the CPU branch
    enc32 = make(2, n_levels=4, log2_t=8, base=2, finest=30, dtype=torch.float32)
    with torch.no_grad():
        cpu_branch = enc32(x.float())
        device = device_branch(enc32, monkeypatch)(x.float())
    torch.testing.assert_close(device, cpu_branch)
    tiled = device_branch(make(2, n_levels=3, log2_t=4, base=5, finest=None, per_level_scale=1.6,
                               layout="tcnn", grid_type="tiled"), monkeypatch)
    expected = reference_tcnn(x, tiled.embedding.weight.detach(), 2, 3, 4, 5, 1.6, "tiled")
    torch.testing.assert_close(tiled(x), expected, atol=1e-6, rtol=0)
    periodic = device_branch(make(2, n_levels=4, log2_t=8, base=2, finest=30, periodic=(False, True)),
                             monkeypatch)
    expected = reference_encode(x, periodic.embedding.weight.detach(), 2, 4, 8, 2, 30, "linear",
                                (False, True))
    torch.testing.assert_close(periodic(x), expected, atol=1e-6, rtol=0)


def test_nan_points_add_nothing_to_the_table_gradient():
    # the float32 CPU passes skip the NaN masking when no point is NaN: with one, it applies
    enc = make(2, dtype=torch.float32)
    x = torch.rand(50, 2)
    weights = torch.randn(50, enc.output_dim)
    with_nan = x.clone()
    with_nan[7, 1] = float("nan")
    keep = torch.arange(50) != 7
    table = enc.embedding.weight
    (got,) = torch.autograd.grad((enc(with_nan)[keep] * weights[keep]).sum(), table)
    (expected,) = torch.autograd.grad((enc(x[keep]) * weights[keep]).sum(), table)
    assert torch.isnan(enc(with_nan)[7]).all()
    torch.testing.assert_close(got, expected)


# --- the shipped reference (implementation="reference") against fast and device ------------

def _implementations_agree(kwargs, dim, n=60, seed=0, x_edges=True):
    """fast, device (keeping and recomputing) and the shipped reference: the same features,
    and the same gradients to x and the table, in float64."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(n, dim, dtype=torch.float64, generator=gen)
    if x_edges:
        x[0], x[1] = 0.0, 1.0
    weights = torch.randn(n, MultiResHashGrid(dim, **kwargs).output_dim, dtype=torch.float64,
                          generator=gen)
    results = {}
    for name, implementation, keep in (("reference", "reference", True), ("fast", "fast", True),
                                       ("device", "device", True), ("recompute", "device", False)):
        enc = encoder(dim, implementation=implementation, dtype=torch.float64, **kwargs)
        enc._device_keep = keep
        with torch.no_grad():
            enc.embedding.weight.copy_(torch.rand(enc.embedding.weight.shape, generator=torch.Generator().manual_seed(1),
                                                  dtype=torch.float64) * 2 - 1)
        xr = x.clone().requires_grad_()
        out = enc(xr)
        grads = torch.autograd.grad((out * weights).sum(), (xr, enc.embedding.weight), allow_unused=True)
        # ("nearest": no path to x in the reference, zeros from the others)
        grads = [torch.zeros_like(xr) if g is None else g for g in grads]
        results[name] = (out, *grads)
    for name in ("fast", "device", "recompute"):
        for got, want in zip(results[name], results["reference"]):
            torch.testing.assert_close(got, want, atol=1e-9, rtol=1e-9)
    return results["reference"][0]


@pytest.mark.parametrize("interpolation", ["linear", "smoothstep", "nearest"])
@pytest.mark.parametrize("dim", range(1, 9))
def test_every_implementation_matches_the_shipped_reference(dim, interpolation):
    n_levels, log2_t, base, finest = CONFIGS[dim]
    kwargs = dict(n_levels=n_levels, n_features_per_level=2, log2_hashmap_size=log2_t,
                  base_resolution=base, finest_resolution=finest, interpolation=interpolation)
    out = _implementations_agree(kwargs, dim, seed=dim)
    # the shipped reference is not a test of itself: it matches the tests' own reference too
    enc = make(dim, interpolation, n_levels, log2_t, base, finest, implementation="reference")
    x = torch.rand(40, dim, dtype=torch.float64)
    expected = reference_encode(x, enc.embedding.weight.detach(), dim, n_levels, log2_t, base, finest, interpolation)
    torch.testing.assert_close(enc(x), expected, atol=1e-12, rtol=0)
    assert out.shape[-1] == n_levels * 2


@pytest.mark.parametrize("interpolation", ["linear", "smoothstep", "nearest"])
@pytest.mark.parametrize("grid_type", ["hash", "dense", "tiled"])
@pytest.mark.parametrize("dim", [1, 2, 3])
def test_implementations_agree_on_tcnn_grids(dim, grid_type, interpolation):
    kwargs = dict(n_levels=4, n_features_per_level=2, log2_hashmap_size=6, base_resolution=3,
                  per_level_scale=1.7, layout="tcnn", grid_type=grid_type, interpolation=interpolation)
    _implementations_agree(kwargs, dim)


@pytest.mark.parametrize("interpolation", ["linear", "smoothstep", "nearest"])
@pytest.mark.parametrize("periodic", [(True,), (False, True), (True, True), (True, False, True)])
def test_implementations_agree_on_periodic_axes(periodic, interpolation):
    dim = len(periodic)
    kwargs = dict(n_levels=4, n_features_per_level=2, log2_hashmap_size=7, base_resolution=2,
                  finest_resolution=30, periodic=periodic, interpolation=interpolation)
    _implementations_agree(kwargs, dim)


@pytest.mark.parametrize("n_features", [1, 4])
def test_implementations_agree_on_other_feature_counts_and_per_axis_resolutions(n_features):
    kwargs = dict(n_levels=5, n_features_per_level=n_features, log2_hashmap_size=8,
                  base_resolution=(2, 5), finest_resolution=(40, 9))
    _implementations_agree(kwargs, 2)


def test_device_branch_in_passes_of_any_size():
    # several passes per group, by levels and by points, against one pass
    enc = make(3, n_levels=5, log2_t=7, base=2, finest=20, implementation="device")
    x = torch.rand(90, 3, dtype=torch.float64, requires_grad=True)
    table = enc.embedding.weight
    expected = enc(x)
    expected_grads = torch.autograd.grad(expected.square().sum(), (x, table))
    for lookups, passes in ((1, 5 * 90), (30, 15), (100, 5), (10**6, 2)):
        enc._device_lookups = lookups
        assert n_passes(enc, 90) == passes          # levels x points; one pass per group
        out = enc(x)
        grads = torch.autograd.grad(out.square().sum(), (x, table))
        torch.testing.assert_close(out, expected, atol=1e-12, rtol=0)
        for got, want in zip(grads, expected_grads):
            torch.testing.assert_close(got, want, atol=1e-10, rtol=0)


def test_reference_second_order_and_nan():
    enc = make(2, "smoothstep", n_levels=3, log2_t=5, base=2, finest=12, implementation="reference")
    x = torch.rand(5, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: enc(x), (x,))
    assert torch.autograd.gradgradcheck(lambda x: enc(x), (x,))
    x_nan = x.detach().clone()
    x_nan[2, 0] = float("nan")
    out = enc(x_nan)
    assert torch.isnan(out[2]).all() and not torch.isnan(out[[0, 1, 3, 4]]).any()


def test_reference_is_one_short_self_contained_function():
    """The shipped reference reads on its own: at most 70 lines, no helper of the speed-only
    part (its formulas in its own shapes)."""
    import inspect
    source = inspect.getsource(encoding._reference_encode)
    assert len(source.splitlines()) <= 70
    assert set(re.findall(r"\b(_[a-z]\w*)\(", source)) <= {"_reference_encode"}
    module = inspect.getsource(encoding)
    assert module.index("\ndef _reference_encode") < module.index("\n# SPEED ONLY") < module.index("\nclass _LevelGroup")


def test_device_and_dtype_arguments_create_the_table_in_place(monkeypatch):
    # a 2**24-row table on the meta device: nothing allocated, nothing built on the CPU first
    created = []
    real_empty = torch.empty

    def watch(*args, **kwargs):
        tensor = real_empty(*args, **kwargs)
        created.append((tensor.device.type, tensor.numel()))
        return tensor

    monkeypatch.setattr(torch, "empty", watch)
    enc = MultiResHashGrid(3, 16, 2, 24, 16, 4096, device="meta", dtype=torch.float16)
    monkeypatch.undo()
    weight = enc.embedding.weight
    assert weight.is_meta and weight.dtype == torch.float16 and weight.shape[0] > 2**24
    assert not any(kind == "cpu" and numel > 2**20 for kind, numel in created)
    assert all(buffer.is_meta for buffer in enc.buffers())
    # on the CPU, in float64: the table is where and what it was asked to be
    enc = MultiResHashGrid(2, 4, 2, 8, device="cpu", dtype=torch.float64)
    assert enc.embedding.weight.dtype == torch.float64 and enc(torch.rand(3, 2)).dtype == torch.float64


def test_reset_parameters():
    enc = MultiResHashGrid(2, 4, 2, 8)
    with torch.no_grad():
        enc.embedding.weight.fill_(3.0)
    torch.manual_seed(0)
    enc.reset_parameters()
    weight = enc.embedding.weight
    assert weight.abs().max() <= 1e-4 and weight.std() > 3e-5      # U(-1e-4, 1e-4)
    torch.manual_seed(0)
    again = MultiResHashGrid(2, 4, 2, 8)
    torch.manual_seed(0)
    again.reset_parameters()
    assert torch.equal(again.embedding.weight, weight)


def test_bad_implementation_is_refused():
    with pytest.raises(ValueError, match="implementation must be one of"):
        MultiResHashGrid(2, implementation="torch")


def test_compiled_device_branch_in_one_graph():
    # torch.compile(fullgraph=True) of the device branch, which keeps its rows and fractions:
    # forward, table and x gradients (the x gradient keeps the custom op out)
    enc = make(3, n_levels=4, log2_t=7, base=2, finest=24, dtype=torch.float32)
    x = torch.rand(300, 3, requires_grad=True)
    compiled = torch.compile(enc, fullgraph=True)
    out = compiled(x)
    grads = torch.autograd.grad(out.square().sum(), (x, enc.embedding.weight))
    expected = reference_encode(x.detach().double(), enc.embedding.weight.detach().double(), 3, 4, 7, 2, 24, "linear")
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=0)
    want = torch.autograd.grad(enc(x).square().sum(), (x, enc.embedding.weight))
    for got, w in zip(grads, want):
        torch.testing.assert_close(got, w, atol=1e-4, rtol=1e-4)
