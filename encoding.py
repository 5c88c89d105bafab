"""Multiresolution hash encoding (Instant-NGP, Müller et al. 2022) in pure PyTorch.

Standalone: copy this one file into your project; it imports only ``torch``, ``math`` and
``typing``. It holds two encodings with the same call shape::

    enc = MultiResHashGrid(dim=3)                   # x: (..., 3) in [0, 1]
    features = enc(x)                               # (..., enc.output_dim)
    enc = Frequency(dim=3, n_levels=10)             # NeRF positional encoding

The math, stated once
---------------------
Notation: D input dimensions, L levels, F features per level, T = 2**log2_hashmap_size,
N_min / N_max the coarsest / finest resolution (an int, or one value per axis),
b the per-level growth factor. Level l, axis d:

layout="paper" (default; the paper's §3, eq. 2-3)
    b_d    = exp((ln N_max_d - ln N_min_d) / (L - 1))     (b = 1 when L = 1; or `per_level_scale`)
    N_l,d  = floor(N_min_d * b_d**l)                        grid cells along axis d
    pos    = x_d * N_l,d                                    vertices 0 .. N_l,d (N_l,d + 1 of them)
    cell   = min(floor(pos), N_l,d - 1), frac = pos - cell  (so x = 1 lands on the last vertex)
    rows   = prod_d (N_l,d + 1) if that is <= T (dense level) else T (hashed level)

layout="tcnn" (tiny-cuda-nn's HashGrid, bit for bit, so tcnn-trained parameters load here)
    b      = per_level_scale (default exp(ln(N_max / N_min) / (L - 1)))
    scale  = exp2(l * log2(b)) * N_min - 1                 (float32, as tcnn computes it)
    res    = ceil(scale) + 1                                vertices per axis
    pos    = x_d * scale + 0.5 (one fused rounding), cell = floor(pos), frac = pos - cell
    rows   = min(next multiple of 8 of res**D, T); dense when res**D <= rows, else hashed

Vertex -> row (both layouts)
    dense  : index = sum_d v_d * stride_d, stride_0 = 1, stride_d = stride_{d-1} * V_{d-1}
             (axis 0 fastest: for an image, x runs along a row; collision-free).
             tcnn takes the result modulo rows, which we reproduce.
    hashed : index = (XOR_d v_d * prime_d mod 2**32) mod T, primes
             1, 2654435761, 805459861, 3674653429, 2097192037, 1434869437, 2165219737;
             axes beyond the 7th use `hash_primes` (documented there).
    All levels share one ``nn.Embedding`` of sum_l rows_l rows; level l starts at row
    offset_l = sum_{k<l} rows_k. Flattened, its weight is tcnn's parameter vector.

Interpolation: "linear" (weights prod_d frac_d or 1 - frac_d over the 2**D cell corners),
"smoothstep" (the same with S(t) = t^2 (3 - 2t), continuous dy/dx) and "nearest" (the
vertex floor(x * N + 0.5) in the paper layout, tcnn's floor(pos) in the tcnn layout).
"""
import math
from typing import List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

__all__ = ["MultiResHashGrid", "Frequency", "hash_primes", "HASH_PRIMES"]

# The spatial-hash primes of the paper (eq. 4) and tiny-cuda-nn; 1 for the first axis keeps
# neighbouring vertices along x in neighbouring rows (cache coherence).
HASH_PRIMES = (1, 2654435761, 805459861, 3674653429, 2097192037, 1434869437, 2165219737)
_GOLDEN_RATIO_32 = 2654435769  # floor(2**32 / golden ratio), a Weyl-sequence step
_INTERPOLATIONS = ("linear", "smoothstep", "nearest")
_LAYOUTS = ("paper", "tcnn")

Resolution = Union[int, float, Sequence[Union[int, float]]]


def _is_prime(n: int) -> bool:
    if n < 2:
        return False
    if n % 2 == 0:
        return n == 2
    for divisor in range(3, math.isqrt(n) + 1, 2):
        if n % divisor == 0:
            return False
    return True


def hash_primes(dim: int) -> List[int]:
    """The multiplier of each axis in the spatial hash, for ``dim`` axes.

    Axes 0-6 use the primes of the paper / tiny-cuda-nn (``HASH_PRIMES``). Axis d >= 7 uses
    the smallest prime >= (d * 2654435769 mod 2**32) | 1: a golden-ratio Weyl sequence spreads
    the starting points over the 32-bit range (like the published primes, which are large and
    odd), and the search makes each one prime. Deterministic, so checkpoints stay valid.
    """
    primes = list(HASH_PRIMES[:dim])
    for d in range(len(HASH_PRIMES), dim):
        candidate = (d * _GOLDEN_RATIO_32) % (1 << 32) | 1
        while not _is_prime(candidate) or candidate in primes:
            candidate += 2
        primes.append(candidate)
    return primes


def _per_axis(value: Resolution, dim: int, name: str) -> Tuple[float, ...]:
    """An int/float or a sequence of ``dim`` of them -> a tuple of ``dim`` positive floats."""
    if isinstance(value, (int, float)):
        values = (float(value),) * dim
    else:
        values = tuple(float(v) for v in value)
        if len(values) != dim:
            raise ValueError(f"{name} needs 1 or dim={dim} values, got {len(values)}")
    if not all(math.isfinite(v) and v > 0 for v in values):
        raise ValueError(f"{name} must be positive and finite, got {value}")
    return values


