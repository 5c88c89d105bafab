"""Fit an image (pixel coordinate -> colour) with a multiresolution hash encoding and a small
MLP under PyTorch Lightning: CPU, one GPU or several (DDP), thumbnails to gigapixels.

    python train.py                                  # matplotlib's grace_hopper.jpg sample
    python train.py -i data/albert.jpg --visualize --export albert_fit.png
    python train.py -i data/tokyo.npy --finest_resolution 32768 --devices 2 --strategy ddp
    python train.py --config logs/experiments/albert/version_0/config.yaml   # that run again

The image stays 8-bit (memory-mapped for ``.npy``); every step draws random continuous
coordinates, bilinearly interpolates the 4 neighbouring pixels in linear light and fits the
field with an L2 loss between the sRGB encodings, the space PSNR is measured in (sRGB 8-bit,
the way the image would be saved), at a learning rate that decays over the second half of
the run.

Read top to bottom: the LightningModule (ImageFit: the step, its schedule, its score), the
command line (build_parser; --config files), then `run`, in four steps: prepare (every
check, the model on its pixels), build_trainer, fit, finish (the summary, --export). What
keeps a long run's work and stops it (checkpoints, the time budget, signals, divergence,
SLURM requeue, log versions) is keep_work.py; the progress bar, previews and the PSNR plot
are previews.py; the pixels, how batches are drawn and scored are pixels.py; the network
and its checkpoints are field.py; rendering is tiles.py. Nothing imports this file.
"""
import argparse
import contextlib
import dataclasses
import importlib
import math
import os
import sys
import time
from typing import List

import numpy as np
import torch
import yaml
from torch import nn
from torch.utils.data import DataLoader, IterableDataset

import lightning.pytorch as pl
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.fabric.utilities.rank_zero import rank_zero_only

import cli
import images
import live
import outputs
import tiles
from cli import UsageError
from field import FieldConfig
from hardware import (DEVICE_HELP, fused_adam, keep_freed_memory, resolve_accelerator,
                      resolve_precision)
from keep_work import (AtomicCheckpointIO, Diverged, KeepWork, claim_version, resume_point,
                       slurm_job_id)
from lazy_adam import LazyAdam
from pixels import (EVAL_BATCH, PixelSource, PsnrProbe, load_source, psnr_from_sse,
                    sampling_seed, source_digest)
from previews import (LOGGERS, Previews, StepBar, logger_names, make_loggers, plot_psnr,
                      quiet_lightning, summary_line)

STEPS_PER_EPOCH = 100                  # upstream's --epochs unit
EPOCHS = 5
GPU_BATCH_SIZE = 2 ** 18               # the paper's batch
CPU_BATCH_SIZE = 2 ** 16               # 2 cores, albert, 120 s: 42.1 dB
PIXELS_PER_SAMPLE = 16                 # a default batch draws at most 1/16 of the image's pixels
CPU_VAL_EVERY, GPU_VAL_EVERY = 250, 1000  # a 2^22-pixel score costs ~25 CPU steps
CKPT_MINUTES = 10.0                    # last.ckpt refreshed this often: bounds lost work in time
ASYNC_LOSS_CHECK_EVERY = 20            # steps between NaN checks on a GPU (each one waits for it)
LR_DECAY_START, LR_DECAY_FINAL = 0.5, 0.05   # --lr_schedule decay: from half-way, down to 1/20
ACCELERATORS = ["auto", "cpu", "gpu", "mps"]
TABLE_OPTIMIZERS = ["adam", "sparse_adam"]
SPARSE_PARAMS_PER_LOOKUP = 12  # GPU: above it lazy Adam writes fewer bytes (bench/step.py)


class _Steps(IterableDataset):
    """Yields step numbers only: batches are drawn on the training device in training_step,
    so the image is never pickled into DataLoader workers nor copied per batch."""

    def __init__(self, length: int):
        self.length = length

    def __iter__(self):
        return iter(range(self.length))

    def __len__(self):
        return self.length


# --- the Lightning module -----------------------------------------------------------------

