"""Decoding: image bytes to uint8 tensors, one plain sentence for each file that cannot be used.

A `RawSource` lists samples before decoding (ids, labels, a reader of bytes); decoding it
gives a `DecodedSet`, the form every model of a run reads. `fingerprint` hashes ids
plus labels so that predictions of different models are only compared on identical samples.
"""
from __future__ import annotations

import io
import tarfile
import warnings
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image, ImageOps, PngImagePlugin, UnidentifiedImageError
from tqdm.auto import tqdm

from .arrays import fingerprint  # noqa: F401 (re-exported: a decoded set's fingerprint)
from .budget import InputBudget
from .errors import ImageError
from .limits import MAX_PIXELS, MAX_PIXELS_IN_FLIGHT


@dataclass
class RawSource:
    """Samples before decoding: ids, labels (-1 when unknown) and a reader of raw bytes."""

    name: str
    ids: list[str]
    labels: np.ndarray
    read: Callable[[int], bytes]
    class_names: list[str] | None = None
    skipped: list[str] = field(default_factory=list)  # what was found but not listed, one sentence each
    followed: list[str] = field(default_factory=list)  # links to folders that were followed, "link → target"


@dataclass
class DecodedSet:
    """Decoded uint8 images, (C, H, W) each, that decoded cleanly, in a stable order.

    ``images`` is either a list of tensors (mixed sizes) or one (N, C, H, W) tensor.
    ``failures`` lists ``(id, reason)`` for every sample skipped as unreadable.
    """

    name: str
    ids: list[str]
    labels: np.ndarray
    images: list[torch.Tensor] | torch.Tensor
    class_names: list[str] | None = None
    failures: list[tuple[str, str]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.ids, self.labels)

    def batch(self, start: int, stop: int) -> list[torch.Tensor] | torch.Tensor:
        return self.images[start:stop]

    def subset(self, index: Sequence[int]) -> "DecodedSet":
        index = list(index)
        return DecodedSet(self.name, [self.ids[i] for i in index], self.labels[index], take_images(self.images, index),
                          self.class_names)


def take_images(images: list[torch.Tensor] | torch.Tensor, index) -> list[torch.Tensor] | torch.Tensor:
    """The images at ``index`` (ints, an array or a tensor), in that order, in the container they came in:
    rows of an (N, C, H, W) tensor, or items of a list of (C, H, W) tensors of any sizes."""
    if isinstance(images, torch.Tensor):
        return images[torch.as_tensor(index, dtype=torch.long)]
    return [images[int(i)] for i in index]





