"""train.py: data path, scoring, fitting, resume, export, previews, DDP and CLI errors.

Every fit runs on a small generated image in tmp_path with the CPU accelerator."""
import io
import logging
import os
import subprocess
import sys
import textwrap

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
import yaml
from PIL import Image

import hardware
import images
import pixels
import previews
import render
import train
from conftest import reference_render
from field import CheckpointError, FieldConfig, load_field

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def smooth_image(height=48, width=80, channels=3, seed=0):
    """(H, W, C) uint8: a few low-frequency waves per channel, non-square and asymmetric so
    that swapped axes or flipped coordinates show up."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width] + 0.5
    out = np.empty((height, width, channels))
    for c in range(channels):
        fx, fy, phase = rng.uniform(0.5, 2.0), rng.uniform(0.5, 2.0), rng.uniform(0, 6.3)
        out[..., c] = (0.5 + 0.3 * np.sin(2 * np.pi * fx * x / width + phase)
                       * np.cos(2 * np.pi * fy * y / height) + 0.15 * x / width)
    return np.clip(out * 255 + 0.5, 0, 255).astype(np.uint8)


def save_png(path, array):
    Image.fromarray(array[..., 0] if array.shape[2] == 1 else array).save(path)
    return str(path)


def fit(tmp_path, image_path, *flags):
    """train.main on the CPU with logs under tmp_path; returns its summary dict."""
    argv = ["-i", str(image_path), "--root", str(tmp_path / "logs"), "--accelerator", "cpu",
            "--batch_size", "4096", *flags]
    return train.main(argv)


# --- pure pieces ----------------------------------------------------------------------------

def test_image_loss_formulas():
    pred = torch.tensor([[0.5, 0.1], [0.0, 1.0]])
    target = torch.tensor([[0.25, 0.1], [0.5, 0.0]])
    assert train.image_loss(pred, target, "l2").item() == pytest.approx((0.0625 + 0.25 + 1) / 4)
    relative = (0.0625 / 0.26 + 0.25 / 0.01 + 1 / 1.01) / 4
    assert train.image_loss(pred, target, "relative_l2").item() == pytest.approx(relative)


# --- training through the command line ------------------------------------------------------

def test_fit_reaches_psnr_a_guess_cannot(tmp_path):
    source = smooth_image()
    path = save_png(tmp_path / "waves.png", source)
    summary = fit(tmp_path, path, "--epochs", "2", "--val_every", "100")
    assert summary["steps"] == 200                     # --epochs counts 100 steps
    # the best constant guess (the mean colour) scores far lower
    mean = source.reshape(-1, 3).mean(0)
    guess = pixels.psnr_from_sse(((source - mean) ** 2).sum(), source.size)
    assert guess < 20 and summary["psnr"] > 30
    # the logged PSNR is the one of the checkpointed field on every pixel
    field, info = load_field(summary["checkpoint"])
    assert (info["width"], info["height"], info["channels"]) == (80, 48, 3)
    assert info["global_step"] == 200
    fit_u8 = render.render_region(field, 80, 48)
    err = ((fit_u8.astype(np.int64) - source) ** 2).sum()
    assert pixels.psnr_from_sse(err, source.size) == pytest.approx(summary["psnr"], abs=1e-3)
    metrics = open(os.path.join(summary["log_dir"], "metrics.csv")).read().splitlines()
    header = metrics[0].split(",")
    logged = [row.split(",") for row in metrics[1:] if row.split(",")[header.index("val/psnr")]]
    assert [int(r[header.index("step")]) for r in logged] == [100, 200]


def test_bf16_mixed_trains_and_scores_in_float32(tmp_path):
    source = smooth_image()
    path = save_png(tmp_path / "waves.png", source)
    summary = fit(tmp_path, path, "--max_steps", "150", "--val_every", "150",
                  "--precision", "bf16-mixed")
    assert summary["psnr"] > 30
    field, _ = load_field(summary["checkpoint"])
    assert field.encoder.embedding.weight.dtype == torch.float32      # master weights
    err = ((render.render_region(field, 80, 48).astype(np.int64) - source) ** 2).sum()
    # the logged score is the float32 render's, not the bfloat16 forward's
    assert pixels.psnr_from_sse(err, source.size) == pytest.approx(summary["psnr"], abs=1e-3)
    optimizer = torch.load(summary["checkpoint"], weights_only=True)["optimizer_states"][0]
    assert all(group["fused"] == hardware.fused_adam(torch.device("cpu"))
               for group in optimizer["param_groups"])


def test_resume_continues_from_saved_step(tmp_path):
    path = save_png(tmp_path / "waves.png", smooth_image())
    first = fit(tmp_path, path, "--max_steps", "20", "--val_every", "10")
    saved = torch.load(first["checkpoint"], weights_only=True)
    assert saved["global_step"] == 20
    # nothing left to do: the weights come back exactly as saved
    same = fit(tmp_path, path, "--max_steps", "20", "--ckpt", first["checkpoint"])
    again = torch.load(same["checkpoint"], weights_only=True)
    assert same["steps"] == 20
    for key, value in saved["state_dict"].items():
        assert torch.equal(again["state_dict"][key], value), key
    # 10 more steps on top of the saved 20, starting from the saved weights
    more = fit(tmp_path, path, "--max_steps", "30", "--val_every", "10",
               "--ckpt", first["checkpoint"])
    assert more["steps"] == 30
    assert torch.load(more["checkpoint"], weights_only=True)["global_step"] == 30
    assert more["psnr"] > first["psnr"]


def test_max_time_counts_training_seconds(tmp_path):
    path = save_png(tmp_path / "waves.png", smooth_image())
    summary = fit(tmp_path, path, "--max_steps", "100000", "--max_time", "1.5", "--val_every", "5")
    assert 5 < summary["steps"] < 100000
    # scoring every 5 steps is paused out: the clock stops just past the budget
    assert 1.5 <= summary["train_seconds"] < 1.5 + 1.0


def test_export_equals_direct_forward_pass(tmp_path):
    source = smooth_image(channels=1)
    path = save_png(tmp_path / "gray.png", source)
    out_npy, out_png = tmp_path / "fit.npy", tmp_path / "fit.png"
    summary = fit(tmp_path, path, "--max_steps", "15", "--export", str(out_npy))
    field, info = load_field(summary["checkpoint"])
    expected = reference_render(field, 80, 48)
    exported = np.load(out_npy)
    assert exported.dtype == np.uint8 and exported.shape == (48, 80, 1)
    np.testing.assert_array_equal(exported, expected)
    train.export_fit(field, 80, 48, 1, str(out_png))
    np.testing.assert_array_equal(images.read_image(str(out_png)), expected)


def test_visualize_writes_previews_and_gif(tmp_path):
    source = smooth_image(60, 40)
    path = save_png(tmp_path / "tall.png", source)
    summary = fit(tmp_path, path, "--max_steps", "12", "--visualize")
    folder = os.path.join(summary["log_dir"], "previews")
    assert sorted(os.listdir(folder)) == [f"step_{s:06d}.png" for s in (1, 2, 4, 8, 10, 12)]
    preview = np.asarray(Image.open(os.path.join(folder, "step_000012.png")))
    # reference | fit, each the whole view (native size here) above a native crop 256 high
    (pw, ph), (x0, y0, cw, ch) = previews.preview_geometry(40, 60)
    assert (pw, ph, x0, y0, cw, ch) == (40, 60, 0, 0, 40, 60)
    assert preview.shape == (ph + ch, 2 * pw, 3)
    np.testing.assert_array_equal(preview[ph:, :pw], source)       # crops carry no label
    field, _ = load_field(summary["checkpoint"])
    np.testing.assert_array_equal(preview[ph:, pw:], reference_render(field, 40, 60))
    with Image.open(os.path.join(summary["log_dir"], "previews.gif")) as gif:
        assert gif.n_frames == 6


DDP_SCRIPT = textwrap.dedent("""
    import sys, torch
    import lightning.pytorch as pl
    import train

    class Dump(pl.Callback):
        def on_train_start(self, trainer, module):
            self.initial = {k: v.clone() for k, v in module.field.state_dict().items()}

        def on_train_end(self, trainer, module):
            torch.save(dict(initial=self.initial, final=module.field.state_dict(),
                            xy=module.draw_batch(64)[0]),
                       f"{sys.argv[1]}/rank{trainer.global_rank}.pt")

    train.main(sys.argv[2:], callbacks=[Dump()])
