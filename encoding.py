"""Multiresolution hash encoding (Instant-NGP, Müller et al. 2022) in pure PyTorch.

Standalone: copy this one file into your project; it imports only ``torch``, ``math`` and
``typing``. Two encodings with the same call shape::

    enc = MultiResHashGrid(dim=3)                   # x: (..., 3) in [0, 1]
    features = enc(x)                               # (..., enc.output_dim)
    enc = Frequency(dim=3, n_levels=10)             # NeRF positional encoding

The math, stated once
---------------------
Notation: D input dimensions, L levels, F features per level, T = 2**log2_hashmap_size, N_min /
N_max the coarsest / finest resolution, b the per-level growth factor; level l, axis d:

layout="paper" (default; the paper's §3, eq. 2-3)
    b_d    = exp((ln N_max_d - ln N_min_d) / (L - 1))  (1 when L = 1; or `per_level_scale`)
    N_l,d  = floor(N_min_d * b_d**l)                     grid cells along axis d
    pos    = x_d * N_l,d                                 vertices 0 .. N_l,d (N_l,d + 1 of them)
    cell   = min(floor(pos), N_l,d - 1), frac = pos - cell  (x = 1 lands on the last vertex)
    V_l,d  = N_l,d + 1 vertices to store; N_l,d on a periodic axis (vertex v is v mod N_l,d:
             features continuous across x_d = 0 / 1, with smoothstep their derivatives too)
    rows   = prod_d V_l,d if that is <= T or grid_type="dense" (a dense level), else T (hashed)

layout="tcnn" (tiny-cuda-nn's Grid encodings, bit for bit, so tcnn-trained parameters load)
    b      = per_level_scale (default exp(ln(N_max / N_min) / (L - 1)))
    scale  = exp2(l * log2(b)) * N_min - 1              (float32, as tcnn computes it)
    res    = ceil(scale) + 1                             vertices per axis
    pos    = x_d * scale + 0.5 (one fused rounding), cell = floor(pos), frac = pos - cell
    rows   = min(next multiple of 8 of res**D, 2**31), then at most T for "hash" (HashGrid;
             hashed when res**D > rows), N_min**D for "tiled" (TiledGrid; the dense index
             below wraps modulo rows), as is for "dense" (DenseGrid); dense and tiled levels
             need res**D < 2**32 (tcnn's 32-bit index)

Vertex -> row (both layouts)
    dense  : index = sum_d v_d * stride_d, stride_0 = 1, stride_d = stride_{d-1} * V_{d-1}
             (axis 0 fastest; collision-free), modulo rows in the tcnn layout (tiled levels)
    hashed : index = (XOR_d v_d * prime_d mod 2**32) mod T, primes `HASH_PRIMES` (the paper's)
             and, beyond the 7th axis, `hash_primes`
    All levels share one ``nn.Embedding`` of sum_l rows_l rows; level l starts at row
    offset_l = sum_{k<l} rows_k. Flattened, its weight is tcnn's parameter vector.

Interpolation: "linear" (weights prod_d frac_d or 1 - frac_d over the 2**D cell corners),
"smoothstep" (the same with S(t) = t^2 (3 - 2t), continuous dy/dx) and "nearest" (the
vertex floor(x * N + 0.5) in the paper layout, tcnn's floor(pos) in the tcnn layout).

Reading order: this docstring, `MultiResHashGrid`, `_reference_encode` and the level plan: the
whole idea. After "SPEED ONLY", the same numbers faster, then tcnn interop and `Frequency`.
"""
import math
from typing import List, NamedTuple, Optional, Sequence, Tuple, Union

import torch
from torch import nn

__all__ = ["MultiResHashGrid", "Frequency", "hash_primes", "HASH_PRIMES"]

Resolution = Union[int, float, Sequence[Union[int, float]]]
_INTERPOLATIONS = ("linear", "smoothstep", "nearest")
_LAYOUTS = ("paper", "tcnn")
_GRID_TYPES = ("hash", "dense", "tiled")
_IMPLEMENTATIONS = ("fast", "reference")
_MAX_INTERPOLATED_DIM = 16      # 2**16 corner lookups per point and level; "nearest" reads 1

# The paper's (eq. 4) and tiny-cuda-nn's hash primes; 1 on axis 0 keeps x-neighbours adjacent.
HASH_PRIMES = (1, 2654435761, 805459861, 3674653429, 2097192037, 1434869437, 2165219737)
_GOLDEN_RATIO_32 = 2654435769  # floor(2**32 / golden ratio), a Weyl-sequence step


def hash_primes(dim: int) -> List[int]:
    """The hash multiplier of each of ``dim`` axes: ``HASH_PRIMES``, then for axis d >= 7 the
    smallest unused prime >= (d * 2654435769 mod 2**32) | 1 (a Weyl sequence over 32 bits)."""
    primes = list(HASH_PRIMES[:dim])
    for d in range(len(HASH_PRIMES), dim):
        candidate = (d * _GOLDEN_RATIO_32) % (1 << 32) | 1
        while candidate in primes or any(candidate % k == 0
                                         for k in range(2, math.isqrt(candidate) + 1)):
            candidate += 2
        primes.append(candidate)
    return primes


