"""FractalDB-style formula-driven images (Kataoka et al.): each class is an iterated function system (IFS)
of 2-4 random contractive affine maps; an instance is a chaos-game rendering of its class's IFS with the
parameters slightly perturbed, at a random rotation, scale, position and colour.

Everything is vectorised in torch over the batch and the points, so it runs on the GPU when there is one
and images never touch the disk.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class IFSCodes:
    """Class codes: ``maps[c, m]`` = (a, b, c, d, e, f) of x' = a x + b y + e, y' = c x + d y + f;
    ``probs[c, m]`` the chaos game's map probabilities (0 for the padding maps of smaller systems)."""

    maps: torch.Tensor  # C x M x 6
    probs: torch.Tensor  # C x M

    def to(self, device: torch.device) -> "IFSCodes":
        return IFSCodes(self.maps.to(device), self.probs.to(device))


def _random_systems(n: int, max_maps: int, g: torch.Generator) -> IFSCodes:
    maps = torch.rand(n, max_maps, 6, generator=g) * 2 - 1
    A = maps[..., :4].reshape(n, max_maps, 2, 2)
    # Rescale each linear part to a spectral norm in [0.3, 0.85]: contractive, so the attractor exists.
    norm = torch.linalg.matrix_norm(A, ord=2).clamp_min(1e-6)
    target = 0.3 + 0.55 * torch.rand(n, max_maps, generator=g)
    A = A * (target / norm)[..., None, None]
    maps = torch.cat([A.reshape(n, max_maps, 4), maps[..., 4:]], dim=-1)
    k = torch.randint(2, max_maps + 1, (n,), generator=g)
    used = torch.arange(max_maps)[None] < k[:, None]
    det = (A[..., 0, 0] * A[..., 1, 1] - A[..., 0, 1] * A[..., 1, 0]).abs()
    probs = (det + 0.03) * used
    return IFSCodes(maps, probs / probs.sum(-1, keepdim=True))


def chaos_points(maps: torch.Tensor, probs: torch.Tensor, points: int, iters: int, g: torch.Generator | None,
                 burn_in: int = 6) -> torch.Tensor:
    """Run the chaos game for a batch of systems (B x M x 6, B x M): returns B x (points * iters) x 2."""
    B = maps.shape[0]
    dev = maps.device
    xy = torch.rand(B, points, 2, device=dev, generator=g) * 2 - 1
    out = []
    for t in range(burn_in + iters):
        idx = torch.multinomial(probs, points, replacement=True, generator=g)  # B x P
        m = torch.gather(maps, 1, idx[..., None].expand(-1, -1, 6))  # B x P x 6
        x, y = xy[..., 0], xy[..., 1]
        xy = torch.stack([m[..., 0] * x + m[..., 1] * y + m[..., 4], m[..., 2] * x + m[..., 3] * y + m[..., 5]], -1)
        if t >= burn_in:
            out.append(xy)
    return torch.cat(out, 1)


def rasterise(pts: torch.Tensor, size: int, scale: torch.Tensor | None = None,
              shift: torch.Tensor | None = None) -> torch.Tensor:
    """Points (B x N x 2) -> density images (B x size x size) in [0, 1], each fitted to its own bounding box."""
    B, N, _ = pts.shape
    lo = pts.amin(1, keepdim=True)
    hi = pts.amax(1, keepdim=True)
    span = (hi - lo).amax(-1, keepdim=True).clamp_min(1e-6)
    unit = (pts - (lo + hi) / 2) / span  # in [-0.5, 0.5], aspect kept
    if scale is not None:
        unit = unit * scale[:, None, None]
    if shift is not None:
        unit = unit + shift[:, None, :]
    pix = ((unit + 0.5) * size).long()
    ok = (pix >= 0).all(-1) & (pix < size).all(-1)
    flat = (torch.arange(B, device=pts.device)[:, None] * size * size + pix[..., 1] * size + pix[..., 0])
    counts = torch.zeros(B * size * size, device=pts.device)
    counts.index_add_(0, flat[ok], torch.ones(int(ok.sum()), device=pts.device))
    img = counts.view(B, size, size)
    # log density, normalised per image: thin and dense fractals both stay visible
    img = torch.log1p(img)
    return img / img.flatten(1).amax(1).clamp_min(1e-6)[:, None, None]


