"""What keeps a long train.py run's work: checkpoints, signals, divergence, log versions.

    keep = KeepWork(ckpt_dir, every_steps, minutes, clock=clock, max_time=120)  # a callback
    trainer = pl.Trainer(callbacks=[keep], plugins=[AtomicCheckpointIO()], ...)

- checkpoints are written whole or not at all (AtomicCheckpointIO), last.ckpt every few
  minutes, step=N.ckpt every N steps, never with non-finite weights;
- the time budget (--max_time), SIGINT, SIGTERM and SIGUSR1 (SLURM's "time is nearly up")
  stop the run after the current step, every rank at the same step; after a signal the
  caller saves last.ckpt, and under SLURM SIGUSR1 then requeues the job, which resumes from
  that checkpoint (logging to a new version_N);
- a non-finite loss stops the run at the step it appears (Diverged);
- two runs started together on one log root each claim their own version_N.

Ranks agree on every decision through one all-reduce per step (agree; a save checks the
weights with one more). Nothing here knows about images or fields beyond the checkpoint's
config; train.py is its only user.
"""
import contextlib
import os
import shlex
import signal
import subprocess
import sys
import time

import torch
import lightning.pytorch as pl
from lightning.fabric.plugins.environments import SLURMEnvironment, TorchElasticEnvironment
from lightning.fabric.utilities.rank_zero import rank_zero_only
from lightning.pytorch.plugins.io import TorchCheckpointIO

from cli import UsageError
from field import CheckpointError, FieldConfig, checkpoint_config, read_checkpoint
from outputs import Stopped, atomic_output, signals_handled

