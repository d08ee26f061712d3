"""The input budget: how many pixels one image may cost, checked from its header before any pixel
is decoded (a 178-byte PNG can claim 100000 × 1 pixels, and a resize to a model's input can make
that 256 × 25,600,000)."""
from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np

from .errors import DatasetError, PixelCapError
from .limits import MAX_PIXELS, MAX_PIXELS_IN_FLIGHT


@dataclass(frozen=True)
class InputBudget:
    """How many pixels one image may cost, checked from its header before any pixel is decoded.

    ``max_pixels`` caps width × height as decoded and, with the same number, the image that each of
    ``preprocess`` (the run's models) makes of it when resizing to its input, before the crop: a long
    thin image is small on disk and as decoded, but 100000 × 1 pixels becomes 256 × 25,600,000 for a
    224-pixel model. None: no cap (PIL's own bomb limit is off either way; this budget replaces it).
    """

    max_pixels: int | None = MAX_PIXELS
    preprocess: tuple = ()  # tinysaver.models.Preprocess of each model the images are for

    def __post_init__(self) -> None:
        m = self.max_pixels
        if m is not None and (isinstance(m, bool) or not isinstance(m, (int, np.integer)) or m < 1):
            raise DatasetError(f"the pixel cap must be a whole number of pixels ≥ 1, got {m!r}")

    @classmethod
    def of(cls, budget: "InputBudget | int | None") -> "InputBudget":
        """A budget as given, or the one of a bare pixel cap (an int, or None for none)."""
        return budget if isinstance(budget, InputBudget) else cls(budget)

    def check(self, width: int, height: int) -> None:
        """PixelCapError (one sentence) when an image of ``width`` × ``height`` is over the budget."""
        cap = self.max_pixels
        if cap is None:
            return
        if width * height > cap:
            raise PixelCapError(f"{width} × {height} pixels is over the cap of {cap:,} pixels (--max-pixels)")
        for pre in self.preprocess:
            size = pre.resized_size(height, width)
            if size is not None and size[0] * size[1] > cap:
                raise PixelCapError(
                    f"{width} × {height} pixels would be resized to {size[1]:,} × {size[0]:,} for a model's "
                    f"{pre.input_size[2]} × {pre.input_size[1]} input, over the cap of {cap:,} pixels (--max-pixels)")

    def draft_size(self, width: int, height: int) -> tuple[int, int] | None:
        """The smallest (width, height) a decoder may reduce an image of ``width`` × ``height`` to
        (a JPEG decodes at 1/2, 1/4 or 1/8 scale at a fraction of the cost) such that every model's
        resize still only shrinks it, in either orientation (EXIF may rotate it after decoding);
        None when no model is known or one takes the image at its own size."""
        if not self.preprocess:
            return None
        need_w = need_h = 0
        for pre in self.preprocess:
            for h, w, swapped in ((height, width, False), (width, height, True)):
                size = pre.resized_size(h, w)
                if size is None:
                    return None
                rh, rw = (size[1], size[0]) if swapped else size
                need_w, need_h = max(need_w, rw), max(need_h, rh)
        return need_w, need_h


class PixelPool:
    """The decoded pixels a process holds at once, across all its requests: one budget, so that many
    legal images cannot add up to an out-of-memory kill. A request reserves its images' pixels (read
    from their headers) before decoding and returns them when answered; a reservation that does not
    fit now is refused at once (the caller answers 503, retry later), and one larger than the whole
    pool is refused for good (413). Thread-safe: decoding runs in worker threads."""

    def __init__(self, capacity: int = MAX_PIXELS_IN_FLIGHT):
        if capacity < 1:
            raise DatasetError(f"the pixel pool holds at least one pixel, got {capacity}")
        self.capacity, self.held = int(capacity), 0
        self._lock = threading.Lock()

    def take(self, pixels: int) -> bool:
        """Reserve ``pixels``; False when they do not fit beside what is held now."""
        if pixels > self.capacity:
            raise PixelCapError(f"the images hold {pixels:,} pixels together, over this process's budget of "
                                f"{self.capacity:,} decoded pixels at once; send fewer per request")
        with self._lock:
            if self.held + pixels > self.capacity:
                return False
            self.held += pixels
            return True

    def give(self, pixels: int) -> None:
        with self._lock:
            self.held = max(self.held - pixels, 0)


__all__ = ["InputBudget", "PixelPool"]