class MultiResHashGrid(nn.Module):
    """Multiresolution hash encoding: x (..., dim) in [0, 1] -> (..., output_dim = L * F).

    Args:
        dim: input dimensions D: 1..16 when interpolating (2**D cell corners), any with "nearest".
        n_levels: number of levels L.
        n_features_per_level: features F stored per vertex.
        log2_hashmap_size: log2 of T, the most rows a level may have (paper: 14-24).
        base_resolution: coarsest resolution N_min (>= 1); an int or one value per axis.
        finest_resolution: finest resolution N_max (an int or one per axis), unless:
        per_level_scale: the growth factor b between levels (an int or one per axis).
        interpolation: "linear", "smoothstep" or "nearest".
        layout: "paper" (the paper's resolutions; collision-free dense coarse levels) or "tcnn"
            (tiny-cuda-nn's conventions bit for bit).
        grid_type: "hash" (levels too large for T rows are hashed), "dense" (every vertex
            stored) or "tiled" (tcnn layout: at most N_min**D rows per level, wrapping).
        periodic: paper layout, a bool or one per axis: x = 0 and x = 1 are one place (vertex
            N_l is vertex 0), e.g. a panorama's longitude; x is still clamped (wrap: x % 1).
        implementation: "fast" (default) or "reference" (_reference_encode, to read and check).
        sparse: the table's gradient as a coalesced sparse COO tensor of the rows the batch
            touched (summed per row in a fixed order), as ``nn.Embedding(sparse=True)``'s, for
            lazy optimizers; settable (``.sparse``). torch.compile(fullgraph=True) raises.
        feature_major: True: in eager mode the output has the strides of a transposed
            contiguous (output_dim, points) matrix (tcnn's "SoA"), which nn.Linear reads, and
            returns the gradient of, with no copy (.view(-1) raises). Default: row-major.
        device, dtype: the table's, made in place (torch's factory arguments; no CPU copy).

    Input: x (..., dim), any floating dtype, clamped to [0, 1]; a point with a NaN coordinate
    gets NaN features. Output: (..., output_dim) in the table's dtype. Gradients flow to the
    table, to x, and through d/dx again (second order, e.g. an eikonal loss); under
    torch.compile with x requiring grad, as plain ops that AOTAutograd differentiates to any
    order (``torch._dynamo.config.trace_autograd_ops = True`` for torch.autograd.grad).

    Attributes: input_dim, output_dim, resolutions (per level and axis: N_l, or tcnn's vertex
    count), rows_per_level, level_offsets, hashed_levels, periodic (D bools), grid_type,
    implementation, embedding (nn.Embedding(sum(rows_per_level), F), initialised U(±1e-4)).
    """

    # Private knobs for tests and bench/: lookups per corner in a pass; the device branch keeps
    # rows and fractions for backward (False: least memory), runs on a CPU too; points per pass.
    _cpu_lookups = 1 << 16
    _device_lookups = 1 << 18
    _device_keep = True
    _device_branch = False
    _chunk_size: Optional[int] = None

    def __init__(self, dim: int, n_levels: int = 16, n_features_per_level: int = 2,
                 log2_hashmap_size: int = 15, base_resolution: Resolution = 16,
                 finest_resolution: Resolution = 512, *,
                 per_level_scale: Optional[Resolution] = None, interpolation: str = "linear",
                 layout: str = "paper", grid_type: str = "hash",
                 periodic: Union[bool, Sequence[bool]] = False, implementation: str = "fast",
                 sparse: bool = False, feature_major: bool = False,
                 device: Optional[Union[torch.device, str]] = None,
                 dtype: Optional[torch.dtype] = None):
        super().__init__()
        for name, value in (("dim", dim), ("n_levels", n_levels),
                            ("n_features_per_level", n_features_per_level),
                            ("log2_hashmap_size", log2_hashmap_size)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if log2_hashmap_size > 31:
            raise ValueError(f"log2_hashmap_size must be <= 31, got {log2_hashmap_size}")
        for name, value, choices in (("interpolation", interpolation, _INTERPOLATIONS),
                                     ("layout", layout, _LAYOUTS),
                                     ("grid_type", grid_type, _GRID_TYPES),
                                     ("implementation", implementation, _IMPLEMENTATIONS)):
            if value not in choices:
                raise ValueError(f"{name} must be one of {choices}, got {value!r}")
        periodic_axes = (periodic,) * dim if isinstance(periodic, bool) else tuple(periodic)
        if len(periodic_axes) != dim or not all(isinstance(p, bool) for p in periodic_axes):
            raise ValueError(f"periodic must be a bool or {dim} bools, got {periodic!r}")
        if any(periodic_axes) and layout != "paper":
            raise ValueError("periodic axes need layout='paper' (tiny-cuda-nn has none)")
        if interpolation != "nearest" and dim > _MAX_INTERPOLATED_DIM:
            raise ValueError(f"dim={dim} with {interpolation!r} interpolation would visit "
                             f"2**{dim} cell corners per point and level; at most dim="
                             f"{_MAX_INTERPOLATED_DIM} (interpolation='nearest' allows any dim)")
        base = _per_axis(base_resolution, dim, "base_resolution")
        if grid_type == "tiled" and (layout != "tcnn" or any(b != int(b) for b in base)):
            raise ValueError("grid_type='tiled' needs layout='tcnn' and an integer "
                             f"base_resolution (tiles of N_min**D rows), got layout={layout!r}, "
                             f"base_resolution={base_resolution}")
        if per_level_scale is None:
            finest = _per_axis(finest_resolution, dim, "finest_resolution")
            if any(f < b for f, b in zip(finest, base)):
                raise ValueError(f"finest_resolution {finest_resolution} must be >= "
                                 f"base_resolution {base_resolution}")
            # b = exp((ln N_max - ln N_min) / (L - 1)), 1 for a single level
            growth = tuple(math.exp((math.log(f) - math.log(b)) / (n_levels - 1))
                           if n_levels > 1 else 1.0 for b, f in zip(base, finest))
        else:
            growth = _per_axis(per_level_scale, dim, "per_level_scale")
        self.input_dim, self.output_dim = dim, n_levels * n_features_per_level
        self.n_levels, self.n_features_per_level = n_levels, n_features_per_level
        self.log2_hashmap_size, self.interpolation = log2_hashmap_size, interpolation
        self.layout, self.grid_type, self.periodic = layout, grid_type, periodic_axes
        self.base_resolution, self.finest_resolution = base_resolution, finest_resolution
        self.per_level_scale, self.implementation = growth, implementation
        self.feature_major = bool(feature_major)

        levels = _plan_levels(base, growth, n_levels, log2_hashmap_size, layout, grid_type,
                              periodic_axes)
        self.resolutions = tuple(level.resolution for level in levels)
        self.rows_per_level = tuple(level.rows for level in levels)
        self.level_offsets = tuple(level.offset for level in levels)
        self.hashed_levels = tuple(i for i, level in enumerate(levels) if level.hashed)
        self._levels = tuple(levels)

        # one embedding for all levels (flattened: tcnn's parameters), initialised once
        weight = torch.empty(sum(self.rows_per_level), n_features_per_level, device=device,
                             dtype=dtype)
        self.embedding = nn.Embedding(*weight.shape, _weight=weight)
        self.sparse = sparse
        self.reset_parameters()
        self._level_groups = nn.ModuleList(_LevelGroup.of_plan(
            levels, (1 << log2_hashmap_size) - 1, layout, periodic_axes, interpolation,
            weight.device))

    @classmethod
    def table_shape(cls, *args, **kwargs) -> Tuple[int, int]:
        """(rows, features) of MultiResHashGrid(*args, **kwargs)'s table, allocating nothing."""
        with torch.device("meta"):
            return tuple(cls(*args, **kwargs).embedding.weight.shape)

    @property
    def sparse(self) -> bool:
        """Whether the table's gradient is sparse (the embedding's flag, which DDP reads)."""
        return self.embedding.sparse

    @sparse.setter
    def sparse(self, value: bool) -> None:
        if not isinstance(value, bool):
            raise ValueError(f"sparse must be a bool, got {value!r}")
        self.embedding.sparse = value

    @torch.no_grad()
    def rows(self, x: torch.Tensor) -> torch.Tensor:
        """x: (..., dim) in [0, 1] -> (R,) the table rows self(x) reads, sorted, each once (the
        rows of its sparse gradient), e.g. for LazyAdam.catch_up before the forward reads them."""
        points = x.reshape(-1, self.input_dim).to(torch.promote_types(x.dtype, torch.float32))
        xt = points.nan_to_num(0.0).clamp(0.0, 1.0).t().contiguous()   # as forward reads x
        return torch.unique(torch.cat([g.rows_start + _corner_rows(
            xt, g, 0, g.stop - g.start, g.offset)[0].view(-1) for g in self._level_groups]))

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """The table as the paper starts it: U(-1e-4, 1e-4)."""
        self.embedding.weight.uniform_(-1e-4, 1e-4)

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
        # positions in float32 at least (N_l * x needs ~24 bits), float64 kept (gradcheck)
        points = x.reshape(-1, self.input_dim).to(torch.promote_types(x.dtype, torch.float32))
        # NaN points: a placeholder position here, NaN features inside the passes
        nan = torch.isnan(points)
        points = points.masked_fill(nan, 0.0).clamp(0.0, 1.0)
        nan = nan.any(-1)
        if self.implementation == "reference":
            if self.sparse:     # the lookups' sparse gradients meet here, summed per row
                table = _CoalescedGrad.apply(table)
            features = _reference_encode(points, table, self._levels, self.interpolation,
                                         self.layout, self.periodic, self.sparse)
            features = features.masked_fill(nan[:, None], float("nan"))
        else:
            mode = self._mode(points, table)
            if mode.compiling and points.requires_grad:
                # traced ops, which AOTAutograd differentiates to any order (a Function once)
                features = _encode(points, table, nan, mode)[0]
            else:
                features = _HashGridFunction.apply(points, table, nan, mode)
        return features.to(table.dtype).reshape(*x.shape[:-1], self.output_dim)

    def _mode(self, points: torch.Tensor, table: torch.Tensor) -> "_Mode":
        """How this call runs (see _Mode): the one place that reads torch's global state."""
        compiling, grad = torch.compiler.is_compiling(), torch.is_grad_enabled()
        if self.embedding.sparse and compiling and grad and table.requires_grad:
            raise RuntimeError("MultiResHashGrid(sparse=True) has no torch.compile path: use "
                               "sparse=False, or no fullgraph=True (then one graph break)")
        cpu = points.device.type == "cpu" and not compiling and not self._device_branch
        keep = (self._device_keep and not cpu and not compiling and grad
                and (points.requires_grad or table.requires_grad))
        # compiled: one pass per level group (inductor fuses its temporaries away)
        lookups = 1 << 62 if compiling else self._cpu_lookups if cpu else self._device_lookups
        return _Mode(tuple(self._level_groups), cpu, compiling, not compiling, keep,
                     self.embedding.sparse, self.feature_major and not compiling, lookups,
                     self._chunk_size)

    @classmethod
    def from_tcnn_config(cls, n_input_dims: int, config: dict, **kwargs) -> "MultiResHashGrid":
        """The layout="tcnn" encoding of a tiny-cuda-nn encoding config (a dict, or a whole
        tcnn config's "encoding"): otype "HashGrid", "DenseGrid", "TiledGrid" or "Grid" ("type"
        "Hash", "Dense" or "Tiled"), tcnn's keys and defaults: n_levels 16 (or n_features =
        n_levels * n_features_per_level), n_features_per_level 2, log2_hashmap_size 19,
        base_resolution 16, per_level_scale 2.0 (DenseGrid: exp(ln(256 / base_resolution) /
        (n_levels - 1))), interpolation "Linear", hash "CoherentPrime"; n_dims_to_encode n
        (tcnn's Composite): dim=n, for x[..., :n]. Anything unsupported raises a ValueError."""
        args, tcnn_kwargs = _args_from_tcnn_config(n_input_dims, config)
        return cls(*args, **tcnn_kwargs, **kwargs)

    def tcnn_config(self) -> dict:
        """This encoding as a tiny-cuda-nn encoding config (a dict, as tcnn's hyperparams()),
        for layout="tcnn" with one integer base_resolution and per_level_scale for all axes."""
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
        """The parameters as tiny-cuda-nn's flat vector (sum(rows_per_level) * F,); tcnn layout."""
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
        shown = {"grid_type": self.grid_type != "hash", "periodic": any(self.periodic),
                 "sparse": self.sparse}
        return (f"dim={self.input_dim}, n_levels={self.n_levels}, n_features_per_level="
                f"{self.n_features_per_level}, log2_hashmap_size={self.log2_hashmap_size}, "
                f"resolutions={self.resolutions[0]}..{self.resolutions[-1]}, hashed_levels="
                f"{len(self.hashed_levels)}, interpolation={self.interpolation!r}, layout="
                f"{self.layout!r}" + "".join(f", {k}={getattr(self, k)!r}"
                                             for k in shown if shown[k]))


# --- The reference: the whole encoding, read top to bottom -----------------------------------

def _reference_encode(x: torch.Tensor, table: torch.Tensor, levels: Sequence["_Level"],
                      interpolation: str, layout: str, periodic: Sequence[bool],
                      sparse: bool = False) -> torch.Tensor:
    """x (N, D) in [0, 1], table (R, F) -> features (N, L * F): the module docstring's formulas,
    one level (of _plan_levels) and one cell corner at a time, in plain torch ops (autograd
    differentiates them). sparse: each lookup's table gradient a sparse tensor of its rows."""
    n_points, dim = x.shape
    primes = hash_primes(dim)
    tcnn, nearest = layout == "tcnn", interpolation == "nearest"
    features = []
    for level in levels:
        cells, uppers = [], []      # per axis (N,): the lower vertex, the upper vertex's weight
        for d in range(dim):
            if tcnn:    # fmaf(scale, x, 0.5) in float32: a float32 product is exact in float64
                pos = (level.scale[d] * x[:, d].double() + 0.5).to(x.dtype)
            else:       # "nearest" reads the vertex floor(x * N + 0.5)
                pos = x[:, d] * level.scale[d] + (0.5 if nearest else 0.0)
            cell = pos.floor()
            if not tcnn:            # x = 1 interpolates onto vertex N from cell N - 1
                cell = cell.clamp(max=level.resolution[d] - (not nearest))
            frac = pos - cell
            cells.append(cell.long())
            uppers.append(frac * frac * (3 - 2 * frac) if interpolation == "smoothstep" else frac)
        level_features = 0.0
        for corner in range(1 if nearest else 2 ** dim):   # bit d set: upper vertex on axis d
            index, weight = 0, 1.0
            for d in range(dim):
                upper = (corner >> d) & 1
                vertex = cells[d] + upper
                if periodic[d]:     # vertex N is vertex 0
                    vertex = vertex % level.resolution[d]
                if level.hashed:    # XOR of v_d * prime_d; its low 32 bits are all mod T keeps
                    index = index ^ vertex * primes[d]
                else:               # v_d * stride_d, axis 0 fastest
                    index = index + vertex * math.prod(level.vertices[:d])
                weight = weight * (uppers[d] if upper else 1 - uppers[d])
            # mod T (hashed); tcnn's dense index wraps modulo rows; paper dense: index < rows
            rows = level.offset + index % level.rows
            vertex = (nn.functional.embedding(rows, table, sparse=True) if sparse
                      else table[rows])                                          # (N, F)
            level_features = level_features + (vertex if nearest else weight[:, None] * vertex)
        features.append(level_features)
    return torch.cat(features, dim=-1)


# --- The level plan: plain Python, computed once at construction -----------------------------

class _Level(NamedTuple):
    """One level: resolution (per axis: N_l, paper layout; tcnn's vertex count, tcnn layout),
    scale (pos = x * scale (+ 0.5)), vertices (V_d per axis), rows, offset (first row), hashed."""
    resolution: Tuple[int, ...]
    scale: Tuple[float, ...]
    vertices: Tuple[int, ...]
    rows: int
    offset: int
    hashed: bool


def _plan_levels(base: Sequence[float], growth: Sequence[float], n_levels: int,
                 log2_hashmap_size: int, layout: str, grid_type: str,
                 periodic: Sequence[bool]) -> List[_Level]:
    """Every level's resolution, rows and offset (the formulas above), from N_min and b."""
    max_rows, offset, levels = 1 << log2_hashmap_size, 0, []
    tile_rows = math.prod(int(b) for b in base)
    for level in range(n_levels):
        if layout == "paper":   # (1 + 1e-12: exp/log round-off must not land a hair below N_max)
            cells = tuple(math.floor(b * g ** level * (1.0 + 1e-12)) for b, g in zip(base, growth))
            resolution, scale = cells, tuple(float(c) for c in cells)
            vertices = tuple(c if p else c + 1 for c, p in zip(cells, periodic))
        else:
            scale = tuple(_tcnn_scale(b, g, level) for b, g in zip(base, growth))
            resolution = vertices = tuple(math.ceil(s) + 1 for s in scale)   # tcnn's res
        n_vertices = math.prod(vertices)
        if layout == "paper":
            rows = n_vertices if grid_type == "dense" else min(n_vertices, max_rows)
        elif grid_type != "hash" and n_vertices >= 2**32:
            raise ValueError(f"level {level} of a {grid_type} grid has {n_vertices} >= 2**32 "
                             "vertices, past tiny-cuda-nn's 32-bit dense index")
        else:   # a multiple of 8 (tcnn's alignment), at most 2**31, T or N_min**D (tiled)
            cap = {"hash": max_rows, "tiled": tile_rows}.get(grid_type, 2**31)
            rows = min(-(-n_vertices // 8) * 8, 2**31, cap)
        hashed = grid_type == "hash" and n_vertices > rows
        levels.append(_Level(resolution, scale, vertices, rows, offset, hashed))
        offset += rows
    return levels


def _float32(value: float) -> float:
    """The nearest float32 to value, as a Python float."""
    return torch.tensor(value, dtype=torch.float32, device="cpu").item()


def _tcnn_scale(base: float, growth: float, level: int) -> float:
    """tcnn's scale exp2f(l * log2f(b)) * N_min - 1.0f, in float32 at every step (b too)."""
    exponent = _float32(level * _float32(math.log2(_float32(growth))))
    return _float32(_float32(_float32(2.0 ** exponent) * base) - 1.0)


def _per_axis(value: Resolution, dim: int, name: str) -> Tuple[float, ...]:
    """An int/float or a sequence of ``dim`` of them -> a tuple of ``dim`` finite floats >= 1."""
    values = (float(value),) * dim if isinstance(value, (int, float)) else tuple(map(float, value))
    if len(values) != dim:
        raise ValueError(f"{name} needs 1 or dim={dim} values, got {len(values)}")
    if not all(math.isfinite(v) and v >= 1 for v in values):
        raise ValueError(f"{name} must be finite and >= 1 on every axis, got {value}")
    return values


# #############################################################################################
# SPEED ONLY: _reference_encode's numbers in fewer, larger operations (tests/test_encoding.py
# checks every path, and every shortcut against its formula, in float64).
# #############################################################################################

class _LevelGroup(nn.Module):
    """Consecutive levels that index alike (all dense or all hashed), run by the same ops.

    Statics: start, stop (levels start..stop-1), hashed, rows_start, rows_stop (its table
    rows), hash_mask (T - 1), tcnn, periodic_bits (bit d: axis d), axis0_direct (axis-0
    vertices < T: the term is the vertex), interpolation, shift (pos = x * scale + shift).
    Buffers (following device moves, not dtype casts), axis-major: scale (D, G, 1) float32;
    mult (D, G, 1) the hash primes (int32: signed, the same products mod 2**32) or strides;
    offset (G, 1) each level's first row from rows_start; max_cell (D, G, 1) (paper) or None;
    wrap_rows (G, 1) tcnn's dense levels' rows or None. Integers int32 (int64 past 2**31)."""
    TENSORS = ("scale", "mult", "offset", "max_cell", "wrap_rows")
    STATICS = ("start", "stop", "hashed", "rows_start", "rows_stop", "hash_mask", "tcnn",
               "periodic_bits", "axis0_direct")

    def __init__(self, start: int, stop: int, hashed: bool, rows_start: int, rows_stop: int,
                 hash_mask: int, tcnn: bool, periodic_bits: int, axis0_direct: bool,
                 interpolation: str, device: Optional[torch.device] = None, **tensors):
        super().__init__()
        self.start, self.stop, self.hashed = start, stop, bool(hashed)
        self.rows_start, self.rows_stop = rows_start, rows_stop
        self.hash_mask, self.tcnn, self.interpolation = hash_mask, bool(tcnn), interpolation
        self.periodic_bits, self.axis0_direct = periodic_bits, bool(axis0_direct)
        self.shift = 0.5 if (self.tcnn or interpolation == "nearest") else 0.0
        self._host = tensors
        # each level's first row, then the group's end, from rows_start (Python ints, to slice)
        self.bounds = (*tensors["offset"].view(-1).tolist(), rows_stop - rows_start)
        device = torch.empty(0, device=device).device
        for name, tensor in tensors.items():
            self.register_buffer(name, tensor if tensor is None else tensor.to(device),
                                 persistent=False)

    @classmethod
    def of_plan(cls, levels: Sequence[_Level], hash_mask: int, layout: str,
                periodic: Sequence[bool], interpolation: str, device: torch.device
                ) -> List["_LevelGroup"]:
        """The plan's levels as groups of consecutive levels that index alike."""
        # int32 row indices (half int64's traffic) unless a row or tcnn dense index reaches 2**31
        largest = max([levels[-1].offset + levels[-1].rows] + [
            sum(v * math.prod(level.vertices[:d]) for d, v in enumerate(level.vertices))
            for level in levels if not level.hashed])
        index_dtype = torch.int32 if largest < 2**31 else torch.int64
        primes = hash_primes(len(periodic))
        if index_dtype == torch.int32:      # each prime's low 32 bits as a signed number
            primes = [p - (1 << 32) if p >= 1 << 31 else p for p in primes]
        last = 0 if interpolation == "nearest" else 1   # x = 1: onto vertex N from cell N - 1

        def column(values, dtype=index_dtype):   # G values -> (G, 1); G lists of D -> (D, G, 1)
            return torch.tensor(values, dtype=dtype, device="cpu").t().contiguous().unsqueeze(-1)

        groups, start = [], 0
        while start < len(levels):
            stop, hashed = start, levels[start].hashed
            while stop < len(levels) and levels[stop].hashed == hashed:
                stop += 1
            group, rows_start = levels[start:stop], levels[start].offset
            cells = [[n - last for n in level.resolution] for level in group]
            wrap = layout == "tcnn" and not hashed      # tcnn's dense levels wrap modulo rows
            groups.append(cls(
                start, stop, hashed, rows_start, group[-1].offset + group[-1].rows, hash_mask,
                layout == "tcnn", sum(1 << d for d, p in enumerate(periodic) if p),
                not hashed or max(level.resolution[0] for level in group) <= hash_mask,
                interpolation, device,
                scale=column([level.scale for level in group], torch.float32),
                mult=column([primes if hashed else [math.prod(lv.vertices[:d]) for d in range(
                    len(periodic))] for lv in group]),     # dense: strides, axis 0 fastest
                offset=column([level.offset - rows_start for level in group]),
                max_cell=column(cells) if layout == "paper" else None,
                wrap_rows=column([level.rows for level in group]) if wrap else None))
            start = stop
        return groups

    def _apply(self, fn, recurse=True):
        # device moves only (no dtype cast), from the CPU values (meta tensors have none)
        for name, tensor in self._buffers.items():
            if tensor is not None:
                device = fn(torch.empty(0, device=tensor.device)).device
                self._buffers[name] = self._host[name].to(device)
        return self

    @classmethod
    def op_args(cls, groups: Sequence["_LevelGroup"]
                ) -> Tuple[List[Optional[torch.Tensor]], List[int]]:
        """(tensors, ints) of groups, in TENSORS / STATICS order, for the custom op's schema."""
        return ([getattr(g, name) for g in groups for name in cls.TENSORS],
                [int(getattr(g, name)) for g in groups for name in cls.STATICS])

    @classmethod
    def from_op_args(cls, tensors: Sequence[Optional[torch.Tensor]], ints: Sequence[int],
                     interpolation: str) -> List["_LevelGroup"]:
        """The inverse of op_args, for a run of groups: concatenated tensors and ints."""
        n_tensors, n_ints = len(cls.TENSORS), len(cls.STATICS)
        return [cls(*ints[i * n_ints:(i + 1) * n_ints], interpolation, tensors[0].device,
                    **dict(zip(cls.TENSORS, tensors[i * n_tensors:(i + 1) * n_tensors])))
                for i in range(len(ints) // n_ints)]


class _Mode(NamedTuple):
    """How one call runs, decided once (MultiResHashGrid._mode) and carried to every pass.

    groups: the level groups. cpu: the CPU branch (cache-sized passes, corners one at a time),
    else the device branch (all corners at once). compiling: traced by torch.compile. eager:
    outside autograd (out= tensors; CPU speed tricks). keep: the device branch keeps corner
    rows and fractions for backward. sparse, feature_major (eager only): the module's.
    lookups: per cell corner in a pass; chunk_size: points per pass (None: from lookups)."""
    groups: Tuple[_LevelGroup, ...]
    cpu: bool
    compiling: bool
    eager: bool
    keep: bool
    sparse: bool
    feature_major: bool
    lookups: int
    chunk_size: Optional[int] = None

    def split(self, n_points: int, per_thread: bool = False
              ) -> List[Tuple[_LevelGroup, int, int, int, int]]:
        """The passes, level-major, (group, first, stop, lo, hi): levels first..stop-1 for points
        lo..hi-1, `lookups` per corner; per_thread: one level per intra-op thread (_per_level)."""
        min_levels = (min(torch.get_num_threads(), max(g.stop - g.start for g in self.groups))
                      if per_thread else 1)
        step = max(min(self.chunk_size or self.lookups // min_levels, n_points), 1)
        passes = []
        for group in self.groups:
            n_levels = group.stop - group.start
            per_pass = min(max(self.lookups // step, 1), n_levels)
            for first in range(0, n_levels, per_pass):
                stop = min(first + per_pass, n_levels)
                for lo in range(0, n_points, step):
                    passes.append((group, first, stop, lo, min(lo + step, n_points)))
        return passes


# --- The autograd Functions, and one loop over the passes each: forward, backward, second order

class _HashGridFunction(torch.autograd.Function):
    """The encoding with a hand-written backward: saves x and the table (with keep, also the
    device branch's corner rows and fractions), not every corner's weights and features."""

    @staticmethod
    def forward(ctx, x, table, nan, mode):
        # asked on a CPU only (a masked copy per pass saved); a GPU would have to wait
        nan = None if mode.cpu and not bool(nan.any()) else nan
        out, kept = _encode(x, table, nan, mode)
        ctx.mode = mode
        ctx.save_for_backward(x, table, nan, *kept)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, table, nan, *kept = ctx.saved_tensors
        mode, (need_x, need_table) = ctx.mode, ctx.needs_input_grad[:2]
        if (mode.compiling and need_table and not need_x and table.device.type == "cpu"
                and _table_grad_op is not None):      # (see _TABLE_GRAD_OP)
            tensors, ints = _LevelGroup.op_args(mode.groups)
            return None, _table_grad_op(x, table, nan, grad_out, tensors, ints,
                                        mode.groups[0].interpolation), None, None
        if torch.is_grad_enabled():      # create_graph: a differentiable step of its own
            if need_table and not mode.compiling and hasattr(torch._C, "_will_engine_execute_node"):
                try:    # is the table's gradient used? (an eikonal loss asks for x only)
                    node = ctx.next_functions[1][0]
                    need_table = node is not None and torch._C._will_engine_execute_node(node)
                except RuntimeError:     # (a leaf that autograd.grad was asked for)
                    pass
            ctx.rows = []   # the CPU passes' corner rows: for the second order, and a backward
            return (*_HashGridBackward.apply(x, table, nan, mode, grad_out, need_x, need_table,
                                             kept or None, ctx.rows), None, None)
        return (*_encode_backward(x, table, nan, mode, grad_out, need_x, need_table, kept or None,
                                  tuple(vars(ctx).pop("rows", ()))), None, None)


class _HashGridBackward(torch.autograd.Function):
    """_encode_backward (x, table, grad_out) -> (grad_x, grad_table) as a differentiable step
    (second order, e.g. an eikonal loss): backward is _encode_double_backward's analytic second
    derivatives, whose ops autograd differentiates once more (third order)."""

    @staticmethod
    def forward(ctx, x, table, nan, mode, grad_out, need_x, need_table, kept, saved):
        ctx.set_materialize_grads(False)
        ctx.mode, saved = mode, [] if saved is None else saved    # (see _encode_backward)
        out = _encode_backward(x, table, nan, mode, grad_out, need_x, need_table, kept, saved)
        ctx.save_for_backward(x, table, nan, grad_out, *saved)
        return out

    @staticmethod
    def backward(ctx, gg_x, gg_table):
        x, table, nan, grad_out, *saved = ctx.saved_tensors
        need_x, need_table, _, _, need_g = ctx.needs_input_grad[:5]
        # third order: autograd records these ops (no out= or other eager-only tricks)
        mode = ctx.mode._replace(eager=ctx.mode.eager and not torch.is_grad_enabled())
        grads = [None, None, None]                                  # x, table, grad_out
        if gg_x is not None:
            grads = _encode_double_backward(x, table, nan, mode, grad_out, gg_x, need_x,
                                            need_table, need_g, saved)
        if gg_table is not None:
            # grad_table's derivatives: the encoding and its x-gradient, gg_table as the table
            more = [None, None, None]
            if need_g:
                more[2] = _encode(x, gg_table, None, mode)[0].to(grad_out.dtype)
                if nan is not None:     # (zeroed here, so not made NaN in the passes first)
                    more[2] = more[2].masked_fill(nan[:, None], 0.0)
            if need_x:
                more[0] = _HashGridBackward.apply(x, gg_table, nan, mode, grad_out, True,
                                                  False, None, None)[0]
            grads = [a if b is None else b if a is None else a + b for a, b in zip(grads, more)]
        return grads[0], grads[1], None, None, grads[2], None, None, None, None


def _encode(x: torch.Tensor, table: torch.Tensor, nan: Optional[torch.Tensor], mode: _Mode
            ) -> Tuple[torch.Tensor, List[torch.Tensor]]:
    """x: (N, D) in [0, 1] -> (features (N, L * F) in the accumulation dtype, NaN for the points
    flagged in nan (N,) (None: none); with mode.keep, the device branch's corner rows and
    fractions for backward, D + 1 tensors per pass). Row-major, or with feature_major the
    strides of a transposed contiguous (L * F, N) matrix; not a view (of a custom Function)."""
    acc_dtype = torch.promote_types(x.dtype, table.dtype)
    n_points, n_features = x.shape[0], table.shape[1]
    n_levels = mode.groups[-1].stop
    strides = (1, n_points) if mode.feature_major else (n_levels * n_features, 1)
    out = torch.empty_strided((n_points, n_levels * n_features), strides, dtype=acc_dtype,
                              device=x.device)
    per_level = out.view(n_points, n_levels, n_features)
    xt = x.t().contiguous()                                                   # (D, N)
    kept = []
    for group, first, stop, lo, hi in mode.split(n_points):
        levels = slice(group.start + first, group.start + stop)
        if mode.cpu or mode.compiling:   # (compiled: the form inductor fuses, see _cpu_forward)
            values = _cpu_forward(xt[:, lo:hi], table, group, first, stop, mode, acc_dtype)
            values = values.transpose(0, 1)                                     # (n, G, F)
            if nan is not None:
                values = values.masked_fill(nan[lo:hi, None, None], float("nan"))
            per_level[lo:hi, levels] = values
        else:
            target = per_level[lo:hi, levels].transpose(0, 1)                   # (G, n, F)
            corners, fracs = _device_forward(xt[:, lo:hi], table, group, first, stop, mode,
                                             None if nan is None else nan[lo:hi], target)
            if mode.keep:
                kept += [corners, *fracs]
    return out, kept


def _encode_backward(x, table, nan, mode: _Mode, grad_out, need_x: bool, need_table: bool,
                     kept: Optional[List[torch.Tensor]] = None, saved=None):
    """Gradients of _encode w.r.t. x (N, D) and table (R, F) (sparse: a _RowCollector's), given
    grad_out (N, L * F); NaN points add nothing. kept: _encode's (None: recomputed). saved: a
    list the CPU passes append their corner rows to, or a tuple of them (_cpu_backward_pass)."""
    n_points, n_features = x.shape[0], table.shape[1]
    grad_xt, grad_table = _zero_grads(x, table, mode, grad_out.dtype, need_x, need_table)
    xt = x.t().contiguous()
    if mode.cpu:
        grad_planes = grad_out.t().reshape(-1, n_features, n_points)            # (L, F, N)
        if not grad_planes.is_contiguous():
            # (e.g. row-major from an elementwise loss) transposed once, in cache-sized runs
            planes = torch.empty_like(grad_planes, memory_format=torch.contiguous_format)
            step = max(mode.lookups // planes.shape[0], 1)
            for lo in range(0, n_points, step):
                planes[..., lo:lo + step] = grad_planes[..., lo:lo + step]
            grad_planes = planes
    else:
        per_level = grad_out.reshape(n_points, -1, n_features)
    n_kept = x.shape[1] + 1
    passes, n_saved = mode.split(n_points, mode.cpu and mode.eager), x.shape[1] + 3
    reuse = isinstance(saved, tuple) and len(saved) == len(passes) * n_saved
    for i, (group, first, stop, lo, hi) in enumerate(passes):
        levels = slice(group.start + first, group.start + stop)
        args = (xt[:, lo:hi], table, group, first, stop, mode)
        pass_nan = None if nan is None else nan[lo:hi]
        pass_grad_xt = grad_xt[:, lo:hi] if need_x else None
        if mode.cpu:
            _cpu_backward_pass(*args, grad_planes[levels, :, lo:hi], pass_nan, grad_table,
                               pass_grad_xt, saved[i * n_saved:(i + 1) * n_saved] if reuse
                               else saved if isinstance(saved, list) else None)
        else:
            g = per_level[lo:hi, levels].transpose(0, 1)                       # (G, n, F)
            g = g if nan is None else g.masked_fill(pass_nan[:, None], 0.0)   # NaN: adds nothing
            _device_backward(*args, g, None if kept is None else
                             kept[i * n_kept:(i + 1) * n_kept], grad_table, pass_grad_xt)
    return (grad_xt.t().to(x.dtype) if need_x else None,
            grad_table.to(table.dtype) if need_table else None)   # (a _RowCollector: its sum)


def _zero_grads(x, table, mode: _Mode, dtype: torch.dtype, need_x: bool, need_table: bool):
    """(grad_xt (D, N), grad_table (R, F)) to add to, of `dtype`: zeros, the table's a
    _RowCollector when mode.sparse; None where not needed."""
    grad_xt = torch.zeros(x.shape[::-1], dtype=dtype, device=x.device) if need_x else None
    grad_table = None
    if need_table:
        grad_table = (_RowCollector(table.shape, dtype, table.device) if mode.sparse
                      else torch.zeros(table.shape, dtype=dtype, device=table.device))
    return grad_xt, grad_table


def _encode_double_backward(x, table, nan, mode: _Mode, grad_out, gg_x, need_x: bool,
                            need_table: bool, need_g: bool, saved: Sequence[torch.Tensor] = ()):
    """[grad_x, grad_table, grad_g]: the gradients of (gg_x * grad_x).sum() w.r.t. x (N, D),
    table (R, F), grad_out (N, L * F), given gg_x (N, D); None if unneeded or zero ("nearest").
    saved: _encode_backward's, per pass _cpu_backward_pass's D + 3 (or (): recomputed)."""
    n_points, n_features = x.shape[0], table.shape[1]
    if mode.groups[0].interpolation == "nearest":
        return [None, None, None]
    grad_xt, grad_table = _zero_grads(x, table, mode, grad_out.dtype, need_x, need_table)
    per_level = grad_out.reshape(n_points, -1, n_features)
    grad_g = torch.empty_like(per_level, memory_format=torch.contiguous_format) if need_g else None
    xt, ggt = x.t().contiguous(), gg_x.t().to(grad_out.dtype)                       # (D, N)
    passes = mode.split(n_points, mode.cpu and mode.eager)
    n_saved = x.shape[1] + 3 if len(saved) == len(passes) * (x.shape[1] + 3) else 0
    for i, (group, first, stop, lo, hi) in enumerate(passes):
        levels = slice(group.start + first, group.start + stop)
        g, gg = per_level[lo:hi, levels].transpose(0, 1), ggt[:, lo:hi]
        if nan is not None:     # NaN points add nothing (their g and gg may be NaN)
            g, gg = g.masked_fill(nan[lo:hi, None], 0.0), gg.masked_fill(nan[lo:hi], 0.0)
        _double_backward_pass(xt[:, lo:hi], table, group, first, stop, mode, g, gg, grad_table,
                              grad_xt[:, lo:hi] if need_x else None,
                              grad_g[lo:hi, levels].transpose(0, 1) if need_g else None,
                              saved[i * n_saved:(i + 1) * n_saved])
    return [grad_xt.t().to(x.dtype) if need_x else None,
            grad_table.to(table.dtype) if need_table else None,
            grad_g.view(n_points, -1).to(grad_out.dtype) if need_g else None]


# --- Every pass's pieces: row index terms per axis, interpolation weights, the cell corners --

def _axis_terms(xt: torch.Tensor, group: _LevelGroup, first: int, stop: int,
                offset: Optional[torch.Tensor], index_dtype: Optional[torch.dtype] = None):
    """xt (D, n), levels first..stop-1 of group (G of them) -> per axis (terms, fracs, weights):
    terms (t0, t1) ("nearest": (t0,)) of (G, n) integers, the lower / upper vertex's share of
    the row index (_corners combines them), with offset (G, 1) (each level's first row in the
    rows indexed; None: 0) folded into axis 0 (XOR adds it to hashed terms < T; tcnn's dense
    levels add it after wrapping, in _corners); fracs (G, n) = pos - cell, pos = x * scale +
    shift, cell = min(floor(pos), max_cell); weights _upper_weight(frac) (None: "nearest").
    index_dtype: the terms' (default: the group's). Shortcuts, tested against their formulas:
    the upper term is the lower one's plus one add ((t + prime) & mask hashed), axis 0's
    multiplier 1, and with axis0_direct axis 0's term the vertex itself, offset included."""
    index_dtype = index_dtype or group.offset.dtype
    scale = group.scale[:, first:stop]
    mult = group.mult[:, first:stop].to(index_dtype)
    max_cell = None if group.max_cell is None else group.max_cell[:, first:stop].to(index_dtype)
    mask, hashed, nearest = group.hash_mask, group.hashed, group.interpolation == "nearest"
    terms, fracs, weights = [], [], None if nearest else []
    for d in range(xt.shape[0]):
        x = xt[d]
        if group.tcnn and x.dtype != torch.float64:
            # tcnn's float32 fmaf(scale, x, 0.5): the product of two float32s is exact in float64
            pos = (scale[d].double() * x.double() + group.shift).to(x.dtype)
        else:
            pos = scale[d].to(x.dtype) * x
            if group.shift:
                pos = pos + group.shift
        cell = pos.to(index_dtype)        # truncation is floor: pos >= 0
        if max_cell is not None:
            cell = torch.minimum(cell, max_cell[d])
        frac = pos - cell
        fracs.append(frac)
        if weights is not None:
            weights.append(_upper_weight(frac, group.interpolation))
        upper = None                      # the upper vertex, when it is not cell + 1
        if (group.periodic_bits >> d) & 1:     # vertex v is v mod N (N = scale, paper layout)
            period = scale[d].to(index_dtype)
            if nearest:                   # floor(x * N + 0.5) reaches N
                cell = torch.remainder(cell, period)
            else:                         # the last cell's upper vertex is N
                upper = torch.remainder(cell + 1, period)
        additive = not hashed or (d == 0 and group.axis0_direct)     # no mask: v * multiplier
        fold = offset if d == 0 and group.wrap_rows is None else None
        pair = []
        for vertex in ([cell] if nearest else [cell, upper]):
            if vertex is None:            # cell + 1: from the lower vertex's term, by one add
                step = 1 if d == 0 else mult[d]
                term = pair[0] + step if additive else (pair[0] + (step & mask)) & mask
            else:
                term = vertex if d == 0 else vertex * mult[d]
                if not additive:
                    term = term & mask
                elif fold is not None:
                    term = term + fold
            pair.append(term)
        if fold is not None and not additive:
            pair = [term ^ fold for term in pair]
        terms.append(tuple(pair))
    return terms, fracs, weights


def _upper_weight(frac: torch.Tensor, interpolation: str):
    """One axis: (s, ds/dfrac), s the upper vertex's weight (the lower's 1 - s): frac ("linear",
    ds/dfrac None) or S(frac) = frac^2 (3 - 2 frac) ("smoothstep")."""
    if interpolation == "smoothstep":
        return frac * frac * (3.0 - 2.0 * frac), 6.0 * frac * (1.0 - frac)
    return frac, None


def _corners(terms, weights, group: _LevelGroup, first: int, stop: int,
             offset: Optional[torch.Tensor], out: Optional[torch.Tensor] = None):
    """Yields (corner, index, weight) per cell corner (bit d set: the upper vertex on axis d),
    given _axis_terms' terms and weights: index (G, n) its table rows (terms XOR-ed or added;
    tcnn's dense levels wrapped modulo their rows, then + offset), weight (G, n) (or None);
    out (2**D, G, n): each corner's rows also written there. Depth first: corners share
    partial sums and products."""
    hashed, n_dims, wrap = group.hashed, len(terms), group.wrap_rows is not None
    factors = None if weights is None else [(1.0 - s, s) for s, _ in weights]
    stack = [(0, 1, 0, None, None), (0, 0, 0, None, None)][-len(terms[0]):]
    while stack:     # each entry: extend a corner of axes < d (its index, weight) by axis d
        d, bit, corner, index, weight = stack.pop()
        corner, term, last = corner | bit << d, terms[d][bit], d == n_dims - 1
        if index is None:
            index = term
        elif last and out is not None and not wrap:     # (straight into out)
            index = (torch.bitwise_xor if hashed else torch.add)(index, term, out=out[corner])
        else:
            index = index ^ term if hashed else index + term
        if factors is not None:
            weight = factors[d][bit] if weight is None else weight * factors[d][bit]
        if not last:
            for b in reversed(range(len(terms[d + 1]))):
                stack.append((d + 1, b, corner, index, weight))
            continue
        if wrap:
            index = torch.remainder(index, group.wrap_rows[first:stop])
            index = index if offset is None else index + offset
        if out is not None and (wrap or n_dims == 1):
            out[corner] = index
        yield corner, index, weight


def _add_grad_x(grad_xt: torch.Tensor, d: int, grad_weight: torch.Tensor, slope,
                group: _LevelGroup, first: int, stop: int) -> None:
    """grad_xt[d] (n,) += the sum over levels of grad_weight (G, n) = dL/d s_d, times ds/dfrac
    (slope; None: 1, linear) and dpos/dx = scale (the cell is piecewise constant)."""
    grad_frac = grad_weight if slope is None else grad_weight * slope
    grad_xt[d].add_((grad_frac * group.scale[d, first:stop].to(grad_frac.dtype)).sum(0))


def _pass_span(group: _LevelGroup, first: int, stop: int, table: torch.Tensor):
    """(the rows of levels first..stop-1 as a view of table (or of its gradient), their
    offsets (G, 1) within it)."""
    start, end = group.bounds[first], group.bounds[stop]
    span = table[group.rows_start + start:group.rows_start + end]
    return span, group.offset[first:stop] - start


# --- The device branch: GPUs, and torch.compile's backward -----------------------------------
# All 2**D corners of a pass at once: one gather, lerps axis by axis, one scatter-add back.

def _corner_rows(xt, group: _LevelGroup, first: int, stop: int, offset: Optional[torch.Tensor],
                 index_dtype: Optional[torch.dtype] = None):
    """(corners (2**D, G, n) ("nearest": (1, G, n)), the table row of each cell corner (see
    _corners), fracs, weights); offset, index_dtype, fracs, weights: see _axis_terms."""
    terms, fracs, weights = _axis_terms(xt, group, first, stop, offset, index_dtype)
    corners = torch.empty((1 << len(terms) if weights is not None else 1, *terms[0][0].shape),
                          dtype=terms[0][0].dtype, device=xt.device)
    for _ in _corners(terms, None, group, first, stop, offset, corners):
        pass
    return corners, fracs, weights


def _device_forward(xt, table, group: _LevelGroup, first: int, stop: int, mode: _Mode,
                    nan: Optional[torch.Tensor], out: torch.Tensor):
    """Writes the features of levels first..stop-1 for points xt (D, n) into out (G, n, F), NaN
    for the points flagged in nan (n,); returns (corner rows, fracs), for backward."""
    span, offset = _pass_span(group, first, stop, table)
    corners, fracs, weights = _corner_rows(xt, group, first, stop, offset)
    values, into = _gather(span, corners, False).to(out.dtype), None
    if weights is None and nan is not None:                   # "nearest"
        values = values.masked_fill(nan[:, None], float("nan"))
    for d, (weight, _) in enumerate(weights or []):  # lerp along axis d: corners pair by bit d
        last = d == len(weights) - 1
        if last and nan is not None:     # a NaN weight makes the point's features NaN
            weight = weight.masked_fill(nan, float("nan"))
        pairs = values.view(-1, 2, *values.shape[1:])
        into = out.unsqueeze(0) if last and mode.eager else None      # (out= is not traced)
        values = torch.lerp(pairs[:, 0], pairs[:, 1], weight.unsqueeze(-1).to(out.dtype), out=into)
    if into is None:
        out.copy_(values[0])
    return corners, fracs


def _lerp_split(grad: torch.Tensor, weight: torch.Tensor, eager: bool) -> torch.Tensor:
    """grad (m, ...) -> (2m, ...), the lerps' lower / upper ends interleaved: grad (1 - weight),
    grad weight. eager: into one buffer with out= (not differentiable, nor traced)."""
    if not eager:
        upper = grad * weight
        return torch.stack((grad - upper, upper), 1).flatten(0, 1)
    both = torch.empty((grad.shape[0], 2) + torch.broadcast_shapes(grad.shape[1:], weight.shape),
                       dtype=torch.promote_types(grad.dtype, weight.dtype), device=grad.device)
    torch.mul(grad, weight, out=both[:, 1])
    torch.sub(grad, both[:, 1], out=both[:, 0])
    return both.flatten(0, 1)


def _device_backward(xt, table, group: _LevelGroup, first: int, stop: int, mode: _Mode,
                     g: torch.Tensor, kept: Optional[List[torch.Tensor]],
                     grad_table: Optional[torch.Tensor], grad_xt: Optional[torch.Tensor]) -> None:
    """Adds the gradients of levels first..stop-1 for points xt (D, n), given g = dL/dfeatures
    (G, n, F), to grad_table (R, F) and grad_xt (D, n); kept: forward's rows and fracs, or None."""
    span, offset = _pass_span(group, first, stop, table)
    if kept is None:
        corners, _, weights = _corner_rows(xt, group, first, stop, offset)
    else:
        corners, nearest = kept[0], group.interpolation == "nearest"
        weights = None if nearest else [_upper_weight(f, group.interpolation) for f in kept[1:]]
    weights = weights or []
    need_x = grad_xt is not None and weights      # "nearest" is piecewise constant
    ends = []                    # per axis, the lerps' two ends (need_x: d out / d weight)
    if need_x:
        values = _gather(span, corners, False).to(g.dtype)
        for weight, _ in weights:
            pairs = values.view(-1, 2, *values.shape[1:])
            ends.append(pairs)
            values = torch.lerp(pairs[:, 0], pairs[:, 1], weight.unsqueeze(-1).to(g.dtype))
    grads = g.unsqueeze(0)
    for d in reversed(range(len(weights))):
        weight, slope = weights[d]
        if need_x:
            pairs = ends[d]
            grad_weight = (grads * (pairs[:, 1] - pairs[:, 0])).sum((0, 3))       # (G, n)
            _add_grad_x(grad_xt, d, grad_weight, slope, group, first, stop)
        grads = _lerp_split(grads, weight.unsqueeze(-1).to(g.dtype), mode.eager)
    if grad_table is not None:
        grad_span = _pass_span(group, first, stop, grad_table)[0]
        grad_span.index_add_(0, corners.reshape(-1), grads.reshape(-1, g.shape[-1]))


def _double_backward_pass(xt, table, group: _LevelGroup, first: int, stop: int, mode: _Mode,
                          g, gg, grad_table, grad_xt, grad_g, saved=()) -> None:
    """Second order of levels first..stop-1, points xt (D, n), all corners at once: derivatives
    of sum(gg * grad_x), grad_x = sum_c (g . row_c) dw_c/dx, g (G, n, F), gg (D, n), added to
    grad_g (G, n, F): sum_c row_c dw_c; grad_table (R, F): g dw_c at row_c; grad_xt (D, n):
    the Hessian of sum_c (g . row_c) w_c times gg (dw_c, along gg, carried as dual numbers)."""
    span, offset = _pass_span(group, first, stop, table)
    tricks = mode.cpu and mode.eager
    words, grad_levels = _pack(span, g.dtype) if tricks else None, None
    if words is not None and grad_table is not None and not isinstance(grad_table, _RowCollector):
        grad_words = _pack(grad_table[group.rows_start:group.rows_stop], g.dtype)
        if grad_words is not None:
            # (G, W) views (_per_level): gather and scatter-add run the levels on all cores
            grad_levels, offset = _per_level(grad_words, group, first, stop)
            words = _per_level(_pack(table[group.rows_start:group.rows_stop], g.dtype), group,
                               first, stop)[0]
    if not (saved and words is not None and (grad_levels is not None or grad_table is None)):
        corners, fracs, _ = _corner_rows(xt, group, first, stop, offset,   # (saved: per-level)
                                         torch.int64 if grad_levels is not None else None)
        saved = (corners, None, None, *fracs)
    corners, rows, g_rows, *fracs = saved
    if words is not None:   # feature pairs as complex numbers (see _pack), gathers on every thread
        g = _pack(g.contiguous(), g.dtype) if g_rows is None else g_rows
        g_conj = g.conj().resolve_conj()     # (a lazy conj makes each product with it slower)
        if rows is None and grad_levels is not None:
            rows = words.expand(corners.shape[0], -1, -1).gather(2, corners)
        elif rows is None:
            rows = _gather(words, corners.reshape(-1).long(), True,
                           torch.get_num_threads()).view(corners.shape)
        values = (rows * g_conj).real if g.is_complex() else rows * g        # (2**D, G, n)
    else:
        rows = _gather(span, corners, tricks).to(g.dtype)                    # (2**D, G, n, F)
        values = (rows * g).sum(-1)
    scale = group.scale[:, first:stop].to(values.dtype)
    tangent, ends = None, []   # values: P at the corners, tangent along gg (None: 0)
    for d, frac in enumerate(fracs):        # lerps along axis d, and their tangents
        weight, slope = _upper_weight(frac.to(values.dtype), group.interpolation)
        step = gg[d] * scale[d]                                   # d frac_d along gg (G, n)
        move = step if slope is None else step * slope            # d weight_d along gg
        diff = values[1::2] - values[0::2]     # (corners pair by bit d: the lower bit)
        dtan = None if tangent is None else tangent[1::2] - tangent[0::2]
        ends.append((weight, slope, frac, step, move, diff, dtan))
        values = torch.lerp(values[0::2], values[1::2], weight)
        tangent = diff * move if dtan is None else torch.lerp(
            tangent[0::2], tangent[1::2], weight) + diff * move
    w, dw = torch.ones_like(values), torch.zeros_like(values)   # the weights split so far
    for d in reversed(range(len(fracs))):
        weight, slope, frac, step, move, diff, dtan = ends[d]
        if grad_xt is not None:
            # d/dx_d of grad_x . gg: slope (Hessian row . gg) + step S''(frac) dP/dweight_d
            term = (dw * diff if dtan is None else dw * diff + w * dtan).sum(0)
            if slope is not None:
                term = term * slope + step * (6.0 - 12.0 * frac) * (w * diff).sum(0)
            _add_grad_x(grad_xt, d, term, None, group, first, stop)
        upper = torch.addcmul(w * move, dw, weight)
        dw = torch.stack((dw - upper, upper), 1).flatten(0, 1)
        w = _lerp_split(w, weight, mode.eager) if d else None      # (only dw is used after)
    dw_rows = dw if words is not None else dw.unsqueeze(-1)     # rows: packed, or (..., F)
    if grad_g is not None:
        grad_dw = (rows * dw_rows).sum(0)
        grad_g.copy_(_unpack(grad_dw) if words is not None else grad_dw)   # (its only pass)
    if grad_levels is not None:
        values = g * dw
        for corner in range(corners.shape[0]):
            grad_levels.scatter_add_(1, corners[corner], values[corner])
    elif grad_table is not None:
        grad_span = _pass_span(group, first, stop, grad_table)[0]
        values = g * dw_rows
        grad_span.index_add_(0, corners.reshape(-1), _unpack(values).reshape(
            -1, grad_span.shape[1]) if words is not None else values.reshape(-1, g.shape[-1]))


# --- The CPU branch: eager mode on a CPU (its forward is torch.compile's too) ----------------
# Cache-sized passes (temporaries malloc recycles), corners one at a time, depth first.

def _cpu_forward(xt: torch.Tensor, table: torch.Tensor, group: _LevelGroup, first: int,
                 stop: int, mode: _Mode, acc_dtype: torch.dtype) -> torch.Tensor:
    """xt: (D, n) -> the features (G, n, F) of the group's levels first..stop-1, corner by
    corner: the CPU branch's forward, and torch.compile's (inductor fuses the corners)."""
    group_table, offset = table[group.rows_start:group.rows_stop], group.offset[first:stop]
    words = _pack(group_table, acc_dtype) if mode.eager else None
    lanes = torch.get_num_threads() if words is not None else 1     # (_gather: int64 rows)
    terms, _, weights = _axis_terms(xt, group, first, stop, offset,
                                    torch.int64 if lanes > 1 else None)
    out = None
    for _, index, weight in _corners(terms, weights, group, first, stop, offset):
        if words is not None:   # (G, n) real or complex
            feature = _gather(words, index, True, lanes)
        else:                   # (G, n, F)
            feature = _gather(group_table, index, mode.eager).to(acc_dtype)
            weight = None if weight is None else weight.unsqueeze(-1)
        if weight is None:
            out = feature
        elif out is None:
            out = feature * weight
        else:
            out.addcmul_(feature, weight)
        index = weight = feature = None   # (freed before the next corner: malloc reuses them)
    return out if words is None else _unpack(out)


def _cpu_backward_pass(xt, table, group: _LevelGroup, first: int, stop: int, mode: _Mode,
                       g_planes, nan, grad_table, grad_xt, saved=None) -> None:
    """Adds the gradients of levels first..stop-1 for points xt (D, n), given g_planes =
    dL/dfeatures (G, F, n), nan (n,) points skipped, to grad_table (R, F) and grad_xt (D, n);
    saved: a list it appends (corners (2**D, G, n), packed rows, g, *fracs) to, or those (tuple)."""
    n_dims, n_features = xt.shape[0], g_planes.shape[1]
    span = slice(group.rows_start, group.rows_stop)
    group_table, group_grad = table[span], None if grad_table is None else grad_table[span]
    grad_words = table_words = grad_levels = table_levels = None
    if mode.eager and group_grad is not None and not isinstance(group_grad, _RowCollector):
        grad_words = _pack(group_grad, g_planes.dtype)                                # (R,)
    if mode.eager and grad_xt is not None:
        table_words = _pack(group_table, g_planes.dtype)                              # (R,)
    # (G, W) views (_per_level), all indexed alike: scatter_add_ and gather on all cores
    per_level = (mode.eager and (group_grad is None or grad_words is not None)
                 and (grad_xt is None or table_words is not None))
    offset = group.offset[first:stop]
    if grad_words is not None or per_level:   # one copy of g, straight into the packed form
        g_rows = (torch.complex(g_planes[:, 0], g_planes[:, 1]) if n_features == 2
                  else g_planes[:, 0].clone())                                    # (G, n)
        if nan is not None:
            g_rows.masked_fill_(nan, 0.0)
        g = _unpack(g_rows)                                                       # (G, n, F)
        g_conj = g_rows.conj().resolve_conj() if grad_xt is not None else None   # (not lazy)
    else:
        g = g_planes.transpose(1, 2)                                             # (G, n, F)
        if nan is not None:
            g = g.masked_fill(nan[:, None], 0.0)
    if per_level and grad_words is not None:
        grad_levels, offset = _per_level(grad_words, group, first, stop)
    if per_level and table_words is not None:
        table_levels, offset = _per_level(table_words, group, first, stop)
    reuse = isinstance(saved, tuple) and per_level      # (the offsets saved corners have)
    if reuse:
        corners, rows_kept, _, *fracs = saved
        weights = [_upper_weight(frac, group.interpolation) for frac in fracs]
        loop = [(c, corners[c], math.prod(s if c >> d & 1 else 1.0 - s for d, (s, _)
                                          in enumerate(weights))) for c in range(len(corners))]
    else:
        terms, fracs, weights = _axis_terms(xt, group, first, stop, offset,
                                            torch.int64 if per_level else None)
        corners = rows_kept = None
        if isinstance(saved, list) and weights is not None and table_levels is not None:
            corners = terms[0][0].new_empty((1 << n_dims, *terms[0][0].shape))   # (int64)
            rows_kept = table_levels.new_empty(corners.shape)
            saved += [corners, rows_kept, g_rows, *fracs]
        loop = _corners(terms, weights, group, first, stop, offset, corners)
    need_x = grad_xt is not None and weights is not None   # "nearest": d/dx = 0
    dots = [None] * (1 << n_dims)     # need_x: each corner's g . row (G, n)
    for corner, index, weight in loop:
        if grad_levels is not None:
            values = g_rows if weight is None else g_rows * weight
            grad_levels.scatter_add_(1, index, values)   # (index: int64 rows of each level)
        elif grad_words is not None:
            values = g_rows if weight is None else g_rows * weight
            # scatter_add_'s 1-D CPU loop beats index_add_'s, even with its int64 copy
            grad_words.scatter_add_(0, index.reshape(-1).long(), values.reshape(-1))
        elif group_grad is not None:
            values = (g if weight is None else g * weight.unsqueeze(-1)).reshape(-1, n_features)
            # (the 2-D index_add_ CPU kernel is several times slower with int32 indices)
            group_grad.index_add_(0, index.reshape(-1).long(), values.to(group_grad.dtype))
        if need_x and table_levels is not None:     # rows . g, pairs as complex numbers
            rows = rows_kept[corner] if reuse else torch.gather(
                table_levels, 1, index, out=None if rows_kept is None else rows_kept[corner])
            dots[corner] = (rows * g_conj).real if rows.is_complex() else rows * g_rows
        elif need_x:
            dots[corner] = (g * _gather(group_table, index, mode.eager)).sum(-1)
        index = weight = values = rows = None   # (freed before the next corner's, see above)
    if need_x:
        # P = sum_c dots_c w_c: dP/ds_d is the difference of the lerps' ends along d, lerped
        # along the later axes (about 2**(D+1) ops, not 4 D 2**D corner by corner)
        grad_weight = []      # per axis so far, its derivative at the corners of later axes
        for d in range(n_dims):
            weight = weights[d][0].to(dots[0].dtype)
            lower, upper = dots[0::2], dots[1::2]
            grad_weight = [[torch.lerp(a, b, weight) for a, b in zip(t[0::2], t[1::2])]
                           for t in grad_weight]
            grad_weight.append([b - a for a, b in zip(lower, upper)])
            if d < n_dims - 1:
                dots = [torch.lerp(a, b, weight) for a, b in zip(lower, upper)]
        for d in range(n_dims):
            _add_grad_x(grad_xt, d, grad_weight[d][0], weights[d][1], group, first, stop)


# --- CPU speed tricks (the CPU branch where mode.eager) --------------------------------------

# A row as one machine word, by row bytes (2-D index_select loops over every row's features)
_WORD_DTYPES = {2: torch.int16, 4: torch.int32, 8: torch.int64, 16: torch.complex128}
# A feature pair as a complex number, for arithmetic (it adds and scales as the pair does)
_PAIR_DTYPES = {torch.float32: torch.complex64, torch.float64: torch.complex128}


def _gather(rows: torch.Tensor, index: torch.Tensor, eager: bool, lanes: int = 1) -> torch.Tensor:
    """rows (R, F) -> (..., F), or packed rows (R,) (_pack) -> (...), at index (...). eager:
    (R, F) rows through a word view (not differentiable). lanes > 1 (int64 index): a gather
    along dim 1 of rows expanded to (lanes, R), split among the threads (index_select is not)."""
    word = _WORD_DTYPES.get(rows.shape[-1] * rows.element_size()) if rows.dim() == 2 else None
    if eager and word is not None and rows.is_contiguous():
        words = _gather(rows.view(word).view(-1), index, eager, lanes)
        return words.view(rows.dtype).view(*index.shape, rows.shape[1])
    if lanes > 1 and rows.dim() == 1 and index.numel() % lanes == 0:
        return rows.expand(lanes, -1).gather(1, index.reshape(lanes, -1)).view(index.shape)
    return rows.index_select(0, index.reshape(-1)).view(*index.shape, *rows.shape[1:])


def _per_level(packed: torch.Tensor, group: _LevelGroup, first: int, stop: int
               ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(view, shift): a group's packed table or gradient (R,) as a (G, W) view whose row g
    holds level first + g, shift (G, 1) added to a level's rows (None: 0), so gathers and
    scatter-adds along dim 1 run one level per thread. Dense levels' view rows overlap, one
    row apart, but each level touches only its own rows."""
    n_levels, n_rows = stop - first, group.hash_mask + 1
    if group.hashed and packed.shape[0] == (group.stop - group.start) * n_rows:
        return packed.view(-1, n_rows)[first:stop], None
    start, end = group.bounds[first], group.bounds[stop]
    view = packed.as_strided((n_levels, end - start - (n_levels - 1)), (1, 1),
                             packed.storage_offset() + start)
    offset = group.offset[first:stop]
    steps = torch.arange(n_levels, dtype=offset.dtype, device=offset.device).unsqueeze(1)
    return view, offset - start - steps


def _pack(rows: torch.Tensor, dtype: torch.dtype) -> Optional[torch.Tensor]:
    """rows (..., F) -> (...), one number per row (elementwise ops then run over one long
    axis): F = 1 as reals, F = 2 (float32 / float64) as complex numbers, whose arithmetic is a
    weighted sum's; None unless contiguous, of `dtype`, with such an F."""
    if rows.dtype != dtype or not rows.is_contiguous() or rows.shape[-1] > 2:
        return None
    if rows.shape[-1] == 1:
        return rows.squeeze(-1)
    pair = _PAIR_DTYPES.get(rows.dtype)
    return None if pair is None else rows.view(pair).squeeze(-1)


def _unpack(packed: torch.Tensor) -> torch.Tensor:
    """The inverse of _pack: (...) -> (..., F)."""
    return torch.view_as_real(packed) if packed.is_complex() else packed.unsqueeze(-1)


# --- The custom op: torch.compile's table gradient on a CPU ----------------------------------

def _table_grad_eager(x: torch.Tensor, table: torch.Tensor, nan: torch.Tensor,
                      grad_out: torch.Tensor, tensors: List[Optional[torch.Tensor]],
                      ints: List[int], interpolation: str) -> torch.Tensor:
    """The table gradient by the eager CPU path, the groups given by _LevelGroup.op_args
    (concatenated): the body of the custom op below."""
    groups = _LevelGroup.from_op_args(tensors, ints, interpolation)
    mode = _Mode(tuple(groups), True, False, True, False, False, False,
                 MultiResHashGrid._cpu_lookups)
    with torch.no_grad():
        return _encode_backward(x, table, nan if bool(nan.any()) else None, mode, grad_out,
                                False, True)[1]


# Inductor's CPU scatter-adds are slower than the eager CPU branch, run as this opaque op
# (torch >= 2.4). Bump the version when its inputs change (copies of this file share it).
_TABLE_GRAD_OP = "hashgrid::table_grad_v5"
_table_grad_op = None
if hasattr(torch.library, "custom_op"):
    _namespace, _name = _TABLE_GRAD_OP.split("::")
    if hasattr(getattr(torch.ops, _namespace), _name):
        _table_grad_op = getattr(getattr(torch.ops, _namespace), _name)
    else:
        _table_grad_op = torch.library.custom_op(_TABLE_GRAD_OP, _table_grad_eager, mutates_args=())
        _table_grad_op.register_fake(lambda x, table, *rest: torch.empty_like(table))


# --- Sparse table gradients (sparse=True) ----------------------------------------------------
# The passes add to a _RowCollector, whose rows are summed in a fixed order (no float atomics).

class _RowCollector:
    """A sparse (R, F) table gradient in the making, used as a dense one (index_add_, row slices
    sharing its contributions); .to(dtype) sums them (_coalesced_rows). dtype: the parts'."""

    def __init__(self, shape, dtype: torch.dtype, device: torch.device, base: int = 0,
                 parts: Optional[List[Tuple[torch.Tensor, torch.Tensor]]] = None):
        self.shape, self.dtype, self.device = torch.Size(shape), dtype, device
        self._base, self._parts = base, [] if parts is None else parts   # [(rows, values)]

    def __getitem__(self, rows: slice) -> "_RowCollector":
        start, stop, _ = rows.indices(self.shape[0])
        return _RowCollector((stop - start,) + self.shape[1:], self.dtype, self.device,
                             self._base + start, self._parts)

    def index_add_(self, dim: int, index: torch.Tensor, values: torch.Tensor) -> "_RowCollector":
        """Tensor.index_add_(0, index (m,), values (m, F)), kept for the sum."""
        assert dim == 0
        if index.dtype == torch.int64 and self._base + self.shape[0] < 2**31:
            index = index.to(torch.int32)         # (the CPU branch's; int32 sorts faster)
        self._parts.append((index + self._base if self._base else index, values))
        return self

    def to(self, dtype: torch.dtype) -> torch.Tensor:
        """The contributions summed per row: a coalesced sparse (R, F) tensor of `dtype`."""
        empty = torch.zeros((0,) + self.shape[1:], dtype=self.dtype, device=self.device)
        parts, self._parts[:] = list(self._parts) or [(empty[:, 0].long(), empty)], []
        rows, values = [torch.cat(column) for column in zip(*parts)]
        del parts                                    # (freed as soon as they are joined)
        return _coalesced_rows(rows, values, self.shape, dtype)


def _coalesced_rows(rows: torch.Tensor, values: torch.Tensor, shape, dtype: torch.dtype
                    ) -> torch.Tensor:
    """rows (m,), values (m, F) -> the coalesced sparse COO tensor (`shape` (R, F), `dtype`)
    whose row r sums values[i] over rows[i] == r, in their given order (a stable sort, then
    segment_reduce: the same bits for any number of threads)."""
    sorted_rows, order = torch.sort(rows, stable=True)
    unique, counts = torch.unique_consecutive(sorted_rows, return_counts=True)
    sums = values.index_select(0, order)
    if rows.numel():
        sums = torch.segment_reduce(sums, "sum", lengths=counts, axis=0)
    return torch.sparse_coo_tensor(unique.long().unsqueeze(0), sums.to(dtype), shape,
                                   is_coalesced=True, check_invariants=False)


class _CoalescedGrad(torch.autograd.Function):
    """The identity on the table, whose backward sums the sparse gradients of its lookups per
    row (_coalesced_rows): implementation="reference" with sparse=True."""

    @staticmethod
    def forward(ctx, table):
        return table.view_as(table)

    @staticmethod
    def backward(ctx, grad):       # (dense if some contribution was, e.g. double backward)
        return _coalesced_rows(grad._indices()[0], grad._values(), grad.shape,
                               grad.dtype) if grad.is_sparse else grad


# --- tiny-cuda-nn interop (layout="tcnn": configs in, configs and parameters out) ------------

def _args_from_tcnn_config(n_input_dims: int, config: dict) -> Tuple[tuple, dict]:
    """MultiResHashGrid's (args, kwargs) for a tcnn encoding config (from_tcnn_config)."""
    if not isinstance(config, dict):
        raise ValueError(f"a tcnn encoding config is a dict, got {type(config).__name__}")
    if "otype" not in config and isinstance(config.get("encoding"), dict):
        config = config["encoding"]         # a whole tcnn config: its encoding
    otypes = {"grid": "hash", "hashgrid": "hash", "densegrid": "dense", "tiledgrid": "tiled"}
    otype = str(config.get("otype")).lower()
    if otype not in otypes:
        hint = "; pass one of its nested grid configs" if otype == "composite" else ""
        raise ValueError(f"not a grid encoding: otype {config.get('otype')!r} (MultiResHashGrid "
                         f"is tcnn's Grid, HashGrid, DenseGrid or TiledGrid){hint}")
    known = ("otype", "type", "n_levels", "n_features", "n_grid_features", "n_features_per_level",
             "log2_hashmap_size", "base_resolution", "per_level_scale", "interpolation", "hash",
             "stochastic_interpolation", "fixed_point_pos", "n_dims_to_encode")
    unknown = [key for key in config if key not in known]
    if unknown:
        raise ValueError(f"unsupported tcnn grid config key(s) {unknown}; supported: {known}")
    grid_types = {"hash": "hash", "dense": "dense", "tiled": "tiled", "tile": "tiled"}
    grid_type = grid_types.get(str(config.get("type", otypes[otype])).lower())
    interpolation = str(config.get("interpolation", "Linear")).lower()
    for key, supported, expected in (
            ("type", grid_type is not None, "Hash, Dense or Tiled"),
            ("hash", str(config.get("hash", "CoherentPrime")).lower() == "coherentprime",
             "CoherentPrime (the paper's primes)"),
            ("interpolation", interpolation in _INTERPOLATIONS, "Nearest, Linear or Smoothstep"),
            ("stochastic_interpolation", not config.get("stochastic_interpolation"), "false"),
            ("fixed_point_pos", not config.get("fixed_point_pos"), "false")):
        if not supported:
            raise ValueError(f"unsupported tcnn {key} {config[key]!r}: expected {expected}")

    def number(key, default, whole=True):       # whole: an integer, else any finite number
        value = config.get(key, default)
        if (isinstance(value, bool) or not isinstance(value, (int, float))
                or not math.isfinite(value) or (whole and value != int(value))):
            raise ValueError(f"tcnn config {key} must be {'an integer' if whole else 'a number'}"
                             f", got {value!r}")
        return int(value) if whole else value

    n_dims = number("n_dims_to_encode", n_input_dims)
    if not 1 <= n_dims <= n_input_dims:
        raise ValueError(f"tcnn config n_dims_to_encode={n_dims} must be in 1..n_input_dims "
                         f"({n_input_dims})")
    n_features_per_level = number("n_features_per_level", 2)
    n_levels = number("n_levels", 16)
    for key in [key for key in ("n_features", "n_grid_features") if key in config][:1]:
        n_features = number(key, None)
        if "n_levels" in config:
            raise ValueError(f"tcnn config may not give both {key} and n_levels")
        if n_features_per_level < 1 or n_features % n_features_per_level:
            raise ValueError(f"tcnn config {key}={n_features} is not a multiple of "
                             f"n_features_per_level={n_features_per_level}")
        n_levels = n_features // n_features_per_level
    base = number("base_resolution", 16)
    if "per_level_scale" in config:
        per_level_scale = number("per_level_scale", None, whole=False)
    elif grid_type != "dense":
        per_level_scale = 2.0
    elif n_levels > 1 and base >= 1:
        # tcnn: std::exp(std::log(256.0f / base_resolution) / (n_levels - 1)), in float32
        log_ratio = _float32(math.log(_float32(256.0 / base)))
        per_level_scale = _float32(math.exp(_float32(log_ratio / (n_levels - 1))))
    else:
        raise ValueError("a DenseGrid with n_levels < 2 needs per_level_scale (tcnn's "
                         "default divides by n_levels - 1)")
    return ((n_dims, n_levels, n_features_per_level, number("log2_hashmap_size", 19),
             base), dict(per_level_scale=per_level_scale, interpolation=interpolation,
                         layout="tcnn", grid_type=grid_type))


# --- Frequency, the NeRF positional encoding -------------------------------------------------

class Frequency(nn.Module):
    """NeRF positional encoding (Mildenhall et al. 2020, eq. 4): x (..., dim) -> (..., dim *
    n_levels * 2), per axis [sin(2^0 pi x), ..., sin(2^(L-1) pi x), cos(2^0 pi x), ...]."""

    def __init__(self, dim: int, n_levels: int = 10):
        super().__init__()
        if not isinstance(dim, int) or dim < 1 or not isinstance(n_levels, int) or n_levels < 1:
            raise ValueError(f"Frequency needs dim >= 1 and n_levels >= 1, got dim={dim!r}, "
                             f"n_levels={n_levels!r}")
        self.input_dim, self.n_levels, self.output_dim = dim, n_levels, dim * n_levels * 2
        self.register_buffer("freqs", 2.0 ** torch.arange(n_levels, dtype=torch.float32),
                             persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (..., dim) -> (..., dim * n_levels * 2)."""
        if not isinstance(x, torch.Tensor) or not torch.is_floating_point(x):
            raise TypeError(f"Frequency expects a floating-point tensor of shape "
                            f"(..., {self.input_dim}), got {type(x).__name__}")
        if x.dim() == 0 or x.shape[-1] != self.input_dim:
            raise ValueError(f"Frequency(dim={self.input_dim}) expects x of shape "
                             f"(..., {self.input_dim}), got {tuple(x.shape)}")
        angles = x.unsqueeze(-1) * (self.freqs.to(x.dtype) * math.pi)           # (..., dim, L)
        return torch.cat((torch.sin(angles), torch.cos(angles)), dim=-1).flatten(-2)

    def extra_repr(self) -> str:
        return f"dim={self.input_dim}, n_levels={self.n_levels}"
