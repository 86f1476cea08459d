"""The native organism's image tokenizer: Chameleon's own VQ-VAE, trained as an autoencoder.

Chameleon ships only the encoder half of its VQ-GAN (``ChameleonVQVAE``: encoder, ``quant_conv``,
codebook, ``post_quant_conv``). We train that module together with a small convolutional decoder
to reconstruct the training images, then keep the encoder and codebook (the decoder is only a
training device and is dropped). Dead codebook entries are restarted on encoder outputs, so the
codebook stays in use. 64 x 64 pixels become 8 x 8 = 64 discrete codes by default (three 2x
downsamplings); `codes_side` gives the other square sizes (4 x 4 = 16 codes: four downsamplings).
"""

from __future__ import annotations

import math

import torch
from torch import nn
from transformers import ChameleonVQVAEConfig

from ..compat import ChameleonVQVAE
from ..errors import OptionError
from .common import Phase, batches, run_phase

RESOLUTION = 64
DOWNSAMPLE = 8


def codes_side(image_tokens: int) -> int:
    """The side of the square code grid of ``image_tokens`` codes (4, 16, 64, 256 or 1,024 on 64 px images)."""
    side = math.isqrt(image_tokens)
    if side * side != image_tokens or side < 2 or RESOLUTION % side or (RESOLUTION // side) & (RESOLUTION // side - 1):
        raise OptionError(
            f"image_tokens {image_tokens}: a {RESOLUTION} px image is cut into a square grid of codes by 2x "
            "downsamplings, so it must be 4, 16, 64, 256 or 1024."
        )
    return side


def downsample(config: ChameleonVQVAEConfig) -> int:
    """Pixels per code side of a VQ config: 2 ** (number of downsamplings)."""
    return 2 ** (len(config.channel_multiplier) - 1)


def vq_config(
    codebook: int = 256, channels: int = 32, embed_dim: int = 16, res_blocks: int = 0, image_tokens: int = 64
) -> ChameleonVQVAEConfig:
    """A small Chameleon VQ-GAN encoder config: 64 px in, 2x downsamplings down to ``image_tokens`` codes
    (three for 8 x 8 codes)."""
    factor = RESOLUTION // codes_side(image_tokens)
    return ChameleonVQVAEConfig(
        embed_dim=embed_dim,
        num_embeddings=codebook,
        latent_channels=channels,
        resolution=RESOLUTION,
        base_channels=channels,
        channel_multiplier=[1] * (factor.bit_length()),
        num_res_blocks=res_blocks,
        attn_resolutions=[],
    )


class Decoder(nn.Module):
    """Training-only decoder: latents (C, s, s) back to pixels (3, 64, 64), one ``factor`` x ``factor`` patch
    per latent."""

    def __init__(self, latent_channels: int, width: int = 128, factor: int = DOWNSAMPLE):
        super().__init__()
        act = nn.SiLU()
        self.net = nn.Sequential(
            nn.Conv2d(latent_channels, width, 3, padding=1),
            act,
            nn.Conv2d(width, width, 3, padding=1),
            act,
            nn.Conv2d(width, 3 * factor**2, 1),
            nn.PixelShuffle(factor),
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """Pixels [B, 3, s * factor, s * factor] from latents [B, C, s, s]."""
        return self.net(z)


def new_vq(config: ChameleonVQVAEConfig) -> ChameleonVQVAE:
    """A fresh VQ-VAE with PyTorch's default convolution initialisation."""
    vq = ChameleonVQVAE(config)
    for m in vq.modules():
        if isinstance(m, nn.Conv2d):
            m.reset_parameters()
    nn.init.uniform_(vq.quantize.embedding.weight, -1.0 / config.num_embeddings, 1.0 / config.num_embeddings)
    return vq


def train_vq(
    vq: ChameleonVQVAE,
    pixels: torch.Tensor,
    *,
    steps: int,
    batch_size: int = 32,
    lr: float = 2e-3,
    seed: int = 0,
    warmup_share: float = 0.2,
    restart_every: int = 20,
    foreground_weight: float = 4.0,
    beta: float = 0.25,
    progress: bool = True,
) -> list[Phase]:
    """Train ``vq`` (in place) to encode ``pixels`` ([N, 3, 64, 64], the processor's values in [-1, 1]).

    Two phases. ``vq-warmup``: a plain autoencoder (no quantisation) for ``warmup_share`` of the
    steps; then the codebook is initialised by k-means on encoder outputs, half of them from
    patches that show the shape. ``vq``: the VQ-VAE objective, reconstruction MSE (shape pixels
    weighted ``1 + foreground_weight``: the shape covers a few percent of the image) + codebook
    loss + ``beta`` x commitment loss, with the stock quantiser's nearest-code rule; codes unused
    for ``restart_every`` steps move onto poorly quantised encoder outputs. Returns the phases
    (the decoder is a training device and is dropped).
    """
    decoder = Decoder(vq.config.latent_channels, factor=downsample(vq.config))
    vq.train()
    background = pixels.amax(dim=(0, 2, 3)).view(1, 3, 1, 1)
    stream = batches(len(pixels), batch_size, seed)
    params = list(vq.parameters()) + list(decoder.parameters())
    codebook = vq.quantize.embedding.weight

    def recon_loss(x, zq):
        recon = decoder(vq.post_quant_conv(zq))
        return (((recon - x) ** 2) * (1 + foreground_weight * foreground(x, background))).mean()

    def warm_step(s):
        x = pixels[next(stream)]
        return recon_loss(x, vq.quant_conv(vq.encoder(x)))

    warm = max(1, int(steps * warmup_share))
    phases = [run_phase(Phase("vq-warmup", warm, batch_size, lr), params, warm_step, progress=progress)]
    init_codebook(vq, pixels, background, seed)
    used = torch.zeros(vq.config.num_embeddings, dtype=torch.bool)

    def vq_step(s):
        x = pixels[next(stream)]
        z = vq.quant_conv(vq.encoder(x))
        flat = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])
        idx = torch.cdist(flat.detach(), codebook.detach()).argmin(1)
        q = codebook[idx]
        vq_loss = ((q - flat.detach()) ** 2).mean() + beta * ((flat - q.detach()) ** 2).mean()
        zq = (flat + (q - flat).detach()).view(z.shape[0], z.shape[2], z.shape[3], -1).permute(0, 3, 1, 2)
        used[idx] = True
        if (s + 1) % restart_every == 0 and s < (steps - warm) * 3 // 4:
            restart_dead_codes(vq, flat.detach(), used)
            used.zero_()
        return recon_loss(x, zq) + vq_loss

    phases.append(run_phase(Phase("vq", steps - warm, batch_size, lr), params, vq_step, progress=progress))
    vq.eval()
    return phases


