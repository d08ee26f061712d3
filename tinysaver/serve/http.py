"""Request bodies: size limits, content types, multipart forms and image decoding.

Every failure is a ``BadRequest`` whose reason is one plain sentence and whose status is the HTTP
code it deserves (400, 401, 413, 415, 503); routes turn it into ``{"error": reason}``. Nothing here
imports Ray, so the parsing is tested on its own.
"""
from __future__ import annotations

import asyncio
import hmac
import json
import os
import re
import zlib
from typing import Any, AsyncIterator, Awaitable, Callable, Iterable, Sequence

from ..errors import ImageError, PixelCapError, ServeError, TinysaverError

RAW_TYPES = ("application/octet-stream", "image/")
DIGITS = re.compile(r"[0-9]{1,15}")  # a length header: ASCII digits only (str.isdigit() also takes '²')


OVERLOADED = "the service is overloaded; retry the request"  # 503's reason, in either layout


RETRY_AFTER_S = 1  # what a 503 asks the client to wait before retrying (seconds)


class BadRequest(TinysaverError):
    """A request the service refuses: ``status`` is its HTTP code, ``reason`` one sentence."""

    def __init__(self, status: int, reason: str):
        super().__init__(reason)
        self.status, self.reason = status, reason


def content_type(headers) -> str:
    return headers.get("content-type", "").split(";")[0].strip().lower()


def check_size(n: int, max_bytes: int) -> None:
    """413 for a body of ``n`` bytes over ``max_bytes`` (--max-body-mb)."""
    if n > max_bytes:
        raise BadRequest(413, f"the body of {n:,} bytes is over the limit of {max_bytes:,} bytes (--max-body-mb)")


async def read_body(request, max_bytes: int, timeout_s: float | None = None) -> bytes:
    """The whole body, refused with 413 as soon as it is known to exceed ``max_bytes``, and with 408
    when it is not whole within ``timeout_s`` (a slow or unfinished upload would hold its slot)."""
    n = request.headers.get("content-length")
    if n is not None and DIGITS.fullmatch(n.strip()):
        check_size(int(n), max_bytes)
    chunks: list[bytes] = []

    async def read() -> None:
        total = 0
        async for chunk in request.stream():
            total += len(chunk)
            if total > max_bytes:
                raise BadRequest(413, f"the body is over the limit of {max_bytes:,} bytes (--max-body-mb)")
            chunks.append(chunk)

    try:
        await asyncio.wait_for(read(), timeout_s)
    except asyncio.TimeoutError:
        raise BadRequest(408, f"the body did not arrive whole within {timeout_s:g} s") from None
    body = b"".join(chunks)
    for coding in reversed(content_codings(request.headers)):  # the last applied is undone first
        body = inflate(body, coding, max_bytes)
    return body


# Content-Encoding → zlib's wbits: gzip's header, or zlib's (RFC 1950; raw deflate is tried after)
CODINGS = {"gzip": 31, "x-gzip": 31, "deflate": 15}


def content_codings(headers) -> list[str]:
    """The body's ``Content-Encoding`` codings, in the order applied (``identity`` dropped); 415 for
    one the service cannot undo."""
    codings = [c.strip().lower() for c in headers.get("content-encoding", "").split(",") if c.strip()]
    codings = [c for c in codings if c != "identity"]
    for c in codings:
        if c not in CODINGS:
            raise BadRequest(415, f"Content-Encoding {c!r} is not supported; send the body plain, gzip or deflate")
    return codings


def inflate(data: bytes, coding: str, max_bytes: int) -> bytes:
    """``data`` decompressed from ``coding`` (gzip or deflate), never past ``max_bytes`` of output:
    a body that would inflate beyond it (a zip bomb) gets 413 as soon as it does, and one that is
    not whole or not that coding gets 400."""
    for wbits in ((CODINGS[coding], -15) if coding == "deflate" else (CODINGS[coding],)):
        d = zlib.decompressobj(wbits)
        try:
            out = d.decompress(data, max_bytes + 1)
        except zlib.error:
            continue  # deflate sent raw, without zlib's header: the next wbits
        if len(out) > max_bytes or d.unconsumed_tail:
            raise BadRequest(413, f"the body inflates past the limit of {max_bytes:,} bytes (--max-body-mb)")
        if not d.eof or d.unused_data:
            raise BadRequest(400, f"the {coding} body is cut short or has bytes after its end")
        return out
    raise BadRequest(400, f"the body is not {coding} data, though its Content-Encoding says so")