class TrainClock:
    """Seconds spent training, with scoring and previews paused out (pauses may nest).
    `agreed`: the reading every rank goes by, the largest over the ranks at the last step's
    end (KeepWork's agreement sets it): the schedule's progress and the time budget."""

    def __init__(self):
        self.elapsed, self.since, self.depth = 0.0, None, 0
        self.agreed = 0.0

    def start(self):
        self.since = time.perf_counter()

    def seconds(self) -> float:
        running = self.depth == 0 and self.since is not None
        return self.elapsed + (time.perf_counter() - self.since if running else 0.0)

    def pause(self):
        if self.depth == 0 and self.since is not None:
            self.elapsed += time.perf_counter() - self.since
        self.depth += 1

    def resume(self):
        self.depth -= 1
        if self.depth == 0 and self.since is not None:
            self.since = time.perf_counter()

    @contextlib.contextmanager
    def paused(self):
        self.pause()
        try:
            yield
        finally:
            self.resume()


def learning_rate(base: float, progress: float, schedule: str = "decay") -> float:
    """Adam's step size at `progress` in [0, 1] of the run (the larger of steps done / the
    step budget and seconds trained / --max_time, so the schedule ends where training does).

    "constant": base throughout. "decay": base for the first LR_DECAY_START of the run, then
    an exponential decay to base * LR_DECAY_FINAL at its end: large steps find the
    structure, small ones settle the fine detail that a constant rate keeps shaking
    (instant-ngp's configs decay their rate exponentially as well).
    """
    if schedule == "constant" or progress <= LR_DECAY_START:
        return base
    t = min(1.0, (progress - LR_DECAY_START) / (1.0 - LR_DECAY_START))
    return base * LR_DECAY_FINAL ** t


def image_loss(pred: torch.Tensor, target: torch.Tensor, kind: str) -> torch.Tensor:
    """Mean L2 in linear light ("l2"), relative L2 (errors scaled by 1 / (pred^2 + 0.01), pred
    detached: the Noise2Noise-style loss upstream uses), or L2 between the sRGB encodings
    ("srgb_l2": the space PSNR is scored in). pred, target: (N, C) linear light."""
    if kind == "srgb_l2":
        pred, target = images.linear_to_srgb(pred), images.linear_to_srgb(target)
    err = (pred - target).square()
    if kind == "relative_l2":
        err = err / (pred.detach().square() + 0.01)
    return err.mean()


