"""examples/: each runs as documented, at a small size, and its printed error is small."""
import os
import re
import subprocess
import sys

import pytest
import torch
import trimesh          # examples/requirements.txt, part of requirements-dev.txt

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SDF = os.path.join(ROOT, "examples", "sdf.py")
SMALL = ["--steps", "200", "--batch", "1024", "--samples", "16384", "--resolution", "40",
         "--log2_hashmap_size", "14"]
sys.path.insert(0, os.path.join(ROOT, "examples"))
import shapes  # noqa: E402


def run_sdf(*args, cwd):
    return subprocess.run([sys.executable, SDF, *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300)


def errors(stdout):
    """(near-surface mean |SDF error|, Chamfer distance) from sdf.py's last line."""
    match = re.search(r"mean \|SDF error\| ([\d.]+), Chamfer distance ([\d.]+)", stdout)
    assert match, stdout
    return float(match[1]), float(match[2])


def box_sdf(p, half):
    q = p.abs() - half
    return q.clamp_min(0).norm(dim=-1) + q.amax(-1).clamp_max(0)


def test_mesh_sdf_is_exact_on_a_box_either_orientation():
    box = trimesh.creation.box(extents=(0.6, 0.3, 0.4))
    p = torch.rand(3000, 3, dtype=torch.float64) - 0.5
    expected = box_sdf(p, torch.tensor([0.3, 0.15, 0.2], dtype=torch.float64))
    for triangles in (box.triangles, box.triangles[:, ::-1]):        # flipped faces too
        got = shapes.mesh_sdf(p, torch.tensor(triangles.copy()), chunk=1 << 12)
        torch.testing.assert_close(got, expected, atol=1e-12, rtol=0)


def test_chain_sdf_is_exact():
    """Points at distance t along the normal of a torus' surface point: SDF t (the tubes are
    0.02 apart at the closest, so within 0.009 no other link is nearer)."""
    u, v = torch.rand(2, 4000, dtype=torch.float64) * 2 * torch.pi
    t = (torch.rand(4000, 1, dtype=torch.float64) - 0.5) * 0.018
    for centre, axis in shapes.TORI:
        axis = torch.tensor(axis, dtype=torch.float64)
        e1 = torch.tensor([1.0, 0, 0], dtype=torch.float64)       # every axis is normal to x
        e2 = torch.linalg.cross(axis, e1)
        ring = torch.cos(u)[:, None] * e1 + torch.sin(u)[:, None] * e2
        normal = torch.cos(v)[:, None] * ring + torch.sin(v)[:, None] * axis
        points = torch.tensor(centre, dtype=torch.float64) + shapes.R * ring + shapes.r * normal
        torch.testing.assert_close(shapes.chain_sdf(points + t * normal), t[:, 0], atol=1e-6, rtol=0)
    mesh = shapes.chain_mesh()                # the tessellation sampled in training: close
    assert shapes.chain_sdf(torch.tensor(mesh.vertices)).abs().max() < 1e-6
    assert shapes.chain_sdf(torch.tensor(mesh.sample(10000))).abs().max() < 1e-4


def test_sdf_example_fits_the_built_in_chain(tmp_path):
    result = run_sdf(*SMALL, "-o", "out/chain.ply", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    error, chamfer = errors(result.stdout)
    # the tubes are 0.04 thick; 200 steps get the surface within a few thousandths
    assert error < 0.01 and chamfer < 0.01, result.stdout
    mesh = trimesh.load(tmp_path / "out" / "chain.ply")
    assert len(mesh.faces) > 500
    assert abs(shapes.chain_sdf(torch.tensor(mesh.vertices)).float()).mean() < 0.01
    assert os.listdir(tmp_path / "out") == ["chain.ply"]       # no temporary file left


def test_sdf_example_fits_a_mesh_in_its_units(tmp_path):
    ball = trimesh.creation.icosphere(subdivisions=3, radius=2.0)          # 1280 triangles
    ball.apply_translation((10, 0, 0))
    ball.export(tmp_path / "ball.obj")
    before = (tmp_path / "ball.obj").read_bytes()
    result = run_sdf("-i", "ball.obj", *SMALL, "--png", "ball.png", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    error, chamfer = errors(result.stdout)
    assert error < 0.01 and chamfer < 0.01, result.stdout      # in [0.1, 0.9]^3 units
    fitted = trimesh.load(tmp_path / "ball_sdf.ply")          # the default output name
    # in the input's units (5 per unit of the [0.1, 0.9]^3 cube): on the ball, within the
    # 1280-triangle tessellation (0.01 deep) and the fit
    radius = (torch.tensor(fitted.vertices) - torch.tensor([10.0, 0, 0], dtype=torch.float64)
              ).norm(dim=-1)
    assert (radius - 2).abs().median() < 0.05, radius
    assert (tmp_path / "ball.obj").read_bytes() == before
    assert (tmp_path / "ball.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("args, message", [
    (["-i", "missing.obj"], "cannot read the mesh 'missing.obj'"),
    (["-i", "bad.obj"], "cannot read the mesh 'bad.obj'"),
    (["-i", "shape.stl"], "the input must be .obj or .ply"),
    (["-i", "bad.obj", "-o", "bad.obj"], "refusing to overwrite the input"),
    (["-o", "out.png"], "the output must be .ply or .obj"),
    (["-o", "out.ply", "--png", "out.ply"], "--png and the output mesh are the same file"),
    (["--steps", "0"], "expected an integer >= 1"),
    (["--encoding", "fourier"], "invalid choice"),
])
def test_sdf_example_bad_flags_and_files(tmp_path, args, message):
    (tmp_path / "bad.obj").write_text("this is not a mesh\n")
    result = run_sdf(*args, cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.startswith("sdf.py: error: ") and message in result.stderr
    assert result.stderr.count("\n") == 1, result.stderr
    assert (tmp_path / "bad.obj").read_text() == "this is not a mesh\n"
