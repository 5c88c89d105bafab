"""What a train.py run shows: the progress bar, its loggers, previews of the fit, the PSNR plot.

    StepBar()                          # one bar over all steps, loss and PSNR
    Previews(image, folder)            # --visualize: previews/step_*.png, previews.gif, and the
                                       # same pictures to image-capable loggers
    plot_psnr(curve, "psnr.png")       # PSNR against training seconds and steps
    make_loggers(["csv", "tensorboard"], root, trace, name, version)   # Lightning's loggers

Pictures are rendered tile by tile (tiles.render_region), so they cost bounded memory on
any image size. train.py is the only user.
"""
import argparse
import importlib
import logging
import math
import os
import warnings
from typing import List

import numpy as np
import torch
from torch import nn

import lightning.pytorch as pl
from lightning.pytorch.callbacks import ProgressBar
from lightning.pytorch.loggers import MLFlowLogger, TensorBoardLogger, WandbLogger

import images
import outputs
import tiles
from pixels import EVAL_BATCH, PixelSource, bilinear_sample, host_tensor

PREVIEW_PANEL = 1024                   # long side of each preview panel; 2 side by side <= 2048
PREVIEW_CROP_MIN = 256                 # minimum height of the native-resolution crop
GIF_MAX_SIDE = 1024                    # GIF frames are halved previews: a few MB, not tens
LOGGERS = {"csv": None, "tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}


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
        self.loggers = []              # the run's loggers: those that take images get each one
        self.reference = None
        (self.pw, self.ph), self.crop = preview_geometry(image.width, image.height)

    def _reference(self) -> np.ndarray:
        """The source seen the way the fit is rendered: bilinear at the preview's pixel
        centres (whole view) and its native pixels (crop)."""
        x0, y0, cw, ch = self.crop
        lut = torch.tensor(images.SRGB_TO_LINEAR_LUT, dtype=torch.float32)
        pixels = host_tensor(self.image.array)
        periodic = self.image.periodic
        view = tiles.render_region(lambda xy: bilinear_sample(pixels, lut, xy, periodic),
                                    self.pw, self.ph, max_batch=EVAL_BATCH)
        crop = np.asarray(self.image.array[y0:y0 + ch, x0:x0 + cw])
        return self._panel(view, crop)

    def _fit(self, field: nn.Module) -> np.ndarray:
        x0, y0, cw, ch = self.crop
        width, height = self.image.width, self.image.height
        view = tiles.render_region(field, self.pw, self.ph, max_batch=EVAL_BATCH)
        crop = tiles.render_region(field, cw, ch, (x0 / width, y0 / height, (x0 + cw) / width,
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
        with outputs.atomic_output(path) as partial:
            picture.save(partial, format="PNG")
        self.written.append(path)
        for logger in self.loggers:
            log_image(logger, "preview", np.asarray(picture), step)
        return path

    def on_train_start(self, trainer, pl_module):
        self.loggers = trainer.loggers

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
            frames.append(np.atleast_3d(np.asarray(frame)))
        durations = [self.gif_ms] * (len(frames) - 1) + [4 * self.gif_ms]
        tiles.write_animation(path, frames, durations)
        return path


def log_image(logger, tag: str, picture: np.ndarray, step: int) -> bool:
    """Hands `picture` ((H, W, C) or (H, W) uint8) to `logger` if it takes images (TensorBoard,
    W&B, MLflow; each has its own call); whether it did."""
    picture = picture[..., None] if picture.ndim == 2 else picture
    if isinstance(logger, TensorBoardLogger):
        logger.experiment.add_image(tag, picture, step, dataformats="HWC")
    elif isinstance(logger, WandbLogger):
        logger.log_image(key=tag, images=[picture], step=step)
    elif isinstance(logger, MLFlowLogger):
        logger.experiment.log_image(logger.run_id, picture, f"{tag}/step_{step:06d}.png")
    else:
        return False
    return True


def plot_psnr(curve, path: str, title: str) -> str:
    """psnr.png: PSNR against training seconds (left) and steps (right), from `curve`
    [(step, train_seconds, psnr)], written whole or not at all."""
    from matplotlib.figure import Figure          # no pyplot: no GUI backend, no global state
    steps, seconds, psnr = zip(*curve) if curve else ((), (), ())
    fig = Figure(figsize=(10, 4))
    left, right = fig.subplots(1, 2, sharey=True)
    for ax, x, label in ((left, seconds, "training seconds"), (right, steps, "steps")):
        ax.plot(x, psnr, marker=".")
        ax.set_xlabel(label)
        ax.grid(alpha=0.3)
    left.set_ylabel("PSNR (dB, sRGB 8-bit)")
    fig.suptitle(title)
    fig.tight_layout()
    with outputs.atomic_output(path) as partial:
        fig.savefig(partial, format="png", dpi=100)
    return path


def logger_names(text: str) -> List[str]:
    """--logger: names from LOGGERS, comma-separated; an error naming the pip command when a
    logger's package is missing (so it fails while the flags are parsed)."""
    names = [name for name in text.split(",") if name]
    unknown = [name for name in names if name not in LOGGERS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"expected one or several of {','.join(LOGGERS)}, "
                                         f"got {text!r}")
    for name in names:
        try:
            if LOGGERS[name]:
                importlib.import_module(LOGGERS[name])
        except ImportError:
            raise argparse.ArgumentTypeError(f"{name}: the {LOGGERS[name]} package is not "
                                             f"installed (pip install {LOGGERS[name]})") from None
    return names


def make_loggers(names: List[str], root: str, trace: str, name: str, version: int) -> list:
    """Lightning's loggers `names` (logger_names), all writing into ROOT/TRACE/NAME/version_N
    (W&B and MLflow also to their own stores)."""
    from lightning.pytorch import loggers
    save_dir = os.path.join(root, trace)
    log_dir = os.path.join(save_dir, name, f"version_{version}")
    run_name = f"{name}/version_{version}"
    made = []
    for logger in names:
        if logger == "csv":
            made.append(loggers.CSVLogger(save_dir, name=name, version=version))
        elif logger == "tensorboard":
            made.append(loggers.TensorBoardLogger(save_dir, name=name, version=version,
                                                  default_hp_metric=False))
        elif logger == "wandb":
            made.append(loggers.WandbLogger(name=run_name, save_dir=log_dir, project=trace))
        else:       # MLflow 3 refuses its file store (ROOT/mlruns) unless asked; a user's
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")       # setting wins
            made.append(loggers.MLFlowLogger(experiment_name=trace, run_name=run_name,
                                             save_dir=os.path.join(root, "mlruns")))
    return made


def summary_line(s: dict, resumed: bool, config: str) -> str:
    """The run's last line, from train.run's summary `s`: what it reached, where the fit, plot
    and checkpoint are, and the command to run next (`config`: the run's config.yaml)."""
    this_run = f" ({s['steps_this_run']} in this run)" if resumed else ""
    compiled = f" (the first, compiling, {s['compile_seconds']:.1f} s)" \
        if s["compile_seconds"] is not None else ""
    fit = f"fit {s['export']}; " if s["export"] else ""
    if s["export"]:
        then = (f"train on: python train.py --config {config} "
                f"--ckpt {s['checkpoint']} --max_steps {2 * s['steps']}")
    else:
        then = f"see the fit: python render.py --ckpt {s['checkpoint']} -o fit.png"
    return (f"train.py: {s['steps']} steps{this_run}, {s['train_seconds']:.1f} s of training"
            f"{compiled}, PSNR {s['psnr']:.2f} dB; {fit}plot {s['plot']}; checkpoint "
            f"{s['checkpoint']}; next, {then}")


def _not_an_advertisement(record: logging.LogRecord) -> bool:
    return "litlogger" not in record.getMessage()


def quiet_lightning() -> None:
    """Silence Lightning's advice that does not apply here (workers: batches are drawn on the
    device; the 1-item validation set is deliberate; the version folder claim_version made
    already holds config.yaml) and its "Tip: ... try installing litlogger" advertisement."""
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logging.getLogger(name).addFilter(_not_an_advertisement)   # a second add is a no-op
    for pattern in (".*does not have many workers.*", ".*number of training batches.*",
                    ".*The `srun` command is available.*", ".*`IterableDataset` has `__len__`.*",
                    ".*that ended before the epoch ended.*", ".*The dirpath has changed from.*",
                    ".*isinstance\\(treespec, LeafSpec\\)` is deprecated.*",
                    ".*exists and is not empty.*"):
        warnings.filterwarnings("ignore", message=pattern)
