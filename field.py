"""The coordinate network that fits an image, its configuration, and its checkpoints.

    config = FieldConfig(width=3250, height=4333, channels=3)     # the paper's image setup
    field = config.build()                      # xy (N, 2) in [0, 1] -> linear colour (N, C)
    field, info = load_field("last.ckpt")       # a fit written by train.py, ready to render

train.py trains a Field and render.py renders one; both import this module, which needs
only torch (no Lightning), so rendering a checkpoint stays a torch-only affair.
"""
import dataclasses
import math
import os
import pickle
from dataclasses import dataclass
from typing import List, Optional, Union

import torch
from torch import nn

import encoding
from cli import one_line

ENCODINGS = ("hashgrid", "freq", "none")
# Checkpoint keys: where Lightning keeps the module's hyperparameters and weights, and the
# prefix of the field's weights inside the LightningModule's state dict.
HPARAMS, FIELD_KEY, STATE_KEY, PREFIX = "hyper_parameters", "field", "state_dict", "field."


class CheckpointError(Exception):
    """A checkpoint that is missing, unreadable or does not fit the run (one-line message)."""


class Field(nn.Module):
    """Coordinate network: xy (N, 2) in [0, 1] -> linear colour (N, C).

    encoder: (N, 2) -> (N, encoded_dim); then `hidden_layers` ReLU layers of `hidden_width`
    and a linear output layer of `channels`. periodic: "", "x", "y" or "xy", the axes along
    which the field wraps around (a 360-degree panorama): coordinates there are taken modulo
    1, so any x (e.g. 0.9 to 1.1, across the seam) is valid.
    """

    def __init__(self, encoder: nn.Module, encoded_dim: int, channels: int, hidden_width: int,
                 hidden_layers: int, periodic: str = ""):
        super().__init__()
        self.encoder = encoder
        self.periodic = periodic
        # which coordinates wrap (x, y): a buffer, so it follows .to(device), made once
        self.register_buffer("wraps", torch.tensor(["x" in periodic, "y" in periodic]),
                             persistent=False)
        layers, width = [], encoded_dim
        for _ in range(hidden_layers):
            layers += [nn.Linear(width, hidden_width), nn.ReLU(inplace=True)]
            width = hidden_width
        layers.append(nn.Linear(width, channels))
        self.mlp = nn.Sequential(*layers)

    def forward(self, xy: torch.Tensor) -> torch.Tensor:
        if self.periodic:
            xy = torch.where(self.wraps, torch.remainder(xy, 1.0), xy)
        hidden = self.encoder(xy)
        *layers, output = self.mlp
        for layer in layers:
            hidden = layer(hidden)
        if hidden.dtype != output.weight.dtype:
            # under autocast (train.py --precision bf16-mixed) the hidden layers ran in
            # bfloat16; the colour itself is computed in float32, since bfloat16's 8 bits
            # would round it to about half an 8-bit level (albert at step 1000: 41.3 dB this
            # way, 40.9 with a bfloat16 output layer; 41.4 all float32). A tiny matmul.
            with torch.autocast(hidden.device.type, enabled=False):
                return output(hidden.to(output.weight.dtype))
        return output(hidden)

    @torch.no_grad()
    def start_at(self, colour: torch.Tensor) -> None:
        """Sets the output layer's bias to `colour` (C,) (linear light): the untrained field
        then predicts about that colour everywhere (the small random MLP adds a little), and
        training starts from the image's mean colour instead of from a random offset
        (albert, 150 steps, seeds 0 / 2: 36.5 / 36.7 dB, against 36.0 / 33.7)."""
        bias = self.mlp[-1].bias
        bias.copy_(colour.to(bias.device, bias.dtype))


