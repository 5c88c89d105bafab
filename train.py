"""Fit an image (pixel coordinate -> colour) with a multiresolution hash encoding and a small
MLP under PyTorch Lightning: CPU, one GPU or several (DDP), thumbnails to gigapixels.

    python train.py                                  # matplotlib's grace_hopper.jpg sample
    python train.py -i data/albert.jpg --visualize --export albert_fit.png
    python train.py -i data/tokyo.npy --finest_resolution 32768 --devices 2 --strategy ddp

The image stays 8-bit (memory-mapped for ``.npy``); every step draws random continuous
coordinates, bilinearly interpolates the 4 neighbouring pixels in linear light and fits the
field with an L2 loss between the sRGB encodings, the space PSNR is measured in (sRGB 8-bit,
the way the image would be saved), at a learning rate that decays over the second half of
the run.

The file follows the run: the LightningModule (ImageFit, with the learning-rate schedule), what
keeps a long run's work (KeepWork: checkpoints, signals, divergence), the progress bar and
previews, then the command line (build_parser, run, main). The pixels and how batches are
drawn and scored live in pixels.py, the network and its checkpoints in field.py (which
render.py shares); nothing imports this file.
"""
import argparse
import contextlib
import ctypes
import hashlib
import math
import os
import shlex
import signal
import sys
import tempfile
import threading
import time
import warnings
from typing import List

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, IterableDataset

import lightning.pytorch as pl
from lightning.fabric.utilities.rank_zero import rank_zero_only
from lightning.pytorch.callbacks import ProgressBar
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.fabric.utilities.exceptions import MisconfigurationException

import cli
import images
import render
from pixels import EVAL_BATCH, PixelSource, PsnrProbe, bilinear_sample, host_tensor, \
    psnr_from_sse, sampling_seed
from field import CheckpointError, FieldConfig, checkpoint_config, read_checkpoint

STEPS_PER_EPOCH = 100                  # upstream's --epochs unit
PREVIEW_PANEL = 1024                   # long side of each preview panel; 2 side by side <= 2048
PREVIEW_CROP_MIN = 256                 # minimum height of the native-resolution crop
GIF_MAX_SIDE = 1024                    # GIF frames are halved previews: a few MB, not tens
GPU_BATCH_SIZE = 2 ** 18               # the paper's batch
CPU_BATCH_SIZE = 2 ** 16               # 2 cores, albert, 120 s: 42.1 dB
CPU_VAL_EVERY, GPU_VAL_EVERY = 250, 1000  # a 2^22-pixel score costs ~25 CPU steps
CKPT_MINUTES = 10.0                    # last.ckpt refreshed this often: bounds lost work in time
GPU_LOSS_CHECK_EVERY = 20              # steps between NaN checks on a GPU (each one waits for it)
LR_DECAY_START, LR_DECAY_FINAL = 0.5, 0.05   # --lr_schedule decay: from half-way, down to 1/20
LOG_VERSION_ENV = "HASHGRID_LOG_VERSION"  # the log version rank 0 claimed, for its DDP workers


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
    """Seconds spent training, with scoring and previews paused out (pauses may nest)."""

    def __init__(self):
        self.elapsed, self.since, self.depth = 0.0, None, 0

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


