"""field.py: the config as the one source of truth, checkpoints old and new, and the module
layout (no import cycles; rendering needs no Lightning)."""
import ast
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

import images
import render
import train
from conftest import ROOT, expect_error
from field import CheckpointError, FieldConfig, load_field, read_checkpoint

DATA = os.path.join(ROOT, "tests", "data")
# Written by train.py before field.py existed (commit abee873): a 20 x 12 RGB source, 3 steps of
# a 3-level hash grid (T = 2**6) + 2 x 64 MLP; its render with that code is kept beside it.
OLD_CKPT = os.path.join(DATA, "checkpoint_v1.ckpt")
OLD_SOURCE = os.path.join(DATA, "checkpoint_v1_source.png")
OLD_RENDER = os.path.join(DATA, "checkpoint_v1_render.png")
OLD_FLAGS = ["--n_levels", "3", "--log2_hashmap_size", "6", "--batch_size", "256"]


def test_config_defaults_are_the_papers_image_setup():
    config = FieldConfig(3250, 4333, 3)
    assert config.finest_resolution == [1625, 2166]          # half the image per axis
    assert (config.n_levels, config.n_features_per_level, config.log2_hashmap_size,
            config.base_resolution, config.hidden_width, config.hidden_layers) == (16, 2, 20, 16,
                                                                                  64, 2)
    # T by image size: log2(pixels / 16) rounded, within 2**19 .. 2**24
    assert [FieldConfig(w, h, 3).log2_hashmap_size for w, h in
            ((512, 600), (3250, 4333), (4096, 8192), (28359, 10725), (56718, 21450))] == [
                19, 20, 21, 24, 24]
    field = config.build()
    assert field.encoder.resolutions[-1] == (1625, 2166)
    assert [m.out_features for m in field.mlp if isinstance(m, torch.nn.Linear)] == [64, 64, 3]
    # the command line's defaults are the config's
    args = train.build_parser().parse_args([])
    assert train.field_config(args, 3250, 4333, 3) == config


def test_to_dict_keeps_only_what_the_encoding_uses_and_round_trips():
    freq = FieldConfig(10, 8, 1, enc_method="freq", n_levels=6, log2_hashmap_size=12)
    assert freq.to_dict() == dict(width=10, height=8, channels=1, enc_method="freq",
                                  hidden_width=64, hidden_layers=2, n_levels=6)
    for config in (freq, FieldConfig(10, 8, 3, finest_resolution=(40, 9)),
                   FieldConfig(10, 8, 3, enc_method="none")):
        assert FieldConfig.from_dict(config.to_dict()).to_dict() == config.to_dict()
    with pytest.raises(ValueError, match="bogus"):
        FieldConfig.from_dict(dict(width=1, height=1, channels=1, bogus=2))


def test_a_checkpoint_from_before_field_py_loads_and_renders_identically():
    field, info = load_field(OLD_CKPT)
    assert (info["width"], info["height"], info["channels"]) == (20, 12, 3)
    assert info["global_step"] == 3 and info["source"] == "src.png"
    assert info["config"] == FieldConfig(20, 12, 3, n_levels=3, log2_hashmap_size=6)
    expected = images.read_image(OLD_RENDER)
    np.testing.assert_array_equal(render.render_region(field, 20, 12), expected)


def test_a_checkpoint_from_before_field_py_resumes(tmp_path):
    source = shutil.copy(OLD_SOURCE, tmp_path / "src.png")
    summary = train.main(["-i", str(source), "--root", str(tmp_path / "logs"), "--accelerator",
                          "cpu", "--ckpt", OLD_CKPT, "--max_steps", "5", "--ckpt_every", "0",
                          *OLD_FLAGS])
    assert summary["steps"] == 5
    resumed = torch.load(summary["checkpoint"], weights_only=True)
    assert resumed["global_step"] == 5
    assert resumed["hyper_parameters"]["field"] == read_checkpoint(OLD_CKPT)[
        "hyper_parameters"]["field"]
    # the old file's "colour" hyperparameter (never read) is not written any more
    assert "colour" in read_checkpoint(OLD_CKPT)["hyper_parameters"]
    assert "colour" not in resumed["hyper_parameters"]
    # saved with two groups (tables and MLP biases together), resumed with three
    saved_groups = read_checkpoint(OLD_CKPT)["optimizer_states"][0]["param_groups"]
    assert [len(g["params"]) for g in saved_groups] == [3, 4]
    groups = resumed["optimizer_states"][0]["param_groups"]
    assert [len(g["params"]) for g in groups] == [3, 1, 3]
    assert [g["base_lr"] for g in groups] == [3e-3, 1e-2, 3e-3]
    table = resumed["state_dict"]["field.encoder.embedding.weight"]
    moments = resumed["optimizer_states"][0]["state"][groups[1]["params"][0]]["exp_avg"]
    assert moments.shape == table.shape            # the tables' Adam state came along
    # saved unfused, resumed with this device's fused Adam
    assert all(group.get("fused") is None
               for group in read_checkpoint(OLD_CKPT)["optimizer_states"][0]["param_groups"])
    assert all(group["fused"] == train.fused_adam(torch.device("cpu"))
               for group in resumed["optimizer_states"][0]["param_groups"])