async def read_files(request, many: bool, max_bytes: int, timeout_s: float | None = None) -> list[tuple[str, bytes]]:
    """(file name, bytes) of each image in the request: the raw body, or the files of a multipart
    form (exactly one unless ``many``)."""
    ctype = content_type(request.headers)
    body = await read_body(request, max_bytes, timeout_s)
    if ctype.startswith("multipart/form-data"):
        request._body = body  # starlette parses the multipart form from the cached body
        try:
            form = await request.form()
            files = [(getattr(v, "filename", k) or k, await v.read()) for k, v in form.multi_items()
                     if hasattr(v, "read")]
        except BadRequest:
            raise
        except Exception as e:  # a malformed form: the parser's words, on one line
            raise BadRequest(400, f"malformed multipart body ({' '.join(str(e).split())[:160] or type(e).__name__})") \
                from None
        if not files:
            raise BadRequest(400, "the multipart body holds no file")
        if not many and len(files) > 1:  # answering the first alone would drop the others silently
            raise BadRequest(400, f"/predict takes one image, the form holds {len(files)} files; send several to "
                                  "/predict/batch")
        return files
    if many:
        raise BadRequest(415, f"/predict/batch takes multipart/form-data, got {ctype or 'no content type'}")
    if not ctype.startswith(RAW_TYPES):
        raise BadRequest(415, f"send an image as application/octet-stream, image/* or multipart/form-data, "
                              f"got {ctype or 'no content type'}")
    return [("body", body)]


def decode(data: bytes, budget):
    """A uint8 (C, H, W) tensor, or BadRequest: 400 for what is not a usable image, 413 over the
    ``budget`` (a `tinysaver.budget.InputBudget`, or a bare pixel cap)."""
    from ..decoding import decode_image  # torch: only where images are decoded

    if not data:
        raise BadRequest(400, "empty body: send the image's bytes")
    try:
        return decode_image(data, budget)
    except ImageError as e:  # one plain sentence, the same as infer prints
        raise BadRequest(413 if isinstance(e, PixelCapError) else 400, f"not a usable image: {e}") from None


TOKEN_ENV = "TINYSAVER_TOKEN"


def token_or_env(token: str | None) -> str | None:
    """The token a service requires: the one given, else ``$TINYSAVER_TOKEN``, else None (open). A
    token given but empty (``--token ''``, a variable that expanded to nothing) is refused: it would
    otherwise start an open service while the user believes it closed."""
    if token is not None and not token.strip():
        raise ServeError("--token is empty: give a secret (or $TINYSAVER_TOKEN), or leave --token out for an "
                         "open service")
    return token or os.environ.get(TOKEN_ENV) or None


def check_token(headers, token: str | None) -> None:
    """401 unless the request carries ``Authorization: Bearer <token>`` (no token set: open)."""
    if not token:
        return

    got = headers.get("authorization", "")
    scheme, _, value = got.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(value.strip().encode(), token.encode()):
        raise BadRequest(401, "missing or wrong token: send 'Authorization: Bearer <token>'")



def decode_all(datas: Sequence[bytes], budget) -> list:
    """`decode` of each body: its tensor, or the BadRequest it raised (one bad image in a
    batch spoils only its own line)."""
    out = []
    for data in datas:
        try:
            out.append(decode(data, budget))
        except BadRequest as e:
            out.append(e)
    return out


async def ndjson_as_ready(answers: Iterable[Awaitable], line: Callable[[int, Any], dict] | None = None,
                          timeout_s: float | None = None) -> AsyncIterator[str]:
    """One JSON line per answer, in the order the answers finish, not the order they were asked:
    a streamed batch hands out each early exit without waiting for the base's answers. Answers
    that finish together (one batch's early exits) go out as one chunk, in the order asked: each
    chunk is a message from the replica to Serve's proxy, which costs far more than a line.

    Without ``line`` each answer is its line's dict. With it, ``line(k, outcome)`` makes answer k's
    dict from its outcome: its result, the exception it raised, or ``TimeoutError`` for one still
    unanswered ``timeout_s`` after the stream began (it is then cancelled). Futures are waited on
    as they are; coroutines become tasks.
    """
    loop = asyncio.get_running_loop()
    futs = [asyncio.ensure_future(a) for a in answers]
    order = {f: k for k, f in enumerate(futs)}
    deadline = None if timeout_s is None else loop.time() + timeout_s

    def render(f) -> str:
        if line is None:
            return json.dumps(f.result()) + "\n"
        if not f.done() or f.cancelled():
            outcome = TimeoutError()
        else:
            outcome = f.exception() or f.result()
        return json.dumps(line(order[f], outcome)) + "\n"

    waiting = set(futs)
    try:
        while waiting:
            left = None if deadline is None else max(deadline - loop.time(), 0.0)
            done, waiting = await asyncio.wait(waiting, timeout=left, return_when=asyncio.FIRST_COMPLETED)
            if not done:  # past the deadline: the rest are answered as timed out
                done, waiting = waiting, set()
                for f in done:
                    f.cancel()
            yield "".join(render(f) for f in sorted(done, key=order.__getitem__))
    finally:  # the client left mid-stream: its answers are not needed
        for f in waiting:
            f.cancel()


__all__ = ["BadRequest", "RAW_TYPES", "CODINGS", "RETRY_AFTER_S", "check_size", "check_token", "content_type", "content_codings", "inflate",
           "decode", "decode_all", "ndjson_as_ready", "read_body", "read_files"]