class ImageFit(pl.LightningModule):
    """Fits `field` to an image attached with `attach`. The hyperparameters (including the
    field config) go into every checkpoint, so field.load_field rebuilds the fit from it."""

    def __init__(self, field: dict, source: str = "", source_digest: str = "",
                 batch_size: int = CPU_BATCH_SIZE,
                 lr: float = 1e-2, mlp_lr: float = 3e-3, lr_schedule: str = "decay",
                 loss: str = "srgb_l2",
                 weight_decay: float = 1e-6, seed: int = 0,
                 max_time: float = None, compile: bool = False,
                 table_optimizer: str = "adam"):
        super().__init__()
        self.save_hyperparameters(ignore=["max_time", "compile"])
        self.max_time = max_time
        self.field = FieldConfig.from_dict(field).build()
        # --compile: the training step's forward only (a function, not a module: the state_dict
        # keys stay the field's); scoring and rendering run the field as it is
        self.train_forward = torch.compile(self.field.forward) if compile else self.field.forward
        self.clock = TrainClock()
        self.image = None
        self.probe = None
        self.generator = None
        self.last_val_step = None
        self.first_step_seconds = None  # this run's first step (compiling, with --compile)
        self.curve = []                 # [(step, train_seconds, psnr)] of every score
        self.catch_up = False           # LazyAdam.catch_up before each forward (setup)

    def attach(self, image: PixelSource, probe: PsnrProbe) -> None:
        """Training data (kept out of the module's state, hence out of checkpoints)."""
        self.image, self.probe = image, probe

    def forward(self, xy: torch.Tensor) -> torch.Tensor:
        return self.field(xy)

    def param_groups(self) -> List[dict]:
        """Adam's parameter groups, each with its `base_lr` (the rate the schedule scales), in
        the order of self.parameters(): the MLP's weights (the paper's L2 regularisation), the
        encoder's tables (--lr; no regularisation), the MLP's biases (--mlp_lr). Empty groups
        (an encoder without parameters) are left out."""
        mlp, hparams = self.field.mlp, self.hparams
        groups = [dict(params=[p for p in mlp.parameters() if p.ndim >= 2],
                       weight_decay=hparams.weight_decay, base_lr=hparams.mlp_lr),
                  dict(params=list(self.field.encoder.parameters()), weight_decay=0.0,
                       base_lr=hparams.lr),
                  dict(params=[p for p in mlp.parameters() if p.ndim < 2], weight_decay=0.0,
                       base_lr=hparams.mlp_lr)]
        return [dict(group, lr=group["base_lr"]) for group in groups if group["params"]]

    def setup(self, stage: str) -> None:
        # --table_optimizer sparse_adam: the tables' gradients are sparse rows (set before DDP
        # wraps the module: it allreduces them as sparse tensors), except under NCCL, which has
        # no sparse allreduce: there the tables step with dense gradients (Adam's step)
        if self.trainer is not None and hasattr(self.field.encoder, "sparse"):
            nccl = self.trainer.world_size > 1 and self.trainer.strategy.root_device.type == "cuda"
            self.field.encoder.sparse = self.hparams.table_optimizer == "sparse_adam" and not nccl
            # (under DDP each rank reads its own batch's rows: catching those up on one rank
            # only would part the replicas, so there the rows catch up at the step)
            self.catch_up = self.field.encoder.sparse and self.trainer.world_size == 1

    def configure_optimizers(self):
        # sparse_adam: LazyAdam, Adam whose sparse-gradient parameters (the tables) step only
        # the rows the batch touched; the MLP's step and the state dict's format are Adam's
        kind = LazyAdam if self.hparams.table_optimizer == "sparse_adam" else torch.optim.Adam
        return kind(self.param_groups(), betas=(0.9, 0.99), eps=1e-15,
                    fused=fused_adam(self.device))

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        # A resumed optimizer takes its settings from the checkpoint: make them this run's.
        # "fused": this device's (a run from before fused Adam, or from another device, would
        # resume unfused; torch then also puts Adam's step counts where the fused kernel wants
        # them). base_lr: this run's --lr and --mlp_lr. Checkpoints from before --mlp_lr have
        # two groups, the second holding the tables and then the MLP's biases: split it.
        if self._trainer is None:        # (loaded outside a run: no optimizer to restore)
            return
        fused = fused_adam(self.trainer.strategy.root_device)
        ours = self.param_groups()
        for state in checkpoint.get("optimizer_states", ()):
            saved = state["param_groups"]
            if len(saved) == 2 and len(ours) == 3:
                n_tables = len(ours[1]["params"])
                saved[1:] = [dict(saved[1], params=saved[1]["params"][:n_tables]),
                             dict(saved[1], params=saved[1]["params"][n_tables:])]
            for group, mine in zip(saved, ours):
                group.update(fused=fused, base_lr=mine["base_lr"])

    def on_train_start(self) -> None:
        self.image.to(self.device)
        gen_device = self.image.pixels.device
        self.generator = torch.Generator(device=gen_device)
        self.generator.manual_seed(sampling_seed(self.hparams.seed, self.global_rank,
                                                 self.global_step))
        self.clock.start()

    def progress(self) -> float:
        """How far the run is, in [0, 1]: steps against the step budget and training seconds
        against --max_time, whichever is further. The seconds are the ranks' agreed reading
        (TrainClock.agreed), so every replica takes the same step size."""
        max_steps = self.trainer.max_steps if self.trainer is not None else -1
        done = self.global_step / max_steps if max_steps and max_steps > 0 else 0.0
        if self.max_time is not None:
            done = max(done, self.clock.agreed / self.max_time)
        return min(1.0, done)

    def on_train_batch_start(self, batch, batch_idx):
        progress = self.progress()
        for group in self.trainer.optimizers[0].param_groups:
            group["lr"] = learning_rate(group["base_lr"], progress, self.hparams.lr_schedule)

    def draw_batch(self, n: int):
        """(xy (n, 2), target (n, C)) from this rank's stream."""
        return self.image.sample(n, self.generator)

    def training_step(self, batch, batch_idx):
        xy, target = self.draw_batch(self.hparams.batch_size)
        if self.catch_up:   # lazy Adam: the rows this forward reads, where Adam would have them
            table = self.field.encoder.embedding.weight
            self.optimizers().optimizer.catch_up(table, self.field.encoder.rows(xy))
        loss = image_loss(self.train_forward(xy), target, self.hparams.loss)  # float32 colour
        self.log("train/loss", loss, prog_bar=True, batch_size=len(xy))
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx):
        if self.first_step_seconds is None:
            self.first_step_seconds = self.clock.seconds()

    def val_dataloader(self):
        return DataLoader(_Steps(1), batch_size=None)

    def on_validation_start(self):
        self.clock.pause()

    def on_validation_end(self):
        self.clock.resume()

    def validation_step(self, batch, batch_idx):
        # scored in float32, as render.py and --export compute the fit, whatever --precision
        # trains in
        with torch.autocast(self.device.type, enabled=False):
            sse, count = self.probe.sse(self.field, self.global_rank, self.trainer.world_size)
        total = torch.tensor([sse, count], dtype=torch.float64, device=self.device)
        total = self.trainer.strategy.reduce(total, reduce_op="sum")
        psnr = psnr_from_sse(float(total[0]), int(total[1]))
        self.last_val_step = self.global_step
        self.curve.append((self.global_step, self.clock.seconds(), psnr))
        # identical on every rank already; sync_dist only keeps Lightning's DDP checks quiet
        self.log("val/psnr", psnr, prog_bar=True, sync_dist=True, batch_size=1)
        self.log("time/train_seconds", self.clock.seconds(), sync_dist=True, batch_size=1)
        if self.device.type == "cuda":      # what the run needs of the GPU, for sizing runs
            peak = torch.cuda.max_memory_allocated(self.device) / 2**20
            self.log("memory/peak_mib", peak, sync_dist=True, batch_size=1, reduce_fx="max")
        # x-axis of the validation rows: the steps taken (Lightning would write one less)
        self.log("step", float(self.global_step), sync_dist=True, batch_size=1)


