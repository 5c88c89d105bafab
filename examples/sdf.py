"""Fit a signed distance field (SDF) with encoding.py's 3-D MultiResHashGrid, a small MLP and an
eikonal loss, write its zero level set as a mesh (marching cubes) and print its error.

    python examples/sdf.py                                  # a built-in chain of three tori
    python examples/sdf.py -i bunny.obj -o bunny_sdf.ply    # your mesh (.obj or .ply)
    python examples/sdf.py --encoding frequency             # NeRF's positional encoding instead

A mesh is scaled into [0.1, 0.9]^3 (the errors' units; the output is in the input's units); its
true SDF is brute force: simplify meshes of more than a few thousand faces first. Needs torch,
numpy, scikit-image, trimesh (matplotlib for --png), shapes.py beside it, encoding.py beside it
or one folder up.
"""
import argparse
import math
import os
import sys
import time

import numpy as np
import torch
import trimesh
from skimage.measure import marching_cubes

from shapes import chain_mesh, chain_sdf, mesh_sdf, samples

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from encoding import Frequency, MultiResHashGrid  # noqa: E402  (the repository root on sys.path)


def main():
    parser = argparse.ArgumentParser(prog="sdf.py", description=__doc__.split("\n\n")[0])
    parser.error = fail                                               # one line, exit 2
    parser.add_argument("-i", "--input", help=".obj or .ply mesh (default: the built-in chain)")
    parser.add_argument("-o", "--output", help=".ply or .obj (default: INPUT_sdf.ply, sdf.ply)")
    parser.add_argument("--encoding", choices=("hashgrid", "frequency"), default="hashgrid")
    parser.add_argument("--steps", type=positive, help="default 1000, or all --seconds allows")
    parser.add_argument("--seconds", type=float, default=math.inf, help="training time")
    parser.add_argument("--batch", type=positive, default=1 << 13, help="points per step")
    parser.add_argument("--samples", type=positive, default=1 << 17, help="training points")
    parser.add_argument("--resolution", type=positive, default=256, help="marching cubes grid")
    parser.add_argument("--log2_hashmap_size", type=positive, default=19)
    parser.add_argument("--png", help="also render the output mesh to this picture")
    args = parser.parse_args()
    steps = args.steps or (math.inf if args.seconds < math.inf else 1000)
    output = args.output or (os.path.splitext(args.input)[0] + "_sdf.ply" if args.input
                             else "sdf.ply")
    if os.path.splitext(output)[1].lower() not in (".ply", ".obj"):
        fail(f"the output must be .ply or .obj, got {output!r}")
    if args.input and os.path.splitext(args.input)[1].lower() not in (".obj", ".ply"):
        fail(f"the input must be .obj or .ply, got {args.input!r}")
    if args.input and os.path.abspath(args.input) in map(os.path.abspath, (output, args.png or "")):
        fail(f"refusing to overwrite the input {args.input!r}")
    if args.png and os.path.abspath(args.png) == os.path.abspath(output):
        fail(f"--png and the output mesh are the same file {output!r}")
    torch.manual_seed(0)
    rng = np.random.default_rng(0)                        # trimesh's sampling (not np.random's)

    surface, scale, shift, sdf = chain_mesh(), 1.0, np.zeros(3), chain_sdf
    if args.input:
        try:
            surface = trimesh.load(args.input, force="mesh")
            if not len(surface.faces):
                raise ValueError("no triangles in it")
        except Exception as error:            # any reader's failure: missing, corrupt, empty
            fail(f"cannot read the mesh {args.input!r}: {error}")
        lo, hi = surface.bounds               # into [0.1, 0.9]^3, the aspect ratio kept
        scale = 0.8 / (hi - lo).max()
        shift = 0.5 - scale * (lo + hi) / 2
        triangles = torch.tensor(surface.apply_scale(scale).apply_translation(shift).triangles,
                                 dtype=torch.float32)
        sdf = lambda p: mesh_sdf(p, triangles)  # noqa: E731
    x_all, sdf_all = samples(surface, args.samples, sdf, rng)

    encoder = (MultiResHashGrid(3, n_levels=16, n_features_per_level=2, base_resolution=16,
                                finest_resolution=1024, log2_hashmap_size=args.log2_hashmap_size)
               if args.encoding == "hashgrid" else Frequency(3, n_levels=8))
    mlp = torch.nn.Sequential(torch.nn.Linear(encoder.output_dim, 64), torch.nn.Softplus(100),
                              torch.nn.Linear(64, 64), torch.nn.Softplus(100),
                              torch.nn.Linear(64, 1))
    model = torch.nn.Sequential(encoder, mlp)
    optimizer = torch.optim.Adam([{"params": encoder.parameters(), "lr": 1e-2},
                                  {"params": mlp.parameters(), "lr": 1e-3}], eps=1e-15)
    start, step = time.perf_counter(), 0
    while step < steps and time.perf_counter() - start < args.seconds:
        batch = torch.randint(len(x_all), (args.batch,))
        x = x_all[batch].requires_grad_(True)
        y = model(x).squeeze(-1)
        (grad,) = torch.autograd.grad(y.sum(), x, create_graph=True)   # d sdf / dx: (B, 3)
        loss = (y - sdf_all[batch]).abs().mean() + 0.1 * (grad.norm(dim=-1) - 1).square().mean()
        if not torch.isfinite(loss):
            sys.exit(f"sdf.py: error: the loss is {loss.item()} at step {step}")   # status 1
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        step += 1
    seconds = time.perf_counter() - start

    with torch.no_grad():                     # the error near the surface, the field on a grid
        x_eval, sdf_eval = samples(surface, 1 << 14, sdf, rng)
        error = (model(x_eval).squeeze(-1) - sdf_eval)[sdf_eval.abs() < 0.01].abs().mean().item()
        axis = torch.linspace(0, 1, max(args.resolution, 2))
        grid = torch.stack(torch.meshgrid(axis, axis, axis, indexing="ij"), -1).reshape(-1, 3)
        volume = torch.cat([model(p) for p in grid.split(1 << 16)]).reshape((len(axis),) * 3)
    if volume.min() > 0 or volume.max() < 0:
        sys.exit("sdf.py: error: the fitted field has no zero level set: train longer (--steps)")
    verts, faces, _, _ = marching_cubes(volume.numpy(), 0.0, spacing=(1 / (len(axis) - 1),) * 3)
    fitted = trimesh.Trimesh(verts, faces, process=False)
    a, b = (torch.from_numpy(mesh.sample(1 << 14, seed=rng)).float() for mesh in (fitted, surface))
    chamfer = sum(torch.cat([torch.cdist(part, q).amin(1) for part in p.split(4096)]).mean()
                  for p, q in ((a, b), (b, a))).item() / 2    # mean distance to the other set
    fitted.apply_translation(-shift).apply_scale(1 / scale)           # in the input's units
    write(output, lambda temp: fitted.export(temp, file_type=output[-3:].lower()))
    if args.png:
        write(args.png, lambda temp: render(fitted, temp))
    print(f"sdf.py: {args.encoding}, {step} steps in {seconds:.1f} s; near-surface mean |SDF "
          f"error| {error:.5f}, Chamfer distance {chamfer:.5f}; wrote {output} "
          f"({len(fitted.vertices)} vertices, {len(fitted.faces)} triangles)")