def foreground(x: torch.Tensor, background: torch.Tensor) -> torch.Tensor:
    """[B, 1, H, W] mask of the pixels that differ from the background colour."""
    return ((x - background).abs().amax(1, keepdim=True) > 0.05).float()


@torch.no_grad()
def init_codebook(
    vq: ChameleonVQVAE, pixels: torch.Tensor, background: torch.Tensor, seed: int, n_images: int = 512, iters: int = 10
) -> None:
    """k-means (Lloyd, from random points) on encoder outputs of ``n_images``, half of the points on the shape."""
    g = torch.Generator().manual_seed(seed)
    x = pixels[torch.randperm(len(pixels), generator=g)[:n_images]]
    z = vq.quant_conv(vq.encoder(x))
    flat = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])
    fg = nn.functional.max_pool2d(foreground(x, background), downsample(vq.config)).flatten().bool()
    k = vq.config.num_embeddings
    half = k * 16
    pick_fg = fg.nonzero().flatten()
    pick_bg = (~fg).nonzero().flatten()
    pick = torch.cat(
        [
            pick_fg[torch.randint(len(pick_fg), (half,), generator=g)],
            pick_bg[torch.randint(len(pick_bg), (half,), generator=g)],
        ]
    )
    points = flat[pick]
    centres = points[torch.randperm(len(points), generator=g)[:k]].clone()
    for _ in range(iters):
        assign = torch.cdist(points, centres).argmin(1)
        for j in range(k):
            members = points[assign == j]
            if len(members):
                centres[j] = members.mean(0)
    vq.quantize.embedding.weight.copy_(centres)


@torch.no_grad()
def restart_dead_codes(vq: ChameleonVQVAE, flat: torch.Tensor, used: torch.Tensor) -> None:
    """Move the unused codebook entries onto encoder outputs, sampled in proportion to quantisation error."""
    dead = (~used).nonzero().flatten()
    if len(dead) == 0:
        return
    codebook = vq.quantize.embedding.weight
    err = torch.cdist(flat, codebook).min(1).values ** 2
    pick = torch.multinomial(err + 1e-8, len(dead), replacement=len(dead) > len(flat))
    codebook[dead] = flat[pick] + 1e-3 * torch.randn_like(flat[pick])