LOG_VERSION_ENV = "HASHGRID_LOG_VERSION"  # the log version rank 0 claimed, for its DDP workers
SLURM_JOB_FILE = "slurm_job_id"           # in a version folder: the SLURM job that writes it
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoints go to a temporary name and are renamed when complete (outputs.atomic_output):
    a full disk or a kill mid-write leaves the previous file intact, never a truncated one."""

    def save_checkpoint(self, checkpoint, path, storage_options=None):
        with atomic_output(path) as partial:
            super().save_checkpoint(checkpoint, partial, storage_options)


class Diverged(Exception):
    """The loss (or the weights) became NaN or infinite: the run stops (exit status 1)."""


def agree(trainer, *values: float):
    """Each value's largest over all ranks (of flags: whether any rank raised one), in one
    all-reduce; none on a single device."""
    if trainer.world_size == 1:
        return values
    votes = torch.tensor(values, dtype=torch.float32, device=trainer.strategy.root_device)
    return tuple(trainer.strategy.reduce(votes, reduce_op="max").tolist())


class KeepWork(pl.Callback):
    """Bounds what a long run can lose, and is the one place that stops it.

    At every step's end the ranks agree once (`agree`, one all-reduce) on the training
    seconds, whether a save is due, whether a signal came and, on check steps, the first
    non-finite loss; every decision follows from that agreement, so every rank takes it at the
    same step:
    - the run stops after the current step when `clock` (seconds trained, pauses out) reaches
      `max_time`, or on STOP_SIGNALS (the caller then saves last.ckpt with `save` and raises
      `stopped(...)`); a second signal stops at once. The agreed seconds go to
      `clock.agreed`, for the learning-rate schedule;
    - last.ckpt is refreshed every `minutes` of wall time, so a kill (even SIGKILL) loses at
      most that much work on any device; step=N.ckpt is kept every `every_steps` steps;
    - a non-finite loss stops the run (Diverged), and nothing non-finite is ever saved:
      weights are checked before every save (that check agrees on its own). On an
      asynchronous device (a GPU) the loss is checked every `check_every` steps (each check
      waits for it) and before a save.
    """

    def __init__(self, ckpt_dir: str, every_steps: int = 0, minutes: float = 10.0,
                 check_every: int = 1, clock=None, max_time: float = None):
        self.ckpt_dir, self.every_steps, self.minutes = ckpt_dir, every_steps, minutes
        self.check_every, self.clock, self.max_time = check_every, clock, max_time
        self.last = os.path.join(ckpt_dir, "last.ckpt")
        self.signal = None            # the signal that asked us to stop
        self.saved = []               # checkpoints written by this callback, oldest first
        self._signals = contextlib.ExitStack()    # our handlers while training
        self._first_bad = None        # device scalar: first step with a non-finite loss, or -1

    def on_train_start(self, trainer, pl_module):
        self._last_save = time.monotonic()
        self._first_bad = torch.full((), -1, dtype=torch.long, device=pl_module.device)
        self._signals.enter_context(signals_handled(self._on_signal, STOP_SIGNALS))

    def _on_signal(self, signum, frame):
        if self.signal is not None:       # asked twice: stop now
            self.restore_signals()
            raise Stopped(signum, f"interrupted by a second {signal.Signals(signum).name}; "
                          "not saved since the last checkpoint")
        self.signal = signum

    def restore_signals(self):
        self._signals.close()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        bad = ~torch.isfinite(loss.detach())
        self._first_bad = torch.where(bad & (self._first_bad < 0), step, self._first_bad)
        save_step = self.every_steps > 0 and step % self.every_steps == 0
        check = save_step or step % self.check_every == 0
        seconds, save_time, signalled, bad_step = agree(
            trainer, self.clock.seconds() if self.clock is not None else 0.0,
            time.monotonic() - self._last_save >= 60 * self.minutes, self.signal is not None,
            int(self._first_bad) if check else -1)
        if self.clock is not None:
            self.clock.agreed = seconds
        self.diverged(trainer, int(bad_step))
        if save_step:
            self.save(trainer, os.path.join(self.ckpt_dir, f"step={step}.ckpt"))
        if save_time:
            self.save(trainer, self.last)
        if signalled or (self.max_time is not None and seconds >= self.max_time):
            trainer.should_stop = True

    def diverged(self, trainer, bad_step: int, bad_weights: bool = False) -> None:
        """Diverged, naming the last finite checkpoint, when the ranks found a non-finite loss
        (`bad_step` >= 0: the step it appeared at) or non-finite weights."""
        if bad_step < 0 and not bad_weights:
            return
        what = f"the loss became NaN or infinite at step {bad_step}" if bad_step >= 0 else \
            f"the weights became NaN or infinite at step {trainer.global_step}"
        kept = [p for p in self.saved if os.path.exists(p)]
        raise Diverged(f"{what}: the run diverged (a lower --lr may help); "
                       + (f"last finite checkpoint: {kept[-1]}" if kept
                          else "no checkpoint was written before it"))

    def save(self, trainer, path: str = None):
        """A complete, resumable checkpoint at `path` (last.ckpt by default), logs flushed."""
        path = path or self.last
        bad_weights = not all(bool(torch.isfinite(p).all())
                              for p in trainer.lightning_module.parameters())
        first_bad = -1 if self._first_bad is None else int(self._first_bad)
        self.diverged(trainer, *(int(v) for v in agree(trainer, first_bad, bad_weights)))
        trainer.save_checkpoint(path, weights_only=False)     # optimizer too: resumable
        for logger in trainer.loggers:                          # logs as far as the checkpoint
            logger.save()
        self._last_save = time.monotonic()
        if path not in self.saved:
            self.saved.append(path)

    def stopped(self, trainer, log_dir: str, argv) -> Stopped:
        """What to raise after a signal stopped the run and last.ckpt was saved: SIGUSR1
        under SLURM requeues the job (rank 0), anything else says how to resume."""
        name = signal.Signals(self.signal).name
        done = f"stopped by {name} at step {trainer.global_step}; checkpoint {self.last}, " \
               f"logs {log_dir}; "
        if self.signal == signal.SIGUSR1 and slurm_job_id() is not None:
            requeued = requeue_job() if trainer.is_global_zero else "requeued by rank 0"
            return Stopped(self.signal, done + requeued)
        return Stopped(self.signal, done + "resume with: " + resume_command(argv, self.last))

    def on_train_end(self, trainer, pl_module):
        self.restore_signals()

    def on_exception(self, trainer, pl_module, exception):
        self.restore_signals()


# --- SLURM: requeue, and the requeued job finds its run again --------------------------------

def slurm_job_id():
    """The SLURM job this process belongs to, as scontrol names it ("123", "123_4" for an
    array task), or None outside a batch job; None too under torchrun inside a SLURM job,
    which Lightning also ranks first."""
    if TorchElasticEnvironment.detect() or not SLURMEnvironment.detect() \
            or SLURMEnvironment.job_id() is None:
        return None
    array = os.environ.get("SLURM_ARRAY_JOB_ID")
    return f"{array}_{os.environ['SLURM_ARRAY_TASK_ID']}" if array else \
        str(SLURMEnvironment.job_id())


def requeue_job() -> str:
    """`scontrol requeue` this job (what Lightning's SLURM handler runs): the job goes back to
    the queue and, started again with the same command, resumes from last.ckpt."""
    job = slurm_job_id()
    try:
        done = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
    except OSError as exc:
        return f"could not requeue SLURM job {job} (scontrol: {exc.strerror or exc})"
    if done.returncode != 0:
        why = " ".join(done.stderr.split()) or f"exit status {done.returncode}"
        return f"could not requeue SLURM job {job} (scontrol: {why})"
    return f"requeued SLURM job {job}, which resumes from that checkpoint"


def job_checkpoint(folder: str):
    """The last.ckpt this SLURM job saved in folder/version_N before it was requeued (the
    newest N: each requeued run resumes from the one before), or None: a new job, or not under
    SLURM. Every rank finds the same one on a shared file system."""
    job = slurm_job_id()
    if job is None or not os.path.isdir(folder):
        return None
    found = None
    versions = [name for name in os.listdir(folder)
                if name.startswith("version_") and name[8:].isdigit()]
    for name in sorted(versions, key=lambda name: int(name[8:])):
        marker = os.path.join(folder, name, SLURM_JOB_FILE)
        last = os.path.join(folder, name, "checkpoints", "last.ckpt")
        if os.path.isfile(marker) and os.path.isfile(last):
            with open(marker) as f:
                found = last if f.read().strip() == job else found
    return found


def claim_version(folder: str) -> int:
    """N of a new folder/version_N, created here: os.mkdir either creates it or fails, so two
    runs started together on one --root never share a folder. Only rank 0 claims; the DDP
    workers it launches inherit the number through the environment (other ranks never
    write logs). Under SLURM the folder records the job, for its requeued self. UsageError
    when the folder cannot be made."""
    if rank_zero_only.rank != 0:
        return int(os.environ.get(LOG_VERSION_ENV, 0))
    try:
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
        job = slurm_job_id()
        if job is not None:
            with open(os.path.join(folder, f"version_{version}", SLURM_JOB_FILE), "w") as f:
                f.write(job + "\n")
    except OSError as exc:
        raise UsageError(f"--root: cannot create the log folder there ({folder}: "
                         f"{exc.strerror or exc})") from None
    os.environ[LOG_VERSION_ENV] = str(version)
    return version


def resume_point(folder: str, ckpt, config: FieldConfig, source_name: str, digest: str):
    """(checkpoint, its step) a run starts from: a requeued SLURM job from the last.ckpt it
    saved under `folder`, whatever --ckpt says (SLURM runs the same command again); any other
    run from `ckpt` (None: from scratch, step 0). UsageError for a checkpoint that does not
    fit this run (check_resume)."""
    last = job_checkpoint(folder)
    if last is not None:
        step = check_resume(last, config, source_name, digest)
        print(f"train.py: SLURM job {slurm_job_id()} requeued: resuming from {last} "
              f"(step {step})", file=sys.stderr)
        return last, step
    return ckpt, 0 if ckpt is None else check_resume(ckpt, config, source_name, digest)


def resume_command(argv, ckpt: str) -> str:
    """The command line that continues a run: its arguments with --ckpt set to `ckpt`."""
    kept, skip = [], False
    for arg in argv:
        if skip or arg == "--ckpt" or arg.startswith("--ckpt="):
            skip = arg == "--ckpt"
            continue
        kept.append(arg)
    return shlex.join(["python", "train.py", *kept, "--ckpt", ckpt])


# --- resuming: the checkpoint a run starts from must fit it ---------------------------------

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
