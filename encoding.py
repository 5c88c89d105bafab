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
    b_d    = exp((ln N_max_d - ln N_min_d) / (L - 1))  (1 when L = 1; or `per_level_scale`)
    N_l,d  = floor(N_min_d * b_d**l)                     grid cells along axis d
    pos    = x_d * N_l,d                                 vertices 0 .. N_l,d (N_l,d + 1 of them)
    cell   = min(floor(pos), N_l,d - 1), frac = pos - cell  (x = 1 lands on the last vertex)
    V_l,d  = N_l,d + 1 vertices to store; on a periodic axis vertex N_l,d is vertex 0
             (vertex v is v mod N_l,d), so V_l,d = N_l,d and features are continuous
             across x_d = 0 / 1 at every level (with smoothstep, their derivatives too)
    rows   = prod_d V_l,d if that is <= T or grid_type="dense" (a dense level),
             else T (a hashed level)

layout="tcnn" (tiny-cuda-nn's Grid encodings, bit for bit, so tcnn-trained parameters load)
    b      = per_level_scale (default exp(ln(N_max / N_min) / (L - 1)))
    scale  = exp2(l * log2(b)) * N_min - 1              (float32, as tcnn computes it)
    res    = ceil(scale) + 1                             vertices per axis
    pos    = x_d * scale + 0.5 (one fused rounding), cell = floor(pos), frac = pos - cell
    rows   = min(next multiple of 8 of res**D, 2**31), then by grid_type:
             "hash"  (HashGrid):  at most T; hashed when res**D > rows
             "dense" (DenseGrid): as is, not capped by T
             "tiled" (TiledGrid): at most N_min**D, the dense index below wrapping modulo
                                  rows (so the level tiles space with copies of its table)
             dense and tiled levels need res**D < 2**32 (tcnn's 32-bit index)

Vertex -> row (both layouts)
    dense  : index = sum_d v_d * stride_d, stride_0 = 1, stride_d = stride_{d-1} * V_{d-1}
             (axis 0 fastest: for an image, x runs along a row; collision-free).
             tcnn takes the result modulo rows (tiled levels wrap by it), as we do.
    hashed : index = (XOR_d v_d * prime_d mod 2**32) mod T, primes
             1, 2654435761, 805459861, 3674653429, 2097192037, 1434869437, 2165219737;
             axes beyond the 7th use `hash_primes` (documented there).
    All levels share one ``nn.Embedding`` of sum_l rows_l rows; level l starts at row
    offset_l = sum_{k<l} rows_k. Flattened, its weight is tcnn's parameter vector.

Interpolation: "linear" (weights prod_d frac_d or 1 - frac_d over the 2**D cell corners),
"smoothstep" (the same with S(t) = t^2 (3 - 2t), continuous dy/dx) and "nearest" (the
vertex floor(x * N + 0.5) in the paper layout, tcnn's floor(pos) in the tcnn layout).

Code map (top to bottom; each formula above lives in exactly one function)
-----------------------------------------------------------------------------
formulas           b: _paper_growth; N_l: _paper_cells; tcnn scale / res: _tcnn_scale,
                   _tcnn_vertices; rows: _level_rows; strides: _dense_strides;
                   dense index / hash: _dense_term, _hash_term, _combine (one axis' share
                   of the row, and how axes combine); periodic wrap: _periodic_vertex;
                   pos / cell / frac: _cell_and_frac; weights: _interpolation_weights;
                   primes: hash_primes
level plan         _Level, _plan_levels: every level's resolution, rows, offset, kind
_LevelGroup        consecutive levels that index alike, as the tensors the passes use (the
                   one representation of levels: eager, torch.compile and the custom op)
MultiResHashGrid   the nn.Module; from_tcnn_config / tcnn_config, table_shape
_HashGridFunction  the autograd Function (saves x and the table; backward recomputes)
pass drivers       _Passes (how work is split), _encode / _encode_backward, per group
CPU speed tricks   word-view gathers, complex-packed feature pairs, gathers / scatter-adds
                   split among the intra-op threads (_per_level)
custom op          hashgrid::table_grad_v4: torch.compile's table gradient on a CPU
Frequency          NeRF positional encoding
"""
import math
from typing import Callable, List, NamedTuple, Optional, Sequence, Tuple, Union

import torch
from torch import nn

__all__ = ["MultiResHashGrid", "Frequency", "hash_primes", "HASH_PRIMES"]

Resolution = Union[int, float, Sequence[Union[int, float]]]
_INTERPOLATIONS = ("linear", "smoothstep", "nearest")
_LAYOUTS = ("paper", "tcnn")
_GRID_TYPES = ("hash", "dense", "tiled")
# Interpolation visits the 2**D corners of a point's cell at every level, each a few tensor ops
# per pass and a gather per point: at D = 16 that is already 65,536 lookups per point and
# level, and D = 40 would never return. "nearest" reads one vertex and has no such limit.
_MAX_INTERPOLATED_DIM = 16


# =============================================================================================
# The formulas: one small function each (Python numbers at construction, tensors per point)
# =============================================================================================

# The spatial-hash primes of the paper (eq. 4) and tiny-cuda-nn; 1 for the first axis keeps
# neighbouring vertices along x in neighbouring rows (cache coherence).
HASH_PRIMES = (1, 2654435761, 805459861, 3674653429, 2097192037, 1434869437, 2165219737)
_GOLDEN_RATIO_32 = 2654435769  # floor(2**32 / golden ratio), a Weyl-sequence step


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


def _float32(value: float) -> float:
    """The nearest float32 to value, as a Python float."""
    return torch.tensor(value, dtype=torch.float32, device="cpu").item()


def _paper_growth(base: float, finest: float, n_levels: int) -> float:
    """b = exp((ln N_max - ln N_min) / (L - 1)), 1 for a single level."""
    if n_levels == 1:
        return 1.0
    return math.exp((math.log(finest) - math.log(base)) / (n_levels - 1))


def _paper_cells(base: float, growth: float, level: int) -> int:
    """N_l = floor(N_min * b**l): cells along one axis at level l (paper layout)."""
    # exp/log round-off can land N_min * b**(L-1) a hair below N_max; the paper means N_max.
    return math.floor(base * growth ** level * (1.0 + 1e-12))


def _tcnn_scale(base: float, growth: float, level: int) -> float:
    """tcnn's scale exp2f(l * log2f(b)) * N_min - 1.0f, rounded to float32 at every step
    (b itself is a float32 there)."""
    exponent = _float32(level * _float32(math.log2(_float32(growth))))
    return _float32(_float32(_float32(2.0 ** exponent) * base) - 1.0)


def _tcnn_vertices(scale: float) -> int:
    """tcnn's resolution: ceil(scale) + 1 vertices along one axis."""
    return math.ceil(scale) + 1


def _level_rows(n_vertices: int, layout: str, grid_type: str, max_rows: int,
                tile_rows: int) -> int:
    """A level's table rows. Paper layout: every vertex if they fit in T (max_rows) or the
    grid is dense, else T. tcnn: every vertex rounded up to a multiple of 8 (its memory
    alignment), at most 2**31; then at most T (hash) or N_min**D (tile_rows, tiled). A hash
    grid's level is hashed when n_vertices > rows."""
    if layout == "paper":
        return n_vertices if grid_type == "dense" else min(n_vertices, max_rows)
    rows = min(-(-n_vertices // 8) * 8, 2**31)
    if grid_type == "hash":
        return min(rows, max_rows)
    return min(rows, tile_rows) if grid_type == "tiled" else rows


def _dense_strides(vertices: Sequence[int]) -> Tuple[int, ...]:
    """stride_0 = 1, stride_d = stride_{d-1} * V_{d-1} (axis 0 fastest)."""
    return tuple(math.prod(vertices[:d]) for d in range(len(vertices)))


def _dense_term(vertex, stride):
    """Axis d's share of a dense level's row index: v_d * stride_d (axes combine by +).
    Ints or integer tensors."""
    return vertex * stride


def _hash_term(vertex, prime, mask: int):
    """Axis d's share of a hashed level's row index: (v_d * prime_d mod 2**32) mod T, written
    & (T - 1) (mask), T being a power of two <= 2**32 (axes combine by XOR). Ints or int64
    tensors, whose wrap-around on overflow keeps the low 32 bits exact."""
    return (vertex * prime) & mask


def _combine(index, term, hashed: bool):
    """A partial row index and one more axis' term -> XOR (spatial hash) or + (dense)."""
    return index ^ term if hashed else index + term


def _periodic_vertex(vertex: torch.Tensor, n_cells: torch.Tensor) -> torch.Tensor:
    """On a periodic axis vertex N is vertex 0: v -> v mod N (float tensors holding
    integers)."""
    return torch.remainder(vertex, n_cells)


def _cell_and_frac(x: torch.Tensor, scale: torch.Tensor, shift: float, tcnn: bool,
                   max_cell: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
    """One axis: x (n,), scale (G, 1) -> cell (G, n) (a float holding the lower vertex) and
    frac (G, n) in [0, 1]: pos = x * scale + shift, cell = min(floor(pos), max_cell),
    frac = pos - cell."""
    if tcnn and x.dtype != torch.float64:
        # tcnn computes fmaf(scale, x, 0.5) in float32 (one rounding). The product of two
        # float32 values is exact in float64, so this reproduces it bit for bit (barring
        # double-rounding ties).
        pos = (scale.double() * x.double() + shift).to(x.dtype)
    else:
        pos = scale.to(x.dtype) * x
        if shift:
            pos = pos + shift
    cell = torch.floor(pos)
    if max_cell is not None:
        cell = torch.minimum(cell, max_cell.to(cell.dtype))
    return cell, pos - cell


def _smoothstep(t: torch.Tensor) -> torch.Tensor:
    return t * t * (3.0 - 2.0 * t)


def _smoothstep_derivative(t: torch.Tensor) -> torch.Tensor:
    return 6.0 * t * (1.0 - t)


def _interpolation_weights(frac: torch.Tensor, interpolation: str):
    """One axis: (weight of the lower vertex, weight of the upper vertex, d upper / d frac,
    None when that is 1). A corner's weight is the product of its axes' weights."""
    if interpolation == "smoothstep":
        s = _smoothstep(frac)
        return 1.0 - s, s, _smoothstep_derivative(frac)
    return 1.0 - frac, frac, None


# =============================================================================================
# The level plan: plain Python, computed once at construction
# =============================================================================================

class _Level(NamedTuple):
    """One level: resolution (N_l per axis in the paper layout, tcnn's vertex count in the
    tcnn layout), scale (pos = x * scale (+ 0.5)), vertices (per axis, the dense index's
    V_d), rows, offset (its first row), hashed."""
    resolution: Tuple[int, ...]
    scale: Tuple[float, ...]
    vertices: Tuple[int, ...]
    rows: int
    offset: int
    hashed: bool


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


def _plan_levels(base: Sequence[float], growth: Sequence[float], n_levels: int,
                 log2_hashmap_size: int, layout: str, grid_type: str,
                 periodic: Sequence[bool]) -> List[_Level]:
    """Every level's resolution, rows and offset, from the per-axis N_min and b."""
    max_rows, offset, levels = 1 << log2_hashmap_size, 0, []
    tile_rows = math.prod(int(b) for b in base)
    for level in range(n_levels):
        if layout == "paper":
            cells = tuple(_paper_cells(b, g, level) for b, g in zip(base, growth))
            resolution, scale = cells, tuple(float(c) for c in cells)
            vertices = tuple(c if p else c + 1 for c, p in zip(cells, periodic))
        else:
            scale = tuple(_tcnn_scale(b, g, level) for b, g in zip(base, growth))
            resolution = vertices = tuple(_tcnn_vertices(s) for s in scale)
        n_vertices = math.prod(vertices)
        if layout == "tcnn" and grid_type != "hash" and n_vertices >= 2**32:
            raise ValueError(f"level {level} of a {grid_type} grid has {n_vertices} >= 2**32 "
                             "vertices, past tiny-cuda-nn's 32-bit dense index")
        rows = _level_rows(n_vertices, layout, grid_type, max_rows, tile_rows)
        hashed = grid_type == "hash" and n_vertices > rows
        levels.append(_Level(resolution, scale, vertices, rows, offset, hashed))
        offset += rows
    return levels


# =============================================================================================
# A group of levels: the one representation the passes use
# =============================================================================================

class _LevelGroup(nn.Module):
    """Consecutive levels that index alike (all dense or all hashed), computed together by
    the same vectorised ops.

    Static: start, stop (levels start..stop-1), hashed, rows_start, rows_stop (the group's
    slice of the table), hash_mask (T - 1), tcnn (tcnn's positions and dense wrap-around),
    periodic_bits (bit d set: axis d is periodic), interpolation, shift (pos = x * scale + shift).
    Tensors (non-persistent buffers, axis-major so each per-axis operand broadcasts as a
    (G, 1) column against a (1, n) row of points and every intermediate is a contiguous
    level-major (G, n) tensor, which keeps one level's table accesses together):
      scale (D, G, 1) float32; mult (D, G, 1) the hash primes (int64) or dense strides;
      offset (G, 1) each level's first row relative to rows_start; max_cell (D, G, 1) the
      highest cell (paper layout) or None; rows (G, 1) for tcnn's dense wrap-around, or None.
    Integer tensors are int32 (int64 for tables of 2**31 rows or more), except mult when
    hashed. Given on the CPU, kept there as the source of their values and copied to the
    default device (a ``with torch.device(...)`` block, meta included). Device moves
    (.to(device), .to_empty()) copy them again; dtype casts (.half(), .double()) leave
    them alone.
    """
    TENSORS = ("scale", "mult", "offset", "max_cell", "rows")
    STATICS = ("start", "stop", "hashed", "rows_start", "rows_stop", "hash_mask", "tcnn",
               "periodic_bits")

    def __init__(self, start: int, stop: int, hashed: bool, rows_start: int, rows_stop: int,
                 hash_mask: int, tcnn: bool, periodic_bits: int, interpolation: str,
                 **tensors):
        super().__init__()
        self.start, self.stop, self.hashed = start, stop, bool(hashed)
        self.rows_start, self.rows_stop = rows_start, rows_stop
        self.hash_mask, self.tcnn, self.interpolation = hash_mask, bool(tcnn), interpolation
        self.periodic_bits = periodic_bits
        self.shift = 0.5 if (self.tcnn or interpolation == "nearest") else 0.0
        self._host = tensors
        device = torch.empty(0).device
        for name in self.TENSORS:
            tensor = tensors[name]
            self.register_buffer(name, None if tensor is None else tensor.to(device),
                                 persistent=False)

    @classmethod
    def from_levels(cls, levels: Sequence[_Level], start: int, hash_mask: int, layout: str,
                    periodic: Sequence[bool], interpolation: str,
                    index_dtype: torch.dtype) -> "_LevelGroup":
        """levels: the plan's levels start..start+G-1, all dense or all hashed."""
        hashed, dim = levels[0].hashed, len(levels[0].scale)
        mult = [hash_primes(dim) if hashed else _dense_strides(lv.vertices) for lv in levels]

        def axis_major(per_level, dtype):     # G lists of D values -> (D, G, 1)
            values = [[[v] for v in axis] for axis in zip(*per_level)]
            return torch.tensor(values, dtype=dtype, device="cpu")

        max_cell = rows = None
        if layout == "paper":   # the highest cell is N - 1, so x = 1 interpolates onto vertex N
            last = 0 if interpolation == "nearest" else 1
            max_cell = axis_major([[n - last for n in lv.resolution] for lv in levels], torch.int64)
        elif not hashed:
            rows = torch.tensor([[lv.rows] for lv in levels], dtype=index_dtype, device="cpu")
        rows_start = levels[0].offset
        return cls(start, start + len(levels), hashed, rows_start,
                   levels[-1].offset + levels[-1].rows, hash_mask, layout == "tcnn",
                   sum(1 << d for d, p in enumerate(periodic) if p), interpolation,
                   scale=axis_major([level.scale for level in levels], torch.float32),
                   mult=axis_major(mult, torch.int64 if hashed else index_dtype),
                   offset=torch.tensor([[lv.offset - rows_start] for lv in levels],
                                       dtype=index_dtype, device="cpu"),
                   max_cell=max_cell, rows=rows)

    def _apply(self, fn, recurse=True):
        # Follow device moves only: a dtype cast would round the float32 scales (.half())
        # or slow the index arithmetic. fn applied to an empty probe tells the device; the
        # values come from the CPU copies (a meta tensor has none, for .to_empty()).
        for name, tensor in self._buffers.items():
            if tensor is not None:
                device = fn(torch.empty(0, device=tensor.device)).device
                self._buffers[name] = self._host[name].to(device)
        return self

    def row_span(self, first: int, stop: int) -> Tuple[int, int]:
        """(first row, end row) of levels first..stop-1, counted from rows_start."""
        offsets = self._host["offset"].view(-1).tolist()
        end = offsets[stop] if stop < len(offsets) else self.rows_stop - self.rows_start
        return offsets[first], end

    def op_args(self) -> Tuple[List[Optional[torch.Tensor]], List[int]]:
        """(tensors, ints) in TENSORS / STATICS order, for the custom op's schema."""
        return ([getattr(self, name) for name in self.TENSORS],
                [int(getattr(self, name)) for name in self.STATICS])

    @classmethod
    def from_op_args(cls, tensors: Sequence[Optional[torch.Tensor]], ints: Sequence[int],
                     interpolation: str) -> List["_LevelGroup"]:
        """The inverse of op_args, for a run of groups: concatenated tensors and ints."""
        n_tensors, n_ints = len(cls.TENSORS), len(cls.STATICS)
        return [cls(*ints[i * n_ints:(i + 1) * n_ints], interpolation=interpolation,
                    **dict(zip(cls.TENSORS, tensors[i * n_tensors:(i + 1) * n_tensors])))
                for i in range(len(ints) // n_ints)]

    def extra_repr(self) -> str:
        return (f"levels {self.start}..{self.stop - 1}, {'hashed' if self.hashed else 'dense'}, "
                f"rows {self.rows_start}..{self.rows_stop - 1}")


# =============================================================================================
# The module
# =============================================================================================

class MultiResHashGrid(nn.Module):
    """Multiresolution hash encoding: x (..., dim) in [0, 1] ->
    (..., n_levels * n_features_per_level).

    Args:
        dim: input dimensions D: 1..16 when interpolating (2**D cell corners per point and
            level), any D >= 1 with "nearest".
        n_levels: number of levels L.
        n_features_per_level: features F stored per vertex.
        log2_hashmap_size: log2 of T, the most rows a level may have (paper: 14-24).
        base_resolution: coarsest resolution N_min (>= 1); an int or one value per axis.
        finest_resolution: finest resolution N_max; an int or one value per axis (e.g. a
            56,718 x 21,450 panorama wants (28359, 10725)). Ignored if per_level_scale is given.
        per_level_scale: growth factor b between levels (int or one per axis), tcnn style.
        interpolation: "linear", "smoothstep" or "nearest".
        layout: "paper" (the paper's resolutions, every vertex addressable, collision-free
            dense coarse levels) or "tcnn" (tiny-cuda-nn's conventions bit for bit; see the
            module docstring, `from_tcnn_config`, `tcnn_params` and `load_tcnn_params`).
        grid_type: "hash" (levels too large for T rows are hashed), "dense" (every level
            stores every vertex) or "tiled" (tcnn layout: at most N_min**D rows per level,
            wrapping); tiny-cuda-nn's HashGrid, DenseGrid and TiledGrid.
        periodic: paper layout: True/False for all axes or one bool per axis; along a
            periodic axis x = 0 and x = 1 are the same place (vertex N_l is vertex 0), e.g.
            an angle or a 360-degree panorama's longitude. x is still clamped to [0, 1]
            (wrap angles first, e.g. x % 1).

    Input: x of shape (..., dim), any floating dtype. Values are clamped to [0, 1]; a point
    with a NaN coordinate gets NaN features (that point only). Output: (..., output_dim) in
    the tables' dtype. Gradients flow to the tables, to x, and again through d/dx
    (second order, e.g. an eikonal loss).

    Attributes: input_dim, output_dim, resolutions (per level, per axis: N_l in the paper
    layout, tcnn's vertex count in the tcnn layout), rows_per_level, level_offsets,
    hashed_levels, periodic (tuple of D bools), grid_type, embedding
    (nn.Embedding(sum(rows_per_level), F), the parameters),
    chunk_size (points per pass; None: automatic, see the speed notes).
    ``MultiResHashGrid.table_shape(...)`` gives the embedding's shape for the same arguments
    without allocating it. The table starts as U(-1e-4, 1e-4), as in the paper.

    Output layout: in eager mode the (..., output_dim) result is stored feature-major, with
    the strides of a transposed contiguous (output_dim, points) matrix (tiny-cuda-nn's "SoA"
    layout): each pass writes contiguous memory, and a following nn.Linear reads it, and
    returns its gradient, with no copy. Under torch.compile it is row-major. Call
    .contiguous() if you need row-major.

    Speed notes: in CPU eager mode, work runs level-major in passes of CPU_LOOKUPS_PER_PASS
    lookups per cell corner (all points for as many levels as fit, or one level for a run of
    points), so consecutive passes find a level's table in cache and temporaries stay small.
    Row indices are int32 (int64 for tables of 2**31 rows or more) and feature pairs are
    handled as complex numbers. Gathers run on all intra-op threads, and so does the table
    gradient (one level per thread). GPUs and torch.compile take each group
    of levels in one pass (of chunk_size points if set); under torch.compile the table
    gradient runs the eager CPU path as the custom op ``hashgrid::table_grad_v4`` (torch >=
    2.4). CPU_PASSES = False makes a CPU take the GPU branch too (to test it without a GPU).
    """

    # CPU eager passes (see the speed notes): lookups per cell corner (points x levels).
    # 2**16: peak memory of a 2-D fwd+bwd step 213 MiB, vs 254 MiB at 2**17.
    CPU_LOOKUPS_PER_PASS = 1 << 16
    # False (on the class or an instance): a CPU in eager mode takes the device branch too
    # (what GPUs and torch.compile run: one pass per level group, plain kernels), for
    # testing that branch without a GPU. Slower on a CPU.
    CPU_PASSES = True

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
        grid_type: str = "hash",
        periodic: Union[bool, Sequence[bool]] = False,
    ):
        super().__init__()
        for name, value in (("dim", dim), ("n_levels", n_levels),
                            ("n_features_per_level", n_features_per_level),
                            ("log2_hashmap_size", log2_hashmap_size)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if log2_hashmap_size > 31:
            raise ValueError("log2_hashmap_size must be <= 31 (tables of 2**31 rows), "
                             f"got {log2_hashmap_size}")
        if interpolation not in _INTERPOLATIONS:
            raise ValueError(f"interpolation must be one of {_INTERPOLATIONS}, "
                             f"got {interpolation!r}")
        if layout not in _LAYOUTS:
            raise ValueError(f"layout must be one of {_LAYOUTS}, got {layout!r}")
        if grid_type not in _GRID_TYPES:
            raise ValueError(f"grid_type must be one of {_GRID_TYPES}, got {grid_type!r}")
        periodic_axes = (periodic,) * dim if isinstance(periodic, bool) else tuple(periodic)
        if len(periodic_axes) != dim or not all(isinstance(p, bool) for p in periodic_axes):
            raise ValueError(f"periodic must be a bool or {dim} bools, got {periodic!r}")
        if any(periodic_axes) and layout != "paper":
            raise ValueError("periodic axes need layout='paper' (tiny-cuda-nn has none)")
        if interpolation != "nearest" and dim > _MAX_INTERPOLATED_DIM:
            raise ValueError(
                f"dim={dim} with {interpolation!r} interpolation would visit 2**{dim} cell "
                f"corners per point and level; at most dim={_MAX_INTERPOLATED_DIM} is "
                "supported (interpolation='nearest' reads one vertex and allows any dim)")
        base = _per_axis(base_resolution, dim, "base_resolution")
        if any(b < 1 for b in base):
            raise ValueError("base_resolution must be >= 1 on every axis (the coarsest level "
                             f"needs at least 1 cell), got {base_resolution}")
        if grid_type == "tiled" and (layout != "tcnn" or any(b != int(b) for b in base)):
            raise ValueError("grid_type='tiled' needs layout='tcnn' and an integer "
                             f"base_resolution (tiles of N_min**D rows), got layout={layout!r}, "
                             f"base_resolution={base_resolution}")
        if per_level_scale is None:
            finest = _per_axis(finest_resolution, dim, "finest_resolution")
            if any(f < b for f, b in zip(finest, base)):
                raise ValueError(f"finest_resolution {finest_resolution} must be >= "
                                 f"base_resolution {base_resolution}")
            growth = tuple(_paper_growth(b, f, n_levels) for b, f in zip(base, finest))
        else:
            growth = _per_axis(per_level_scale, dim, "per_level_scale")
            if any(g < 1 for g in growth):
                raise ValueError(f"per_level_scale must be >= 1, got {per_level_scale}")
        self.input_dim = dim
        self.output_dim = n_levels * n_features_per_level
        self.n_levels = n_levels
        self.n_features_per_level = n_features_per_level
        self.log2_hashmap_size = log2_hashmap_size
        self.interpolation = interpolation
        self.layout = layout
        self.grid_type = grid_type
        self.periodic = periodic_axes
        self.base_resolution = base_resolution
        self.finest_resolution = finest_resolution
        self.per_level_scale = growth
        self.chunk_size: Optional[int] = None   # points per pass; None: automatic (_Passes)

        levels = _plan_levels(base, growth, n_levels, log2_hashmap_size, layout, grid_type,
                              periodic_axes)
        self.resolutions = tuple(level.resolution for level in levels)
        self.rows_per_level = tuple(level.rows for level in levels)
        self.level_offsets = tuple(level.offset for level in levels)
        self.hashed_levels = tuple(i for i, level in enumerate(levels) if level.hashed)

        # One embedding for all levels: one gather serves every level at once, and its
        # flattened weight has exactly tiny-cuda-nn's parameter layout. Initialised once,
        # U(-1e-4, 1e-4) as in the paper: nn.Embedding's own normal_ init would first take
        # minutes on a 2**31-row table.
        weight = torch.empty(sum(self.rows_per_level), n_features_per_level)
        self.embedding = nn.Embedding(*weight.shape, _weight=weight.uniform_(-1e-4, 1e-4))

        # Row indices in int32 (half the memory traffic of int64: 2-D eager forward 185 ms vs
        # 320 ms for 2**18 points) unless some index reaches 2**31: a row, or a tcnn dense
        # index before its wrap-around (vertex at most V_d per axis).
        largest = max([sum(self.rows_per_level)] + [
            sum(v * s for v, s in zip(level.vertices, _dense_strides(level.vertices)))
            for level in levels if not level.hashed])
        index_dtype = torch.int32 if largest < 2**31 else torch.int64
        groups, start, max_rows = [], 0, 1 << log2_hashmap_size
        while start < n_levels:
            stop = start
            while stop < n_levels and levels[stop].hashed == levels[start].hashed:
                stop += 1
            groups.append(_LevelGroup.from_levels(levels[start:stop], start, max_rows - 1,
                                                  layout, periodic_axes, interpolation,
                                                  index_dtype))
            start = stop
        self._level_groups = nn.ModuleList(groups)

    @classmethod
    def table_shape(cls, *args, **kwargs) -> Tuple[int, int]:
        """(rows, features) of the embedding of MultiResHashGrid(*args, **kwargs), without
        allocating it (built on the meta device), e.g. to check a checkpoint's weight against
        its config first. An invalid config raises the constructor's ValueError."""
        with torch.device("meta"):
            return tuple(cls(*args, **kwargs).embedding.weight.shape)

    def _passes(self, device: torch.device) -> "_Passes":
        cpu_passes = (self.CPU_PASSES and device.type == "cpu"
                      and not torch.compiler.is_compiling())
        return _Passes(tuple(self._level_groups), self.chunk_size, cpu_passes,
                       self.CPU_LOOKUPS_PER_PASS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (..., dim) in [0, 1] -> (..., n_levels * n_features_per_level)."""
        if not isinstance(x, torch.Tensor) or not torch.is_floating_point(x):
            got = type(x).__name__ if not isinstance(x, torch.Tensor) else x.dtype
            raise TypeError(f"MultiResHashGrid expects a floating-point tensor of shape "
                            f"(..., {self.input_dim}), got {got}")
        if x.dim() == 0 or x.shape[-1] != self.input_dim:
            raise ValueError(f"MultiResHashGrid(dim={self.input_dim}) expects x of shape "
                             f"(..., {self.input_dim}), got {tuple(x.shape)}")
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
        passes = self._passes(points.device)
        features = _HashGridFunction.apply(points, table, nan.any(-1), passes)   # (N, L * F)
        return features.to(table.dtype).reshape(*batch_shape, self.output_dim)

    @classmethod
    def from_tcnn_config(cls, n_input_dims: int, config: dict) -> "MultiResHashGrid":
        """The layout="tcnn" encoding of a tiny-cuda-nn encoding config (its JSON as a dict):
        otype "HashGrid", "DenseGrid", "TiledGrid" or "Grid" (with "type" "Hash", "Dense" or
        "Tiled"), and tcnn's keys with tcnn's defaults: n_levels 16 (or n_features /
        n_grid_features = n_levels * n_features_per_level), n_features_per_level 2,
        log2_hashmap_size 19, base_resolution 16, per_level_scale 2.0 (DenseGrid:
        exp(ln(256 / base_resolution) / (n_levels - 1)), in float32), interpolation
        "Linear" ("Nearest", "Smoothstep"), hash "CoherentPrime". Names of types are
        case-insensitive, keys are not (as in tcnn). Anything else raises a ValueError
        naming it. Load the trained parameters with `load_tcnn_params`."""
        if not isinstance(config, dict):
            raise ValueError(f"a tcnn encoding config is a dict, got {type(config).__name__}")
        known = ("otype", "type", "n_levels", "n_features", "n_grid_features",
                 "n_features_per_level", "log2_hashmap_size", "base_resolution",
                 "per_level_scale", "interpolation", "hash", "stochastic_interpolation",
                 "fixed_point_pos")
        unknown = [key for key in config if key not in known]
        if unknown:
            raise ValueError(f"unsupported tcnn grid config key(s) {unknown}; "
                             f"supported: {list(known)}")
        otypes = {"grid": "hash", "hashgrid": "hash", "densegrid": "dense", "tiledgrid": "tiled"}
        otype = config.get("otype")
        if str(otype).lower() not in otypes:
            raise ValueError(f"unsupported tcnn encoding otype {otype!r}: expected Grid, "
                             "HashGrid, DenseGrid or TiledGrid")
        grid_types = {"hash": "hash", "dense": "dense", "tiled": "tiled", "tile": "tiled"}
        grid_type = grid_types.get(str(config.get("type", otypes[str(otype).lower()])).lower())
        if grid_type is None:
            raise ValueError(f"unsupported tcnn grid type {config['type']!r}: expected Hash, "
                             "Dense or Tiled")
        if str(config.get("hash", "CoherentPrime")).lower() != "coherentprime":
            raise ValueError(f"unsupported tcnn hash {config['hash']!r}: only CoherentPrime "
                             "(the paper's primes, 1 for the first axis)")
        for flag in ("stochastic_interpolation", "fixed_point_pos"):
            if config.get(flag, False):
                raise ValueError(f"unsupported tcnn option {flag}={config[flag]!r}")
        interpolation = str(config.get("interpolation", "Linear")).lower()
        if interpolation not in _INTERPOLATIONS:
            raise ValueError(f"unsupported tcnn interpolation {config['interpolation']!r}: "
                             "expected Nearest, Linear or Smoothstep")

        def integer(key, default):
            value = config.get(key, default)
            if (isinstance(value, bool) or not isinstance(value, (int, float))
                    or not math.isfinite(value) or value != int(value)):
                raise ValueError(f"tcnn config {key} must be an integer, got {value!r}")
            return int(value)

        n_features_per_level = integer("n_features_per_level", 2)
        n_levels = integer("n_levels", 16)
        for key in ("n_features", "n_grid_features"):
            if key in config:
                if "n_levels" in config:
                    raise ValueError(f"tcnn config may not give both {key} and n_levels")
                n_features = integer(key, None)
                if n_features_per_level < 1 or n_features % n_features_per_level:
                    raise ValueError(f"tcnn config {key}={n_features} is not a multiple of "
                                     f"n_features_per_level={n_features_per_level}")
                n_levels = n_features // n_features_per_level
                break
        base = integer("base_resolution", 16)
        if "per_level_scale" in config:
            per_level_scale = config["per_level_scale"]
            if isinstance(per_level_scale, bool) or not isinstance(per_level_scale, (int, float)):
                raise ValueError(f"tcnn config per_level_scale must be a number, "
                                 f"got {per_level_scale!r}")
        elif grid_type != "dense":
            per_level_scale = 2.0
        elif n_levels > 1 and base >= 1:
            # tcnn: std::exp(std::log(256.0f / base_resolution) / (n_levels - 1)), in float32
            log_ratio = _float32(math.log(_float32(256.0 / base)))
            per_level_scale = _float32(math.exp(_float32(log_ratio / (n_levels - 1))))
        else:
            raise ValueError("a DenseGrid with n_levels < 2 needs per_level_scale (tcnn's "
                             "default divides by n_levels - 1)")
        return cls(n_input_dims, n_levels, n_features_per_level,
                   integer("log2_hashmap_size", 19), base, per_level_scale=per_level_scale,
                   interpolation=interpolation, layout="tcnn", grid_type=grid_type)

    def tcnn_config(self) -> dict:
        """This encoding as a tiny-cuda-nn encoding config (the dict form of its JSON, in
        the form of tcnn's own hyperparams()), for layout="tcnn" with one integer
        base_resolution and one per_level_scale for all axes."""
        self._require_tcnn()
        base = _per_axis(self.base_resolution, self.input_dim, "base_resolution")
        if len(set(base)) != 1 or base[0] != int(base[0]) or len(set(self.per_level_scale)) != 1:
            raise ValueError("a tcnn config has one integer base_resolution and one "
                             f"per_level_scale for all axes, got {self.base_resolution} and "
                             f"{self.per_level_scale}")
        config = {"otype": "Grid", "type": self.grid_type.capitalize(),
                  "n_levels": self.n_levels, "n_features_per_level": self.n_features_per_level,
                  "base_resolution": int(base[0]), "per_level_scale": self.per_level_scale[0],
                  "interpolation": self.interpolation.capitalize(), "hash": "CoherentPrime"}
        if self.grid_type == "hash":
            config["log2_hashmap_size"] = self.log2_hashmap_size
        return config

    def tcnn_params(self) -> torch.Tensor:
        """The parameters as tiny-cuda-nn's flat vector: (sum(rows_per_level) * F,),
        layout="tcnn" only."""
        self._require_tcnn()
        return self.embedding.weight.detach().reshape(-1).clone()

    @torch.no_grad()
    def load_tcnn_params(self, params: torch.Tensor) -> None:
        """Load a tiny-cuda-nn Grid parameter vector (e.g. ``tcnn.Encoding.params``)."""
        self._require_tcnn()
        weight = self.embedding.weight
        if params.numel() != weight.numel():
            raise ValueError(f"expected {weight.numel()} tcnn parameters ({weight.shape[0]} "
                             f"rows x {weight.shape[1]} features), got {params.numel()}")
        weight.copy_(params.detach().reshape(weight.shape).to(weight.device, weight.dtype))

    def _require_tcnn(self) -> None:
        if self.layout != "tcnn":
            raise ValueError("tcnn parameter vectors need MultiResHashGrid(..., layout='tcnn')")

    def extra_repr(self) -> str:
        return (f"dim={self.input_dim}, n_levels={self.n_levels}, "
                f"n_features_per_level={self.n_features_per_level}, "
                f"log2_hashmap_size={self.log2_hashmap_size}, "
                f"resolutions={self.resolutions[0]}..{self.resolutions[-1]}, "
                f"hashed_levels={len(self.hashed_levels)}, "
                f"interpolation={self.interpolation!r}, layout={self.layout!r}"
                + (f", grid_type={self.grid_type!r}" if self.grid_type != "hash" else "")
                + (f", periodic={self.periodic}" if any(self.periodic) else ""))


# =============================================================================================
# The autograd Function
# =============================================================================================

class _HashGridFunction(torch.autograd.Function):
    """Interpolated table lookup with a hand-written backward.

    Autograd through the plain ops would keep every corner's indices, weights and gathered
    features alive until backward (upstream's fwd+bwd step allocates 352 MiB on 2-D, this
    162); this saves only x and the table, and backward recomputes the cheap index arithmetic.
    """

    @staticmethod
    def forward(ctx, x, table, nan, passes):
        nan = _any_nan(nan, passes)           # decided once, for backward too
        ctx.passes = passes
        ctx.save_for_backward(x, table, nan)
        return _encode(x, table, nan, passes)

    @staticmethod
    def backward(ctx, grad_out):
        x, table, nan = ctx.saved_tensors
        need_x, need_table = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if (_table_grad_op is not None and torch.compiler.is_compiling() and need_table
                and not need_x and table.device.type == "cpu"):
            tensors, ints = [], []
            for group in ctx.passes.groups:
                group_tensors, group_ints = group.op_args()
                tensors += group_tensors
                ints += group_ints
            interpolation = ctx.passes.groups[0].interpolation
            grad_table = _table_grad_op(x, table, nan, grad_out, tensors, ints, interpolation)
            return None, grad_table, None, None
        grad_x, grad_table = _encode_backward(x, table, nan, ctx.passes, grad_out, need_x,
                                              need_table)
        return grad_x, grad_table, None, None


# =============================================================================================
# Pass drivers
# =============================================================================================

class _Passes:
    """How the work is split into passes, each (group, first, stop, lo, hi): the group's
    levels first..stop-1 (counted from group.start) for the points lo..hi-1.

    cpu_passes (CPU eager): passes of about lookups_per_pass lookups per cell corner,
    level-major: all points for as many levels as fit, or, when one level's points exceed
    it, one level for runs of lookups_per_pass points. Consecutive passes then visit the
    same level's table, which stays in cache, and every temporary is a few hundred KB that
    malloc recycles, instead of a fresh 10-100 MB buffer whose page faults would dominate
    (2-D eager fwd 2.21 -> 5.92 M points/s, fwd+bwd step 218 -> 162 MiB, with the SoA
    output below). It also enables the CPU speed tricks. Otherwise (GPUs, torch.compile)
    each group is one pass over all points. chunk_size, if given, sets the points per pass.
    """

    def __init__(self, groups: Sequence[_LevelGroup], chunk_size: Optional[int],
                 cpu_passes: bool, lookups_per_pass: int):
        self.groups, self.chunk_size = groups, chunk_size
        self.cpu_passes, self.lookups_per_pass = cpu_passes, lookups_per_pass

    def split(self, n_points: int, min_levels: int = 1
              ) -> List[Tuple[_LevelGroup, int, int, int, int]]:
        """min_levels: with cpu_passes, runs of lookups_per_pass // min_levels points, so a
        pass holds min_levels levels where the group has them."""
        step = self.chunk_size or (self.lookups_per_pass // min_levels if self.cpu_passes
                                   else n_points)
        step = max(min(step, n_points), 1)
        passes = []
        for group in self.groups:
            n_levels = group.stop - group.start
            per_pass = n_levels
            if self.cpu_passes:
                per_pass = min(max(self.lookups_per_pass // step, 1), n_levels)
            for first in range(0, n_levels, per_pass):
                stop = min(first + per_pass, n_levels)
                passes += [(group, first, stop, lo, min(lo + step, n_points))
                           for lo in range(0, n_points, step)]
        return passes


def _axis_terms(xt: torch.Tensor, group: _LevelGroup, first: int, stop: int,
                offset: Optional[torch.Tensor], wide: bool = False):
    """Per-axis pieces of every corner's row index, and the positions inside the cells.

    xt: (D, n), levels first..stop-1 of group (G of them) -> terms: D pairs (t0, t1) of
    (G, n) integers, the axis' share of the row index of the lower / upper vertex (combined
    over axes by _combine), with offset (G, 1), each level's first row in the rows indexed,
    folded into axis 0 (one op per axis rather than one per corner; for hashed levels the
    offset is a multiple of T and the terms are < T, so XOR adds it); offset None: rows
    within each level. fracs: D tensors (G, n) in [0, 1]. wide: int64 terms (what gather /
    scatter_add_ take).
    """
    scale, mult = group.scale[:, first:stop], group.mult[:, first:stop]
    max_cell = group.max_cell[:, first:stop] if group.max_cell is not None else None
    index_dtype, mask = group.offset.dtype, group.hash_mask
    if wide:   # int64 arithmetic costs less than a copy of each corner's index to int64
        index_dtype = torch.int64
    terms, fracs = [], []
    for d in range(xt.shape[0]):
        cell, frac = _cell_and_frac(xt[d], scale[d], group.shift, group.tcnn,
                                    max_cell[d] if max_cell is not None else None)
        fracs.append(frac)
        fold = d == 0 and group.rows is None and offset is not None  # (tcnn: after the wrap)
        upper = None                              # the upper vertex, when it is not cell + 1
        if (group.periodic_bits >> d) & 1:             # vertex v is v mod N (N = scale, paper)
            period = scale[d].to(cell.dtype)
            if group.interpolation == "nearest":  # floor(x * N + 0.5) reaches N
                cell = _periodic_vertex(cell, period)
            else:                                 # the last cell's upper vertex is N
                upper = _periodic_vertex(cell + 1, period)
        if group.hashed:
            # Products in int64 (inductor vectorises them; int32 made the compiled 3-D
            # forward 2x slower); what remains is < T, in the narrower index dtype.
            t0 = _hash_term(cell.long(), mult[d], mask).to(index_dtype)
            if upper is None:
                # term(v + 1) = (term(v) + prime mod T) mod T: no second product
                t1 = (t0 + (mult[d] & mask).to(index_dtype)) & mask
            else:
                t1 = _hash_term(upper.long(), mult[d], mask).to(index_dtype)
            if fold:
                t0, t1 = _combine(t0, offset, True), _combine(t1, offset, True)
        else:
            t0 = _dense_term(cell.to(index_dtype), mult[d])
            if fold:
                t0 = _combine(t0, offset, False)
            if upper is None:
                t1 = t0 + mult[d]          # term(v + 1) = term(v) + stride
            else:
                t1 = _dense_term(upper.to(index_dtype), mult[d])
                t1 = _combine(t1, offset, False) if fold else t1
        terms.append((t0, t1))
    return terms, fracs


def _for_each_corner(terms, factors, hashed: bool, wrap, visit: Callable, d: int = 0,
                     corner: int = 0, index=None, weight=None):
    """Calls visit(corner, index, weight) for every cell corner: index (G, n) its table rows,
    weight (G, n) its interpolation weight (None without factors, i.e. "nearest": one
    corner). Bit d of `corner` set means the upper vertex on axis d. wrap: (rows, offset)
    for tcnn's dense levels (index mod rows, then + offset), else None.

    Depth-first over the axes (d, corner, index, weight: the partial results so far), so
    corners share partial sums and products: about 2 ops per corner instead of 2 (D - 1),
    while only D partial results are alive at a time. (A plain recursive function: a
    recursive closure would be a reference cycle holding every pass's temporaries until
    the garbage collector runs.)
    """
    if d == len(terms):
        if wrap is not None:
            index = torch.remainder(index, wrap[0]) + wrap[1]
        visit(corner, index, weight)
        return
    for bit in ((0,) if factors is None else (0, 1)):
        term = terms[d][bit]
        next_index = term if index is None else _combine(index, term, hashed)
        next_weight = None
        if factors is not None:
            factor = factors[d][bit]
            next_weight = factor if weight is None else weight * factor
        _for_each_corner(terms, factors, hashed, wrap, visit, d + 1, corner | (bit << d),
                         next_index, next_weight)


def _corner_setup(xt, group: _LevelGroup, first: int, stop: int,
                  offset: Optional[torch.Tensor], wide: bool = False):
    """(terms, factors, wrap) of a pass (offset, wide: see _axis_terms): factors per axis from
    _interpolation_weights, None for "nearest" (one vertex at full weight)."""
    terms, fracs = _axis_terms(xt, group, first, stop, offset, wide)
    factors = None
    if group.interpolation != "nearest":
        factors = [_interpolation_weights(frac, group.interpolation) for frac in fracs]
    wrap = None
    if group.rows is not None:
        wrap = (group.rows[first:stop], offset)
    return terms, factors, wrap


def _product(factors: List[torch.Tensor]) -> torch.Tensor:
    result = factors[0]
    for factor in factors[1:]:
        result = result * factor
    return result


def _encode_group(xt: torch.Tensor, table: torch.Tensor, group: _LevelGroup, first: int,
                  stop: int, fast: bool, acc_dtype: torch.dtype) -> torch.Tensor:
    """xt: (D, n) -> the features (G, n, F) of the group's levels first..stop-1."""
    group_table = table[group.rows_start:group.rows_stop]
    packed = fast and _packable(group_table, acc_dtype)
    rows = _pack(group_table) if packed else None
    # gather along dim 1 of the rows expanded to (threads, R), the lookups split among them,
    # runs on all cores where index_select is serial (2**16 lookups, 2 cores: 40 vs 62-73 us)
    lanes = torch.get_num_threads() if packed else 1
    terms, factors, wrap = _corner_setup(xt, group, first, stop, group.offset[first:stop],
                                         lanes > 1)
    out = []

    def accumulate(corner, index, weight):
        if lanes > 1 and index.numel() % lanes == 0:   # (G, n) real or complex
            lookups = index.reshape(lanes, -1)
            feature = rows.expand(lanes, -1).gather(1, lookups).view(index.shape)
        elif packed:   # (G, n) real or complex
            feature = rows.index_select(0, index.reshape(-1)).view(index.shape)
        else:        # (G, n, F)
            feature = _gather(group_table, index, fast).to(acc_dtype)
            weight = weight.unsqueeze(-1) if weight is not None else None
        if weight is None:
            out.append(feature)
        elif not out:
            out.append(feature * weight)
        else:
            out[0].addcmul_(feature, weight)

    _for_each_corner(terms, factors, group.hashed, wrap, accumulate)
    return _unpack(out[0]) if packed else out[0]


def _encode(x: torch.Tensor, table: torch.Tensor, nan: Optional[torch.Tensor],
            passes: _Passes) -> torch.Tensor:
    """x: (N, D) in [0, 1] -> features (N, L * F) in the accumulation dtype, NaN for the
    points flagged in nan (N,) (their x holds a placeholder; None: no NaN point, _any_nan).

    In eager mode the result has the strides of a transposed contiguous (L * F, N) matrix:
    every level is computed for a run of points at a time, and each feature's values for
    those points are adjacent, so the passes write contiguous memory (16 levels x 2**18
    points: 17 ms, vs 93 ms into a row-major output). A following matmul (the MLP's first
    layer) reads this layout as is (nn.Linear(32, 64): 63 ms, vs 88 ms with a .contiguous()
    copy first), and hands back its gradient in the same layout.
    """
    acc_dtype = torch.promote_types(x.dtype, table.dtype)
    n_points, n_features = x.shape[0], table.shape[1]
    n_levels = passes.groups[-1].stop
    fast = passes.cpu_passes and not torch.is_grad_enabled()
    # Under torch.compile the result is row-major: inductor writes that layout as cheaply, and
    # AOTAutograd would copy an incoming row-major gradient (an elementwise loss) into the
    # traced layout. Either way a tensor of its own, not a view (autograd forbids modifying
    # a view made inside a custom Function in place).
    strides = (n_levels * n_features, 1) if torch.compiler.is_compiling() else (1, n_points)
    out = torch.empty_strided((n_points, n_levels * n_features), strides, dtype=acc_dtype,
                              device=x.device)
    # Written through its (N, L, F) view: the order inductor vectorises well.
    per_level = out.view(n_points, n_levels, n_features)
    xt = x.t().contiguous()                                                   # (D, N)
    for group, first, stop, lo, hi in passes.split(n_points):
        values = _encode_group(xt[:, lo:hi], table, group, first, stop, fast, acc_dtype)
        values = values.transpose(0, 1)                                         # (n, G, F)
        # NaN rows masked before the write, which inductor fuses
        if nan is not None:
            values = values.masked_fill(nan[lo:hi, None, None], float("nan"))
        per_level[lo:hi, group.start + first:group.start + stop] = values
    return out


def _any_nan(nan: torch.Tensor, passes: _Passes) -> Optional[torch.Tensor]:
    """nan (N,), or None when the CPU passes can tell at once that no point is NaN (the
    usual case: a masked copy per pass saved, 3 ms of an albert training step). Elsewhere
    the flags are always applied: asking would make a GPU wait, and a traced graph branch."""
    if passes.cpu_passes and not bool(nan.any()):
        return None
    return nan


def _backward_group(xt, table, group: _LevelGroup, first: int, stop: int, fast: bool,
                    g_planes, nan, grad_table, grad_xt, need_x: bool):
    """Adds the gradients of the group's levels first..stop-1 for points xt (D, n), given
    g_planes = dL/dfeatures (G, F, n) (a view of the caller's gradient; points flagged in
    nan (n,) are skipped, None: no point is), to grad_table (R, F) and to grad_xt (D, n)."""
    n_dims, n_features = xt.shape[0], g_planes.shape[1]
    group_table = table[group.rows_start:group.rows_stop]
    group_grad = None
    if grad_table is not None:
        group_grad = grad_table[group.rows_start:group.rows_stop]
    packed = fast and group_grad is not None and _packable(group_grad, g_planes.dtype)
    level_rows, offset = None, group.offset[first:stop]
    # one copy of the gradient, straight into the packed form, NaN points zeroed (was 2 copies)
    if packed:
        g_rows = (torch.complex(g_planes[:, 0], g_planes[:, 1]) if n_features == 2
                  else g_planes[:, 0].clone())                                    # (G, n)
        if nan is not None:
            g_rows.masked_fill_(nan, 0.0)
        grad_rows, g = _pack(group_grad), _unpack(g_rows)                        # (R,), (G, n, F)
        if not need_x:
            # scatter_add_ along dim 1 of this (G, W) view runs the levels on all cores
            level_rows, offset = _per_level(grad_rows, group, first, stop)
    terms, factors, wrap = _corner_setup(xt, group, first, stop, offset,
                                         level_rows is not None)
    need_x = need_x and factors is not None   # "nearest" is piecewise constant: d/dx = 0
    grad_frac = [None] * n_dims
    if not packed:
        g = g_planes.transpose(1, 2)                                             # (G, n, F)
        if nan is not None:
            g = g.masked_fill(nan[:, None], 0.0)

    # Under torch.compile, in-place adds into a view of the gradient would each be turned into
    # a copy of the whole table: collect all corners and add them in one out-of-place op.
    pending = [] if torch.compiler.is_compiling() else None

    def accumulate(corner, index, weight):
        if level_rows is not None:
            values = g_rows if weight is None else g_rows * weight
            level_rows.scatter_add_(1, index, values)   # (index: int64 rows of each level)
        elif packed:
            values = g_rows if weight is None else g_rows * weight
            # scatter_add_'s 1-D CPU loop is tighter than index_add_'s, even after the int64
            # copy it needs (2**16 complex rows: 1.5 vs 2.4-3.0 ns per lookup)
            grad_rows.scatter_add_(0, index.reshape(-1).long(), values.reshape(-1))
        elif group_grad is not None:
            values = (g if weight is None else g * weight.unsqueeze(-1)).reshape(-1, n_features)
            if pending is not None:
                pending.append((index.reshape(-1), values))
            else:
                # (the 2-D index_add_ kernel is 4x slower with int32 indices: 8.5 vs 2.1 ms)
                group_grad.index_add_(0, index.reshape(-1).long(), values.to(group_grad.dtype))
        if need_x:
            g_dot_feature = (g * _gather(group_table, index, fast)).sum(-1)       # (G, n)
            for d in range(n_dims):
                # d weight / d s_d = +-prod_{e != d} (s_e or 1 - s_e)
                others = [factors[e][(corner >> e) & 1] for e in range(n_dims) if e != d]
                term = g_dot_feature * _product(others) if others else g_dot_feature
                term = term if (corner >> d) & 1 else -term
                grad_frac[d] = term if grad_frac[d] is None else grad_frac[d] + term

    _for_each_corner(terms, factors, group.hashed, wrap, accumulate)
    if pending:
        rows = torch.cat([index for index, _ in pending]).long()
        values = torch.cat([values for _, values in pending]).to(group_grad.dtype)
        group_grad.copy_(torch.zeros_like(group_grad).index_add(0, rows, values))
    if need_x:
        scale = group.scale[:, first:stop]
        for d in range(n_dims):
            ds = factors[d][2]
            dfrac = grad_frac[d] if ds is None else grad_frac[d] * ds
            # d pos / d x = scale; the cell index is piecewise constant
            grad_xt[d].add_((dfrac * scale[d].to(dfrac.dtype)).sum(0))


def _encode_backward(x, table, nan, passes: _Passes, grad_out, need_x: bool, need_table: bool):
    """Gradients of _encode w.r.t. x (N, D) and table (R, F), given grad_out (N, L * F), best
    in _encode's output layout (else it is transposed once). NaN points (nan: (N,), or None
    when there are none) contribute nothing.

    Only differentiable torch ops, so autograd can differentiate this again (second-order
    gradients such as an eikonal loss on |df/dx|).
    """
    n_points, n_features = x.shape[0], table.shape[1]
    n_planes = grad_out.shape[1] // n_features
    grad_planes = grad_out.t().reshape(n_planes, n_features, n_points)          # (L, F, N)
    if not grad_planes.is_contiguous():
        # e.g. a row-major gradient from an elementwise loss on the features: the passes would
        # read it with a large stride, so transpose it once, in runs of points that fit in cache
        planes = torch.empty_like(grad_planes, memory_format=torch.contiguous_format)
        step = n_points
        if passes.cpu_passes:
            step = max(passes.lookups_per_pass // planes.shape[0], 1)
        for lo in range(0, n_points, step):
            planes[..., lo:lo + step] = grad_planes[..., lo:lo + step]
        grad_planes = planes
    fast = passes.cpu_passes and not torch.is_grad_enabled()
    grad_table = None
    if need_table:
        grad_table = torch.zeros(table.shape, dtype=grad_out.dtype, device=table.device)
    grad_xt = None
    if need_x:
        grad_xt = torch.zeros(x.shape[::-1], dtype=grad_out.dtype, device=x.device)   # (D, N)
    xt = x.t().contiguous()
    # one level per intra-op thread in each pass: the table gradient's scatter_add_ then runs
    # on all cores (_backward_group, _per_level)
    min_levels = 1
    if fast and need_table and not need_x:
        most = max(g.stop - g.start for g in passes.groups)
        min_levels = max(min(torch.get_num_threads(), most), 1)
    for group, first, stop, lo, hi in passes.split(n_points, min_levels):
        levels = slice(group.start + first, group.start + stop)
        _backward_group(xt[:, lo:hi], table, group, first, stop, fast,
                        grad_planes[levels, :, lo:hi], None if nan is None else nan[lo:hi],
                        grad_table,
                        grad_xt[:, lo:hi] if need_x else None, need_x)
    grad_x = grad_xt.t().to(x.dtype) if need_x else None
    if need_table:
        grad_table = grad_table.to(table.dtype)
    return grad_x, grad_table


# =============================================================================================
# CPU speed tricks (the cpu_passes branch, outside autograd: `fast` above)
# =============================================================================================

# Row-at-a-time access to the (R, F) tables is much faster through a 1-D view with one element
# per row (F features reinterpreted as one machine word): PyTorch's 2-D index_select /
# index_add_ kernels loop over features per row (2**16 rows of a 2**19 x 2 float32 table:
# 0.23 ms through the word view, 8.0 ms in 2-D). Word dtypes for the gather, by row size:
_WORD_DTYPES = {2: torch.int16, 4: torch.int32, 8: torch.int64, 16: torch.complex128}
# ... and for the scatter-add, where the arithmetic must stay right: a pair of floats adds
# exactly like a complex number (the same 2**16 rows: 0.16 ms as complex, 8.0 ms in 2-D).
_PAIR_DTYPES = {torch.float32: torch.complex64, torch.float64: torch.complex128}


def _gather(table: torch.Tensor, index: torch.Tensor, fast: bool) -> torch.Tensor:
    """table: (R, F), index: (G, n) -> (G, n, F). fast: through a one-word-per-row view
    (the dtype views are not differentiable, and buy nothing on GPUs or under compile)."""
    n_features = table.shape[1]
    word = _WORD_DTYPES.get(n_features * table.element_size())
    if fast and word is not None and table.is_contiguous():
        rows = table.view(word).view(-1).index_select(0, index.reshape(-1))
        return rows.view(table.dtype).view(*index.shape, n_features)
    return table.index_select(0, index.reshape(-1)).view(*index.shape, n_features)


def _per_level(rows: torch.Tensor, group: _LevelGroup, first: int, stop: int
               ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(view, shift): the packed rows (R,) of a group as a (G, W) view whose row g holds level
    first + g, and shift (G, 1), added to a level's own row numbers to index its view row
    (None: no shift). Gathers / scatter-adds along dim 1 of the view run one level per
    intra-op thread, where 1-D ones are serial (a hashed pair of levels x 2**15 points on 2
    cores: 0.67 vs 1.46 ns per lookup; albert's dense levels: 0.17 vs 1.0 ms).

    Row g starts s * g rows after the first level's first row: levels of T rows each (hashed)
    take s = T, so each view row is exactly its level (no shift). Levels of any sizes (dense)
    take s = 1: the view rows then overlap in memory, but level g's rows, at shift_g = (its
    offset - the first level's) - g in its view row, are its own, so the threads' writes never
    meet, and the levels stay summed serially each (deterministic)."""
    n_levels, n_rows = stop - first, group.hash_mask + 1
    if group.hashed and rows.shape[0] == (group.stop - group.start) * n_rows:
        return rows.view(-1, n_rows)[first:stop], None
    start, end = group.row_span(first, stop)
    view = rows.as_strided((n_levels, end - start - (n_levels - 1)), (1, 1),
                           rows.storage_offset() + start)
    offset = group.offset[first:stop]
    steps = torch.arange(n_levels, dtype=offset.dtype, device=offset.device).unsqueeze(1)
    return view, offset - start - steps


def _packable(table: torch.Tensor, acc_dtype: torch.dtype) -> bool:
    """Whether feature rows can be handled as single numbers: F = 1 as reals, F = 2 (float32 /
    float64) as complex numbers, whose arithmetic on a pair is exactly what interpolation does
    to it (a weighted sum). Elementwise ops then run over one long axis instead of broadcasting
    a weight over a trailing axis of size 2 (4 corners of 2**16 points gathered, weighted and
    summed: 0.76 ms, vs 27 ms with (n, 2) rows)."""
    n_features = table.shape[1]
    return (table.dtype == acc_dtype and table.is_contiguous()
            and (n_features == 1 or (n_features == 2 and table.dtype in _PAIR_DTYPES)))


def _pack(rows: torch.Tensor) -> torch.Tensor:
    """(..., F) contiguous, F in {1, 2} -> (...) one real or complex number per row."""
    if rows.shape[-1] == 1:
        return rows.squeeze(-1)
    return rows.view(_PAIR_DTYPES[rows.dtype]).squeeze(-1)


def _unpack(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of _pack: (...) -> (..., F)."""
    return torch.view_as_real(packed) if packed.is_complex() else packed.unsqueeze(-1)


# =============================================================================================
# The custom op: torch.compile's table gradient on a CPU
# =============================================================================================

def _table_grad_eager(x: torch.Tensor, table: torch.Tensor, nan: torch.Tensor,
                      grad_out: torch.Tensor, tensors: List[Optional[torch.Tensor]],
                      ints: List[int], interpolation: str) -> torch.Tensor:
    """The table gradient by the eager CPU path, the groups given by _LevelGroup.op_args
    (concatenated): the body of the custom op below."""
    groups = _LevelGroup.from_op_args(tensors, ints, interpolation)
    cpu_passes = table.device.type == "cpu"   # (the op is for CPUs; called elsewhere, plainly)
    passes = _Passes(groups, None, cpu_passes, MultiResHashGrid.CPU_LOOKUPS_PER_PASS)
    with torch.no_grad():
        return _encode_backward(x, table, _any_nan(nan, passes), passes, grad_out, False,
                                True)[1]


# Under torch.compile, inductor would turn the backward's scatter-adds into its own kernels,
# which on CPU are several times slower than the eager path (int32 indices, complex pairs,
# cache-sized passes): as this opaque custom op, compiled 2-D fwd+bwd went 0.37 -> 1.26 M
# points/s (torch >= 2.4). Its name carries a version, bumped whenever its inputs change: a
# second copy of this file in the same process reuses the op of an equal version, and a copy
# of another version registers its own instead of silently replacing this one.
_TABLE_GRAD_OP = "hashgrid::table_grad_v4"
_table_grad_op = None
if hasattr(torch.library, "custom_op"):
    _namespace, _name = _TABLE_GRAD_OP.split("::")
    if hasattr(getattr(torch.ops, _namespace), _name):
        _table_grad_op = getattr(getattr(torch.ops, _namespace), _name)
    else:
        _table_grad_op = torch.library.custom_op(_TABLE_GRAD_OP, _table_grad_eager,
                                                 mutates_args=())
        _table_grad_op.register_fake(lambda x, table, *rest: torch.empty_like(table))


# =============================================================================================
# Frequency encoding
# =============================================================================================

class Frequency(nn.Module):
    """NeRF positional encoding (Mildenhall et al. 2020, eq. 4):
    x (..., dim) -> (..., dim * n_levels * 2), per input axis
    [sin(2^0 pi x), ..., sin(2^(L-1) pi x), cos(2^0 pi x), ..., cos(2^(L-1) pi x)].
    """

    def __init__(self, dim: int, n_levels: int = 10):
        super().__init__()
        if not isinstance(dim, int) or dim < 1 or not isinstance(n_levels, int) or n_levels < 1:
            raise ValueError(f"Frequency needs dim >= 1 and n_levels >= 1, got dim={dim!r}, "
                             f"n_levels={n_levels!r}")
        self.input_dim = dim
        self.n_levels = n_levels
        self.output_dim = dim * n_levels * 2
        self.register_buffer("freqs", 2.0 ** torch.arange(n_levels, dtype=torch.float32),
                             persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (..., dim) -> (..., dim * n_levels * 2)."""
        if not isinstance(x, torch.Tensor) or not torch.is_floating_point(x):
            raise TypeError(f"Frequency expects a floating-point tensor of shape "
                            f"(..., {self.input_dim})")
        if x.dim() == 0 or x.shape[-1] != self.input_dim:
            raise ValueError(f"Frequency(dim={self.input_dim}) expects x of shape "
                             f"(..., {self.input_dim}), got {tuple(x.shape)}")
        angles = x.unsqueeze(-1) * (self.freqs.to(x.dtype) * math.pi)           # (..., dim, L)
        return torch.cat((torch.sin(angles), torch.cos(angles)), dim=-1).flatten(-2)

    def extra_repr(self) -> str:
        return f"dim={self.input_dim}, n_levels={self.n_levels}"
