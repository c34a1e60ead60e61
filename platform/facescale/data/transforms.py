"""The one place where images become model input: uint8 on the host, normalised on the training device.

Loaders deliver uint8 ``[B, 3, H, W]`` batches (mirror already applied): a quarter of the bytes of float32 on the
host and over PCIe. The step moves them to the device (``non_blocking`` from pinned memory) and normalises them
there, in the dtype the model runs in.
"""

from __future__ import annotations

import torch

# InsightFace arcface_torch `dataset.py` normalises with mean 0.5, std 0.5 after ToTensor: (x/255 - 0.5) / 0.5,
# i.e. (x - 127.5) / 127.5 on uint8 pixels.
PIXEL_MEAN = PIXEL_STD = 127.5


def normalize_images(images: torch.Tensor, device: torch.device | str, dtype: torch.dtype = torch.float32,
                     ) -> torch.Tensor:
    """uint8 ``[B, 3, H, W]`` → ``(x − 127.5) / 127.5`` on ``device`` in ``dtype``.

    Args:
        images: uint8 images, channels first, on the host (pinned for an asynchronous copy) or already on the device.
        device: The training device.
        dtype: The dtype the model runs in (float32, or bfloat16 / float16 under mixed precision).

    Returns:
        The normalised batch on ``device``.

    Raises:
        TypeError: If ``images`` is not uint8 (a loader that still normalises on the host).
    """
    if images.dtype != torch.uint8:
        raise TypeError(f"normalize_images expects uint8 images, got {images.dtype} (loaders deliver uint8 batches)")
    x = images.to(device, non_blocking=True).to(dtype)
    return x.sub_(PIXEL_MEAN).div_(PIXEL_STD)
