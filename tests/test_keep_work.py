"""keep_work.py, through train.py: a run never destroys a file, never loses more work than it
must (checkpoints, signals, SLURM requeue, divergence, log versions), and every refusal is one
line (exit 2) rather than a traceback. (render.py's and convert.py's own are in their tests.)

Each test reproduces one fault of the issue "Lose nothing" on tiny images (40x24, 2 hash
levels of 2^8 rows, 256-pixel batches). Subprocesses run with one thread (the machine is
shared) and write only under tmp_path."""
import os
import re
import shlex
import signal
import struct
import subprocess
import sys
import time
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

import images
import keep_work
import train
from field import load_field
from conftest import ENV, expect_error, leftovers, nan_image, prog_lines, run_limited
from test_train import save_png, smooth_image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = os.path.join(ROOT, "train.py")
SMALL = ["--accelerator", "cpu", "--n_levels", "2", "--log2_hashmap_size", "8",
         "--batch_size", "256"]


@pytest.fixture(autouse=True)
def one_thread():
    """Two shared cores: one torch thread is several times faster than two here."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def train_argv(tmp_path, image, *flags):
    return ["-i", str(image), "--root", str(tmp_path / "logs"), *SMALL, *flags]


def small_png(folder, name="img.png", seed=0, height=24, width=40):
    return save_png(os.path.join(folder, name), smooth_image(height, width, seed=seed))


def finite_weights(path):
    ckpt = torch.load(path, weights_only=True)
    return all(bool(torch.isfinite(v).all()) for v in ckpt["state_dict"].values())


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A 10-step fit of a 40x24 image: its last.ckpt (with optimiser state)."""
    folder = tmp_path_factory.mktemp("fit")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        summary = train.main(train_argv(folder, small_png(folder), "--max_steps", "10"))
    finally:
        torch.set_num_threads(threads)
    return summary["checkpoint"]


# --- 1. --export never overwrites the input ---------------------------------------------------

@pytest.mark.parametrize("kind", ["npy", "jpg", "jpg-symlink", "png-hardlink"])
def test_export_onto_the_input_is_refused_before_training(tmp_path, capsys, kind):
    ext = kind.split("-")[0]
    source = tmp_path / f"source.{ext}"
    if ext == "npy":
        np.save(source, smooth_image(24, 40))
    else:
        Image.fromarray(smooth_image(24, 40)).save(source)
    before = source.read_bytes()
    export = source
    if kind.endswith("symlink"):
        (tmp_path / "elsewhere").mkdir()
        export = tmp_path / "elsewhere" / "fit.jpg"
        os.symlink(source, export)
    elif kind.endswith("hardlink"):
        export = tmp_path / "fit.png"
        os.link(source, export)
    expect_error(capsys, train.main,
                 train_argv(tmp_path, source, "--max_steps", "5", "--export", str(export)),
                 "would overwrite the input")
    assert source.read_bytes() == before
    assert not (tmp_path / "logs").exists()            # refused before training


# --- 2. step=N.ckpt named by the true step, one per N --------------------------------------------

def test_periodic_checkpoints_hold_their_own_step(tmp_path):
    image = small_png(tmp_path)
    summary = train.main(train_argv(tmp_path, image, "--max_steps", "500", "--val_every", "250",
                                    "--ckpt_every", "100"))
    folder = os.path.dirname(summary["checkpoint"])
    steps = range(100, 501, 100)
    assert sorted(os.listdir(folder)) == sorted([f"step={n}.ckpt" for n in steps] + ["last.ckpt"])
    saved = {n: torch.load(os.path.join(folder, f"step={n}.ckpt"), weights_only=True)
             for n in steps}
    assert {n: ckpt["global_step"] for n, ckpt in saved.items()} == {n: n for n in steps}
    assert torch.load(summary["checkpoint"], weights_only=True)["global_step"] == 500
    # five different states, not one file written five times
    key = next(k for k in saved[100]["state_dict"] if "mlp" in k)
    assert not torch.equal(saved[100]["state_dict"][key], saved[500]["state_dict"][key])


# --- 3. SIGINT / SIGTERM save and say how to resume; SIGKILL loses little -------------------------

