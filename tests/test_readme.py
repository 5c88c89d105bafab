"""The README works as written: every ```bash block and every ```python snippet runs, in README
order, as one shell session in a fresh copy of the repository, at a small size.

What "a small size" changes is one table (SUBSTITUTIONS) plus one rule for train.py
(TRAIN_SMALL); a section someone adds later gets the same treatment without touching this file,
and a command that cannot run here must be named in NOT_RUN with the reason.
"""
import importlib.metadata
import os
import re
import shlex
import shutil
import subprocess
import sys

import numpy as np
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# (README text, what the test runs instead), applied to every command, in this order.
SUBSTITUTIONS = [
    # installing is not the test's business: test_requirements_are_installed checks the files
    (r"pip install -r (\S+)", r"test -f \1"),
    (r"python -m pytest -q$", "python -m pytest -q --collect-only tests/test_field.py"),
    (r"--chart 65536x24576", "--chart 640x240"),               # 1.6 gigapixels
    (r"--chart 4096x4096", "--chart 256x256"),
    (r"--max_time 120", "--max_time 2"),
    (r"--epochs 10", "--max_steps 4"),                         # a resume: 2 steps more
    (r"--frames (150|60)", "--frames 3"),
    (r"--scale (8|4)\b", "--scale 2"),
    (r"--width 1024", "--width 64"),
    (r"--region_px 1200 800 1712 1312 --width 2048", "--region_px 120 80 171 131 --width 204"),
    (r"--finest_resolution 32768", "--finest_resolution 256"),
    (r"--seconds 120 --e2e_seconds 120", "--seconds 2 --e2e_seconds 2 --curve_every 2"),
    (r"--serve(?= |$)(?! *\d)", "--serve 0"),                  # any free port
    # an SDF fit of 60 s: 100 small steps (the README's flags, later on the line, win)
    (r"examples/sdf\.py --seconds 60",
     "examples/sdf.py --steps 100 --batch 1024 --samples 8192 --resolution 32 "
     "--log2_hashmap_size 12 --seconds 60"),
]
# Put right after every `train.py` (the README's own flags, later on the line, win): a tiny
# network for 2 steps.
TRAIN_SMALL = "--max_steps 2 --batch_size 1024 --n_levels 4 --log2_hashmap_size 12 --val_every 2"
# Commands (by their start) the test does not run, with the reason.
NOT_RUN = {
    "npm ci": ".ci/run installs OpenSeadragon once; a fresh copy would download it again",
    "python view.py": "serves until Ctrl-C; tests/test_view.py starts it and fetches its tiles",
    "ssh ": "needs a remote machine",
}

# The photos data/README.md asks for, as small stand-ins (size / 10 for albert).
STAND_INS = {"albert.jpg": (325, 433, 1), "tokyo.jpg": (567, 214, 3), "pano.jpg": (360, 120, 3)}


def readme():
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        return f.read()


def blocks(text):
    """[(language, code)] of the README's ```bash / ```sh / ```python blocks, in order."""
    return re.findall(r"^```(bash|sh|python)\n(.*?)^```", text, flags=re.S | re.M)


def small(command):
    """A README command as the test runs it."""
    for pattern, replacement in SUBSTITUTIONS:
        command = re.sub(pattern, replacement, command)
    return re.sub(r"(\btrain\.py\b)", r"\1 " + TRAIN_SMALL, command) \
        if re.search(r"python \S*\btrain\.py", command) and "bench/" not in command else command


def session(text, folder):
    """The README's blocks as one bash script: each command echoed first, so a failure names
    its line; each Python snippet written to a file and run with python."""
    lines = ["set -euo pipefail"]
    for index, (language, code) in enumerate(blocks(text)):
        if language == "python":
            name = f"readme_snippet_{index}.py"
            with open(os.path.join(folder, name), "w") as f:
                f.write(code)
            lines += [f"echo '+ README python snippet {index}'", f"python {name}"]
            continue
        for command in code.replace("\\\n", " ").splitlines():
            command = command.strip()
            if not command or command.startswith("#"):
                continue
            if any(command.startswith(start) for start in NOT_RUN):
                continue
            run = small(command)
            lines += [f"echo {shlex.quote('+ ' + run)}", run]
    return "\n".join(lines) + "\n"


