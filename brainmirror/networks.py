"""The networks and the symmetry-aware masks.

Slices are canonical axial slices of shape (96, 112): axis 0 is left-right, so ``x.flip(-2)``
is the mirror image about the mid-sagittal plane.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
from torch import nn

with warnings.catch_warnings():
    # MONAI imports every installed monai.* package: beside the MONAI Deploy SDK that includes
    # Holoscan, which warns about the stack size in every process (each preparation worker too),
    # although the core never runs it. The app imports Holoscan itself first and keeps the warning.
    warnings.filterwarnings("ignore", message="Current stack size", category=RuntimeWarning)
    from monai.networks.nets import BasicUNet

SLICE_SHAPE = (96, 112)
MIRROR_AXIS = -2  # left-right axis of a (..., 96, 112) slice tensor
# Recorded in a bundle: how its U-Net sees a slice, the masks its healthy statistics were fitted with,
# and the healthy reference its maps compare a slice with.
INFERENCE = {"masks": "hemispheres", "mirror": "sealed", "reference": "restored"}


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def mirror(x: torch.Tensor) -> torch.Tensor:
    return x.flip(MIRROR_AXIS)


class Reconstructor(nn.Module):
    """2D U-Net that rebuilds masked regions from context and, optionally, the mirrored slice.

    Input channels: masked slice, mirror image of the masked slice (zeros when the mirror is
    withheld), mask. The mirror is taken after masking, so no channel shows a masked voxel: with a
    mask that never covers a voxel and its mirror, a masked voxel sees its mirror partner, and the
    network cannot copy what it has to rebuild (a lesion comes back as healthy tissue).
    """

    def __init__(self, features: tuple[int, ...] = (16, 16, 32, 64, 128, 16)):
        super().__init__()
        self.unet = BasicUNet(spatial_dims=2, in_channels=3, out_channels=1, features=features)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, use_mirror: bool | torch.Tensor = True) -> torch.Tensor:
        keep = torch.as_tensor(use_mirror, dtype=x.dtype, device=x.device).reshape(-1, 1, 1, 1)
        visible = x * (1 - mask)
        inputs = torch.cat([visible, mirror(visible) * keep, mask], dim=1)
        return self.unet(inputs)


class Restorer(nn.Module):
    """2D U-Net that returns a slice without its disorders, given the slice and its hemisphere
    reconstruction (input channels: slice, reconstruction).

    Trained on healthy slices with synthetic disorders (``disorders.py``) to return the clean slice
    and, as a second output, where the disorders were (logits of their weight map): where the slice
    departs from its mirror-informed reconstruction like a disorder, it follows the reconstruction;
    where it departs like healthy tissue (the two hemispheres' own folding), it keeps the slice. Its
    residual is therefore small in healthy tissue, which the reconstruction residual alone is not.
    Having to say where the disorders are keeps it from learning the identity.
    """

    def __init__(self, features: tuple[int, ...] = (16, 16, 32, 64, 128, 16)):
        super().__init__()
        self.unet = BasicUNet(spatial_dims=2, in_channels=2, out_channels=2, features=features)

    def restore_and_locate(self, x: torch.Tensor, reconstruction: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The restored slice and the logits of where its disorders are, each (n, 1, H, W)."""
        out = self.unet(torch.cat([x, reconstruction], dim=1))
        return out[:, :1], out[:, 1:]

    def forward(self, x: torch.Tensor, reconstruction: torch.Tensor) -> torch.Tensor:
        return self.restore_and_locate(x, reconstruction)[0]


class BetaVAE(nn.Module):
    """Convolutional Beta-VAE over difference maps with a dense latent (default 1024)."""

    def __init__(self, in_channels: int = 2, latent: int = 1024, channels: tuple[int, ...] = (16, 32, 64, 16)):
        super().__init__()
        layers, previous = [], in_channels
        for c in channels:
            layers += [nn.Conv2d(previous, c, 4, stride=2, padding=1), nn.BatchNorm2d(c), nn.LeakyReLU(0.2)]
            previous = c
        self.encoder = nn.Sequential(*layers, nn.Flatten())
        down = 2 ** len(channels)
        self.grid = (channels[-1], SLICE_SHAPE[0] // down, SLICE_SHAPE[1] // down)
        flat = int(np.prod(self.grid))
        self.mu = nn.Linear(flat, latent)
        self.logvar = nn.Linear(flat, latent)
        self.expand = nn.Linear(latent, flat)
        layers = []
        rev = list(channels[::-1]) + [channels[0]]
        for a, b in zip(rev[:-1], rev[1:]):
            layers += [nn.ConvTranspose2d(a, b, 4, stride=2, padding=1), nn.BatchNorm2d(b), nn.LeakyReLU(0.2)]
        self.decoder = nn.Sequential(*layers, nn.Conv2d(channels[0], in_channels, 3, padding=1))

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.encoder(x)
        return self.mu(h), self.logvar(h).clamp(-10, 10)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        mu, logvar = self.encode(x)
        z = mu + torch.randn_like(mu) * (0.5 * logvar).exp() if self.training else mu
        return self.decoder(self.expand(z).view(-1, *self.grid)), mu, logvar


def beta_vae_loss(recon: torch.Tensor, x: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor, beta: float) -> torch.Tensor:
    reconstruction = ((recon - x) ** 2).flatten(1).sum(1)
    kl = -0.5 * (1 + logvar - mu**2 - logvar.exp()).sum(1)
    return (reconstruction + beta * kl).mean()


def hemispheres(shape=SLICE_SHAPE) -> tuple[np.ndarray, np.ndarray]:
    """The two inference masks, one hemisphere each: the network rebuilds a hemisphere from the
    mirror image of the other one, without any tissue of the masked side.
    """
    left = np.zeros(shape, np.float32)
    left[: shape[0] // 2] = 1
    return left, left[::-1].copy()


def rebuild_hemispheres(reconstructor: Reconstructor, x: torch.Tensor, use_mirror: torch.Tensor) -> torch.Tensor:
    """Each hemisphere of ``x`` (n, 1, 96, 112) rebuilt while it is masked; ``use_mirror`` (n,) 1 or 0."""
    out = torch.zeros_like(x)
    for half in hemispheres():
        mask = torch.from_numpy(half).to(x)[None, None].expand(len(x), -1, -1, -1)
        out = out + reconstructor(x, mask, use_mirror) * mask
    return out


def checkerboard(phase: int, block: int, offset: int = 0, shape=SLICE_SHAPE) -> np.ndarray:
    """Blocks aligned on the mid-sagittal plane: the mirror of a masked block is never masked."""
    centre = shape[0] // 2
    cols = np.floor((np.arange(shape[0]) - centre) / block).astype(int)
    rows = (np.arange(shape[1]) + offset) // block
    return ((cols[:, None] + rows[None, :]) % 2 == phase).astype(np.float32)


def training_mask(rng: np.random.Generator, shape=SLICE_SHAPE) -> np.ndarray:
    """A random mask whose mirror image it never overlaps: mostly a hemisphere (the inference
    masks), otherwise checkerboards or blobs."""
    kind = rng.random()
    if kind < 0.5:
        return hemispheres(shape)[0 if rng.random() < 0.5 else 1]
    if kind < 0.75:
        return checkerboard(int(rng.integers(2)), int(rng.choice([8, 12, 16, 24])), int(rng.integers(24)), shape)
    yy, xx = np.meshgrid(np.arange(shape[1]), np.arange(shape[0]))
    mask = np.zeros(shape, bool)
    for _ in range(int(rng.integers(1, 6))):
        cx, cy = rng.uniform(0, shape[0]), rng.uniform(0, shape[1])
        ax, ay = rng.uniform(4, 24, size=2)
        mask |= ((xx - cx) / ax) ** 2 + ((yy - cy) / ay) ** 2 <= 1
    return (mask & ~mask[::-1]).astype(np.float32)
