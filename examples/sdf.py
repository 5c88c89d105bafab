"""Fit a signed distance field (SDF) with encoding.py's 3-D MultiResHashGrid, a small MLP and an
eikonal loss, write its zero level set as a mesh (marching cubes) and print its error.

    python examples/sdf.py                                  # a built-in chain of three tori
    python examples/sdf.py -i bunny.obj -o bunny_sdf.ply    # your mesh (.obj or .ply)
    python examples/sdf.py --encoding frequency             # NeRF's positional encoding instead

The ground truth is exact for the built-in shape; for a mesh it is the distance to its
triangles, negative where the generalized winding number says "inside" (robust to small holes
and flipped faces), by brute force: O(points x faces), so simplify meshes of more than a few
thousand faces first. A mesh is scaled into [0.1, 0.9]^3 to fit (errors are in those units);
the output mesh is in the input's units. Needs torch, numpy, scikit-image and trimesh (and
matplotlib for --png); copy it next to encoding.py, or run it from the repository root.
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

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from encoding import Frequency, MultiResHashGrid  # noqa: E402  (the repository root on sys.path)

# The built-in shape: a chain of three tori (centre, axis), ring radius R, tube radius r. Links
# 0.22 apart are linked (0.22 < 2R - 2r) and never touch (0.22 > R + r; the tubes are 0.02 apart
# at the closest), so the min of their exact SDFs is the exact SDF.
TORI, R, r = [((0.28, 0.5, 0.5), (0, 0, 1)), ((0.5, 0.5, 0.5), (0, 1, 0)),
              ((0.72, 0.5, 0.5), (0, 0, 1))], 0.16, 0.04


def chain_sdf(p):
    """p: (N, 3) -> (N,) the exact signed distance to the chain."""
    dists = []
    for centre, axis in TORI:
        q, n = p - torch.tensor(centre), torch.tensor(axis, dtype=p.dtype)
        height = q @ n
        dists.append(torch.hypot((q - height[:, None] * n).norm(dim=-1) - R, height) - r)
    return torch.stack(dists).amin(0)


def chain_mesh():
    """The chain as a fine triangle mesh (to sample its surface by area)."""
    parts = [trimesh.creation.torus(R, r, major_sections=256, minor_sections=64)
             .apply_transform(trimesh.geometry.align_vectors((0, 0, 1), axis))
             .apply_translation(centre) for centre, axis in TORI]
    return trimesh.util.concatenate(parts)


def mesh_sdf(p, triangles, chunk=1 << 21):
    """p: (N, 3), triangles: (F, 3, 3) -> (N,) signed distance to the mesh, negative inside."""
    out = []
    for points in p.split(max(chunk // len(triangles), 1)):
        a, b, c = (triangles[None, :, i] - points[:, None] for i in range(3))   # (n, F, 3)
        # winding number: the triangles' solid angles seen from the point (Van Oosterom &
        # Strackee) over 4 pi; about 1 inside a closed surface (-1 if its faces are flipped)
        la, lb, lc = a.norm(dim=-1), b.norm(dim=-1), c.norm(dim=-1)
        det = (a * torch.cross(b, c, dim=-1)).sum(-1)
        den = la * lb * lc + (a * b).sum(-1) * lc + (b * c).sum(-1) * la + (c * a).sum(-1) * lb
        inside = torch.atan2(det, den).sum(1).abs() / (2 * math.pi) > 0.5
        # distance: to the plane where the point projects into the triangle, else to the edges
        n = torch.cross(b - a, c - a, dim=-1)
        sides = torch.stack([(n * torch.cross(u, v, dim=-1)).sum(-1)
                             for u, v in ((a, b), (b, c), (c, a))])
        within = (sides >= 0).all(0) | (sides <= 0).all(0)
        plane = (a * n).sum(-1).abs() / n.norm(dim=-1)
        edge = torch.stack([(u - (u * (v - u)).sum(-1, keepdim=True).div(
            (v - u).square().sum(-1, keepdim=True).clamp_min(1e-30)).clamp(-1, 0) * (v - u))
            .norm(dim=-1) for u, v in ((a, b), (b, c), (c, a))]).amin(0)
        dist = torch.where(within & (plane < edge), plane, edge).amin(1)
        out.append(torch.where(inside, -dist, dist))
    return torch.cat(out)


def samples(surface, n, sdf):
    """n points, half within ~0.01 of the surface, a quarter within ~0.05, a quarter anywhere
    -> (points (n, 3), their true SDF (n,))."""
    near = torch.from_numpy(surface.sample(n - n // 4)).float()
    noise = torch.where(torch.arange(len(near))[:, None] < n // 2, 0.01, 0.05)
    x = torch.cat([(near + torch.randn_like(near) * noise).clamp(0, 1), torch.rand(n // 4, 3)])
    return x, sdf(x)


def chamfer(a, b):
    """a (N, 3), b (M, 3): the mean distance from each point to the other set, both ways."""
    def nearest(p, q):
        return torch.cat([torch.cdist(chunk, q).amin(1) for chunk in p.split(4096)]).mean()
    return (0.5 * (nearest(a, b) + nearest(b, a))).item()


def fail(message, status=2):
    """One line on stderr and the exit status: 2 for a bad flag or file, 1 for a failed fit."""
    print(f"sdf.py: error: {' '.join(str(message).split())}", file=sys.stderr)
    sys.exit(status)


def positive(text):
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value}")
    return value


def main():
    parser = argparse.ArgumentParser(prog="sdf.py",
                                     description=__doc__.split("\n\n")[0].replace("\n", " "))
    parser.error = fail                                               # one line, exit 2
    parser.add_argument("-i", "--input", help=".obj or .ply mesh (default: the built-in chain)")
    parser.add_argument("-o", "--output", help=".ply or .obj (default: INPUT_sdf.ply, sdf.ply)")
    parser.add_argument("--encoding", choices=("hashgrid", "frequency"), default="hashgrid")
    parser.add_argument("--steps", type=positive, help="training steps (default: 1000, or "
                        "as many as --seconds allows)")
    parser.add_argument("--seconds", type=float, default=math.inf, help="training time")
    parser.add_argument("--batch", type=positive, default=1 << 13, help="points per step")
    parser.add_argument("--samples", type=positive, default=1 << 17, help="training points")
    parser.add_argument("--resolution", type=positive, default=256, help="marching cubes grid")
    parser.add_argument("--log2_hashmap_size", type=positive, default=19)
    parser.add_argument("--png", help="also render the output mesh to this picture")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    steps = args.steps or (math.inf if args.seconds < math.inf else 1000)
    output = args.output or (os.path.splitext(args.input)[0] + "_sdf.ply" if args.input
                             else "sdf.ply")
    if os.path.splitext(output)[1].lower() not in (".ply", ".obj"):
        fail(f"the output must be .ply or .obj, got {output!r}")
    if args.png and not args.png.lower().endswith(".png"):
        fail(f"--png must name a .png file, got {args.png!r}")
    if args.input and os.path.abspath(args.input) in map(os.path.abspath, (output, args.png or "")):
        fail(f"refusing to overwrite the input {args.input!r}")
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)                                         # trimesh's sampling

    if args.input:
        if os.path.splitext(args.input)[1].lower() not in (".obj", ".ply"):
            fail(f"the input must be .obj or .ply, got {args.input!r}")
        try:
            surface = trimesh.load(args.input, force="mesh")
            if not len(surface.faces):
                raise ValueError("no triangles in it")
        except Exception as error:            # any reader's failure: missing, corrupt, empty
            fail(f"cannot read the mesh {args.input!r}: {error}")
        lo, hi = surface.bounds               # into [0.1, 0.9]^3, the aspect ratio kept
        scale = 0.8 / (hi - lo).max()
        shift = 0.5 - scale * (lo + hi) / 2
        surface.apply_scale(scale).apply_translation(shift)
        triangles = torch.tensor(surface.triangles, dtype=torch.float32)
        sdf = lambda p: mesh_sdf(p, triangles)  # noqa: E731
    else:
        surface, scale, shift, sdf = chain_mesh(), 1.0, np.zeros(3), chain_sdf
    x_all, sdf_all = samples(surface, args.samples, sdf)

    if args.encoding == "hashgrid":          # 16 levels from 16 to 1024 cells per axis
        encoder = MultiResHashGrid(3, n_levels=16, n_features_per_level=2, base_resolution=16,
                                   finest_resolution=1024, log2_hashmap_size=args.log2_hashmap_size)
    else:
        encoder = Frequency(3, n_levels=8)
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
            fail(f"the loss is {loss.item()} at step {step}", 1)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        step += 1
    seconds = time.perf_counter() - start

    with torch.no_grad():                     # the error near the surface, the field on a grid
        x_eval, sdf_eval = samples(surface, 1 << 14, sdf)
        error = (model(x_eval).squeeze(-1) - sdf_eval)[sdf_eval.abs() < 0.01].abs().mean().item()
        axis = torch.linspace(0, 1, max(args.resolution, 2))
        grid = torch.stack(torch.meshgrid(axis, axis, axis, indexing="ij"), -1).reshape(-1, 3)
        volume = torch.cat([model(p) for p in grid.split(1 << 16)]).reshape((len(axis),) * 3)
    try:                                      # the zero level set
        verts, faces, _, _ = marching_cubes(volume.numpy(), 0.0, spacing=(1 / (len(axis) - 1),) * 3)
    except ValueError:                        # no zero crossing in the volume
        fail("the fitted field has no zero level set: train longer (--steps)", 1)
    fitted = trimesh.Trimesh(verts, faces, process=False)
    distance = chamfer(torch.from_numpy(fitted.sample(1 << 14)).float(),
                       torch.from_numpy(surface.sample(1 << 14)).float())
    fitted.apply_translation(-shift).apply_scale(1 / scale)           # in the input's units
    write(output, lambda f: fitted.export(f, file_type=output[-3:].lower()))
    if args.png:
        write(args.png, lambda f: render(fitted, f))
    print(f"sdf.py: {args.encoding}, {step} steps in {seconds:.1f} s; near-surface mean |SDF "
          f"error| {error:.5f}, Chamfer distance {distance:.5f}; wrote {output} "
          f"({len(fitted.vertices)} vertices, {len(fitted.faces)} triangles)")


def write(path, save):
    """save(temporary path), then renamed to path: all or nothing."""
    folder, name = os.path.split(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    temp = os.path.join(folder, f".{name}.{os.getpid()}.tmp")
    try:
        save(temp)
        os.replace(temp, path)
    finally:
        if os.path.exists(temp):
            os.remove(temp)


def render(mesh, path):
    """A shaded picture of mesh (matplotlib)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from mpl_toolkits.mplot3d.art3d import Poly3DCollection
    light = np.clip(mesh.face_normals @ np.array([0.3, -0.5, 0.8]) / 1.0, 0, 1)
    fig = plt.figure(figsize=(6, 4), dpi=150)
    ax = fig.add_subplot(projection="3d")
    ax.add_collection3d(Poly3DCollection(mesh.triangles, facecolors=plt.cm.bone(0.25 + 0.7 * light),
                                         linewidths=0))
    centre, size = mesh.bounds.mean(0), (mesh.bounds[1] - mesh.bounds[0]).max() / 2
    ax.set(xlim=centre[0] + [-size, size], ylim=centre[1] + [-size, size],
           zlim=centre[2] + [-size, size])
    ax.set_axis_off()
    fig.savefig(path, format="png", bbox_inches="tight")
    plt.close(fig)


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        fail("interrupted; nothing written", 130)