def start_train(tmp_path, image, *flags):
    """train.py in a subprocess, stdout/stderr to files in tmp_path; returns the Popen."""
    out = open(tmp_path / "stdout.txt", "w")
    err = open(tmp_path / "stderr.txt", "w")
    proc = subprocess.Popen([sys.executable, TRAIN, *train_argv(tmp_path, image, *flags)],
                            cwd=tmp_path, env=ENV, stdout=out, stderr=err, text=True)
    out.close()
    err.close()
    return proc


def output_of(tmp_path):
    return (tmp_path / "stdout.txt").read_text(), (tmp_path / "stderr.txt").read_text()


def wait_for_file(path, proc, tmp_path, timeout=90):
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if proc.poll() is not None:
            pytest.fail(f"train.py ended ({proc.returncode}) before {path} appeared: "
                        + output_of(tmp_path)[1][-2000:])
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"{path} did not appear within {timeout} s")
        time.sleep(0.05)


def version_dir(tmp_path, name="img", version=0):
    return tmp_path / "logs" / "experiments" / name / f"version_{version}"


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM, signal.SIGUSR1])
def test_signal_saves_last_checkpoint_and_prints_a_working_resume_command(tmp_path, capsys,
                                                                          signum):
    image = small_png(tmp_path)
    proc = start_train(tmp_path, image, "--max_steps", "1000000", "--ckpt_every", "20",
                       "--val_every", "10")
    log_dir = version_dir(tmp_path)
    wait_for_file(log_dir / "checkpoints" / "step=20.ckpt", proc, tmp_path)
    proc.send_signal(signum)
    assert proc.wait(timeout=60) == 128 + signum
    _, err = output_of(tmp_path)
    assert "Traceback" not in err
    lines = prog_lines(err)
    assert len(lines) == 1, err[-3000:]
    name = signal.Signals(signum).name
    last = str(log_dir / "checkpoints" / "last.ckpt")
    match = re.fullmatch(rf"train\.py: stopped by {name} at step (\d+); checkpoint (\S+), "
                         rf"logs (\S+); resume with: (.+)", lines[0])
    assert match, lines[0]
    step = int(match[1])
    assert step >= 20 and match[2] == last and match[3] == str(log_dir)
    assert torch.load(last, weights_only=True)["global_step"] == step
    # the logs reach the checkpoint (one row every 10 steps)
    rows = (log_dir / "metrics.csv").read_text().splitlines()
    header = rows[0].split(",")
    logged = [int(float(r.split(",")[header.index("step")])) for r in rows[1:]]
    assert max(logged) >= step - 10
    # the printed command continues from the saved step (run here with a finite length)
    command = shlex.split(match[4])
    assert command[:2] == ["python", "train.py"]
    args = command[2:]
    assert args[args.index("--ckpt") + 1] == last and args.count("--ckpt") == 1
    args[args.index("--max_steps") + 1] = str(step + 5)
    summary = train.main(args)
    assert summary["steps"] == step + 5 and summary["steps_this_run"] == 5
    assert torch.load(summary["checkpoint"], weights_only=True)["global_step"] == step + 5


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_second_signal_interrupts_at_once(tmp_path, signum):
    image = small_png(tmp_path)
    # steps of 2^18 pixels (a second or so each here): both signals land within one step
    proc = start_train(tmp_path, image, "--max_steps", "1000000", "--ckpt_every", "1",
                       "--batch_size", str(2 ** 18))
    folder = version_dir(tmp_path) / "checkpoints"
    wait_for_file(folder / "step=1.ckpt", proc, tmp_path)
    proc.send_signal(signum)
    time.sleep(0.1)
    proc.send_signal(signum)
    assert proc.wait(timeout=60) == 128 + signum
    _, err = output_of(tmp_path)
    assert "Traceback" not in err
    name = signal.Signals(signum).name
    assert prog_lines(err) == [f"train.py: interrupted by a second {name}; not saved since "
                               f"the last checkpoint"], err[-2000:]
    assert "last.ckpt" not in os.listdir(folder) and leftovers(folder) == []
    assert torch.load(folder / "step=1.ckpt", weights_only=True)["global_step"] == 1


