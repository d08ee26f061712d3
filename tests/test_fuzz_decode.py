"""The image decoder, fuzzed with hypothesis: random bytes and mutated real PNG and JPEG files
decode to an image or raise the one-line ImageError, never another exception, never a hang."""
import io

import numpy as np
import pytest

from tests.helpers import png_bytes

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from tinysaver.decoding import decode_image  # noqa: E402
from tinysaver.errors import ImageError  # noqa: E402


def jpeg_bytes(arr):
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=80)
    return buf.getvalue()


RNG = np.random.default_rng(7)
SEEDS = [png_bytes(RNG.integers(0, 256, (24, 20, 3), dtype=np.uint8)), png_bytes(RNG.integers(0, 256, (9, 31),
         dtype=np.uint8)), jpeg_bytes(RNG.integers(0, 256, (32, 32, 3), dtype=np.uint8))]
FUZZ = settings(max_examples=300, deadline=2000, database=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow])


def decodes_or_says_why(data: bytes) -> None:
    try:
        img = decode_image(data, max_pixels=4_000_000)
    except ImageError as e:
        msg = str(e)
        assert msg and "\n" not in msg and "object at 0x" not in msg, msg
        return
    assert img.dtype.is_floating_point is False and img.ndim == 3 and img.shape[0] in (1, 3)


@FUZZ
@given(st.binary(max_size=4096))
def test_random_bytes(data):
    decodes_or_says_why(data)


@FUZZ
@given(st.sampled_from(SEEDS), st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), max_size=12),
       st.integers(0, 10**6))
def test_mutated_real_files(seed, flips, cut):
    data = bytearray(seed)
    for pos, val in flips:  # overwrite bytes anywhere, header and size fields included
        data[pos % len(data)] = val
    decodes_or_says_why(bytes(data[: max(1, cut % (len(data) + 1))]))


def test_a_header_claiming_huge_dimensions_is_refused_before_decoding():
    import struct
    import zlib

    data = bytearray(SEEDS[1])
    # IHDR width/height sit at bytes 16..24 of a PNG: claim 8000 × 8000 and fix the chunk's CRC
    data[16:24] = struct.pack(">II", 8000, 8000)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])) & 0xFFFFFFFF)
    with pytest.raises(ImageError, match="8000 × 8000 pixels is over the cap"):
        decode_image(bytes(data), max_pixels=4_000_000)