def default_finest_resolution(width: int, height: int, base_resolution: int) -> List[int]:
    """The paper's image setup: N_max = half the image size along each axis, (x, y)."""
    return [max(base_resolution, width // 2), max(base_resolution, height // 2)]


def default_log2_hashmap_size(width: int, height: int) -> int:
    """T grows with the image: about one table row per 16 pixels per level, from 2**19 (the
    paper's default; smaller tables cost small images PSNR: grace_hopper at 2**14 fits to
    31.1 dB in 500 steps, at 2**19 to 32.0) to the paper's gigapixel 2**24. Albert (3250 x
    4333): 2**20, which reached 40.6-41.3 dB in 120 s on 2 CPU cores where 2**19 reached 39.8
    (fewer collisions on the fine levels outweigh the slower, less cache-friendly steps)."""
    return min(24, max(19, round(math.log2(width * height / 16))))


@dataclass
class FieldConfig:
    """Everything that builds a Field for one image: the one source of truth for building,
    saving (``to_dict``, stored in every checkpoint) and reloading (``from_dict``).

    width, height, channels: the image the field fits.
    enc_method: "hashgrid" (MultiResHashGrid), "freq" (NeRF frequencies, n_levels octaves)
        or "none" (raw xy into the MLP).
    Hash grid (the paper's image experiments, §5.1): L = n_levels, F = n_features_per_level,
    T = 2**log2_hashmap_size (None: default_log2_hashmap_size, by image size), N_min =
    base_resolution, N_max = finest_resolution (an int, an (x, y) pair, or None for half the
    image size per axis), and the interpolation.
    MLP: hidden_layers ReLU layers of hidden_width (the paper: 2 x 64).
    periodic: "", "x", "y" or "xy": axes along which the image wraps around (a 360-degree
        panorama: "x"), made seamless by a hash grid with periodic axes.
    """
    width: int
    height: int
    channels: int
    enc_method: str = "hashgrid"
    n_levels: int = 16
    n_features_per_level: int = 2
    log2_hashmap_size: Optional[int] = None
    base_resolution: int = 16
    finest_resolution: Optional[Union[int, List[int]]] = None
    interpolation: str = "linear"
    hidden_width: int = 64
    hidden_layers: int = 2
    periodic: str = ""

    def __post_init__(self):
        if self.enc_method not in ENCODINGS:
            raise ValueError(f"unknown enc_method {self.enc_method!r}; expected one of "
                             + ", ".join(ENCODINGS))
        if self.periodic not in ("", "x", "y", "xy"):
            raise ValueError(f"periodic must be '', 'x', 'y' or 'xy', got {self.periodic!r}")
        if self.periodic and self.enc_method != "hashgrid":
            raise ValueError("periodic axes need enc_method 'hashgrid'")
        if self.log2_hashmap_size is None:
            self.log2_hashmap_size = default_log2_hashmap_size(self.width, self.height)
        if self.finest_resolution is None:
            self.finest_resolution = default_finest_resolution(self.width, self.height,
                                                               self.base_resolution)
        elif not isinstance(self.finest_resolution, int):
            self.finest_resolution = [int(v) for v in self.finest_resolution]

    # Which options each encoding uses; the others are left out of the saved dict, so two
    # checkpoints compare equal whenever they build the same network.
    _USES = {"hashgrid": ("n_levels", "n_features_per_level", "log2_hashmap_size",
                          "base_resolution", "finest_resolution", "interpolation"),
             "freq": ("n_levels",), "none": ()}
    _ALWAYS = ("width", "height", "channels", "enc_method", "hidden_width", "hidden_layers")

    def to_dict(self) -> dict:
        """Plain data for a checkpoint: only the options `enc_method` uses (periodic only
        when set, so checkpoints from before it existed compare equal)."""
        values = {key: getattr(self, key) for key in self._ALWAYS + self._USES[self.enc_method]}
        if self.periodic:
            values["periodic"] = self.periodic
        return values

    @classmethod
    def from_dict(cls, values: dict) -> "FieldConfig":
        """Inverse of to_dict; ValueError for unknown keys (from a newer or foreign file)."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ValueError(f"unknown field option(s) {', '.join(map(str, unknown))}")
        return cls(**values)

    def build_encoder(self):
        """(encoder, encoded_dim): xy (N, 2) -> (N, encoded_dim)."""
        if self.enc_method == "hashgrid":
            encoder = encoding.MultiResHashGrid(
                2, n_levels=self.n_levels, n_features_per_level=self.n_features_per_level,
                log2_hashmap_size=self.log2_hashmap_size, base_resolution=self.base_resolution,
                finest_resolution=self.finest_resolution, interpolation=self.interpolation,
                # tcnn's layout, which the first Linear reads and hands back as is: a training
                # step 3-8% faster (bench/layout.py)
                feature_major=True,
                **({"periodic": ("x" in self.periodic, "y" in self.periodic)}
                   if self.periodic else {}))
            return encoder, encoder.output_dim
        if self.enc_method == "freq":
            encoder = encoding.Frequency(2, n_levels=self.n_levels)
            return encoder, encoder.output_dim
        return nn.Identity(), 2

    def build(self) -> Field:
        encoder, encoded_dim = self.build_encoder()
        return Field(encoder, encoded_dim, self.channels, self.hidden_width, self.hidden_layers,
                     self.periodic)


# --- checkpoints ---------------------------------------------------------------------------

ZIP_MAGIC = b"PK\x03\x04"


def read_checkpoint(path: str, device="cpu") -> dict:
    """The dict of a checkpoint written by train.py; CheckpointError (one line) otherwise."""
    if os.path.isdir(path):
        raise CheckpointError(f"{path}: is a folder, not a checkpoint file (train.py saves "
                              "them as .../checkpoints/last.ckpt)")
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    if magic != ZIP_MAGIC and magic[:1] != b"\x80":     # torch.save's zip, or its older pickle
        raise CheckpointError(f"{path}: not a checkpoint (train.py writes them with torch.save: "
                              "a zip archive)")
    try:
        # weights_only: a checkpoint is data; nothing in it may run code when loaded
        ckpt = torch.load(path, map_location=device, weights_only=True)
    except pickle.UnpicklingError:
        raise CheckpointError(f"{path}: refused: it holds Python objects, not only tensors and "
                              "plain data, so it was not written by train.py") from None
    except Exception as exc:
        # torch's own message for a cut-off file is often an OS error ("Invalid argument")
        detail = "" if isinstance(exc, OSError) else f" ({one_line(exc)})"
        raise CheckpointError(f"{path}: truncated or corrupt checkpoint{detail}") from None
    config = ckpt.get(HPARAMS, {}).get(FIELD_KEY) if isinstance(ckpt, dict) else None
    if not isinstance(config, dict) or STATE_KEY not in ckpt:
        raise CheckpointError(f"{path}: not a train.py checkpoint (no field config)")
    return ckpt


def checkpoint_config(ckpt: dict, path: str) -> FieldConfig:
    """The FieldConfig stored in a checkpoint dict; CheckpointError if it cannot be one."""
    try:
        return FieldConfig.from_dict(ckpt[HPARAMS][FIELD_KEY])
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{path}: bad field config ({one_line(exc)})") from None


def field_weights(ckpt: dict) -> dict:
    """The field's own entries of the checkpoint's state dict, prefix removed."""
    return {key[len(PREFIX):]: value for key, value in ckpt[STATE_KEY].items()
            if isinstance(key, str) and key.startswith(PREFIX)}


def check_weights(config: FieldConfig, weights: dict, path: str) -> None:
    """CheckpointError unless `weights` have exactly the names and shapes `config` builds.

    The network is built on the meta device (shapes only, no memory), so a small crafted
    file cannot make the loader allocate gigabytes before the mismatch is found.
    """
    try:
        with torch.device("meta"):
            expected = {k: tuple(v.shape) for k, v in config.build().state_dict().items()}
    except (TypeError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{path}: bad field config ({one_line(exc)})") from None
    got = {k: tuple(v.shape) if isinstance(v, torch.Tensor) else None for k, v in weights.items()}
    if got != expected:
        diffs = [f"{k}: {got.get(k)} vs {expected.get(k)}"
                 for k in sorted(set(got) | set(expected)) if got.get(k) != expected.get(k)]
        raise CheckpointError(f"{path}: weights do not match their config (stored vs "
                              f"expected shape) " + "; ".join(diffs[:3]))


def load_field(path: str, device="cpu"):
    """(field, info) from a train.py checkpoint, without the source image.

    field: eval-mode nn.Module on `device`, xy (N, 2) in [0, 1] -> linear colour (N, C).
    info: dict with width, height, channels (ints), global_step, source (the trained image's
    file name) and config (the FieldConfig). (Checkpoints from before may also hold a
    "colour" hyperparameter: always "linear", the field's output, and not read.)
    """
    ckpt = read_checkpoint(path, "cpu")
    config = checkpoint_config(ckpt, path)
    weights = field_weights(ckpt)
    check_weights(config, weights, path)
    field = config.build()
    field.load_state_dict(weights)
    hparams = ckpt[HPARAMS]
    info = dict(width=int(config.width), height=int(config.height),
                channels=int(config.channels),
                global_step=int(ckpt.get("global_step", 0)), source=hparams.get("source", ""),
                config=config)
    return field.to(device).eval(), info