def test_sigkill_loses_at_most_ckpt_minutes(tmp_path):
    image = small_png(tmp_path)
    proc = start_train(tmp_path, image, "--max_steps", "1000000", "--ckpt_minutes", "0.005")
    last = version_dir(tmp_path) / "checkpoints" / "last.ckpt"
    wait_for_file(last, proc, tmp_path)
    first = torch.load(last, weights_only=True)["global_step"]
    deadline = time.monotonic() + 60               # until it has been refreshed at least once
    while torch.load(last, weights_only=True)["global_step"] == first:
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.1)
    time.sleep(0.2)
    proc.kill()
    proc.wait(timeout=30)
    ckpt = torch.load(last, weights_only=True)     # complete whatever the moment of the kill
    assert ckpt["global_step"] > first and finite_weights(last)
    _, info = load_field(str(last))
    assert info["global_step"] == ckpt["global_step"]


# --- 3b. SLURM: SIGUSR1 saves, requeues, and the requeued job resumes from that step -------------

def fake_slurm(tmp_path, job="4242"):
    """The environment of a SLURM batch job (one task) with a stand-in `scontrol` on PATH that
    records its arguments in tmp_path/scontrol.txt."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    scontrol = bin_dir / "scontrol"
    scontrol.write_text(f"#!/bin/sh\necho \"$@\" >> {tmp_path / 'scontrol.txt'}\n")
    scontrol.chmod(0o755)
    return dict(ENV, PATH=f"{bin_dir}{os.pathsep}{ENV['PATH']}", SLURM_JOB_ID=job,
                SLURM_JOB_NAME="fit", SLURM_NTASKS="1", SLURM_PROCID="0", SLURM_LOCALID="0",
                SLURM_NODEID="0", SLURM_NNODES="1")


def start_in(tmp_path, env, argv, name):
    out, err = open(tmp_path / f"{name}.out", "w"), open(tmp_path / f"{name}.err", "w")
    proc = subprocess.Popen([sys.executable, TRAIN, *argv], cwd=tmp_path, env=env, stdout=out,
                            stderr=err, text=True)
    out.close()
    err.close()
    return proc


def wait_until(condition, proc, what, timeout=90):
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None, f"train.py ended ({proc.returncode}) before {what}"
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"no {what} within {timeout} s")
        time.sleep(0.05)


def test_slurm_requeue_signal_saves_requeues_and_the_job_resumes_there(tmp_path):
    image = small_png(tmp_path)
    env = fake_slurm(tmp_path)
    argv = train_argv(tmp_path, image, "--max_steps", "1000000", "--ckpt_every", "20",
                      "--val_every", "10")
    log_dir = version_dir(tmp_path)
    folder = log_dir / "checkpoints"
    proc = start_in(tmp_path, env, argv, "first")
    wait_until(lambda: (folder / "step=20.ckpt").exists(), proc, "step=20.ckpt")
    proc.send_signal(signal.SIGUSR1)          # what `#SBATCH --signal=USR1@90` sends
    assert proc.wait(timeout=60) == 128 + signal.SIGUSR1
    lines = prog_lines((tmp_path / "first.err").read_text())
    match = re.fullmatch(r"train\.py: stopped by SIGUSR1 at step (\d+); checkpoint (\S+), logs "
                         r"(\S+); requeued SLURM job 4242, which resumes from that checkpoint",
                         lines[-1] if lines else "")
    assert match and len(lines) == 1, lines
    step = int(match[1])
    assert match[2] == str(folder / "last.ckpt") and match[3] == str(log_dir)
    assert torch.load(folder / "last.ckpt", weights_only=True)["global_step"] == step >= 20
    assert (tmp_path / "scontrol.txt").read_text() == "requeue 4242\n"
    # SLURM starts the same command again in the same job: it continues from that step, not
    # from step 0, and logs to the next version_N
    proc = start_in(tmp_path, env, argv, "requeued")
    later = version_dir(tmp_path, version=1) / "checkpoints" / "step=40.ckpt"
    wait_until(later.exists, proc, later.name)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 128 + signal.SIGTERM
    lines = prog_lines((tmp_path / "requeued.err").read_text())
    assert lines[0] == (f"train.py: SLURM job 4242 requeued: resuming from {folder / 'last.ckpt'}"
                        f" (step {step})"), lines
    match = re.fullmatch(r"train\.py: stopped by SIGTERM at step (\d+); .*resume with: .*",
                         lines[1])
    assert match and int(match[1]) >= 40, lines
    assert (tmp_path / "scontrol.txt").read_text() == "requeue 4242\n"   # SIGTERM: no requeue
    scored = []
    for version in (0, 1):
        rows = (version_dir(tmp_path, version=version) / "metrics.csv").read_text().splitlines()
        header = rows[0].split(",")
        scored += [int(float(r.split(",")[header.index("step")])) for r in rows[1:]
                   if r.split(",")[header.index("val/psnr")]]
    # one score every 10 steps across both runs, and one where each stopped: none lost, none
    # repeated
    stops = {step, int(match[1])}
    assert scored == sorted(set(range(10, int(match[1]) + 1, 10)) | stops)


# --- 4. two runs on one --root get their own version_N -------------------------------------------

def test_two_runs_started_together_get_their_own_versions(tmp_path):
    image = small_png(tmp_path)
    runs = []
    for k in range(2):
        folder = tmp_path / f"run{k}"
        folder.mkdir()
        out, err = open(folder / "stdout.txt", "w"), open(folder / "stderr.txt", "w")
        cmd = [sys.executable, TRAIN, "-i", image, "--root", str(tmp_path / "logs"), *SMALL,
               "--max_steps", "30", "--val_every", "10"]
        runs.append((folder, subprocess.Popen(cmd, cwd=folder, env=ENV, stdout=out, stderr=err)))
        out.close()
        err.close()
    paths = []
    for folder, proc in runs:
        assert proc.wait(timeout=120) == 0, (folder / "stderr.txt").read_text()[-2000:]
        stdout = (folder / "stdout.txt").read_text()
        match = re.search(r"checkpoint (\S+last\.ckpt)", stdout)
        assert match, stdout
        paths.append(match[1])
    versions = {os.path.basename(os.path.dirname(os.path.dirname(p))) for p in paths}
    assert versions == {"version_0", "version_1"}
    for path in paths:
        assert torch.load(path, weights_only=True)["global_step"] == 30
        rows = open(os.path.join(os.path.dirname(os.path.dirname(path)),
                                 "metrics.csv")).read().splitlines()
        width = len(rows[0].split(","))
        assert len(rows) > 3 and all(len(row.split(",")) == width for row in rows), rows
        header = rows[0].split(",")
        scored = [int(float(r.split(",")[header.index("step")])) for r in rows[1:]
                  if r.split(",")[header.index("val/psnr")]]
        assert scored == [10, 20, 30]                  # one run's rows, not both interleaved


def test_claim_version_takes_the_next_free_folder(tmp_path, monkeypatch):
    monkeypatch.delenv(keep_work.LOG_VERSION_ENV, raising=False)
    folder = tmp_path / "name"
    (folder / "version_3").mkdir(parents=True)
    (folder / "version_x").write_text("a file, not a version")
    (folder / "version_1a").mkdir()
    assert keep_work.claim_version(str(folder)) == 4
    assert (folder / "version_4").is_dir()
    assert keep_work.claim_version(str(folder)) == 5
    assert os.environ[keep_work.LOG_VERSION_ENV] == "5"
    assert keep_work.claim_version(str(tmp_path / "fresh")) == 0


# --- 5. outputs are all or nothing ----------------------------------------------------------------


def test_export_failing_mid_write_keeps_the_previous_export(tmp_path):
    image = small_png(tmp_path, height=256, width=384)          # export .npy: 295 KB
    out = tmp_path / "out"
    out.mkdir()
    target = out / "x.npy"
    np.save(target, np.arange(12, dtype=np.uint8).reshape(2, 2, 3))
    before = target.read_bytes()
    done = run_limited([sys.executable, TRAIN, *train_argv(tmp_path, image, "--max_steps", "3",
                                                             "--export", str(target))],
                       150_000, tmp_path)               # a checkpoint (80 KB) still fits
    assert done.returncode == 1, done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    lines = prog_lines(done.stderr)
    assert len(lines) == 1 and lines[0].startswith("train.py: error: "), done.stderr[-2000:]
    assert "File too large" in lines[0] and str(target) in lines[0]
    assert target.read_bytes() == before
    assert sorted(os.listdir(out)) == ["x.npy"]


def test_checkpoint_on_a_full_disk_is_one_line_and_no_truncated_file(tmp_path):
    image = small_png(tmp_path)                         # 40x24: a few KB; checkpoints ~80 KB
    done = run_limited([sys.executable, TRAIN, *train_argv(tmp_path, image, "--max_steps", "6",
                                                             "--ckpt_every", "2")],
                       30_000, tmp_path)
    assert done.returncode == 1, done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    lines = prog_lines(done.stderr)
    assert len(lines) == 1 and lines[0].startswith("train.py: error: "), done.stderr[-2000:]
    ckpt_dir = version_dir(tmp_path) / "checkpoints"
    assert lines[0].endswith(f"File too large: '{ckpt_dir / 'step=2.ckpt'}'"), lines[0]
    assert not ckpt_dir.exists() or os.listdir(ckpt_dir) == []


# --- 6. --export that could never be written: refused before training -----------------------------

def test_export_under_a_file_or_onto_a_folder_is_refused(tmp_path, capsys):
    image = small_png(tmp_path)
    (tmp_path / "afile").write_text("x")
    expect_error(capsys, train.main, train_argv(tmp_path, image, "--max_steps", "5", "--export",
                                                str(tmp_path / "afile" / "fit.png")),
                 "cannot write there")
    (tmp_path / "folder.png").mkdir()
    expect_error(capsys, train.main, train_argv(tmp_path, image, "--max_steps", "5", "--export",
                                                str(tmp_path / "folder.png")), "is a folder")
    assert not (tmp_path / "logs").exists()
    assert os.listdir(tmp_path / "folder.png") == []


# --- 7. non-finite pixels ------------------------------------------------------------------------


def test_non_finite_pixels_are_refused(tmp_path, capsys):
    source = nan_image(tmp_path / "hdr.npy")
    expect_error(capsys, train.main, train_argv(tmp_path, source, "--max_steps", "5"),
                 "3 of 2880 values are NaN or infinite")
    assert not (tmp_path / "logs").exists()


# --- 8. divergence stops the run; nothing non-finite is saved -------------------------------------

def diverged(capsys, argv):
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        train.main(argv)
    assert exc.value.code == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = prog_lines(err)
    assert len(lines) == 1, err
    return lines[0]


def test_diverging_run_stops_with_the_step_and_last_finite_checkpoint(tmp_path, capsys):
    image = small_png(tmp_path)
    line = diverged(capsys, train_argv(tmp_path, image, "--lr", "1e30", "--max_steps", "100",
                                       "--ckpt_every", "1"))
    match = re.fullmatch(r"train\.py: error: the (?:loss|weights) became NaN or infinite at "
                         r"step (\d+): the run diverged \(a lower --lr may help\); last finite "
                         r"checkpoint: (\S+)", line)
    assert match, line
    step, named = int(match[1]), match[2]
    folder = version_dir(tmp_path) / "checkpoints"
    saved = sorted(os.listdir(folder))
    assert saved and "last.ckpt" not in saved and leftovers(folder) == []
    steps = sorted(int(re.fullmatch(r"step=(\d+)\.ckpt", name)[1]) for name in saved)
    assert steps == list(range(1, step))             # every step before it, none after
    assert named == str(folder / f"step={step - 1}.ckpt")
    for name in saved:
        assert finite_weights(folder / name), name


def test_resume_with_corrupt_optimiser_state_stops_at_once(tmp_path, capsys, checkpoint):
    ckpt = torch.load(checkpoint, weights_only=True)
    assert ckpt["global_step"] == 10
    for state in ckpt["optimizer_states"][0]["state"].values():
        state["exp_avg"].fill_(float("nan"))
    corrupt = tmp_path / "corrupt.ckpt"
    torch.save(ckpt, corrupt)
    image = small_png(tmp_path)                      # the same pixels the checkpoint saw
    line = diverged(capsys, train_argv(tmp_path, image, "--max_steps", "30", "--ckpt_every", "1",
                                       "--ckpt", str(corrupt)))
    assert line == ("train.py: error: the weights became NaN or infinite at step 11: the run "
                    "diverged (a lower --lr may help); no checkpoint was written before it")
    folder = version_dir(tmp_path) / "checkpoints"
    assert not folder.exists() or os.listdir(folder) == []


# --- 9. truncated PNGs; another image of the same size --------------------------------------------

def write_png(path, pixels, rows=None):
    """An 8-bit RGB PNG by hand: IHDR, one IDAT holding a complete zlib stream of the first
    `rows` rows only (all by default), IEND."""
    height, width, _ = pixels.shape
    rows = height if rows is None else rows
    raw = b"".join(b"\x00" + pixels[r].tobytes() for r in range(rows))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n")
        for kind, data in ((b"IHDR", header), (b"IDAT", zlib.compress(raw)), (b"IEND", b"")):
            f.write(struct.pack(">I", len(data)) + kind + data
                    + struct.pack(">I", zlib.crc32(kind + data)))
    return str(path)


def test_png_with_rows_missing_is_refused(tmp_path, capsys):
    pixels = smooth_image(24, 40)
    whole = write_png(tmp_path / "whole.png", pixels)
    np.testing.assert_array_equal(images.read_image(whole), pixels)     # the writer is right
    half = write_png(tmp_path / "half.png", pixels, rows=12)
    with pytest.raises(images.ImageError, match="truncated"):
        images.read_image(half)
    expect_error(capsys, train.main, train_argv(tmp_path, half, "--max_steps", "5"), "truncated")
    assert not (tmp_path / "logs").exists()


def test_resume_on_another_image_of_the_same_size_warns_and_trains(tmp_path, capsys):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    first = small_png(tmp_path / "a", "img.png", seed=0)
    other = small_png(tmp_path / "b", "img.png", seed=1)     # same name and size, other pixels
    ckpt = train.main(train_argv(tmp_path, first, "--max_steps", "5"))["checkpoint"]
    capsys.readouterr()
    summary = train.main(train_argv(tmp_path, other, "--max_steps", "8", "--ckpt", ckpt))
    warnings = prog_lines(capsys.readouterr().err)
    assert warnings == [f"train.py: warning: --ckpt {ckpt} was trained on another image "
                        f"(img.png) of the same size; continuing from its weights"]
    assert summary["steps"] == 8 and summary["steps_this_run"] == 3
    # the same pixels under another name: no warning
    renamed = tmp_path / "renamed.png"
    renamed.write_bytes(open(first, "rb").read())
    train.main(train_argv(tmp_path, renamed, "--max_steps", "6", "--ckpt", ckpt))
    assert prog_lines(capsys.readouterr().err) == []


# --- 10. one line, exit 2, never a traceback ------------------------------------------------------

TRAIN_FLAG_ERRORS = [
    (["--lr", "-1"], "--lr: expected a number > 0, got -1"),
    (["--lr", "nan"], "--lr: expected a finite number, got 'nan'"),
    (["--seed", "-1"], "--seed: expected an integer"),
    (["--seed", "4294967296"], "got 4294967296"),
    (["--log2_hashmap_size", "40"], "--log2_hashmap_size: expected an integer 1..31, got 40"),
    (["--finest_resolution", "4", "--base_resolution", "16"], "finest_resolution"),
    (["--periodic", "x", "--enc_method", "freq"], "periodic axes need enc_method 'hashgrid'"),
    (["--max_time", "nan"], "--max_time: expected a finite number, got 'nan'"),
    (["--max_time", "-1"], "--max_time: expected a number > 0, got -1"),
]


@pytest.mark.parametrize("flags, needle", TRAIN_FLAG_ERRORS,
                         ids=[" ".join(f) for f, _ in TRAIN_FLAG_ERRORS])
def test_train_flag_errors_are_one_line(tmp_path, capsys, flags, needle):
    image = small_png(tmp_path)
    expect_error(capsys, train.main, train_argv(tmp_path, image, "--max_steps", "5", *flags),
                 needle)
    assert not (tmp_path / "logs").exists()


def test_train_root_under_a_file_is_one_line(tmp_path, capsys):
    image = small_png(tmp_path)
    (tmp_path / "afile").write_text("x")
    argv = ["-i", image, "--root", str(tmp_path / "afile" / "logs"), *SMALL, "--max_steps", "5"]
    expect_error(capsys, train.main, argv, "cannot create the log folder there")


def test_decompression_bomb_says_how_much_memory(tmp_path, capsys, monkeypatch):
    image = small_png(tmp_path)
    monkeypatch.setattr(images, "available_memory", lambda: 1000)
    err = expect_error(capsys, train.main, train_argv(tmp_path, image, "--max_steps", "5"),
                       "decoding 40x24 pixels needs about")
    assert "needs about 6.7 KB of memory, 1.0 KB is available" in err   # 40*24 * (4 + 3) B


def test_one_line_error_from_the_shell(tmp_path):
    done = subprocess.run([sys.executable, TRAIN, "--lr", "nan", "--root", str(tmp_path / "logs")],
                          cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr == "train.py: error: argument --lr: expected a finite number, got 'nan'\n"
    assert not (tmp_path / "logs").exists()