""")


def test_ddp_two_cpu_processes_train_the_same_weights(tmp_path):
    path = save_png(tmp_path / "waves.png", smooth_image())
    script = tmp_path / "ddp_fit.py"
    script.write_text(DDP_SCRIPT)
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, str(script), str(tmp_path), "-i", path, "--root", str(tmp_path / "logs"),
           "--accelerator", "cpu", "--devices", "2", "--strategy", "ddp", "--max_steps", "5",
           "--batch_size", "1024", "--val_every", "5",
           "--max_time", "60"]                 # exercises the ranks' agreement on stopping
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    for key, final in ranks[0]["final"].items():
        assert torch.equal(final, ranks[1]["final"][key]), key
    assert any(not torch.equal(value, ranks[0]["initial"][key])
               for key, value in ranks[0]["final"].items())              # it did train
    assert not torch.allclose(ranks[0]["xy"], ranks[1]["xy"])    # each rank draws its own pixels
    assert "PSNR" in done.stdout


# --- errors: one line on stderr, exit status 2 ------------------------------------------------

def expect_usage_error(capsys, argv, needle):
    capsys.readouterr()                                # drop what earlier runs printed
    with pytest.raises(SystemExit) as exc:
        train.main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("train.py: error: ") and needle in err, err


def test_unusable_images_are_one_line_errors(tmp_path, capsys):
    root = ["--root", str(tmp_path / "logs"), "--accelerator", "cpu"]
    expect_usage_error(capsys, ["-i", str(tmp_path / "missing.png"), *root], "missing.png")
    garbage = tmp_path / "garbage.png"
    garbage.write_bytes(b"not an image at all")
    expect_usage_error(capsys, ["-i", str(garbage), *root], "garbage.png")
    empty = tmp_path / "empty.npy"
    np.save(empty, np.zeros((0, 5, 3), np.uint8))
    expect_usage_error(capsys, ["-i", str(empty), *root], "empty.npy")
    assert not os.path.exists(tmp_path / "logs")       # nothing started


def test_bad_flags_are_one_line_errors(capsys):
    expect_usage_error(capsys, ["--lr", "abc"], "--lr: invalid float value: 'abc'")
    expect_usage_error(capsys, ["--no_such_flag"], "unrecognized arguments: --no_such_flag")


def test_bad_checkpoints_are_one_line_errors(tmp_path, capsys):
    path = save_png(tmp_path / "waves.png", smooth_image())
    argv = ["-i", path, "--root", str(tmp_path / "logs"), "--accelerator", "cpu"]
    expect_usage_error(capsys, [*argv, "--ckpt", str(tmp_path / "nope.ckpt")], "nope.ckpt")
    junk = tmp_path / "junk.ckpt"
    junk.write_bytes(b"\x00" * 100)
    expect_usage_error(capsys, [*argv, "--ckpt", str(junk)], "junk.ckpt")
    with pytest.raises(CheckpointError, match="junk.ckpt"):
        load_field(str(junk))
    first = fit(tmp_path, path, "--max_steps", "2")
    expect_usage_error(capsys, [*argv, "--log2_hashmap_size", "12", "--ckpt", first["checkpoint"]],
                       f"log2_hashmap_size {FieldConfig(80, 48, 3).log2_hashmap_size} vs 12")
    other = save_png(tmp_path / "other.png", smooth_image(32, 32))
    expect_usage_error(capsys, ["-i", other, *argv[2:], "--ckpt", first["checkpoint"]],
                       "width 80 vs 32")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_gpu_without_gpu_exits_2_from_the_shell(tmp_path):
    path = save_png(tmp_path / "waves.png", smooth_image())
    done = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), "-i", path,
                           "--root", str(tmp_path / "logs"), "--accelerator", "gpu"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip() == "train.py: error: --accelerator gpu: no GPU is available to torch"


def test_bad_options_are_one_line_errors(tmp_path, capsys):
    path = save_png(tmp_path / "waves.png", smooth_image())
    argv = ["-i", path, "--root", str(tmp_path / "logs"), "--accelerator", "cpu"]
    expect_usage_error(capsys, [*argv, "--export", str(tmp_path / "fit.xyz")],
                       "unsupported output extension '.xyz'")
    expect_usage_error(capsys, [*argv, "--precision", "bogus"], "Precision 'bogus' is invalid")


def test_learning_rate_schedule_by_hand():
    lr = train.learning_rate
    assert lr(1e-2, 0.0) == lr(1e-2, 0.5) == 1e-2                    # constant first half
    assert lr(1e-2, 0.75) == pytest.approx(1e-2 * 0.05 ** 0.5)          # half-way down
    assert lr(1e-2, 1.0) == pytest.approx(5e-4)                        # 1/20 at the end
    assert lr(1e-2, 0.9, "constant") == 1e-2


def test_the_run_follows_the_schedule(tmp_path):
    path = save_png(tmp_path / "waves.png", smooth_image())
    summary = fit(tmp_path, path, "--max_steps", "8", "--lr", "0.02", "--mlp_lr", "0.004",
                  "--ckpt_every", "4")
    groups = torch.load(summary["checkpoint"], weights_only=True)["optimizer_states"][0][
        "param_groups"]
    # groups: MLP weights, tables, MLP biases; only the weights are L2-regularised
    assert [len(g["params"]) for g in groups] == [3, 1, 3]
    assert [g["weight_decay"] for g in groups] == [1e-6, 0.0, 0.0]
    # the last step (index 7 of 8) ran at progress 7/8; step 4's checkpoint at 3/8
    assert [g["lr"] for g in groups] == [pytest.approx(train.learning_rate(base, 7 / 8))
                                         for base in (0.004, 0.02, 0.004)]
    halfway = torch.load(os.path.join(summary["log_dir"], "checkpoints", "step=4.ckpt"),
                         weights_only=True)["optimizer_states"][0]["param_groups"]
    assert [g["lr"] for g in halfway] == [0.004, 0.02, 0.004]


# --- config files, loggers, the PSNR plot, the last line ---------------------------------------

def test_config_yaml_repeats_the_run_and_the_command_line_wins(tmp_path, capsys):
    path = save_png(tmp_path / "waves.png", smooth_image())
    first = fit(tmp_path, path, "--max_steps", "12", "--val_every", "6", "--lr", "0.02",
                "--finest_resolution", "40,24", "--logger", "csv")
    written = os.path.join(first["log_dir"], "config.yaml")
    config = yaml.safe_load(open(written))
    # every flag, with what the defaults resolved to
    assert set(config) == set(vars(train.build_parser().parse_args([]))) - {"config"}
    assert (config["batch_size"], config["max_steps"], config["lr"], config["accelerator"],
            config["finest_resolution"], config["logger"], config["visualize"]) == \
        (4096, 12, 0.02, "cpu", [40, 24], ["csv"], False)
    again = train.main(["--config", written])
    assert again["log_dir"] != first["log_dir"]                    # a new version_N
    assert open(os.path.join(again["log_dir"], "config.yaml")).read() == open(written).read()
    saved = [torch.load(s["checkpoint"], weights_only=True)["state_dict"] for s in (first, again)]
    for key, value in saved[0].items():
        assert torch.equal(saved[1][key], value), key              # the same run, exactly
    assert again["psnr"] == first["psnr"]
    # a flag on the command line wins over the file
    shorter = train.main(["--config", written, "--max_steps", "6"])
    assert shorter["steps"] == 6
    assert yaml.safe_load(open(os.path.join(shorter["log_dir"], "config.yaml")))["max_steps"] == 6


def test_config_mistakes_are_one_line_errors(tmp_path, capsys):
    config = tmp_path / "run.yaml"
    root = ["--root", str(tmp_path / "logs")]
    config.write_text("max_steps: 5\nlrr: 0.1\n")
    expect_usage_error(capsys, ["--config", str(config), *root],
                       f"--config {config}: unknown key 'lrr' (not a train.py flag)")
    config.write_text("lr: abc\n")
    expect_usage_error(capsys, ["--config", str(config), *root],
                       "argument --lr: invalid float value: 'abc'")
    config.write_text("- a list\n- of things\n")
    expect_usage_error(capsys, ["--config", str(config), *root],
                       "expected flag: value lines, got a list")
    config.write_text("lr: [unclosed\n")
    expect_usage_error(capsys, ["--config", str(config), *root], f"--config {config}: ")
    expect_usage_error(capsys, ["--config", str(tmp_path / "none.yaml"), *root],
                       "No such file or directory")
    assert not os.path.exists(tmp_path / "logs")


@pytest.mark.parametrize("name", ["wandb", "mlflow"])
def test_a_logger_without_its_package_names_the_pip_command(capsys, monkeypatch, name):
    monkeypatch.setitem(sys.modules, name, None)            # import fails as if not installed
    expect_usage_error(capsys, ["--logger", f"csv,{name}"],
                       f"argument --logger: {name}: the {name} package is not installed "
                       f"(pip install {name})")
    expect_usage_error(capsys, ["--logger", "csv,bogus"],
                       "expected one or several of csv,tensorboard,wandb,mlflow, got 'csv,bogus'")


def test_tensorboard_receives_the_previews_as_images(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    source = smooth_image()
    path = save_png(tmp_path / "waves.png", source)
    summary = fit(tmp_path, path, "--max_steps", "4", "--visualize",
                  "--logger", "csv,tensorboard")
    events = EventAccumulator(summary["log_dir"], size_guidance={"images": 0})
    events.Reload()
    logged = events.Images("preview")
    assert [event.step for event in logged] == [1, 2, 4]
    for event in logged:          # the very pictures written to previews/
        picture = np.asarray(Image.open(io.BytesIO(event.encoded_image_string)))
        on_disk = np.asarray(Image.open(os.path.join(summary["log_dir"], "previews",
                                                     f"step_{event.step:06d}.png")))
        np.testing.assert_array_equal(picture, on_disk)
    assert [s.step for s in events.Scalars("val/psnr")] == [1, 2, 3, 4]   # a tenth of the run


def test_wandb_and_mlflow_loggers_get_the_scores_and_previews(tmp_path, monkeypatch):
    pytest.importorskip("wandb", reason="wandb is not installed (requirements-dev.txt has it)")
    pytest.importorskip("mlflow", reason="mlflow is not installed (requirements-dev.txt has "
                        "mlflow-skinny)")
    from mlflow.tracking import MlflowClient
    path = save_png(tmp_path / "waves.png", smooth_image())
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "WANDB_"))}
    env.update(WANDB_MODE="offline", WANDB_SILENT="true")    # W&B without an account
    done = subprocess.run(            # a process of its own: W&B keeps a service running
        [sys.executable, os.path.join(ROOT, "train.py"), "-i", path, "--root",
         str(tmp_path / "logs"), "--accelerator", "cpu", "--batch_size", "4096", "--max_steps",
         "4", "--val_every", "2", "--logger", "wandb,mlflow", "--visualize"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    psnr = float(done.stdout.split("PSNR ")[-1].split(" dB")[0])
    log_dir = tmp_path / "logs" / "experiments" / "waves" / "version_0"
    pictures = [np.asarray(Image.open(log_dir / "previews" / f"step_{step:06d}.png"))
                for step in (1, 2, 4)]
    # MLflow's file store ROOT/mlruns: the run named as the version folder, val/psnr at each
    # validation, the very previews as artifacts
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")       # as train.py does
    client = MlflowClient(f"file:{tmp_path / 'logs' / 'mlruns'}")
    [run] = client.search_runs([client.get_experiment_by_name("experiments").experiment_id])
    assert run.data.tags["mlflow.runName"] == "waves/version_0"
    history = client.get_metric_history(run.info.run_id, "val/psnr")
    assert [m.step for m in history] == [2, 4]
    assert history[-1].value == pytest.approx(psnr, abs=0.005)
    for step, picture in zip((1, 2, 4), pictures):
        artifact = client.download_artifacts(run.info.run_id, f"preview/step_{step:06d}.png",
                                             str(tmp_path))
        np.testing.assert_array_equal(np.asarray(Image.open(artifact)), picture)
    # W&B offline: its run inside the version folder, the previews among its images
    [run_dir] = (log_dir / "wandb").glob("offline-run-*")
    media = [np.asarray(Image.open(f)) for f in (run_dir / "files" / "media" / "images").glob(
        "preview_*.png")]
    assert len(media) == 3
    assert all(any(np.array_equal(m, p) for m in media) for p in pictures)


def test_lightning_advertises_nothing(tmp_path):
    # its "Tip: ... try installing litlogger" goes to the lightning.pytorch logger in every run
    seen = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())
    lightning_log = logging.getLogger("lightning.pytorch")
    rank_zero_logs = [logging.getLogger(name) for name in (
        "lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero")]
    lightning_log.addHandler(handler)
    try:
        for log in rank_zero_logs:                   # as before quiet_lightning ever ran
            log.removeFilter(previews._not_an_advertisement)
        for quiet in (False, True):
            if quiet:
                previews.quiet_lightning()
            seen.clear()
            pl.Trainer(accelerator="cpu", logger=False, default_root_dir=tmp_path,
                       enable_progress_bar=False, enable_model_summary=False)
            assert any("GPU available" in line for line in seen)        # the handler sees it
            assert any("litlogger" in line for line in seen) is not quiet, seen
    finally:
        lightning_log.removeHandler(handler)
        previews.quiet_lightning()


def test_every_run_ends_with_a_psnr_plot_and_says_what_next(tmp_path, capsys):
    source = smooth_image()
    path = save_png(tmp_path / "waves.png", source)
    capsys.readouterr()
    summary = fit(tmp_path, path, "--max_steps", "30", "--val_every", "10")
    last = capsys.readouterr().out.strip().splitlines()[-1]
    log_dir, ckpt = summary["log_dir"], summary["checkpoint"]
    plot = os.path.join(log_dir, "psnr.png")
    assert last == (f"train.py: 30 steps, {summary['train_seconds']:.1f} s of training, PSNR "
                    f"{summary['psnr']:.2f} dB; plot {plot}; checkpoint {ckpt}; next, see the "
                    f"fit: python render.py --ckpt {ckpt} -o fit.png")
    # the plot: 1000 x 400, both panels drawn in the line colour (matplotlib's first, C0)
    picture = np.asarray(Image.open(plot).convert("RGB")).astype(int)
    assert picture.shape == (400, 1000, 3)
    line = np.abs(picture - [31, 119, 180]).sum(-1) < 60
    assert line[:, :500].sum() > 100 and line[:, 500:].sum() > 100
    # its points are the logged scores
    assert [step for step, _, _ in summary["curve"]] == [10, 20, 30]
    assert summary["curve"][-1][2] == pytest.approx(summary["psnr"])
    # and the command it suggests renders the fit
    command = last.split("see the fit: ")[1].split()
    assert command[:2] == ["python", "render.py"]
    render.main(command[2:-1] + [str(tmp_path / "fit.png")])
    field, _ = load_field(ckpt)
    np.testing.assert_array_equal(images.read_image(str(tmp_path / "fit.png")),
                                  reference_render(field, 80, 48))


def test_compile_trains_the_same_checkpoint_layout_and_reports_its_time(tmp_path, capsys):
    path = save_png(tmp_path / "waves.png", smooth_image())
    flags = ["--max_steps", "3", "--n_levels", "2", "--log2_hashmap_size", "8"]
    plain = fit(tmp_path, path, *flags)
    capsys.readouterr()
    compiled = fit(tmp_path, path, *flags, "--compile")
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert 0 < compiled["compile_seconds"] <= compiled["train_seconds"]
    assert f"(the first, compiling, {compiled['compile_seconds']:.1f} s)" in last
    keys = [list(torch.load(s["checkpoint"], weights_only=True)["state_dict"]) for s in
            (plain, compiled)]
    assert keys[0] == keys[1]                         # render.py loads it as any other
    assert compiled["psnr"] == pytest.approx(plain["psnr"], abs=0.5)


def test_mps_is_an_accelerator_choice(capsys):
    if torch.backends.mps.is_available():
        pytest.skip("this machine has an MPS device")
    expect_usage_error(capsys, ["--accelerator", "mps"],
                       "--accelerator mps: no MPS device (Apple GPU) is available to torch")


def test_default_batch_is_a_sixteenth_of_the_image():
    assert train.default_batch_size(512 * 600, "cpu") == 2 ** 14        # grace_hopper
    assert train.default_batch_size(3250 * 4333, "cpu") == 2 ** 16      # albert: the CPU's cap
    assert train.default_batch_size(3250 * 4333, "gpu") == 2 ** 18      # the GPU's cap
    assert train.default_batch_size(80 * 48, "cpu") == 2 ** 8


def test_a_time_budget_alone_is_not_cut_short_by_the_default_length():
    parser = train.build_parser()

    def length(*flags):
        return train.resolved(parser.parse_args(list(flags)), "cpu", 0, 10**6)

    assert length().max_steps == 500                                   # 5 epochs of 100
    budget = length("--max_time", "120")
    assert budget.max_steps is None and budget.val_every == train.CPU_VAL_EVERY
    assert length("--max_time", "120", "--epochs", "2").max_steps == 200
    assert length("--max_time", "120", "--max_steps", "30").max_steps == 30