def keep_freed_memory() -> bool:
    """glibc only: serve every allocation from the heap and keep what is freed there, rather
    than mapping fresh pages for each large tensor and unmapping them when it is freed. A CPU
    step's large temporaries (the 34 MB table gradient, 16 MB activations) then reuse memory
    instead of page-faulting it in every step: albert on 2 cores, 66-68 vs 72-73 ms per step.
    The process keeps its peak memory until it exits. False (nothing done) elsewhere."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_top_pad, m_mmap_max = -1, -2, -4
    return all(mallopt(option, value) == 1 for option, value in
               ((m_mmap_max, 0), (m_trim_threshold, 2**31 - 1), (m_top_pad, 2**28)))


def fused_adam(device: torch.device) -> bool:
    """Whether torch has a fused Adam for parameters on `device` (CUDA; CPUs since torch 2.4):
    one kernel over all parameters instead of several passes over the 8.4 M-value table per
    step (albert on 2 CPU cores: 4.4 vs 36 ms per step)."""
    try:
        torch.optim.Adam([torch.zeros(1, device=device, requires_grad=True)], fused=True)
    except (RuntimeError, ValueError):
        return False
    return True


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
                 colour: str = "linear", max_time: float = None):
        super().__init__()
        self.save_hyperparameters(ignore=["max_time"])
        self.max_time = max_time
        self.field = FieldConfig.from_dict(field).build()
        self.clock = TrainClock()
        self.image = None
        self.probe = None
        self.generator = None
        self.last_val_step = None

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

    def configure_optimizers(self):
        return torch.optim.Adam(self.param_groups(), betas=(0.9, 0.99), eps=1e-15,
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
        against --max_time, whichever is further. Rank 0's value, so every replica takes
        the same step size."""
        max_steps = self.trainer.max_steps if self.trainer is not None else -1
        done = self.global_step / max_steps if max_steps and max_steps > 0 else 0.0
        if self.max_time is not None:
            done = max(done, self.clock.seconds() / self.max_time)
            if self.trainer is not None and self.trainer.world_size > 1:   # clocks differ
                done = float(self.trainer.strategy.broadcast(done, src=0))
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
        loss = image_loss(self.field(xy), target, self.hparams.loss)   # float32 colour
        self.log("train/loss", loss, prog_bar=True, batch_size=len(xy))
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx):
        if self.max_time is not None:
            # every rank must stop at the same step: stop when any rank's clock has run out
            out = self.clock.seconds() >= self.max_time
            if self.trainer.strategy.reduce_boolean_decision(out, all=False):
                self.trainer.should_stop = True

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
        # identical on every rank already; sync_dist only keeps Lightning's DDP checks quiet
        self.log("val/psnr", psnr, prog_bar=True, sync_dist=True, batch_size=1)
        self.log("time/train_seconds", self.clock.seconds(), sync_dist=True, batch_size=1)
        if self.device.type == "cuda":      # what the run needs of the GPU, for sizing runs
            peak = torch.cuda.max_memory_allocated(self.device) / 2**20
            self.log("memory/peak_mib", peak, sync_dist=True, batch_size=1, reduce_fx="max")
        # x-axis of the validation rows: the steps taken (Lightning would write one less)
        self.log("step", float(self.global_step), sync_dist=True, batch_size=1)


# --- keeping the work: checkpoints, signals, divergence -----------------------------------