def test_weights_are_checked_against_the_config_before_anything_is_built(tmp_path):
    # A tiny file whose config claims 16 levels of 2**31 rows: building it for real would need
    # 256 GiB. The shapes are compared first, on the meta device, so it fails at once.
    ckpt = torch.load(OLD_CKPT, weights_only=True)
    ckpt["hyper_parameters"]["field"].update(n_levels=16, log2_hashmap_size=31,
                                             width=10**6, height=10**6)
    crafted = tmp_path / "crafted.ckpt"
    torch.save(ckpt, crafted)
    with pytest.raises(CheckpointError, match="do not match") as error:
        load_field(str(crafted))
    assert "encoder.embedding.weight" in str(error.value) and "\n" not in str(error.value)


def project_modules():
    return sorted(name[:-3] for name in os.listdir(ROOT) if name.endswith(".py"))


def imports_of(module):
    tree = ast.parse(open(os.path.join(ROOT, module + ".py")).read())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names.add(node.module.split(".")[0])
    return names & set(project_modules())


SCRIPTS = {"train", "render", "view", "convert"}
LIBRARIES = {"cli", "encoding", "field", "hardware", "images", "keep_work", "outputs", "pixels",
             "previews", "tiles"}


def test_module_imports_run_one_way():
    graph = {module: imports_of(module) for module in project_modules()}
    assert not any("train" in deps for deps in graph.values()), graph   # nothing imports train
    assert graph["encoding"] == set()                                  # standalone
    assert {lib: graph[lib] & SCRIPTS for lib in LIBRARIES} == {lib: set() for lib in LIBRARIES}
    done, visiting = set(), []

    def visit(module):        # depth-first search for a cycle
        assert module not in visiting, f"import cycle: {' -> '.join(visiting + [module])}"
        if module not in done:
            visiting.append(module)
            for dep in graph[module]:
                visit(dep)
            visiting.pop()
            done.add(module)

    for module in graph:
        visit(module)


def test_render_runs_without_lightning():
    code = "import sys, render, field; print(any(m.startswith('lightning') for m in sys.modules))"
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert done.stdout.strip() == "False", done.stderr


def test_output_layer_stays_float32_under_autocast():
    torch.manual_seed(0)
    field = FieldConfig(width=64, height=48, channels=3, log2_hashmap_size=12).build()
    with torch.no_grad():
        field.encoder.embedding.weight.uniform_(-1, 1)
    xy = torch.rand(500, 2)
    with torch.no_grad():
        full = field(xy)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            mixed = field(xy)
            hidden = field.mlp[:-1](field.encoder(xy))
    assert hidden.dtype == torch.bfloat16 and mixed.dtype == torch.float32
    # the output layer itself ran in float32 on the bfloat16 hidden features
    output = field.mlp[-1]
    expected = hidden.double() @ output.weight.double().t() + output.bias.double()
    assert torch.allclose(mixed.double(), expected, rtol=0, atol=1e-6)
    assert torch.allclose(mixed, full, atol=0.05) and not torch.equal(mixed, full)


def test_start_at_sets_the_untrained_colour():
    torch.manual_seed(0)
    field = FieldConfig(width=64, height=48, channels=3, log2_hashmap_size=12).build()
    colour = torch.tensor([0.1, 0.4, 0.9])
    xy = torch.rand(1000, 2)
    with torch.no_grad():
        before, old_bias = field(xy), field.mlp[-1].bias.clone()
        field.start_at(colour)
        after = field(xy)
    assert torch.equal(field.mlp[-1].bias.detach(), colour)
    # the bias moves every prediction by the same amount; the fresh table (~1e-4) and the
    # random MLP leave the untrained prediction near the colour
    torch.testing.assert_close(after.double(), (before - old_bias + colour).double(),
                               atol=1e-6, rtol=0)
    assert (after - colour).abs().mean() < 0.3


class NotTensors:
    """Something a checkpoint written by train.py never holds."""

    def __init__(self):
        self.payload = [1, 2, 3]


def test_bad_checkpoints_are_one_line(tmp_path, capsys, checkpoint):
    data = open(checkpoint, "rb").read()
    cut = tmp_path / "cut.ckpt"
    cut.write_bytes(data[:len(data) // 2])
    pickled = tmp_path / "pickled.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {"field": {}}, "x": NotTensors()}, pickled)
    image = str(tmp_path / "img.png")
    images.write_image(image, np.zeros((24, 40, 3), np.uint8))
    for path, needle in ((cut, "truncated or corrupt"), (pickled, "refused")):
        for main, argv, prog in (
                (render.main, ["--ckpt", str(path), "-o", str(tmp_path / "x.png")], "render.py"),
                (train.main, ["-i", image, "--root", str(tmp_path / "logs"), "--ckpt", str(path)],
                 "train.py")):
            err = expect_error(capsys, main, argv, needle, prog=prog)
            assert str(path) in err and "Errno" not in err and "weights_only" not in err, err
    assert not (tmp_path / "x.png").exists() and not (tmp_path / "logs").exists()