# --- command line -----------------------------------------------------------------------

def sample_image_path() -> str:
    """matplotlib's public-domain grace_hopper.jpg: on every install, no download."""
    import matplotlib.cbook
    return str(matplotlib.cbook.get_sample_data("grace_hopper.jpg", asfileobj=False))


def build_parser() -> argparse.ArgumentParser:
    """Every flag; each one is also a --config key (its name without the dashes)."""
    p = cli.ArgumentParser(prog="train.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=None,
                   help="a YAML file of flag: value lines (e.g. a run's config.yaml); flags "
                   "given on the command line win")
    p.add_argument("-i", "--input", help="image to fit: .jpg .png .tif .webp .bmp or .npy "
                   "(default: matplotlib's grace_hopper.jpg sample)")
    p.add_argument("--root", default="./logs", help="log root (default: ./logs)")
    p.add_argument("--trace", default="experiments",
                   help="experiment folder under --root (default: experiments); logs go to "
                   "ROOT/TRACE/IMAGE_NAME/version_N")
    p.add_argument("--batch_size", type=cli.integer(1), default=None,
                   help=f"pixels per step (default: 1/{PIXELS_PER_SAMPLE} of the image's pixels "
                   f"as a power of 2, at most {GPU_BATCH_SIZE} on GPU, {CPU_BATCH_SIZE} on CPU)")
    p.add_argument("--epochs", type=cli.integer(1), default=None,
                   help=f"training length in epochs of {STEPS_PER_EPOCH} steps, counted from "
                   f"step 0 (a resumed run trains up to this total) (default: {EPOCHS}; with "
                   "--max_time alone, the time budget ends the run)")
    p.add_argument("--max_steps", type=cli.integer(1), default=None,
                   help="training length in steps in total, overrides --epochs (default: none)")
    p.add_argument("--max_time", type=cli.number(above=0), default=None,
                   help="stop after this many seconds of training steps in this run; "
                   "start-up, scoring and previews are not counted (default: none)")
    p.add_argument("--device", default="auto",
                   help=f"{DEVICE_HELP}; it also sets --accelerator; --devices, when given, "
                   "overrides it (default: auto)")
    p.add_argument("--accelerator", choices=ACCELERATORS, default="auto",
                   help="auto: a GPU (CUDA, or Apple's MPS) if torch sees one, else the CPU "
                   "(default: auto)")
    p.add_argument("--devices", type=cli.devices, default=None,
                   help="device count, GPU indices (0,1) or auto (default: 1: --device)")
    p.add_argument("--strategy", default="auto",
                   help="Lightning strategy, e.g. ddp for several devices (default: auto)")
    p.add_argument("--num_nodes", type=cli.integer(1), default=1,
                   help="machines for multi-node DDP, launched by SLURM or torchrun "
                   "(default: 1)")
    p.add_argument("--precision", default="auto",
                   help="Lightning precision, e.g. 32-true or bf16-mixed (default: auto: "
                   "bf16-mixed where the GPU or CPU computes bfloat16 natively, else 32-true)")
    p.add_argument("--enc_method", choices=["hashgrid", "freq", "none"], default="hashgrid",
                   help="input encoding (default: hashgrid)")
    p.add_argument("--n_levels", type=cli.integer(1), default=FieldConfig.n_levels,
                   help="hash-grid levels L, or frequency octaves for freq (default: %(default)s)")
    p.add_argument("--n_features_per_level", type=cli.integer(1),
                   default=FieldConfig.n_features_per_level,
                   help="features per level F (default: %(default)s)")
    p.add_argument("--log2_hashmap_size", type=cli.integer(1, 31), default=None,
                   help="log2 of the table size T per level, 1..31 (default: by image size, "
                   "round(log2(pixels / 16)) within 19..24; albert: 20)")
    p.add_argument("--base_resolution", type=cli.integer(1), default=FieldConfig.base_resolution,
                   help="coarsest grid resolution N_min (default: %(default)s)")
    p.add_argument("--finest_resolution", type=cli.resolution, default=None,
                   help="finest resolution N_max: N for both axes or X,Y (default: half the "
                   "image width, half its height)")
    p.add_argument("--periodic", choices=["x", "y", "xy"], default="",
                   help="axes along which the image wraps around, e.g. x for a 360-degree "
                   "panorama: the fit is seamless across them (default: none)")
    p.add_argument("--interpolation", choices=["linear", "smoothstep", "nearest"],
                   default=FieldConfig.interpolation,
                   help="hash-grid interpolation (default: %(default)s)")
    p.add_argument("--lr", type=cli.number(above=0), default=1e-2,
                   help="Adam learning rate of the hash tables (default: 1e-2, the paper's)")
    p.add_argument("--mlp_lr", type=cli.number(above=0), default=3e-3,
                   help="Adam learning rate of the MLP (default: 3e-3; see the README)")
    p.add_argument("--table_optimizer", choices=TABLE_OPTIMIZERS, default=None,
                   help="adam: Adam over every table row each step; sparse_adam: lazy Adam over "
                   "the rows the batch touched (sparse gradients; the MLP keeps Adam) "
                   "(default: adam on a CPU; on a GPU sparse_adam for tables of more than "
                   f"{SPARSE_PARAMS_PER_LOOKUP} parameters per lookup of a step; see the README)")
    p.add_argument("--lr_schedule", choices=["decay", "constant"], default="decay",
                   help="decay: constant for the first half of the run (steps or --max_time), "
                   "then exponential decay to 1/20 (default: decay)")
    p.add_argument("--loss", choices=["srgb_l2", "l2", "relative_l2"], default="srgb_l2",
                   help="srgb_l2: L2 between the sRGB encodings, where PSNR is scored; l2 or "
                   "relative_l2 in linear light (default: srgb_l2)")
    p.add_argument("--seed", type=cli.integer(0, 2**32 - 1), default=0,
                   help="initialisation and sampling seed (default: 0)")
    p.add_argument("--val_every", type=cli.integer(1), default=None,
                   help=f"PSNR every N steps (default: {CPU_VAL_EVERY} on CPU, "
                   f"{GPU_VAL_EVERY} on GPU, at most a tenth of the run)")
    p.add_argument("--ckpt_every", type=cli.integer(0), default=0,
                   help="also keep checkpoints/step=N.ckpt every N steps, 0: none (default: 0)")
    p.add_argument("--ckpt_minutes", type=cli.number(above=0), default=CKPT_MINUTES,
                   help="refresh checkpoints/last.ckpt every this many minutes, so that a "
                   "crash or kill loses at most that much work (default: %(default)s)")
    p.add_argument("--ckpt", default=None,
                   help="resume from this checkpoint (same image and network flags)")
    p.add_argument("--export", default=None,
                   help="write the full-resolution fit here at the end: .png .jpg .tif .webp "
                   ".bmp or .npy")
    p.add_argument("--export_dtype", choices=("uint8", "uint16", "float16", "float32"),
                   default="uint8", help="export pixels: uint8 / uint16 sRGB (uint16: .png "
                   ".tif .npy) or float16 / float32 linear light (.tif .npy)")
    p.add_argument("--visualize", action=argparse.BooleanOptionalAction, default=False,
                   help="write previews at steps 1, 2, 4, 8, 10, 20, ... and an animated GIF, "
                   "and hand them to the loggers that take images")
    p.add_argument("--logger", type=logger_names, default=None,
                   help="where metrics go, one or several of " + ",".join(LOGGERS)
                   + " (default: csv, and tensorboard when it is installed)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False,
                   help="torch.compile the field for the training step (its first step then "
                   "takes the compile time, reported at the end)")
    p.add_argument("--serve", type=cli.integer(0, 65535), nargs="?", const=8000, metavar="PORT",
                   help="show the fit live in the browser (view.py's page, from rank 0) at "
                   "http://127.0.0.1:PORT/ [default port: 8000; 0: any free one]")
    return p