class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoints go to a temporary name and are renamed when complete (images.atomic_output):
    a full disk or a kill mid-write leaves the previous file intact, never a truncated one."""

    def save_checkpoint(self, checkpoint, path, storage_options=None):
        with images.atomic_output(path) as partial:
            super().save_checkpoint(checkpoint, partial, storage_options)


class NonFiniteLoss(Exception):
    """The loss (or the weights) became NaN or infinite: the run diverged."""

    def __init__(self, step: int, what: str = "the loss"):
        super().__init__(f"{what} became NaN or infinite at step {step}")
        self.step = step


class Interrupted(BaseException):
    """A second SIGINT/SIGTERM: the run stops at once, unsaved (exit status 128 + N). Not a
    KeyboardInterrupt, which Lightning turns into exit status 1 (and a repeated SIGTERM would
    reach Lightning's own handler, which exits with status 0)."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum, self.status = signum, 128 + signum


def any_rank(trainer, *flags: bool):
    """Each flag OR-ed over all ranks, in one all-reduce (none on a single device)."""
    if trainer.world_size == 1:
        return flags
    votes = torch.tensor(flags, dtype=torch.float32, device=trainer.strategy.root_device)
    return tuple(bool(v) for v in trainer.strategy.reduce(votes, reduce_op="sum") > 0)


class KeepWork(pl.Callback):
    """Bounds what a long run can lose, and stops it cleanly when asked to.

    - last.ckpt is refreshed every `minutes` of wall time, so a kill (even SIGKILL) loses at
      most that much work on any device; step=N.ckpt is kept every `every_steps` steps.
    - SIGINT (Ctrl-C) and SIGTERM (schedulers, `timeout`) stop the run after the current step,
      every rank at the same step; the caller then saves last.ckpt. A second signal
      interrupts at once.
    - A non-finite loss stops the run at the step it appears, and nothing non-finite is ever
      saved: weights are checked before every save. On a GPU the loss is checked every
      `check_every` steps (each check waits for the device) and always before a save.
    """

    def __init__(self, ckpt_dir: str, every_steps: int = 0, minutes: float = 10.0,
                 check_every: int = 1):
        self.ckpt_dir, self.every_steps, self.minutes = ckpt_dir, every_steps, minutes
        self.check_every = check_every
        self.signal = None            # the signal that asked us to stop
        self.saved = []               # checkpoints written by this callback, oldest first
        self._previous_handlers = {}
        self._first_bad = None        # device scalar: first step with a non-finite loss, or -1

    def on_train_start(self, trainer, pl_module):
        self._last_save = time.monotonic()
        self._first_bad = torch.full((), -1, dtype=torch.long, device=pl_module.device)
        if threading.current_thread() is threading.main_thread():   # signals: main thread only
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous_handlers[signum] = signal.getsignal(signum)
                signal.signal(signum, self._on_signal)

    def _on_signal(self, signum, frame):
        if self.signal is not None:       # asked twice: stop now
            self.restore_signals()
            raise Interrupted(signum)
        self.signal = signum

    def restore_signals(self):
        for signum, handler in self._previous_handlers.items():
            signal.signal(signum, handler)
        self._previous_handlers = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        bad = ~torch.isfinite(loss.detach())
        self._first_bad = torch.where(bad & (self._first_bad < 0), step, self._first_bad)
        save_step = self.every_steps > 0 and step % self.every_steps == 0
        # one decision for all ranks (one all-reduce under DDP), so that they save and stop
        # at the same step
        save_time, stop = any_rank(trainer, time.monotonic() - self._last_save
                                   >= 60 * self.minutes, self.signal is not None)
        if save_step or save_time or step % self.check_every == 0:
            self.check_finite(trainer, pl_module)
        if save_step:
            self.save(trainer, os.path.join(self.ckpt_dir, f"step={step}.ckpt"))
        if save_time:
            self.save(trainer, os.path.join(self.ckpt_dir, "last.ckpt"))
        if stop:
            trainer.should_stop = True

    def check_finite(self, trainer, pl_module, weights: bool = False):
        """NonFiniteLoss if any rank has seen a non-finite loss (or, with `weights`, holds
        non-finite weights)."""
        step = -1 if self._first_bad is None else int(self._first_bad)
        bad_weights = weights and not all(bool(torch.isfinite(p).all())
                                          for p in pl_module.parameters())
        if trainer.strategy.reduce_boolean_decision(step >= 0 or bad_weights, all=False):
            if step >= 0:
                raise NonFiniteLoss(step)
            raise NonFiniteLoss(trainer.global_step, "the weights")

    def save(self, trainer, path: str):
        self.check_finite(trainer, trainer.lightning_module, weights=True)
        trainer.save_checkpoint(path, weights_only=False)     # optimizer too: resumable
        for logger in trainer.loggers:                          # logs as far as the checkpoint
            logger.save()
        self._last_save = time.monotonic()
        if path not in self.saved:
            self.saved.append(path)

    def on_train_end(self, trainer, pl_module):
        self.restore_signals()

    def on_exception(self, trainer, pl_module, exception):
        self.restore_signals()


# --- callbacks: progress bar, previews -----------------------------------------------------

class StepBar(ProgressBar):
    """One tqdm bar over all steps (not per 100-step epoch) with loss and PSNR; metrics are
    read every `refresh` steps only, each read being a host-device sync."""

    def __init__(self, refresh: int = 10):
        super().__init__()
        self.refresh = refresh
        self.enabled = True
        self.bar = None

    def disable(self):
        self.enabled = False

    def enable(self):
        self.enabled = True

    def on_train_start(self, trainer, pl_module):
        from tqdm.auto import tqdm
        total = trainer.max_steps if trainer.max_steps > 0 else None
        self.bar = tqdm(total=total, initial=trainer.global_step, desc="fit", unit="step",
                        disable=not self.enabled, dynamic_ncols=True)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.bar.update(trainer.global_step - self.bar.n)
        if trainer.global_step % self.refresh == 0:
            self._show(trainer, pl_module)

    def on_validation_end(self, trainer, pl_module):
        if self.bar is not None:
            self._show(trainer, pl_module)

    def _show(self, trainer, pl_module):
        metrics = self.get_metrics(trainer, pl_module)
        shown = {}
        if "train/loss" in metrics:
            shown["loss"] = f"{metrics['train/loss']:.3g}"
        if "val/psnr" in metrics:
            shown["psnr"] = f"{metrics['val/psnr']:.2f}dB"
        self.bar.set_postfix(shown, refresh=False)

    def on_train_end(self, trainer, pl_module):
        if self.bar is not None:
            self.bar.close()

    def on_exception(self, trainer, pl_module, exception):
        # end the bar's line, so that the one-line error printed next starts its own
        self.on_train_end(trainer, pl_module)


def is_preview_step(step: int) -> bool:
    """1, 2, 4, 8, then 10, 20, ..., 90, 100, 200, ...: log-spaced like upstream."""
    if step < 1:
        return False
    if step < 10:
        return step & (step - 1) == 0
    return step % 10 ** int(math.log10(step)) == 0


def preview_geometry(width: int, height: int, panel: int = PREVIEW_PANEL):
    """Sizes of a preview: the downscaled whole view (pw, ph) and the native-resolution crop
    window (x0, y0, cw, ch) at the image centre."""
    scale = min(1.0, panel / max(width, height))
    pw, ph = max(1, round(width * scale)), max(1, round(height * scale))
    cw, ch = min(width, pw), min(height, max(PREVIEW_CROP_MIN, ph // 2))
    return (pw, ph), ((width - cw) // 2, (height - ch) // 2, cw, ch)


class Previews(pl.Callback):
    """--visualize: at log-spaced steps writes previews/step_XXXXXX.png (reference | fit, whole
    view above a native-resolution centre crop), rendered tile by tile; at the end
    previews.gif cycles through them."""

    def __init__(self, image: PixelSource, out_dir: str, gif_ms: int = 400):
        self.image, self.out_dir, self.gif_ms = image, out_dir, gif_ms
        self.written = []
        self.reference = None
        (self.pw, self.ph), self.crop = preview_geometry(image.width, image.height)

    def _reference(self) -> np.ndarray:
        """The source seen the way the fit is rendered: bilinear at the preview's pixel
        centres (whole view) and its native pixels (crop)."""
        x0, y0, cw, ch = self.crop
        lut = torch.tensor(images.SRGB_TO_LINEAR_LUT, dtype=torch.float32)
        pixels = host_tensor(self.image.array)
        periodic = self.image.periodic
        view = render.render_region(lambda xy: bilinear_sample(pixels, lut, xy, periodic),
                                    self.pw, self.ph, max_batch=EVAL_BATCH)
        crop = np.asarray(self.image.array[y0:y0 + ch, x0:x0 + cw])
        return self._panel(view, crop)

    def _fit(self, field: nn.Module) -> np.ndarray:
        x0, y0, cw, ch = self.crop
        width, height = self.image.width, self.image.height
        view = render.render_region(field, self.pw, self.ph, max_batch=EVAL_BATCH)
        crop = render.render_region(field, cw, ch, (x0 / width, y0 / height, (x0 + cw) / width,
                                                    (y0 + ch) / height), max_batch=EVAL_BATCH)
        return self._panel(view, crop)

    def _panel(self, view: np.ndarray, crop: np.ndarray) -> np.ndarray:
        """(ph + ch, pw, C) uint8: the whole view above the crop."""
        out = np.zeros((self.ph + crop.shape[0], self.pw, view.shape[2]), np.uint8)
        out[:self.ph] = view
        out[self.ph:, :crop.shape[1]] = crop
        return out

    def write(self, field: nn.Module, step: int) -> str:
        from PIL import Image, ImageDraw
        if self.reference is None:
            self.reference = self._reference()
        canvas = np.concatenate([self.reference, self._fit(field)], 1)
        mode = "L" if canvas.shape[2] == 1 else "RGB"
        picture = Image.fromarray(canvas[..., 0] if mode == "L" else canvas, mode)
        draw = ImageDraw.Draw(picture)
        for x, text in ((4, "reference"), (self.pw + 4, f"step {step}")):
            box = draw.textbbox((x, 4), text)
            draw.rectangle((box[0] - 2, box[1] - 2, box[2] + 2, box[3] + 2), fill=0)
            draw.text((x, 4), text, fill=255 if mode == "L" else (255, 255, 255))
        os.makedirs(self.out_dir, exist_ok=True)
        path = os.path.join(self.out_dir, f"step_{step:06d}.png")
        with images.atomic_output(path) as partial:
            picture.save(partial, format="PNG")
        self.written.append(path)
        return path

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step
        if trainer.is_global_zero and is_preview_step(step):
            with pl_module.clock.paused():
                self.write(pl_module.field, step)

    def on_train_end(self, trainer, pl_module):
        if not trainer.is_global_zero:
            return
        last = f"step_{trainer.global_step:06d}.png"
        if not self.written or os.path.basename(self.written[-1]) != last:
            self.write(pl_module.field, trainer.global_step)
        self.write_gif(os.path.join(os.path.dirname(self.out_dir), "previews.gif"))

    def write_gif(self, path: str) -> str:
        """Animated GIF of the previews written so far (long side <= GIF_MAX_SIDE), the last
        frame held longer."""
        from PIL import Image
        frames = []
        for png in self.written:
            with Image.open(png) as im:
                frame = im.copy()
            frame.thumbnail((GIF_MAX_SIDE, GIF_MAX_SIDE), Image.Resampling.LANCZOS)
            frames.append(frame.convert("P", palette=Image.Palette.ADAPTIVE)
                          if frame.mode == "RGB" else frame)
        durations = [self.gif_ms] * (len(frames) - 1) + [4 * self.gif_ms]
        with images.atomic_output(path) as partial:
            frames[0].save(partial, format="GIF", save_all=True, append_images=frames[1:],
                           duration=durations, loop=0)
        return path


# --- command line -----------------------------------------------------------------------

def sample_image_path() -> str:
    """matplotlib's public-domain grace_hopper.jpg: on every install, no download."""
    import matplotlib.cbook
    return str(matplotlib.cbook.get_sample_data("grace_hopper.jpg", asfileobj=False))


def parse_resolution(text: str):
    """--finest_resolution: "N" (both axes) or "X,Y"."""
    parts = [int(p) for p in text.split(",")]
    if len(parts) not in (1, 2) or min(parts) < 1:
        raise argparse.ArgumentTypeError(f"expected N or X,Y (positive ints), got {text!r}")
    return parts[0] if len(parts) == 1 else parts


def parse_devices(text: str):
    """--devices: "auto", a count ("2") or GPU indices ("0,1")."""
    if text == "auto":
        return text
    try:
        if "," in text:
            return [int(p) for p in text.split(",") if p]
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected auto, N or i,j,..., got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    p = cli.ArgumentParser(prog="train.py", description=__doc__.split("\n\n")[0])
    p.add_argument("-i", "--input", help="image to fit: .jpg .png .tif .webp .bmp or .npy "
                   "(default: matplotlib's grace_hopper.jpg sample)")
    p.add_argument("--root", default="./logs", help="log root (default: ./logs)")
    p.add_argument("--trace", default="experiments",
                   help="experiment folder under --root (default: experiments); logs go to "
                   "ROOT/TRACE/IMAGE_NAME/version_N")
    p.add_argument("--batch_size", type=cli.integer(1), default=None,
                   help=f"pixels per step (default: {GPU_BATCH_SIZE} on GPU, "
                   f"{CPU_BATCH_SIZE} on CPU)")
    p.add_argument("--epochs", type=cli.integer(1), default=5,
                   help=f"training length in epochs of {STEPS_PER_EPOCH} steps, counted from "
                   "step 0 (a resumed run trains up to this total) (default: 5)")
    p.add_argument("--max_steps", type=cli.integer(1), default=None,
                   help="training length in steps in total, overrides --epochs (default: none)")
    p.add_argument("--max_time", type=cli.number(above=0), default=None,
                   help="stop after this many seconds of training steps in this run; "
                   "start-up, scoring and previews are not counted (default: none)")
    p.add_argument("--device", type=int, default=0,
                   help="GPU index to use when --devices is not given (default: 0)")
    p.add_argument("--accelerator", choices=["auto", "cpu", "gpu"], default="auto",
                   help="auto: a GPU if torch sees one, else the CPU (default: auto)")
    p.add_argument("--devices", type=parse_devices, default=None,
                   help="device count, GPU indices (0,1) or auto (default: 1; on GPU [--device])")
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
    p.add_argument("--finest_resolution", type=parse_resolution, default=None,
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
                   f"{GPU_VAL_EVERY} on GPU)")
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
    p.add_argument("--visualize", action="store_true",
                   help="write previews at steps 1, 2, 4, 8, 10, 20, ... and an animated GIF")
    return p


class UsageError(Exception):
    """A command-line problem found after parsing: one line, exit status 2 (see cli.py)."""


def field_config(args: argparse.Namespace, width: int, height: int,
                 channels: int) -> FieldConfig:
    """The network the command line asks for, for a width x height image."""
    return FieldConfig(width, height, channels, enc_method=args.enc_method,
                       n_levels=args.n_levels, n_features_per_level=args.n_features_per_level,
                       log2_hashmap_size=args.log2_hashmap_size,
                       base_resolution=args.base_resolution,
                       finest_resolution=args.finest_resolution,
                       interpolation=args.interpolation, periodic=args.periodic)


def resolve_precision(precision: str, accelerator: str) -> str:
    """--precision auto: "bf16-mixed" where the hardware computes bfloat16 natively (CUDA
    GPUs that support it; CPUs with AVX512-BF16 or AMX), else "32-true". Under bf16-mixed
    the hidden layers' matmuls run in bfloat16 (the paper runs its MLP in half precision);
    the table, the encoding, the output layer, the loss, the weights and Adam stay float32.
    Albert on 2 AVX512-BF16 cores: 77 vs 129 ms per step, 41.3 vs 41.4 dB at step 1000 (one
    thread, MLP rate 1e-2). Emulated bfloat16 would be slower than float32, hence the
    hardware test."""
    if precision != "auto":
        return precision
    if accelerator == "gpu":
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "32-true"
    native = [getattr(torch.cpu, name, lambda: False)()
              for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return "bf16-mixed" if any(native) else "32-true"


def resolve_accelerator(args) -> str:
    """"cpu" or "gpu"; UsageError when a GPU is asked for and there is none."""
    has_gpu = torch.cuda.is_available()
    if args.accelerator == "gpu" and not has_gpu:
        raise UsageError("--accelerator gpu: no GPU is available to torch")
    if args.accelerator == "auto":
        return "gpu" if has_gpu else "cpu"
    return args.accelerator


def load_source(path: str) -> np.ndarray:
    """(H, W, C) uint8 sRGB of `path`; UsageError when it cannot be used."""
    try:
        array = images.read_image(path)
        return images.to_srgb8(array)
    except images.ImageError as exc:
        raise UsageError(str(exc)) from None
    except (OSError, ValueError) as exc:
        raise UsageError(f"{path}: {getattr(exc, 'strerror', None) or exc}") from None


def source_digest(source: np.ndarray) -> str:
    """A fingerprint of an image (its size and 64 rows spread over it): a resumed run warns
    when its checkpoint was trained on another image of the same size."""
    digest = hashlib.sha1(repr(source.shape).encode())
    for row in np.linspace(0, source.shape[0] - 1, 64).astype(np.int64):
        digest.update(np.ascontiguousarray(source[row]).tobytes())
    return digest.hexdigest()[:16]


def check_resume(ckpt_path: str, config: FieldConfig, source_name: str, digest: str) -> int:
    """The step `ckpt_path` was saved at. UsageError unless it is a train.py checkpoint of the
    same network and image size; a one-line warning when it was trained on another image of
    that size."""
    try:
        ckpt = read_checkpoint(ckpt_path)
        saved = checkpoint_config(ckpt, ckpt_path).to_dict()
    except CheckpointError as exc:
        raise UsageError(str(exc)) from None
    config = config.to_dict()
    diffs = [f"{k} {saved.get(k)!r} vs {config.get(k)!r}" for k in sorted(set(saved) | set(config))
             if saved.get(k) != config.get(k)]
    if diffs:
        raise UsageError(f"--ckpt {ckpt_path} does not match this run (checkpoint vs now): "
                         + ", ".join(diffs))
    hparams = ckpt["hyper_parameters"]
    saved_digest, saved_name = hparams.get("source_digest"), hparams.get("source", "")
    if saved_digest != digest if saved_digest else saved_name != source_name:
        print(f"train.py: warning: --ckpt {ckpt_path} was trained on another image "
              f"({saved_name or 'unknown'}) of the same size; continuing from its weights",
              file=sys.stderr)
    return int(ckpt.get("global_step", 0))


def check_writable_folder(folder: str, flag: str) -> None:
    """UsageError now, not hours later, unless files can be created in `folder` (made here)."""
    try:
        os.makedirs(folder, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as exc:
        raise UsageError(f"{flag} {folder}: cannot write there ({exc.strerror or exc})") from None


def check_export(path: str, source_path: str, dtype: str = "uint8") -> None:
    """UsageError before training for an export that could not be written at the end: a
    format images.write_image lacks or that cannot hold `dtype`, a folder, an unwritable
    place, or the source image."""
    ext = os.path.splitext(path)[1].lower()
    if ext not in images.EXTENSIONS:
        raise UsageError(f"--export {path}: unsupported format {ext or '(none)'}; use one of "
                         + " ".join(images.EXTENSIONS))
    try:
        images.check_dtype(path, dtype)
    except images.ImageError as exc:
        raise UsageError(f"--export_dtype: {exc}") from None
    if os.path.isdir(path):
        raise UsageError(f"--export {path}: is a folder")
    if images.same_file(path, source_path):
        raise UsageError(f"--export {path}: would overwrite the input image; choose another name")
    check_writable_folder(os.path.dirname(os.path.abspath(path)), "--export")


def check_field(config: FieldConfig) -> None:
    """UsageError for network flags that cannot build a field (e.g. N_max below N_min); built
    on the meta device, so checking costs no memory."""
    try:
        with torch.device("meta"):
            config.build()
    except ValueError as exc:
        raise UsageError(cli.one_line(exc)) from None


def export_fit(field: nn.Module, width: int, height: int, channels: int, path: str,
               dtype: str = "uint8") -> str:
    """Full-resolution render of `field` to `path`, tile by tile (render.render_to_file)."""
    render.render_to_file(field, width, height, channels, path, max_batch=EVAL_BATCH,
                          dtype=dtype)
    return path


def quiet_lightning() -> None:
    """Silence Lightning's advice that does not apply here (workers: batches are drawn on the
    device; the 1-item validation set is deliberate)."""
    for pattern in (".*does not have many workers.*", ".*number of training batches.*",
                    ".*The `srun` command is available.*", ".*`IterableDataset` has `__len__`.*",
                    ".*that ended before the epoch ended.*", ".*The dirpath has changed from.*",
                    ".*isinstance\\(treespec, LeafSpec\\)` is deprecated.*"):
        warnings.filterwarnings("ignore", message=pattern)


def claim_version(folder: str) -> int:
    """N of a new folder/version_N, created here: os.mkdir either creates it or fails, so two
    runs started together on one --root never share a folder. Only rank 0 claims; the DDP
    workers it launches inherit the number through the environment (other ranks never
    write logs)."""
    if rank_zero_only.rank != 0:
        return int(os.environ.get(LOG_VERSION_ENV, 0))
    os.makedirs(folder, exist_ok=True)
    taken = [int(name[8:]) for name in os.listdir(folder)
             if name.startswith("version_") and name[8:].isdigit()]
    version = max(taken, default=-1) + 1
    while True:
        try:
            os.mkdir(os.path.join(folder, f"version_{version}"))
            break
        except FileExistsError:
            version += 1
    os.environ[LOG_VERSION_ENV] = str(version)
    return version


def make_loggers(root: str, trace: str, name: str) -> list:
    """CSV always, TensorBoard as well when it is installed, in a freshly claimed version."""
    save_dir = os.path.join(root, trace)
    try:
        version = claim_version(os.path.join(save_dir, name))
    except OSError as exc:
        raise UsageError(f"--root {root}: cannot create the log folder there "
                         f"({exc.strerror or exc})") from None
    loggers = [CSVLogger(save_dir, name=name, version=version)]
    try:
        import tensorboard  # noqa: F401  (optional dependency)
        from lightning.pytorch.loggers import TensorBoardLogger
        loggers.append(TensorBoardLogger(save_dir, name=name, version=version))
    except ImportError:
        pass
    return loggers


def resume_command(argv, ckpt: str) -> str:
    """The command line that continues a run: its arguments with --ckpt set to `ckpt`."""
    kept, skip = [], False
    for arg in argv:
        if skip or arg == "--ckpt" or arg.startswith("--ckpt="):
            skip = arg == "--ckpt"
            continue
        kept.append(arg)
    return shlex.join(["python", "train.py", *kept, "--ckpt", ckpt])


class Stopped(Exception):
    """The run stopped early on purpose (a signal): checkpoint saved; exit status 128 + N."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.status = 128 + signum


def run(args, callbacks=(), argv=()) -> dict:
    """Train as `args` say; returns a summary dict (rank 0 fills psnr/paths). `argv`: the
    command line, for the resume hint printed when a signal stops the run."""
    accelerator = resolve_accelerator(args)
    if accelerator == "cpu":
        keep_freed_memory()
    path = args.input or sample_image_path()
    source = load_source(path)
    height, width, channels = source.shape
    config = field_config(args, width, height, channels)
    check_field(config)
    digest = source_digest(source)
    first_step = 0
    if args.ckpt is not None:
        first_step = check_resume(args.ckpt, config, os.path.basename(path), digest)
    if args.export:
        check_export(args.export, path, args.export_dtype)
    on_gpu = accelerator == "gpu"
    precision = resolve_precision(args.precision, accelerator)
    batch_size = args.batch_size or (GPU_BATCH_SIZE if on_gpu else CPU_BATCH_SIZE)
    val_every = args.val_every or (GPU_VAL_EVERY if on_gpu else CPU_VAL_EVERY)
    max_steps = args.max_steps if args.max_steps is not None else args.epochs * STEPS_PER_EPOCH
    devices = args.devices if args.devices is not None else ([args.device] if on_gpu else 1)

    pl.seed_everything(args.seed, verbose=False)
    model = ImageFit(config.to_dict(), source=os.path.basename(path), source_digest=digest,
                     batch_size=batch_size, lr=args.lr, mlp_lr=args.mlp_lr,
                     lr_schedule=args.lr_schedule,
                     loss=args.loss, seed=args.seed, max_time=args.max_time)
    image = PixelSource(source, config.periodic)
    if args.ckpt is None:
        model.field.start_at(image.mean_colour())
    model.attach(image, PsnrProbe(source))

    name = os.path.splitext(os.path.basename(path))[0]
    loggers = make_loggers(args.root, args.trace, name)
    log_dir = loggers[0].log_dir
    ckpt_dir = os.path.join(log_dir, "checkpoints")
    keep = KeepWork(ckpt_dir, args.ckpt_every, args.ckpt_minutes,
                    check_every=GPU_LOSS_CHECK_EVERY if on_gpu else 1)
    all_callbacks = [StepBar(), keep, *callbacks]
    if args.visualize:
        all_callbacks.append(Previews(image, os.path.join(log_dir, "previews")))
    quiet_lightning()
    try:
        trainer = pl.Trainer(
            accelerator=accelerator, devices=devices, num_nodes=args.num_nodes,
            strategy=args.strategy, precision=precision, max_steps=max_steps,
            max_epochs=-1, val_check_interval=val_every, check_val_every_n_epoch=None,
            num_sanity_val_steps=0, logger=loggers, callbacks=all_callbacks,
            plugins=[AtomicCheckpointIO()], enable_checkpointing=False,
            enable_model_summary=False, log_every_n_steps=min(50, val_every))
    except (ValueError, TypeError, RuntimeError, MisconfigurationException) as exc:
        raise UsageError(str(exc).strip().splitlines()[0]) from None

    last_ckpt = os.path.join(ckpt_dir, "last.ckpt")
    try:
        trainer.fit(model, train_dataloaders=DataLoader(_Steps(STEPS_PER_EPOCH), batch_size=None),
                    ckpt_path=args.ckpt, weights_only=True)
        keep.save(trainer, last_ckpt)           # checks the weights are finite first
    except NonFiniteLoss as exc:
        kept = [p for p in keep.saved if os.path.exists(p)]
        raise Diverged(f"{exc}: the run diverged (a lower --lr may help); "
                       + (f"last finite checkpoint: {kept[-1]}" if kept
                          else "no checkpoint was written before it")) from None
    steps_this_run = trainer.global_step - first_step
    if keep.signal is not None:
        signame = signal.Signals(keep.signal).name
        raise Stopped(keep.signal, f"stopped by {signame} at step {trainer.global_step}; "
                      f"checkpoint {last_ckpt}, logs {log_dir}; resume with: "
                      + resume_command(argv, last_ckpt))
    if model.last_val_step != trainer.global_step:
        trainer.validate(model, verbose=False)      # score the final weights too

    summary = dict(steps=trainer.global_step, steps_this_run=steps_this_run,
                   train_seconds=model.clock.seconds(),
                   psnr=float(trainer.callback_metrics.get("val/psnr", float("nan"))),
                   log_dir=log_dir, checkpoint=last_ckpt, export=None,
                   rank=trainer.global_rank)
    if trainer.is_global_zero:
        if args.export:
            with images.stop_on_signals("train.py", f"{args.export} was not written; the fit "
                                        f"is saved: python render.py --ckpt {last_ckpt} -o "
                                        f"{args.export} writes it"):
                summary["export"] = export_fit(model.field.eval(), width, height, channels,
                                               args.export, args.export_dtype)
        resumed = f" ({steps_this_run} in this run)" if args.ckpt is not None else ""
        print(f"train.py: {summary['steps']} steps{resumed}, {summary['train_seconds']:.1f} s of "
              f"training in this run, PSNR {summary['psnr']:.2f} dB; checkpoint {last_ckpt}"
              + (f"; export {summary['export']}" if summary["export"] else ""))
    return summary


class Diverged(Exception):
    """A non-finite loss stopped the run (exit status 1)."""


def main(argv=None, callbacks=()) -> dict:
    """Command-line entry point: `argv` as sys.argv[1:]. Extra Lightning `callbacks` are
    passed to the Trainer. Usage problems print one line and exit with status 2; a run
    stopped by SIGINT/SIGTERM exits 128 + the signal's number after saving last.ckpt, a
    diverged one with status 1."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return run(args, callbacks, argv)
    except UsageError as exc:
        parser.error(exc)
    except (images.ImageError, OSError) as exc:      # e.g. the disk filled up mid-run
        parser.exit(1, f"train.py: error: {cli.one_line(exc)}\n")
    except Diverged as exc:
        parser.exit(1, f"train.py: error: {exc}\n")
    except Stopped as exc:
        parser.exit(exc.status, f"train.py: {exc}\n")
    except Interrupted as exc:    # a second signal during training
        parser.exit(exc.status, f"train.py: interrupted by a second "
                    f"{signal.Signals(exc.signum).name}; not saved since the last checkpoint\n")
    except KeyboardInterrupt:     # before training started
        parser.exit(128 + signal.SIGINT, "train.py: interrupted\n")


if __name__ == "__main__":
    main()