def header_pixels(data: bytes) -> int:
    """Width × height as the image's header declares them, read without decoding a pixel; 0 for
    what is not a readable image (decoding it then refuses it with its reason)."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            w, h = im.size
    except Exception:  # noqa: BLE001 - anything unreadable is decode_image's to explain
        return 0
    return int(w) * int(h)


def decode_image(data: bytes, max_pixels: InputBudget | int | None = MAX_PIXELS) -> torch.Tensor:
    """Decode image bytes to a uint8 (C, H, W) tensor with C=1 (greyscale) or C=3 (RGB).

    The EXIF orientation is applied. RGBA, palette and CMYK images become RGB; 16-bit greyscale
    is scaled (not clipped) to 8 bits, and float greyscale in [0, 1] is scaled to [0, 255].
    The size is read from the header first and checked against ``max_pixels``, an
    `InputBudget` or a bare pixel cap (width × height; None: no cap): an image over it raises
    ``PixelCapError`` before any pixel is decoded. Anything that is not a usable image raises
    ``ImageError`` with one plain sentence, whatever the decoder raised.
    """
    budget = InputBudget.of(max_pixels)
    # PIL's fixed bomb limit (a warning naming the file at 89 MP, a refusal at 179 MP) would overrule
    # --max-pixels both ways; the budget reads the same header, so it is the one rule
    Image.MAX_IMAGE_PIXELS = None
    if not data:
        raise ImageError("empty file (0 bytes)")
    try:
        with Image.open(io.BytesIO(data)) as im:
            w, h = im.size
            budget.check(w, h)
            if w * h == 0:
                raise ImageError(f"the image has no pixels ({w} × {h})")
            draft = budget.draft_size(w, h) if im.format == "JPEG" else None
            if draft is not None and draft[0] * 2 <= w and draft[1] * 2 <= h:
                # a JPEG several times larger than any model needs decodes at a reduced scale (still at
                # least that size): a 48 MP photo costs a fraction of its full decode in memory and time
                im.draft(im.mode, draft)
            im.load()
            im = ImageOps.exif_transpose(im)  # phone photos store their rotation in EXIF
            if im.mode in ("I;16", "I;16B", "I;16L", "I"):
                wide = np.asarray(im, dtype=np.float64)  # 16-bit samples: scale, do not clip, to 8 bits
                sixteen = im.mode.startswith("I;16") or wide.max(initial=0) > 255
                arr = np.clip(np.round(wide / (257.0 if sixteen else 1.0)), 0, 255).astype(np.uint8)
            elif im.mode == "F":
                wide = np.nan_to_num(np.asarray(im, dtype=np.float64), nan=0.0, posinf=255.0, neginf=0.0)
                arr = np.clip(np.round(wide * (255.0 if wide.max(initial=0) <= 1.0 else 1.0)), 0, 255).astype(np.uint8)
            else:
                if im.mode not in ("L", "RGB"):
                    im = im.convert("L" if im.mode == "1" else "RGB")
                arr = np.array(im, dtype=np.uint8)  # a writable copy: torch warns on read-only buffers
    except ImageError:
        raise
    except UnidentifiedImageError:
        raise ImageError("not an image, or in a format tinysaver cannot read (JPEG, PNG, BMP, WebP, GIF, TIFF)") \
            from None
    except MemoryError:
        raise ImageError("too large to decode in the memory available") from None
    except ValueError as e:
        if "MAX_TEXT_CHUNK" not in str(e):
            raise ImageError("truncated or corrupt image data" + _first_line(e)) from None
        # PIL's limit on a text or colour-profile chunk holds (a 100 MB zTXt is a bomb); its words do not
        raise ImageError("a text or colour-profile chunk of the PNG is over PIL's limit "
                         f"({PngImagePlugin.MAX_TEXT_CHUNK // 2**20} MB); strip the image's metadata") from None
    except Exception as e:  # PIL reports bad data as OSError, SyntaxError, struct.error, ...
        raise ImageError("truncated or corrupt image data" + _first_line(e)) from None
    if arr.ndim == 2:
        arr = arr[None]
    elif arr.ndim == 3:
        arr = arr.transpose(2, 0, 1)
    else:
        raise ImageError(f"an image of unexpected shape {arr.shape}")
    return torch.from_numpy(np.ascontiguousarray(arr))


def _first_line(e: BaseException) -> str:
    first = (str(e).splitlines() or [""])[0][:120]
    return f" ({first})" if first else ""


def unreadable_reason(e: BaseException) -> str:
    """One plain sentence for why a file could not be used (no class names, no object reprs)."""
    if isinstance(e, ImageError):
        return str(e)
    if isinstance(e, PermissionError):
        return "permission denied"
    if isinstance(e, IsADirectoryError):
        return "a folder, not an image file"
    if isinstance(e, (OSError, tarfile.TarError, EOFError)):
        return f"cannot be read ({getattr(e, 'strerror', None) or (str(e).splitlines() or ['I/O error'])[0][:120]})"
    return (str(e).splitlines() or [type(e).__name__])[0][:160]


def decoded_blocks(source: RawSource, block: int, max_pixels: InputBudget | int | None = MAX_PIXELS):
    """Decode ``source`` ``block`` samples at a time, skipping unreadable ones.

    Yields ``(index, images, failures)`` per block: the source positions and uint8 images that
    decoded, and ``(id, reason)`` for each sample that did not (``reason`` is one plain sentence).
    """
    cap = InputBudget.of(max_pixels).max_pixels
    in_flight = max(MAX_PIXELS_IN_FLIGHT, cap or 0)
    index, images, failures, pixels = [], [], [], 0
    for i in range(len(source.ids)):
        try:
            img = decode_image(source.read(i), max_pixels)
        except Exception as e:  # one unusable file is reported and skipped, never fatal
            failures.append((source.ids[i], unreadable_reason(e)))
        else:
            index.append(i)
            images.append(img)
            pixels += img.shape[-1] * img.shape[-2]
        # a block ends at ``block`` samples, or earlier when its decoded pixels reach the in-flight
        # budget: the caller has used a block before the next is decoded, so memory stays bounded
        if len(index) + len(failures) >= block or pixels >= in_flight or i == len(source.ids) - 1:
            yield index, images, failures
            index, images, failures, pixels = [], [], [], 0


def decode_all(source: RawSource, progress: bool = True,
               max_pixels: InputBudget | int | None = MAX_PIXELS) -> DecodedSet:
    """Decode every sample once; unreadable ones are skipped, counted and reported."""
    index, images, failures = [], [], []
    bar = tqdm(total=len(source.ids), desc=f"decode {source.name}", disable=not progress, leave=False)
    for b_index, b_images, b_failures in decoded_blocks(source, 256, max_pixels):
        index += b_index
        images += b_images
        failures += b_failures
        bar.update(len(b_index) + len(b_failures))
    bar.close()
    ids = [source.ids[i] for i in index]
    labels = [int(source.labels[i]) for i in index]
    if failures:
        warnings.warn(f"{source.name}: skipped {len(failures)} unreadable image(s), first: "
                      f"{failures[0][0]}: {failures[0][1]}")
    return DecodedSet(source.name, ids, np.asarray(labels, dtype=np.int64), images, source.class_names, failures)


__all__ = ["RawSource", "DecodedSet", "take_images", "header_pixels", "decode_image", "unreadable_reason",
           "decoded_blocks", "decode_all"]