def write_config(args: argparse.Namespace, path: str) -> str:
    """config.yaml: every flag of the run with the values it resolved to (batch size, device,
    precision, loggers, ...), so that `--config path` repeats it exactly."""
    values = {key: value for key, value in vars(args).items() if key != "config"}
    with outputs.atomic_output(path) as partial, open(partial, "w") as f:
        yaml.safe_dump(values, f, sort_keys=False)
    return path


def field_config(args: argparse.Namespace, width: int, height: int,
                 channels: int) -> FieldConfig:
    """The network the command line asks for, for a width x height image; UsageError for
    flags that cannot build one (e.g. N_max below N_min: built on the meta device, so
    checking costs no memory)."""
    try:
        config = FieldConfig(width, height, channels, enc_method=args.enc_method,
                             n_levels=args.n_levels,
                             n_features_per_level=args.n_features_per_level,
                             log2_hashmap_size=args.log2_hashmap_size,
                             base_resolution=args.base_resolution,
                             finest_resolution=args.finest_resolution,
                             interpolation=args.interpolation, periodic=args.periodic)
        with torch.device("meta"):
            config.build()
    except ValueError as exc:
        raise UsageError(cli.one_line(exc)) from None
    return config


def check_export(path: str, source: str, dtype: str) -> None:
    """UsageError before training for an export that could not be written at the end: a
    format images.write_image lacks or that cannot hold `dtype`, or outputs.check_output's
    cases (a folder, the source image, an unwritable place)."""
    try:
        images.check_dtype(path, dtype)
        outputs.check_output(path, source)
    except (images.ImageError, ValueError) as exc:
        raise UsageError(f"--export {exc}") from None


