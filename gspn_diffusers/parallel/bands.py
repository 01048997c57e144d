"""How a latent is cut into horizontal bands of rows, one per process, and what each band is at every UNet level.

Band edges sit at multiples of the UNet's total downsampling factor ``f = 2 ** (levels - 1)``, so every level
(rows halved, rounded up, by each stride-2 convolution) cuts at the same place and a band's rows at level ``l``
are exactly ``[r0 / 2**l, ceil(r1 / 2**l))``. Bands differ by at most one row group of ``f`` rows; the last one
also holds a partial group when the height is not a multiple of ``f``.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import ParallelConfigError


def downsampling_factor(unet_config: dict) -> int:
    """``2 ** (len(block_out_channels) - 1)``: every down block but the last halves the latent."""
    return 2 ** (len(unet_config["block_out_channels"]) - 1)


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(frozen=True)
class BandPlan:
    """The row bounds of every band at level 0 and the latent size; ``levels`` UNet levels."""

    height: int
    width: int
    factor: int
    bounds: tuple[int, ...]  # N + 1 row bounds at level 0: band k is [bounds[k], bounds[k + 1])

    @property
    def size(self) -> int:
        return len(self.bounds) - 1

    @property
    def levels(self) -> int:
        return self.factor.bit_length()  # factor = 2 ** (levels - 1)

    def rows(self, band: int, level: int = 0) -> tuple[int, int]:
        """Band ``band``'s rows ``[start, end)`` at UNet level ``level`` (rows halved, rounded up, per level)."""
        scale = 2**level
        return self.bounds[band] // scale, _ceil_div(self.bounds[band + 1], scale)

    def heights(self, level: int = 0) -> list[int]:
        return [end - start for start, end in (self.rows(k, level) for k in range(self.size))]

    def level_height(self, level: int) -> int:
        return _ceil_div(self.height, 2**level)

    def level_width(self, level: int) -> int:
        return _ceil_div(self.width, 2**level)

    def level_of(self, band: int, height: int, width: int) -> int:
        """The UNet level at which band ``band`` is ``height x width`` (a transformer or layer input)."""
        matches = [
            level
            for level in range(self.levels)
            if self.heights(level)[band] == height and self.level_width(level) == width
        ]
        if len(matches) != 1:
            raise ParallelConfigError(
                f"A {height}x{width} band feature matches {len(matches)} UNet levels of the {self.height}x"
                f"{self.width} latent split into {self.size} bands; the latent is too small for patch parallelism."
            )
        return matches[0]


def plan_bands(height: int, width: int, num_bands: int, factor: int) -> BandPlan:
    """Cut ``height`` latent rows into ``num_bands`` bands at multiples of ``factor`` (sizes differ by <= 1 group).

    Raises :class:`ParallelConfigError` (on every process alike: each computes the same plan) when there are
    fewer row groups than bands.
    """
    groups = _ceil_div(height, factor)
    if num_bands < 1 or groups < num_bands:
        raise ParallelConfigError(
            f"A latent of {height} rows ({height * 8} px) cannot be split into {num_bands} bands of at least one "
            f"row group: the UNet downsamples by {factor}, so it has only {groups} groups of {factor} rows. Use at "
            f"most {groups} processes, or a taller image (at least {num_bands * factor * 8} px)."
        )
    base, extra = divmod(groups, num_bands)
    bounds = [0]
    for band in range(num_bands):
        bounds.append(min(height, bounds[-1] + (base + (band < extra)) * factor))
    return BandPlan(height=height, width=width, factor=factor, bounds=tuple(bounds))
