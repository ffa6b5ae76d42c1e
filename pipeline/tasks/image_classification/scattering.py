"""A fixed wavelet scattering transform (Mallat 2012; Bruna & Mallat's ScatterNet) made
of convolutions, so that it trains, exports to ONNX and quantises like any other layer.

Kymatio computes the transform with FFTs, which an ONNX graph does not carry. Here
kymatio's own filter bank (Morlet wavelets and a Gaussian low-pass, defined in Fourier on
the padded image) is brought back to space, each filter cropped to where it has weight,
and applied as a strided convolution over the circularly padded image: the circular
convolutions and subsampling of kymatio's `scattering2d`, to within the crop
(tests/test_image_models.py compares the two).

The output for J scales and L angles, per input channel: one low-pass average, J*L
first-order and L*L*J*(J-1)/2 second-order coefficients (81 for J=2, L=8), each at
1/2^J of the image's side: features that are stable to small deformations and need no
training, which is what differentially private learning lacks (Tramer & Boneh 2021).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional as F

CROP = 1e-3     # a filter is cut where its magnitude falls below this share of its peak


def spatial_kernel(fourier: np.ndarray, crop: float) -> np.ndarray:
    """A filter given in Fourier on a periodic grid, as the complex correlation kernel
    (2r+1 square, centred) that computes the same circular convolution."""
    space = np.fft.fftshift(np.fft.ifft2(fourier))
    centre_h, centre_w = space.shape[0] // 2, space.shape[1] // 2
    magnitude = np.abs(space)
    rows, cols = np.nonzero(magnitude >= crop * magnitude.max())
    radius = int(max(np.abs(rows - centre_h).max(), np.abs(cols - centre_w).max()))
    radius = min(radius, centre_h - 1, centre_w - 1)
    kernel = space[centre_h - radius:centre_h + radius + 1,
                   centre_w - radius:centre_w + radius + 1]
    # Convolution flips the filter; torch's conv2d correlates.
    return kernel[::-1, ::-1]


def stack_kernels(kernels: list[np.ndarray], complex_output: bool) -> Tensor:
    """Kernels of different sizes, zero-padded to the largest, as a conv2d weight
    [filters (x2 for real and imaginary parts), 1, size, size]."""
    size = max(k.shape[0] for k in kernels)
    weight = []
    for kernel in kernels:
        margin = (size - kernel.shape[0]) // 2
        padded = np.pad(kernel, margin)
        weight += [padded.real, padded.imag] if complex_output else [padded.real]
    return torch.tensor(np.stack(weight)[:, None], dtype=torch.float32)


def circular_conv(x: Tensor, weight: Tensor, stride: int, groups: int = 1) -> Tensor:
    radius = weight.shape[-1] // 2
    return F.conv2d(F.pad(x, (radius,) * 4, mode="circular"), weight, stride=stride,
                    groups=groups)


def modulus(pairs: Tensor) -> Tensor:
    """|z| for channels laid out as (real, imaginary) pairs."""
    batch, channels, height, width = pairs.shape
    pairs = pairs.reshape(batch, channels // 2, 2, height, width)
    return torch.sqrt(pairs.pow(2).sum(dim=2))


class Scattering2D(nn.Module):
    """Second-order scattering of [batch, channels, height, width] images into
    [batch, channels * K, height / 2^J, width / 2^J], K = 1 + J*L + L*L*J*(J-1)/2, in
    kymatio's order (per channel: the average, first order by scale then angle, second
    order by first path then second). No parameters: its filters are buffers, rebuilt
    from kymatio rather than saved (not in a checkpoint's state, nor averaged as a
    federated model's statistics)."""

    def __init__(self, height: int, width: int, J: int = 2, L: int = 8,
                 crop: float = CROP):
        super().__init__()
        from kymatio.scattering2d.filter_bank import filter_bank
        from kymatio.scattering2d.utils import compute_padding

        if height % 2 ** J or width % 2 ** J or min(height, width) <= 2 ** J:
            raise ValueError(f"model.J: a {height}x{width} image does not divide into "
                             f"more than one 2^{J} cell a side")
        self.J, self.L = J, L
        padded_h, padded_w = compute_padding(height, width, J)
        # F.pad's order: left, right, top, bottom (kymatio pads an odd extra on the far side)
        self.padding = ((padded_w - width) // 2, (padded_w - width + 1) // 2,
                        (padded_h - height) // 2, (padded_h - height + 1) // 2)
        bank = filter_bank(padded_h, padded_w, J, L)
        psi, phi = bank["psi"], bank["phi"]["levels"]

        def kernel(fourier: np.ndarray) -> np.ndarray:
            return spatial_kernel(fourier, crop)

        # Low-pass at each resolution 2^j that a path reaches; wavelets of scale j at the
        # resolution of the path they follow (full resolution for the first order).
        for j in range(J):
            self.register_buffer(f"phi_{j}", stack_kernels([kernel(phi[j])], False),
                                 persistent=False)
            waves = [kernel(p["levels"][0]) for p in psi if p["j"] == j]
            self.register_buffer(f"psi_{j}", stack_kernels(waves, True), persistent=False)
            for j1 in range(1, j):
                waves = [kernel(p["levels"][j1]) for p in psi if p["j"] == j]
                self.register_buffer(f"psi_{j}_at_{j1}", stack_kernels(waves, True),
                                     persistent=False)
        self.output_channels = 1 + J * L + L * L * J * (J - 1) // 2

    def wavelets(self, scale: int, resolution: int) -> Tensor:
        name = f"psi_{scale}" if resolution == 0 else f"psi_{scale}_at_{resolution}"
        return getattr(self, name)

    def lowpass(self, x: Tensor, resolution: int) -> Tensor:
        """Average at resolution 2^resolution, subsampled to 2^J, border cut (kymatio's
        `unpad`), each channel on its own."""
        # each channel as an image of its own: one plain convolution runs faster than
        # a depthwise one
        averaged = circular_conv(x.reshape(-1, 1, *x.shape[-2:]),
                                 getattr(self, f"phi_{resolution}"),
                                 2 ** (self.J - resolution))
        cut = averaged[..., 1:-1, 1:-1]
        return cut.reshape(*x.shape[:2], *cut.shape[-2:])

    def forward(self, images: Tensor) -> Tensor:
        batch, channels, height, width = images.shape
        J, L = self.J, self.L
        x = F.pad(images.reshape(batch * channels, 1, height, width), self.padding,
                  mode="reflect")
        first: list[Tensor] = []
        second: list[Tensor] = []
        orders = [self.lowpass(x, 0)]
        for j1 in range(J):
            # |x * psi_j1|, kept at resolution 2^j1: [N, L, h, w]
            u1 = modulus(circular_conv(x, self.wavelets(j1, 0), 2 ** j1))
            first.append(self.lowpass(u1, j1))
            paths = []
            for j2 in range(j1 + 1, J):
                # every angle of u1 through every wavelet of scale j2, each angle as an
                # image of its own (one plain convolution runs faster than L groups)
                u2 = modulus(circular_conv(u1.reshape(-1, 1, *u1.shape[-2:]),
                                           self.wavelets(j2, j1), 2 ** (j2 - j1)))
                s2 = self.lowpass(u2, j2)
                paths.append(s2.reshape(-1, L, L, *s2.shape[-2:]))
            if paths:
                # kymatio's order: first angle, then second scale, then second angle
                second.append(torch.cat(paths, dim=2).flatten(1, 2))
        orders += first + second
        out = torch.cat(orders, dim=1)
        return out.reshape(batch, channels * self.output_channels, *out.shape[-2:])