def default_batch_size(pixels: int, accelerator: str) -> int:
    """1/PIXELS_PER_SAMPLE of the image as a power of 2, within 2^8 and the device's batch:
    a small image then takes many cheap steps rather than redrawing each pixel several times
    per step (grace_hopper on 2 cores: 2^14 pixels, 28 ms per step, against 174 ms for 2^16
    at about the same PSNR per step)."""
    cap = CPU_BATCH_SIZE if accelerator == "cpu" else GPU_BATCH_SIZE
    return min(cap, 2 ** max(8, round(math.log2(pixels / PIXELS_PER_SAMPLE))))


def default_table_optimizer(accelerator: str, config: FieldConfig, batch_size: int) -> str:
    """One rule per device (the numbers: the README, from bench/step.py). On a GPU the bytes a
    step writes: sparse_adam once the tables hold more than SPARSE_PARAMS_PER_LOOKUP parameters
    per lookup of a step (batch x levels x 4 corners). On a CPU the measured clock: adam,
    faster at every table size measured."""
    if accelerator != "gpu" or config.enc_method != "hashgrid":
        return "adam"
    with torch.device("meta"):                  # the table's size, nothing allocated
        params = config.build_encoder()[0].embedding.weight.numel()
    lookups = batch_size * config.n_levels * 4
    return "sparse_adam" if params > SPARSE_PARAMS_PER_LOOKUP * lookups else "adam"