def fresh_checkout(folder):
    """The repository's files (no logs, data or caches) in `folder`, with data/ holding the
    stand-ins for the downloads, and `python` on PATH meaning this interpreter."""
    ignore = shutil.ignore_patterns(".git", ".venv", "logs", "__pycache__", ".pytest_cache",
                                    "out", "*.npy", "data")
    shutil.copytree(ROOT, folder, ignore=ignore, dirs_exist_ok=True)
    os.makedirs(os.path.join(folder, "data"), exist_ok=True)
    for name, (width, height, channels) in STAND_INS.items():
        y, x = np.mgrid[0:height, 0:width]
        pixels = np.stack([(x * 3 + y) % 256, (y * 2) % 256, (x ^ y) % 256], -1)[..., :channels]
        Image.fromarray(pixels.astype(np.uint8).squeeze()).save(os.path.join(folder, "data", name),
                                                                 quality=90)
    bin_dir = os.path.join(folder, ".readme_bin")
    os.makedirs(bin_dir)
    with open(os.path.join(bin_dir, "python"), "w") as f:
        f.write(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    os.chmod(os.path.join(bin_dir, "python"), 0o755)
    return bin_dir


def test_every_readme_command_runs_at_a_small_size(tmp_path):
    text = readme()
    assert any(language == "bash" for language, _ in blocks(text)), "no shell block left"
    folder = str(tmp_path / "checkout")
    bin_dir = fresh_checkout(folder)
    script = session(text, folder)
    env = dict(os.environ, PATH=bin_dir + os.pathsep + os.environ["PATH"],
               PYTHONDONTWRITEBYTECODE="1")
    env.pop("HASHGRID_TEST_DEVICE", None)
    result = subprocess.run(["bash", "-c", script], cwd=folder, env=env, capture_output=True,
                            text=True, timeout=900)
    output = (result.stdout + result.stderr).replace("\r", "\n")
    assert result.returncode == 0, "a README command failed:\n" + output[-4000:]
    # what the commands promise is there
    for path in ("albert_fit.png", "albert_fit16.png", "huge.npy", "albert16.png",
                 "albert_linear.tif", "zoom.gif", "fit.dzi", "tokyo_fit.dzi", "tokyo_fit.npy",
                 "data/tokyo.npy", "data/chart.npy", "chart_small.png", "seam.png", "sdf.ply",
                 "sdf.png", "sdf_frequency.ply"):
        assert os.path.exists(os.path.join(folder, path)), path
    assert Image.open(os.path.join(folder, "albert16.png")).mode.startswith("I;16")
    assert len(os.listdir(os.path.join(folder, "frames"))) == 3


def test_readme_python_snippet_runs(capsys):
    snippet = next(code for language, code in blocks(readme()) if language == "python")
    namespace = {}
    exec(compile(snippet, "README.md", "exec"), namespace)
    # the snippet's own claims hold
    assert namespace["features"].shape == (4096, 32)
    assert namespace["sdf"].shape == (4096, 1)
    assert namespace["enc"].embedding.weight.grad is not None
    assert namespace["pano"].resolutions[-1] == (28359, 10725)
    assert namespace["big"].embedding.weight.is_meta
    assert "MultiResHashGrid(" in capsys.readouterr().out


def requirements(name):
    """Requirement names of a requirements file, following `-r` includes."""
    names = []
    with open(os.path.join(ROOT, name)) as f:
        for line in f:
            line = line.split("#")[0].strip()
            if line.startswith("-r "):
                names += requirements(line[3:].strip())
            elif line:
                names.append(re.match(r"[A-Za-z0-9_.\-]+", line)[0])
    return names


def test_requirements_are_installed_and_split():
    scripts, dev = requirements("requirements.txt"), requirements("requirements-dev.txt")
    assert "tifffile" in scripts and "pytest" not in scripts
    assert set(scripts) < set(dev) and "pytest" in dev
    for name in dev:
        importlib.metadata.version(name)          # PackageNotFoundError if missing