def _floor(value: float) -> int:
    # exp/log round-off can land N_min * b**(L-1) a hair below N_max; the paper means N_max.
    return math.floor(value * (1.0 + 1e-12))


def _next_multiple(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def _float32(value: float) -> float:
    return torch.tensor(value, dtype=torch.float32).item()


def _smoothstep(t: torch.Tensor) -> torch.Tensor:
    return t * t * (3.0 - 2.0 * t)


def _smoothstep_derivative(t: torch.Tensor) -> torch.Tensor:
    return 6.0 * t * (1.0 - t)


class _Group:
    """Consecutive levels that index alike (all dense or all hashed), computed together.

    scale, mult, max_cell: (D, G, 1) -- axis-major, so each per-axis operand broadcasts as a
    (G, 1) column against a (1, n) row of points and every intermediate is a contiguous
    level-major (G, n) tensor (one level's lookups stay together, which keeps the table
    accesses local). mult holds the dense strides (index dtype) or the hash primes (int64).
    rows_start/rows_stop:
    the group's slice of the table; offset: (G, 1) each level's first row relative to
    rows_start. max_cell: highest cell index (paper layout) or None. rows: (G, 1) rows per
    level for tcnn's dense wrap-around, or None.
    """

    def __init__(self, start, stop, hashed, rows_start, rows_stop, scale, mult, offset, max_cell, rows):
        self.start, self.stop, self.hashed = start, stop, hashed
        self.rows_start, self.rows_stop = rows_start, rows_stop
        self.scale, self.mult, self.offset, self.max_cell, self.rows = scale, mult, offset, max_cell, rows

    def levels(self, first: int, stop: int) -> "_Group":
        """The sub-group of this group's levels first..stop-1 (counted from the group's start)."""
        per_level = lambda t: None if t is None else t[..., first:stop, :]
        return _Group(self.start + first, self.start + stop, self.hashed, self.rows_start, self.rows_stop,
                      per_level(self.scale), per_level(self.mult), per_level(self.offset),
                      per_level(self.max_cell), per_level(self.rows))


class _Grid:
    """Everything forward and backward need: the level groups and the static options.

    cpu_passes (CPU eager): the work runs in passes of about lookups_per_pass lookups per cell
    corner, level-major: all points for as many levels as fit, or, when one level's points
    exceed it, one level for runs of lookups_per_pass points. Consecutive passes then visit
    the same level's table, which stays in cache, and every temporary is a few hundred KB
    that malloc recycles, instead of a fresh 10-100 MB buffer whose page faults would
    dominate. Otherwise (GPUs, torch.compile) each group of levels is one pass over all
    points. chunk_size, if given, sets the points per pass.
    """

    def __init__(self, groups: List[_Group], interpolation: str, tcnn: bool, hash_mask: int,
                 chunk_size: Optional[int], cpu_passes: bool, lookups_per_pass: int):
        self.groups, self.interpolation, self.tcnn, self.hash_mask = groups, interpolation, tcnn, hash_mask
        self.chunk_size, self.cpu_passes, self.lookups_per_pass = chunk_size, cpu_passes, lookups_per_pass

    def passes(self, n_points: int):
        """[(levels: _Group, lo, hi)]: each pass computes `levels` for the points lo..hi-1."""
        step = self.chunk_size or (self.lookups_per_pass if self.cpu_passes else n_points)
        step = max(min(step, n_points), 1)
        passes = []
        for group in self.groups:
            n_levels = group.stop - group.start
            per_pass = min(max(self.lookups_per_pass // step, 1), n_levels) if self.cpu_passes else n_levels
            for first in range(0, n_levels, per_pass):
                levels = group if per_pass == n_levels else group.levels(first, min(first + per_pass, n_levels))
                passes += [(levels, lo, min(lo + step, n_points)) for lo in range(0, n_points, step)]
        return passes


def _axis_terms(xt: torch.Tensor, group: _Group, grid: _Grid):
    """Per-axis pieces of every corner's row index, and the positions inside the cells.

    xt: (D, n) -> terms: D pairs (t0, t1) of (G, n) integers (int32 unless the table has
    2**31 rows or more), the axis' share of the row index
    of the lower / upper vertex (combined over axes by + when dense, ^ when hashed), with the
    level offset folded into axis 0; fracs: D tensors (G, n) in [0, 1].
    """
    shift = 0.5 if (grid.tcnn or grid.interpolation == "nearest") else 0.0
    index_dtype = group.offset.dtype
    terms, fracs = [], []
    for d in range(xt.shape[0]):
        scale = group.scale[d]
        if grid.tcnn and xt.dtype != torch.float64:
            # tcnn computes fmaf(scale, x, 0.5) in float32 (one rounding). The product of two
            # float32 values is exact in float64, so this reproduces it bit for bit (barring
            # double-rounding ties).
            pos = (scale.double() * xt[d].double() + shift).to(xt.dtype)
        else:
            pos = scale.to(xt.dtype) * xt[d]                                # (G, n)
            if shift:
                pos = pos + shift
        cell = torch.floor(pos)
        if group.max_cell is not None:
            cell = torch.minimum(cell, group.max_cell[d].to(cell.dtype))
        fracs.append(pos - cell)
        mult = group.mult[d]
        if group.hashed:
            # (v * prime) mod 2**32 mod T == (v * prime) & (T - 1), T being a power of two.
            # The product is taken in int64, whose wrap-around keeps the low 32 bits exact;
            # what remains is < T and continues in the (narrower, faster) index dtype.
            t0 = ((cell.long() * mult) & grid.hash_mask).to(index_dtype)
            t1 = (t0 + (mult & grid.hash_mask).to(index_dtype)) & grid.hash_mask   # (a + b) & m == ((a & m) + b) & m
            if d == 0:   # hashed levels' offsets are multiples of T and t < T: ^ offset == + offset
                t0, t1 = t0 ^ group.offset, t1 ^ group.offset
        else:
            t0 = cell.to(index_dtype) * mult
            if d == 0 and group.rows is None:
                t0 = t0 + group.offset
            t1 = t0 + mult
        terms.append((t0, t1))
    return terms, fracs


def _for_each_corner(terms, factors, group: _Group, visit, d: int = 0, corner: int = 0, index=None, weight=None):
    """Calls visit(corner, index, weight) for every cell corner: index (G, n) its table rows,
    weight (G, n) its interpolation weight (None without factors, i.e. "nearest": one corner).
    Bit d of `corner` set means the upper vertex on axis d.

    Depth-first over the axes (d, corner, index, weight: the partial results so far), so
    corners share partial sums and products: about 2 ops per corner instead of 2 (D - 1),
    while only D partial results are alive at a time. (A plain recursive function: a
    recursive closure would be a reference cycle holding every pass's temporaries until
    the garbage collector runs.)
    """
    if d == len(terms):
        if group.rows is not None:      # tcnn wraps dense indices modulo the level's rows
            index = torch.remainder(index, group.rows) + group.offset
        visit(corner, index, weight)
        return
    for bit in ((0,) if factors is None else (0, 1)):
        term = terms[d][bit]
        if index is None:
            next_index = term
        else:
            next_index = index ^ term if group.hashed else index + term
        next_weight = None
        if factors is not None:
            factor = factors[d][bit]
            next_weight = factor if weight is None else weight * factor
        _for_each_corner(terms, factors, group, visit, d + 1, corner | (bit << d), next_index, next_weight)


def _product(factors: List[torch.Tensor]) -> torch.Tensor:
    result = factors[0]
    for factor in factors[1:]:
        result = result * factor
    return result


def _interpolation_factors(fracs: List[torch.Tensor], interpolation: str):
    """Per axis: (weight of lower vertex, weight of upper vertex, d upper / d frac or None);
    None for "nearest", which takes one vertex at full weight."""
    if interpolation == "nearest":
        return None
    smooth = interpolation == "smoothstep"
    factors = []
    for frac in fracs:
        s = _smoothstep(frac) if smooth else frac
        factors.append((1.0 - s, s, _smoothstep_derivative(frac) if smooth else None))
    return factors


# Row-at-a-time access to the (R, F) tables is much faster through a 1-D view with one element
# per row (F features reinterpreted as one machine word): PyTorch's 2-D index_select /
# index_add_ kernels loop over features per row. Word dtypes for the gather, by row size:
_WORD_DTYPES = {2: torch.int16, 4: torch.int32, 8: torch.int64, 16: torch.complex128}
# ... and for the scatter-add, where the arithmetic must stay right: a pair of floats adds
# exactly like a complex number.
_PAIR_DTYPES = {torch.float32: torch.complex64, torch.float64: torch.complex128}


def _fast_path(tensor: torch.Tensor) -> bool:
    # CPU kernels only (elsewhere the plain kernels are fine, and complex atomics are not a
    # given); the dtype views are not differentiable (double backward) and buy nothing
    # under torch.compile.
    return tensor.device.type == "cpu" and not torch.is_grad_enabled() and not torch.compiler.is_compiling()


def _gather(table: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """table: (R, F), index: (G, n) -> (G, n, F)."""
    n_features = table.shape[1]
    word = _WORD_DTYPES.get(n_features * table.element_size())
    if word is not None and table.is_contiguous() and _fast_path(table):
        rows = table.view(word).view(-1).index_select(0, index.reshape(-1))
        return rows.view(table.dtype).view(*index.shape, n_features)
    return table.index_select(0, index.reshape(-1)).view(*index.shape, n_features)


def _packable(table: torch.Tensor, acc_dtype: torch.dtype) -> bool:
    """Whether feature rows can be handled as single numbers: F = 1 as reals, F = 2 (float32 /
    float64) as complex numbers, whose arithmetic on a pair is exactly what interpolation does
    to it (a weighted sum). Elementwise ops then run over one long axis instead of broadcasting
    a weight over a trailing axis of size 2, several times faster on CPU."""
    n_features = table.shape[1]
    return (_fast_path(table) and table.dtype == acc_dtype and table.is_contiguous()
            and (n_features == 1 or (n_features == 2 and table.dtype in _PAIR_DTYPES)))


def _pack(rows: torch.Tensor) -> torch.Tensor:
    """(..., F) contiguous, F in {1, 2} -> (...) one real or complex number per row."""
    if rows.shape[-1] == 1:
        return rows.squeeze(-1)
    return rows.view(_PAIR_DTYPES[rows.dtype]).squeeze(-1)


def _unpack(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of _pack: (...) -> (..., F)."""
    return torch.view_as_real(packed) if packed.is_complex() else packed.unsqueeze(-1)


def _encode_group(xt: torch.Tensor, table: torch.Tensor, group: _Group, grid: _Grid, acc_dtype) -> torch.Tensor:
    """xt: (D, n) -> this group's features (G, n, F)."""
    group_table = table[group.rows_start:group.rows_stop]
    packed = _packable(group_table, acc_dtype)
    rows = _pack(group_table) if packed else None
    terms, fracs = _axis_terms(xt, group, grid)
    factors = _interpolation_factors(fracs, grid.interpolation)
    out = []

    def accumulate(corner, index, weight):
        if packed:   # (G, n) real or complex
            feature = rows.index_select(0, index.reshape(-1)).view(index.shape)
        else:        # (G, n, F)
            feature = _gather(group_table, index).to(acc_dtype)
            weight = weight.unsqueeze(-1) if weight is not None else None
        if weight is None:
            out.append(feature)
        elif not out:
            out.append(feature * weight)
        else:
            out[0].addcmul_(feature, weight)

    _for_each_corner(terms, factors, group, accumulate)
    return _unpack(out[0]) if packed else out[0]


def _encode(x: torch.Tensor, table: torch.Tensor, nan: torch.Tensor, grid: _Grid) -> torch.Tensor:
    """x: (N, D) in [0, 1] -> features (N, L * F) in the accumulation dtype, NaN for the
    points flagged in nan (N,) (their x holds a placeholder).

    In eager mode the result has the strides of a transposed contiguous (L * F, N) matrix:
    every level is computed for a run of points at a time, and each feature's values for
    those points are adjacent, so the passes write contiguous memory. A following matmul
    (the MLP's first layer) reads this layout as is, and hands back its gradient in the same
    layout.
    """
    acc_dtype = torch.promote_types(x.dtype, table.dtype)
    n_points, n_features, n_levels = x.shape[0], table.shape[1], grid.groups[-1].stop
    # Under torch.compile the result is row-major: inductor writes that layout as cheaply, and
    # AOTAutograd would copy an incoming row-major gradient (an elementwise loss) into the
    # traced layout. Either way a tensor of its own, not a view (autograd forbids modifying
    # a view made inside a custom Function in place).
    strides = (n_levels * n_features, 1) if torch.compiler.is_compiling() else (1, n_points)
    out = torch.empty_strided((n_points, n_levels * n_features), strides, dtype=acc_dtype, device=x.device)
    per_level = out.view(n_points, n_levels, n_features)                               # (N, L, F)
    xt = x.t().contiguous()                                                             # (D, N)
    for levels, lo, hi in grid.passes(n_points):
        values = _encode_group(xt[:, lo:hi], table, levels, grid, acc_dtype).transpose(0, 1)      # (n, G, F)
        per_level[lo:hi, levels.start:levels.stop] = values.masked_fill(nan[lo:hi, None, None], float("nan"))
    return out


def _backward_group(xt, table, group: _Group, grid: _Grid, g_planes, nan, grad_table, grad_xt, need_x: bool):
    """Adds one group's gradients for points xt (D, n), given g_planes = dL/dfeatures (G, F, n)
    (a view of the caller's gradient; points flagged in nan (n,) are skipped), to
    grad_table (R, F) and to grad_xt (D, n)."""
    n_dims, n_features = xt.shape[0], g_planes.shape[1]
    group_table = table[group.rows_start:group.rows_stop]
    group_grad = grad_table[group.rows_start:group.rows_stop] if grad_table is not None else None
    terms, fracs = _axis_terms(xt, group, grid)
    factors = _interpolation_factors(fracs, grid.interpolation)
    need_x = need_x and factors is not None       # "nearest" is piecewise constant: d/dx = 0
    grad_frac = [None] * n_dims
    packed = group_grad is not None and _packable(group_grad, g_planes.dtype)
    if packed:   # one copy of the gradient, straight into the packed form, then NaN points zeroed
        g_rows = (torch.complex(g_planes[:, 0], g_planes[:, 1]) if n_features == 2
                  else g_planes[:, 0].clone()).masked_fill_(nan, 0.0)                # (G, n)
        grad_rows, g = _pack(group_grad), _unpack(g_rows)                           # (R,), (G, n, F)
    else:
        g = g_planes.transpose(1, 2).masked_fill(nan[:, None], 0.0)                 # (G, n, F)

    # Under torch.compile, in-place adds into a view of the gradient would each be turned into
    # a copy of the whole table: collect all corners and add them in one out-of-place op.
    pending = [] if torch.compiler.is_compiling() else None

    def accumulate(corner, index, weight):
        if packed:
            values = g_rows if weight is None else g_rows * weight
            grad_rows.index_add_(0, index.reshape(-1), values.reshape(-1))
        elif group_grad is not None:
            values = (g if weight is None else g * weight.unsqueeze(-1)).reshape(-1, n_features)
            if pending is not None:
                pending.append((index.reshape(-1), values))
            else:
                # (the 2-D index_add_ kernel is slow with int32 indices)
                group_grad.index_add_(0, index.reshape(-1).long(), values.to(group_grad.dtype))
        if need_x:
            g_dot_feature = (g * _gather(group_table, index)).sum(-1)        # (G, n)
            for d in range(n_dims):
                # d weight / d s_d = +-prod_{e != d} (s_e or 1 - s_e)
                others = [factors[e][(corner >> e) & 1] for e in range(n_dims) if e != d]
                term = g_dot_feature * _product(others) if others else g_dot_feature
                term = term if (corner >> d) & 1 else -term
                grad_frac[d] = term if grad_frac[d] is None else grad_frac[d] + term

    _for_each_corner(terms, factors, group, accumulate)
    if pending:
        rows = torch.cat([index for index, _ in pending]).long()
        values = torch.cat([values for _, values in pending]).to(group_grad.dtype)
        group_grad.copy_(torch.zeros_like(group_grad).index_add(0, rows, values))
    if need_x:
        for d in range(n_dims):
            ds = factors[d][2]
            dfrac = grad_frac[d] if ds is None else grad_frac[d] * ds
            # d pos / d x = scale; the cell index is piecewise constant
            grad_xt[d].add_((dfrac * group.scale[d].to(dfrac.dtype)).sum(0))


def _encode_backward(x, table, nan, grid: _Grid, grad_out, need_x: bool, need_table: bool):
    """Gradients of _encode w.r.t. x (N, D) and table (R, F), given grad_out (N, L * F), best
    in _encode's output layout (else it is transposed once). NaN points (nan: (N,))
    contribute nothing.

    Only differentiable torch ops, so autograd can differentiate this again (second-order
    gradients such as an eikonal loss on |df/dx|).
    """
    n_points, n_features = x.shape[0], table.shape[1]
    grad_planes = grad_out.t().reshape(grad_out.shape[1] // n_features, n_features, n_points)   # (L, F, N)
    if not grad_planes.is_contiguous():
        # e.g. a row-major gradient from an elementwise loss on the features: the passes would
        # read it with a large stride, so transpose it once, in runs of points that fit in cache
        planes = torch.empty_like(grad_planes, memory_format=torch.contiguous_format)
        step = max(grid.lookups_per_pass // planes.shape[0] if grid.cpu_passes else n_points, 1)
        for lo in range(0, n_points, step):
            planes[..., lo:lo + step] = grad_planes[..., lo:lo + step]
        grad_planes = planes
    grad_table = torch.zeros(table.shape, dtype=grad_out.dtype, device=table.device) if need_table else None
    grad_xt = torch.zeros(x.shape[::-1], dtype=grad_out.dtype, device=x.device) if need_x else None   # (D, N)
    xt = x.t().contiguous()
    for levels, lo, hi in grid.passes(n_points):
        _backward_group(xt[:, lo:hi], table, levels, grid, grad_planes[levels.start:levels.stop, :, lo:hi],
                        nan[lo:hi], grad_table, grad_xt[:, lo:hi] if need_x else None, need_x)
    grad_x = grad_xt.t().to(x.dtype) if need_x else None
    if need_table:
        grad_table = grad_table.to(table.dtype)
    return grad_x, grad_table


def _table_grad_eager(x: torch.Tensor, table: torch.Tensor, nan: torch.Tensor, grad_out: torch.Tensor,
                      tensors: List[torch.Tensor], spec: List[int], interpolation: str) -> torch.Tensor:
    """The table gradient by the eager CPU path, from a flat description of the grid (see
    _flatten_grid): the body of the _TABLE_GRAD_OP custom op below."""
    tcnn, hash_mask, n_groups = spec[0], spec[1], spec[2]
    groups, at = [], 0
    for g in range(n_groups):
        start, stop, hashed, rows_start, rows_stop, has_max_cell, has_rows = spec[3 + 7 * g: 10 + 7 * g]
        scale, mult, offset = tensors[at:at + 3]
        at += 3
        max_cell = tensors[at] if has_max_cell else None
        at += has_max_cell
        rows = tensors[at] if has_rows else None
        at += has_rows
        groups.append(_Group(start, stop, bool(hashed), rows_start, rows_stop, scale, mult, offset, max_cell, rows))
    grid = _Grid(groups, interpolation, bool(tcnn), hash_mask, None, True, MultiResHashGrid.CPU_LOOKUPS_PER_PASS)
    with torch.no_grad():
        return _encode_backward(x, table, nan, grid, grad_out, False, True)[1]


def _flatten_grid(grid: _Grid):
    tensors, spec = [], [int(grid.tcnn), grid.hash_mask, len(grid.groups)]
    for group in grid.groups:
        spec += [group.start, group.stop, int(group.hashed), group.rows_start, group.rows_stop,
                 int(group.max_cell is not None), int(group.rows is not None)]
        tensors += [group.scale, group.mult, group.offset]
        tensors += [t for t in (group.max_cell, group.rows) if t is not None]
    return tensors, spec


# Under torch.compile, inductor would turn the backward's scatter-adds into its own kernels,
# which on CPU are several times slower than the eager path (int32 indices, complex
# pairs, cache-sized passes). A custom op keeps the eager path opaque to the compiler
# (torch >= 2.4). Its name carries a version, bumped whenever its inputs change: a second
# copy of this file in the same process reuses the op of an equal version, and a copy of
# another version registers its own instead of silently replacing this one.
_TABLE_GRAD_OP = "hashgrid::table_grad_v2"
_table_grad_op = None
if hasattr(torch.library, "custom_op"):
    _namespace, _name = _TABLE_GRAD_OP.split("::")
    if hasattr(getattr(torch.ops, _namespace), _name):
        _table_grad_op = getattr(getattr(torch.ops, _namespace), _name)
    else:
        _table_grad_op = torch.library.custom_op(_TABLE_GRAD_OP, _table_grad_eager, mutates_args=())
        _table_grad_op.register_fake(lambda x, table, *rest: torch.empty_like(table))


class _HashGridFunction(torch.autograd.Function):
    """Interpolated table lookup with a hand-written backward.

    Autograd through the plain ops would keep every corner's indices, weights and gathered
    features alive until backward (hundreds of MB for 2**18 points); this saves only x and
    the table, and backward recomputes the cheap index arithmetic.
    """

    @staticmethod
    def forward(ctx, x, table, nan, grid):
        ctx.grid = grid
        ctx.save_for_backward(x, table, nan)
        return _encode(x, table, nan, grid)

    @staticmethod
    def backward(ctx, grad_out):
        x, table, nan = ctx.saved_tensors
        need_x, need_table = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if (_table_grad_op is not None and torch.compiler.is_compiling() and need_table and not need_x
                and table.device.type == "cpu"):
            tensors, spec = _flatten_grid(ctx.grid)
            return None, _table_grad_op(x, table, nan, grad_out, tensors, spec, ctx.grid.interpolation), None, None
        grad_x, grad_table = _encode_backward(x, table, nan, ctx.grid, grad_out, need_x, need_table)
        return grad_x, grad_table, None, None


class MultiResHashGrid(nn.Module):
    """Multiresolution hash encoding: x (..., dim) in [0, 1] -> (..., n_levels * n_features_per_level).

    Args:
        dim: input dimensions D (any D >= 1).
        n_levels: number of levels L.
        n_features_per_level: features F stored per vertex.
        log2_hashmap_size: log2 of T, the most rows a level may have (paper: 14-24).
        base_resolution: coarsest resolution N_min; an int or one value per axis.
        finest_resolution: finest resolution N_max; an int or one value per axis (e.g. a
            56,718 x 21,450 panorama wants (28359, 10725)). Ignored if per_level_scale is given.
        per_level_scale: growth factor b between levels (int or one per axis), tcnn style.
        interpolation: "linear", "smoothstep" or "nearest".
        layout: "paper" (the paper's resolutions, every vertex addressable, collision-free
            dense coarse levels) or "tcnn" (tiny-cuda-nn's conventions bit for bit; see the
            module docstring, `tcnn_params` and `load_tcnn_params`).

    Input: x of shape (..., dim), any floating dtype. Values are clamped to [0, 1]; a point
    with a NaN coordinate gets NaN features (that point only). Output: (..., output_dim) in
    the tables' dtype. Gradients flow to the tables, to x, and again through d/dx
    (second order, e.g. an eikonal loss).

    Attributes: input_dim, output_dim, resolutions (per level, per axis: N_l in the paper
    layout, tcnn's vertex count in the tcnn layout), rows_per_level, level_offsets,
    hashed_levels, embedding (nn.Embedding(sum(rows_per_level), F), the parameters),
    chunk_size (points per pass; None: automatic, see the speed notes).

    Output layout: in eager mode the (..., output_dim) result is stored feature-major, with the
    strides of a transposed contiguous (output_dim, points) matrix (tiny-cuda-nn's "SoA"
    layout): each pass writes contiguous memory, and a following nn.Linear reads it, and
    returns its gradient, with no copy. Under torch.compile it is row-major. Call
    .contiguous() if you need row-major.

    Speed notes: in CPU eager mode, work runs level-major in passes of CPU_LOOKUPS_PER_PASS
    lookups per cell corner (all points for as many levels as fit, or one level for a run of
    points), so consecutive passes find a level's table in cache and temporaries stay small.
    Row indices are int32 (int64 for tables of 2**31 rows or more) and feature pairs are
    handled as complex numbers. GPUs and torch.compile take each group of levels in one pass
    (of chunk_size points if set); under torch.compile the table gradient runs the eager CPU
    path as the custom op ``hashgrid::table_grad_v2`` (torch >= 2.4).
    """

    # CPU eager passes (see the speed notes): lookups per cell corner (points x levels).
    CPU_LOOKUPS_PER_PASS = 1 << 16

    def __init__(
        self,
        dim: int,
        n_levels: int = 16,
        n_features_per_level: int = 2,
        log2_hashmap_size: int = 15,
        base_resolution: Resolution = 16,
        finest_resolution: Resolution = 512,
        *,
        per_level_scale: Optional[Resolution] = None,
        interpolation: str = "linear",
        layout: str = "paper",
    ):
        super().__init__()
        for name, value, low in (("dim", dim, 1), ("n_levels", n_levels, 1),
                                 ("n_features_per_level", n_features_per_level, 1),
                                 ("log2_hashmap_size", log2_hashmap_size, 1)):
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
        if log2_hashmap_size > 31:
            raise ValueError(f"log2_hashmap_size must be <= 31 (tables of 2**31 rows), got {log2_hashmap_size}")
        if interpolation not in _INTERPOLATIONS:
            raise ValueError(f"interpolation must be one of {_INTERPOLATIONS}, got {interpolation!r}")
        if layout not in _LAYOUTS:
            raise ValueError(f"layout must be one of {_LAYOUTS}, got {layout!r}")
        self.input_dim = dim
        self.output_dim = n_levels * n_features_per_level
        self.n_levels = n_levels
        self.n_features_per_level = n_features_per_level
        self.log2_hashmap_size = log2_hashmap_size
        self.interpolation = interpolation
        self.layout = layout
        self.chunk_size: Optional[int] = None   # points per pass; None: automatic (see _Grid)
        base = _per_axis(base_resolution, dim, "base_resolution")
        if per_level_scale is None:
            finest = _per_axis(finest_resolution, dim, "finest_resolution")
            if any(f < b for f, b in zip(finest, base)):
                raise ValueError(f"finest_resolution {finest_resolution} must be >= base_resolution {base_resolution}")
            growth = tuple(math.exp((math.log(f) - math.log(b)) / (n_levels - 1)) if n_levels > 1 else 1.0
                           for f, b in zip(finest, base))
        else:
            growth = _per_axis(per_level_scale, dim, "per_level_scale")
            if any(g < 1 for g in growth):
                raise ValueError(f"per_level_scale must be >= 1, got {per_level_scale}")
        self.base_resolution = base_resolution
        self.finest_resolution = finest_resolution
        self.per_level_scale = growth

        hash_rows = 1 << log2_hashmap_size
        primes = hash_primes(dim)
        scales, mults, max_cells, rows, hashed = [], [], [], [], []
        resolutions = []
        for level in range(n_levels):
            if layout == "paper":
                cells = [_floor(b * g ** level) for b, g in zip(base, growth)]
                level_scale = [float(c) for c in cells]
                vertices = [c + 1 for c in cells]
                # the highest cell is N - 1 so that x == 1 interpolates onto vertex N
                max_cells.append([c if interpolation == "nearest" else c - 1 for c in cells])
                resolutions.append(tuple(cells))
                n_vertices = math.prod(vertices)
                level_rows = n_vertices if n_vertices <= hash_rows else hash_rows
            else:
                # float32 at every step, as tcnn: exp2f(level * log2f(b)) * N_min - 1.0f
                level_scale = [_float32(_float32(_float32(2.0 ** _float32(level * _float32(math.log2(g)))) * b) - 1.0)
                               for b, g in zip(base, growth)]
                vertices = [math.ceil(s) + 1 for s in level_scale]
                resolutions.append(tuple(vertices))
                n_vertices = math.prod(vertices)
                level_rows = min(_next_multiple(n_vertices, 8), hash_rows)
            is_hashed = n_vertices > level_rows
            strides = [math.prod(vertices[:d]) for d in range(dim)]
            scales.append(level_scale)
            mults.append(primes if is_hashed else strides)
            rows.append(level_rows)
            hashed.append(is_hashed)
        self.resolutions = tuple(resolutions)
        self.rows_per_level = tuple(rows)
        self.level_offsets = tuple(sum(rows[:level]) for level in range(n_levels))
        self.hashed_levels = tuple(level for level in range(n_levels) if hashed[level])
        self._hash_mask = hash_rows - 1

        # One embedding for all levels: one gather serves every level at once, and its
        # flattened weight has exactly tiny-cuda-nn's parameter layout.
        self.embedding = nn.Embedding(sum(rows), n_features_per_level)
        nn.init.uniform_(self.embedding.weight, -1e-4, 1e-4)

        # Consecutive levels that index alike (all dense or all hashed) form a group, computed
        # by the same vectorised ops (in one pass on a GPU or under torch.compile, in
        # cache-sized passes on a CPU). Buffers are non-persistent (derived from the
        # config) and integer-typed, so .half()/.to(dtype) cannot round them; the float32
        # scales are stored as their bit patterns for that reason.
        # Row indices fit int32 (half the memory traffic of int64) unless the table is huge;
        # a dense index before tcnn's wrap-around can reach a level's rows plus one stride.
        largest_index = sum(rows) + max((max(m) for m, h in zip(mults, hashed) if not h), default=0)
        index_dtype = torch.int32 if largest_index < 2**31 else torch.int64
        self._groups = []
        start = 0
        while start < n_levels:
            stop = start
            while stop < n_levels and hashed[stop] == hashed[start]:
                stop += 1
            rows_start = self.level_offsets[start]
            name = f"_group{len(self._groups)}"

            def buffer(suffix, values, dtype=torch.int64):
                self.register_buffer(name + suffix, torch.tensor(values, dtype=dtype), persistent=False)

            axis_major = lambda per_level: [[[v] for v in axis] for axis in zip(*per_level[start:stop])]  # (D, G, 1)
            scale = torch.tensor(axis_major(scales), dtype=torch.float32)
            self.register_buffer(name + "_scale_bits", scale.view(torch.int32), persistent=False)
            buffer("_mult", axis_major(mults), torch.int64 if hashed[start] else index_dtype)
            buffer("_offset", [[offset - rows_start] for offset in self.level_offsets[start:stop]], index_dtype)
            if layout == "paper":
                buffer("_max_cell", axis_major(max_cells))
            elif not hashed[start]:
                buffer("_rows", [[r] for r in rows[start:stop]], index_dtype)
            self._groups.append((name, start, stop, hashed[start], rows_start, rows_start + sum(rows[start:stop])))
            start = stop

    def _grid(self, device: torch.device) -> _Grid:
        groups = [
            _Group(start, stop, is_hashed, rows_start, rows_stop,
                   scale=getattr(self, name + "_scale_bits").view(torch.float32),
                   mult=getattr(self, name + "_mult"),
                   offset=getattr(self, name + "_offset"),
                   max_cell=getattr(self, name + "_max_cell", None),
                   rows=getattr(self, name + "_rows", None))
            for name, start, stop, is_hashed, rows_start, rows_stop in self._groups
        ]
        cpu_passes = device.type == "cpu" and not torch.compiler.is_compiling()
        return _Grid(groups, self.interpolation, self.layout == "tcnn", self._hash_mask, self.chunk_size,
                     cpu_passes, self.CPU_LOOKUPS_PER_PASS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (..., dim) in [0, 1] -> (..., n_levels * n_features_per_level)."""
        if not isinstance(x, torch.Tensor) or not torch.is_floating_point(x):
            raise TypeError(f"MultiResHashGrid expects a floating-point tensor of shape (..., {self.input_dim}), "
                            f"got {type(x).__name__ if not isinstance(x, torch.Tensor) else x.dtype}")
        if x.dim() == 0 or x.shape[-1] != self.input_dim:
            raise ValueError(f"MultiResHashGrid(dim={self.input_dim}) expects x of shape (..., {self.input_dim}), "
                             f"got {tuple(x.shape)}")
        table = self.embedding.weight
        batch_shape = x.shape[:-1]
        points = x.reshape(-1, self.input_dim)
        # float64 stays float64 (gradcheck); anything narrower computes positions in float32,
        # since N_l * x needs ~24 bits at the finest levels.
        points = points.to(torch.float64 if points.dtype == torch.float64 else torch.float32)
        # NaN coordinates get a placeholder position and NaN features, inside the chunked
        # passes (cheap there, in cache) rather than as extra passes over the whole output.
        nan = torch.isnan(points)
        points = points.masked_fill(nan, 0.0).clamp(0.0, 1.0)
        features = _HashGridFunction.apply(points, table, nan.any(-1), self._grid(points.device))  # (N, L * F)
        return features.to(table.dtype).reshape(*batch_shape, self.output_dim)

    def tcnn_params(self) -> torch.Tensor:
        """The parameters as tiny-cuda-nn's flat vector: (sum(rows_per_level) * F,), layout="tcnn" only."""
        self._require_tcnn()
        return self.embedding.weight.detach().reshape(-1).clone()

    @torch.no_grad()
    def load_tcnn_params(self, params: torch.Tensor) -> None:
        """Load a tiny-cuda-nn HashGrid parameter vector (e.g. ``tcnn.Encoding.params``)."""
        self._require_tcnn()
        weight = self.embedding.weight
        if params.numel() != weight.numel():
            raise ValueError(f"expected {weight.numel()} tcnn parameters "
                             f"({weight.shape[0]} rows x {weight.shape[1]} features), got {params.numel()}")
        weight.copy_(params.detach().reshape(weight.shape).to(device=weight.device, dtype=weight.dtype))

    def _require_tcnn(self) -> None:
        if self.layout != "tcnn":
            raise ValueError("tcnn parameter vectors need MultiResHashGrid(..., layout='tcnn')")

    def extra_repr(self) -> str:
        return (f"dim={self.input_dim}, n_levels={self.n_levels}, n_features_per_level={self.n_features_per_level}, "
                f"log2_hashmap_size={self.log2_hashmap_size}, resolutions={self.resolutions[0]}..{self.resolutions[-1]}, "
                f"hashed_levels={len(self.hashed_levels)}, interpolation={self.interpolation!r}, layout={self.layout!r}")


class Frequency(nn.Module):
    """NeRF positional encoding (Mildenhall et al. 2020, eq. 4):
    x (..., dim) -> (..., dim * n_levels * 2), per input axis
    [sin(2^0 pi x), ..., sin(2^(L-1) pi x), cos(2^0 pi x), ..., cos(2^(L-1) pi x)].
    """

    def __init__(self, dim: int, n_levels: int = 10):
        super().__init__()
        if not isinstance(dim, int) or dim < 1 or not isinstance(n_levels, int) or n_levels < 1:
            raise ValueError(f"Frequency needs dim >= 1 and n_levels >= 1, got dim={dim!r}, n_levels={n_levels!r}")
        self.input_dim = dim
        self.n_levels = n_levels
        self.output_dim = dim * n_levels * 2
        self.register_buffer("freqs", 2.0 ** torch.arange(n_levels, dtype=torch.float32),
                             persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (..., dim) -> (..., dim * n_levels * 2)."""
        if not isinstance(x, torch.Tensor) or not torch.is_floating_point(x):
            raise TypeError(f"Frequency expects a floating-point tensor of shape (..., {self.input_dim})")
        if x.dim() == 0 or x.shape[-1] != self.input_dim:
            raise ValueError(f"Frequency(dim={self.input_dim}) expects x of shape (..., {self.input_dim}), "
                             f"got {tuple(x.shape)}")
        angles = x.unsqueeze(-1) * (self.freqs.to(x.dtype) * math.pi)           # (..., dim, L)
        return torch.cat((torch.sin(angles), torch.cos(angles)), dim=-1).flatten(-2)

    def extra_repr(self) -> str:
        return f"dim={self.input_dim}, n_levels={self.n_levels}"