def resolved(args: argparse.Namespace, accelerator: str, index: int,
             pixels: int) -> argparse.Namespace:
    """`args` with what its defaults resolve to for this image on this machine, on device
    `index` of `accelerator` (written to config.yaml, so that the run repeats exactly
    elsewhere too)."""
    if args.max_steps is not None or args.epochs is not None or args.max_time is None:
        max_steps = args.max_steps or (args.epochs or EPOCHS) * STEPS_PER_EPOCH
    else:
        max_steps = None                        # --max_time alone: the budget ends the run
    on_cpu = accelerator == "cpu"
    tensorboard = importlib.util.find_spec("tensorboard") is not None
    return argparse.Namespace(**{**vars(args), **dict(
        accelerator=accelerator, precision=resolve_precision(args.precision, accelerator),
        batch_size=args.batch_size or default_batch_size(pixels, accelerator),
        val_every=args.val_every or min(CPU_VAL_EVERY if on_cpu else GPU_VAL_EVERY,
                                        max(1, (max_steps or 2**62) // 10)),
        max_steps=max_steps, devices=args.devices if args.devices is not None
        else (1 if accelerator != "gpu" else [index]),
        logger=args.logger or ["csv"] + (["tensorboard"] if tensorboard else []))})


def export_fit(field: nn.Module, width: int, height: int, channels: int, path: str,
               dtype: str = "uint8") -> str:
    """Full-resolution render of `field` to `path`, tile by tile (tiles.render_to_file)."""
    tiles.render_to_file(field, width, height, channels, path, max_batch=EVAL_BATCH,
                          dtype=dtype)
    return path


# --- the run: prepare, build the trainer, fit, finish ---------------------------------------

@dataclasses.dataclass
class Plan:
    """A run as `prepare` settles it, before anything is written: the flags resolved for this
    image and machine, the image, the network, the step it starts from; `build_trainer` adds
    where it logs and what keeps its work."""
    args: argparse.Namespace
    source_path: str
    source: np.ndarray                 # (H, W, C) uint8 sRGB
    config: FieldConfig
    model: ImageFit
    first_step: int                    # 0, or the step of the checkpoint it resumes
    runs: str                          # ROOT/TRACE/IMAGE_NAME, the version_N folders' home
    log_dir: str = ""
    keep: KeepWork = None


def run(args, callbacks=(), argv=()) -> dict:
    """Train as `args` say; returns a summary dict (rank 0 fills psnr/paths). `argv`: the
    command line, for the resume hint printed when a signal stops the run. `callbacks` go to
    the Trainer after train.py's own."""
    plan = prepare(args)
    trainer = build_trainer(plan, callbacks)
    fit(plan, trainer, argv)
    return finish(plan, trainer)


def prepare(args) -> Plan:
    """Everything that can refuse the run, checked before anything is written (the image, the
    network flags, the checkpoint it resumes, the export); the model built on its pixels."""
    accelerator, index = resolve_accelerator(args.accelerator, args.device)
    if accelerator == "cpu":
        keep_freed_memory()
    path = args.input or sample_image_path()
    source = load_source(path)
    height, width, channels = source.shape
    config = field_config(args, width, height, channels)
    digest, source_name = source_digest(source), os.path.basename(path)
    runs = os.path.join(args.root, args.trace, os.path.splitext(source_name)[0])
    ckpt, first_step = resume_point(runs, args.ckpt, config, source_name, digest)
    if args.export:
        check_export(args.export, path, args.export_dtype)
    args.ckpt = ckpt                            # a requeued job's own last.ckpt, if any
    args = resolved(args, accelerator, index, width * height)
    if args.table_optimizer is None:
        args.table_optimizer = default_table_optimizer(accelerator, config, args.batch_size)
    pl.seed_everything(args.seed, verbose=False)
    model = ImageFit(config.to_dict(), source=source_name, source_digest=digest,
                     batch_size=args.batch_size, lr=args.lr, mlp_lr=args.mlp_lr,
                     lr_schedule=args.lr_schedule, loss=args.loss, seed=args.seed,
                     max_time=args.max_time, compile=args.compile,
                     table_optimizer=args.table_optimizer)
    image = PixelSource(source, config.periodic)
    if ckpt is None:
        model.field.start_at(image.mean_colour())
    model.attach(image, PsnrProbe(source))
    return Plan(args, path, source, config, model, first_step, runs)


def build_trainer(plan: Plan, callbacks=()) -> pl.Trainer:
    """The Trainer, its version_N folder (claimed, with config.yaml), loggers and callbacks:
    the live view when asked for (listening first: a port in use stops the run before its log
    folder exists), the progress bar, what keeps the work (KeepWork: saves, and the one place
    that stops the run) and previews."""
    args = plan.args
    serving = []
    if args.serve is not None and rank_zero_only.rank == 0:
        try:
            serving.append(live.LiveView(plan.model.field, plan.config, plan.source, args.serve,
                                         first_step=plan.first_step))
        except OSError as exc:
            raise UsageError(f"--serve: {exc}") from None
    version = claim_version(plan.runs)
    plan.log_dir = os.path.join(plan.runs, f"version_{version}")
    plan.keep = KeepWork(os.path.join(plan.log_dir, "checkpoints"), args.ckpt_every,
                         args.ckpt_minutes, clock=plan.model.clock, max_time=args.max_time,
                         check_every=1 if args.accelerator == "cpu" else ASYNC_LOSS_CHECK_EVERY)
    own = [StepBar(), plan.keep]
    if args.visualize:
        own.append(Previews(plan.model.image, os.path.join(plan.log_dir, "previews")))
    own += serving
    # SLURM's requeue signal is KeepWork's: it saves at a step's end and requeues then
    cluster = [SLURMEnvironment(auto_requeue=False)] if slurm_job_id() is not None else []
    loggers = make_loggers(args.logger, args.root, args.trace, os.path.basename(plan.runs),
                           version)
    quiet_lightning()
    try:
        trainer = pl.Trainer(
            accelerator=args.accelerator, devices=args.devices, num_nodes=args.num_nodes,
            strategy=args.strategy, precision=args.precision,
            max_steps=-1 if args.max_steps is None else args.max_steps,
            max_epochs=-1, val_check_interval=args.val_every, check_val_every_n_epoch=None,
            num_sanity_val_steps=0, logger=loggers, callbacks=[*own, *callbacks],
            plugins=[AtomicCheckpointIO(), *cluster], enable_checkpointing=False,
            enable_model_summary=False, log_every_n_steps=min(50, args.val_every),
            default_root_dir=plan.log_dir)
    except (ValueError, TypeError, RuntimeError, MisconfigurationException) as exc:
        raise UsageError(cli.one_line(exc)) from None
    if trainer.is_global_zero:
        write_config(args, os.path.join(plan.log_dir, "config.yaml"))
    return trainer


def fit(plan: Plan, trainer: pl.Trainer, argv=()) -> None:
    """Train until the step budget or KeepWork stops the run; then save last.ckpt, score the
    final weights and plot the curve. A signal's stop raises outputs.Stopped after the save,
    with the command that resumes (`argv`)."""
    model, keep = plan.model, plan.keep
    trainer.fit(model, train_dataloaders=DataLoader(_Steps(STEPS_PER_EPOCH), batch_size=None),
                ckpt_path=plan.args.ckpt, weights_only=True)
    keep.save(trainer)                          # last.ckpt; checks the weights are finite first
    if keep.signal is None and model.last_val_step != trainer.global_step:
        trainer.validate(model, verbose=False)      # score the final weights too
    if trainer.is_global_zero:
        plot_psnr(model.curve, os.path.join(plan.log_dir, "psnr.png"),
                  f"train.py on {os.path.basename(plan.source_path)}")
    if keep.signal is not None:
        raise keep.stopped(trainer, plan.log_dir, argv)


def finish(plan: Plan, trainer: pl.Trainer) -> dict:
    """The run's summary; rank 0 also writes --export and prints the last line."""
    args, model, keep = plan.args, plan.model, plan.keep
    summary = dict(steps=trainer.global_step, steps_this_run=trainer.global_step
                   - plan.first_step, train_seconds=model.clock.seconds(),
                   psnr=float(trainer.callback_metrics.get("val/psnr", float("nan"))),
                   log_dir=plan.log_dir, checkpoint=keep.last,
                   plot=os.path.join(plan.log_dir, "psnr.png"), curve=model.curve, export=None,
                   compile_seconds=model.first_step_seconds if args.compile else None,
                   rank=trainer.global_rank)
    if trainer.is_global_zero:
        if args.export:
            height, width, channels = plan.source.shape
            with outputs.stop_on_signals("train.py", f"{args.export} was not written; the fit "
                                         f"is saved: python render.py --ckpt {keep.last} -o "
                                         f"{args.export} writes it"):
                summary["export"] = export_fit(model.field.eval(), width, height, channels,
                                               args.export, args.export_dtype)
        print(summary_line(summary, args.ckpt is not None,
                           os.path.join(plan.log_dir, "config.yaml")))
    return summary


def main(argv=None, callbacks=()) -> dict:
    """Command-line entry point: `argv` as sys.argv[1:]. Extra Lightning `callbacks` are
    passed to the Trainer. Usage problems print one line and exit with status 2; a run
    stopped by a signal exits 128 + its number (after saving last.ckpt, unless signalled
    twice), a diverged one with status 1."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    args = cli.parse_with_config(parser, argv)
    try:
        return run(args, callbacks, argv)
    except UsageError as exc:
        parser.error(exc)
    except (images.ImageError, OSError, Diverged) as exc:   # e.g. the disk filled up mid-run
        parser.exit(1, f"train.py: error: {cli.one_line(exc)}\n")
    except outputs.Stopped as exc:
        parser.exit(exc.status, f"train.py: {exc}\n")
    except KeyboardInterrupt:     # before training started
        parser.exit(128 + 2, "train.py: interrupted\n")


if __name__ == "__main__":
    main()
