"""examples/sdf.py's data: the shapes it fits, their true signed distances (negative inside),
and the points it trains and checks on.

chain_sdf, chain_mesh: a built-in chain of three linked tori, its exact SDF and a fine mesh of it
(to sample its surface by area). mesh_sdf: any triangle mesh's SDF by brute force, O(points x
faces): the distance to its triangles, signed by the generalized winding number (robust to
small holes and flipped faces). samples: points near a surface and anywhere, with their SDF.
"""
import math

import torch
import trimesh

# The chain: tori (centre, axis), ring radius R, tube radius r. Links 0.22 apart are linked
# (0.22 < 2R - 2r) and never touch (0.22 > R + r; the tubes are 0.02 apart at the closest),
# so the min of their exact SDFs is the exact SDF.
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
    """The chain as a fine triangle mesh (trimesh.Trimesh)."""
    return trimesh.util.concatenate([
        trimesh.creation.torus(R, r, major_sections=256, minor_sections=64)
        .apply_transform(trimesh.geometry.align_vectors((0, 0, 1), axis))
        .apply_translation(centre) for centre, axis in TORI])


def mesh_sdf(p, triangles, chunk=1 << 21):
    """p: (N, 3), triangles: (F, 3, 3) -> (N,) signed distance to the mesh, negative inside;
    chunk: points x faces per pass (memory)."""
    out = []
    for points in p.split(max(chunk // len(triangles), 1)):
        a, b, c = (triangles[None, :, i] - points[:, None] for i in range(3))   # (n, F, 3)
        edges = ((a, b), (b, c), (c, a))
        # winding number: the triangles' solid angles seen from the point (Van Oosterom &
        # Strackee) over 4 pi; about 1 inside a closed surface (-1 if its faces are flipped)
        la, lb, lc = a.norm(dim=-1), b.norm(dim=-1), c.norm(dim=-1)
        det = (a * torch.cross(b, c, dim=-1)).sum(-1)
        den = la * lb * lc + (a * b).sum(-1) * lc + (b * c).sum(-1) * la + (c * a).sum(-1) * lb
        inside = torch.atan2(det, den).sum(1).abs() / (2 * math.pi) > 0.5
        # distance: to the plane where the point projects into the triangle, else to the edges
        n = torch.cross(b - a, c - a, dim=-1)
        sides = torch.stack([(n * torch.cross(u, v, dim=-1)).sum(-1) for u, v in edges])
        within = (sides >= 0).all(0) | (sides <= 0).all(0)
        plane = (a * n).sum(-1).abs() / n.norm(dim=-1)
        edge = torch.stack([(u - (u * (v - u)).sum(-1, keepdim=True).div(
            (v - u).square().sum(-1, keepdim=True).clamp_min(1e-30)).clamp(-1, 0) * (v - u))
            .norm(dim=-1) for u, v in edges]).amin(0)
        dist = torch.where(within & (plane < edge), plane, edge).amin(1)
        out.append(torch.where(inside, -dist, dist))
    return torch.cat(out)


def samples(surface, n, sdf, rng):
    """surface: a trimesh.Trimesh in [0, 1]^3, sdf: its true SDF, rng: numpy's, for trimesh ->
    (x (n, 3), sdf(x) (n,)): half within ~0.01 of the surface, a quarter within ~0.05, a quarter
    anywhere in [0, 1]^3."""
    near = torch.from_numpy(surface.sample(n - n // 4, seed=rng)).float()
    noise = torch.where(torch.arange(len(near))[:, None] < n // 2, 0.01, 0.05)
    x = torch.cat([(near + torch.randn_like(near) * noise).clamp(0, 1), torch.rand(n // 4, 3)])
    return x, sdf(x)