def make_codes(classes: int, seed: int, max_maps: int = 4, min_fill: float = 0.12, device: str = "cpu") -> IFSCodes:
    """``classes`` IFS codes; systems whose attractor is nearly a point or a line (fill < ``min_fill``
    of a 32 x 32 raster) are rejected, as FractalDB filters by filling rate."""
    g = torch.Generator().manual_seed(seed)
    kept_maps, kept_probs, have = [], [], 0
    for _ in range(50):
        cand = _random_systems(max(4 * classes, 64), max_maps, g)
        pts = chaos_points(cand.maps, cand.probs, 256, 8, g)
        fill = (rasterise(pts, 32) > 0).float().mean((1, 2))
        good = fill >= min_fill
        kept_maps.append(cand.maps[good])
        kept_probs.append(cand.probs[good])
        have += int(good.sum())
        if have >= classes:
            break
    maps = torch.cat(kept_maps)[:classes]
    probs = torch.cat(kept_probs)[:classes]
    if maps.shape[0] < classes:
        raise RuntimeError(f"could only find {maps.shape[0]} non-degenerate IFS codes of {classes}")
    return IFSCodes(maps, probs).to(torch.device(device))


def render_density(codes: IFSCodes, labels: torch.Tensor, size: int, g: torch.Generator | None = None,
                   points: int = 384, iters: int = 12, perturb: float = 0.06, max_rotation: float = 0.3) -> torch.Tensor:
    """Density maps (B x size x size, in [0, 1]) of new instances of the classes ``labels``."""
    dev = codes.maps.device
    B = labels.shape[0]
    maps = codes.maps[labels].clone()
    # instance variation: jitter every parameter of the class code a little (FractalDB's "instances")
    maps = maps * (1 + perturb * (torch.rand(maps.shape, device=dev, generator=g) * 2 - 1))
    probs = codes.probs[labels]
    # small rotations (radians, +-max_rotation) and flips as augmentation; FractalDB itself uses flips only,
    # and full rotations made the classes much harder to learn in short (CPU) pretraining runs
    theta = (torch.rand(B, device=dev, generator=g) * 2 - 1) * max_rotation
    pts = chaos_points(maps, probs, points, iters, g)
    c, s = torch.cos(theta)[:, None], torch.sin(theta)[:, None]
    flip = torch.where(torch.rand(B, device=dev, generator=g) < 0.5, -1.0, 1.0)[:, None]
    x, y = pts[..., 0] * flip, pts[..., 1]
    pts = torch.stack([c * x - s * y, s * x + c * y], -1)
    scale = 0.75 + 0.25 * torch.rand(B, device=dev, generator=g)
    shift = (torch.rand(B, 2, device=dev, generator=g) * 2 - 1) * (1 - scale[:, None]) / 2
    return rasterise(pts, size, scale, shift)  # B x H x W


def colourise(dens: torch.Tensor, g: torch.Generator | None = None) -> torch.Tensor:
    """Density maps (B x H x W) -> float images (B x 3 x H x W, in [0, 1]): a random foreground colour on a
    random dark background, so colour carries no class information."""
    B, dev = dens.shape[0], dens.device
    fg = 0.4 + 0.6 * torch.rand(B, 3, 1, 1, device=dev, generator=g)
    bg = 0.3 * torch.rand(B, 3, 1, 1, device=dev, generator=g)
    img = bg + (fg - bg) * dens[:, None]
    return img.clamp(0, 1)


def render_batch(codes: IFSCodes, labels: torch.Tensor, size: int, g: torch.Generator | None = None,
                 points: int = 384, iters: int = 12, perturb: float = 0.06, max_rotation: float = 0.3) -> torch.Tensor:
    """Float images (B x 3 x size x size, in [0, 1]) of the classes ``labels``, each a new instance."""
    return colourise(render_density(codes, labels, size, g, points, iters, perturb, max_rotation), g)
