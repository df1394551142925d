"""Size classes: how much a request of ``n`` bytes really reserves inside a pool."""

from __future__ import annotations

from kotoba_memory.errors import ConfigError
from kotoba_memory.validation import check_int

_ALLOWED_PER_OCTAVE = (1, 2, 4, 8, 16, 32)


class SizeClasses:
    """A grid of ``per_octave`` classes between consecutive powers of two, on a ``granule`` step.

    ``per_octave=1`` is the classic power-of-two scheme (~25 % average waste on a realistic mix);
    16 classes per octave waste at most 1/16 of a request and ~2-3 % on average.
    """

    __slots__ = ("granule", "per_octave")

    def __init__(self, per_octave: int = 16, granule: int = 16) -> None:
        if check_int(per_octave, "per_octave") not in _ALLOWED_PER_OCTAVE:
            raise ConfigError("per_octave", f"must be one of {_ALLOWED_PER_OCTAVE}, got {per_octave}")
        if granule < 8 or granule & (granule - 1):
            raise ValueError(f"granule must be a power of two >= 8, got {granule}")
        self.per_octave = per_octave
        self.granule = granule

    def round(self, n: int) -> int:
        """The class size that serves a request of ``n`` bytes (``n >= 1``)."""
        granule = self.granule
        if n <= granule:
            return granule
        k = (n - 1).bit_length() - 1  # 2**k < n <= 2**(k + 1)
        step = max(granule, (1 << k) // self.per_octave)
        return -(-n // step) * step

    def classes_up_to(self, limit: int) -> list[int]:
        """Every distinct class size ``<= limit``, ascending."""
        sizes: list[int] = []
        n = 1
        while n <= limit:
            size = self.round(n)
            if size > limit:
                break
            sizes.append(size)
            n = size + 1
        return sizes

    def __repr__(self) -> str:
        return f"SizeClasses(per_octave={self.per_octave}, granule={self.granule})"