def fail(message):
    """A bad flag or file: one line on stderr, exit status 2."""
    print(f"sdf.py: error: {' '.join(str(message).split())}", file=sys.stderr)
    sys.exit(2)


def positive(text):
    if int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text}")
    return int(text)


def write(path, save):
    """save(a temporary name in path's folder), then renamed to path: all or nothing."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    temp = f"{path}.{os.getpid()}.tmp"
    try:
        save(temp)
        os.replace(temp, path)
    finally:
        if os.path.exists(temp):
            os.remove(temp)


def render(mesh, path):
    """A shaded picture of mesh (matplotlib), as PNG."""
    import matplotlib.pyplot as plt
    from mpl_toolkits.mplot3d.art3d import Poly3DCollection
    light = np.clip(mesh.face_normals @ np.array([0.3, -0.5, 0.8]), 0, 1)
    ax = plt.figure(figsize=(6, 4), dpi=150).add_subplot(projection="3d")
    ax.add_collection3d(Poly3DCollection(mesh.triangles, linewidths=0,
                                         facecolors=plt.cm.bone(0.25 + 0.7 * light)))
    centre, size = mesh.bounds.mean(0), (mesh.bounds[1] - mesh.bounds[0]).max() / 2
    ax.set(**{f"{axis}lim": (c - size, c + size) for axis, c in zip("xyz", centre)})
    ax.set_axis_off()
    plt.savefig(path, format="png", bbox_inches="tight")
    plt.close()


if __name__ == "__main__":
    main()
