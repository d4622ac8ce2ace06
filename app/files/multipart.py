"""An incremental multipart/form-data reader: part bodies are streamed, never held whole."""

from __future__ import annotations

import re
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass
from urllib.parse import unquote

MAX_HEADER_BYTES = 16 * 1024
MAX_PREAMBLE_BYTES = 16 * 1024
# RFC 2046 boundary characters; a space is allowed but not at the end.
_BOUNDARY = re.compile(r"[0-9A-Za-z'()+_,\-./:=? ]{0,69}[0-9A-Za-z'()+_,\-./:=?]\Z")


class MalformedMultipart(ValueError):
    """The body is not valid multipart/form-data."""


class FieldTooLarge(ValueError):
    """A part read whole was longer than its limit."""


@dataclass(frozen=True)
class Part:
    """One part's headers: its form name, file name and content type."""

    name: str
    filename: str | None
    content_type: str | None


def parse_header(value: str) -> tuple[str, dict[str, str]]:
    """A header value's main token (lowercased) and its parameters (names lowercased)."""
    main, _, rest = value.partition(";")
    params: dict[str, str] = {}
    i, n = 0, len(rest)
    while i < n:
        while i < n and rest[i] in " \t;":
            i += 1
        if i >= n:
            break
        equals, semicolon = rest.find("=", i), rest.find(";", i)
        if equals < 0 or 0 <= semicolon < equals:
            i = semicolon + 1 if semicolon >= 0 else n  # a parameter without a value
            continue
        name = rest[i:equals].strip().lower()
        i = equals + 1
        while i < n and rest[i] in " \t":
            i += 1
        if i < n and rest[i] == '"':
            i += 1
            chars: list[str] = []
            while i < n and rest[i] != '"':
                if rest[i] == "\\" and i + 1 < n:
                    i += 1
                chars.append(rest[i])
                i += 1
            i += 1
            text = "".join(chars)
        else:
            end = rest.find(";", i)
            end = n if end < 0 else end
            text = rest[i:end].strip()
            i = end
        params.setdefault(name, text)
    return main.strip().lower(), params


def boundary_of(content_type: str) -> bytes | None:
    """The boundary of a `multipart/form-data` Content-Type, or None for any other type."""
    main, params = parse_header(content_type)
    boundary = params.get("boundary")
    if main != "multipart/form-data" or boundary is None or not _BOUNDARY.match(boundary):
        return None
    return boundary.encode("ascii")


def _filename(params: dict[str, str]) -> str | None:
    extended = params.get("filename*")
    if extended is not None:
        # RFC 5987: charset'language'percent-encoded
        charset, _, rest = extended.partition("'")
        _, _, encoded = rest.partition("'")
        try:
            return unquote(encoded, encoding=charset or "utf-8", errors="replace")
        except LookupError:
            return unquote(encoded, errors="replace")
    return params.get("filename")


class MultipartReader:
    """Reads parts from a body's chunks: `next_part()` for the headers, then `read_body()`."""

    def __init__(self, chunks: AsyncIterator[bytes], boundary: bytes, *, max_parts: int) -> None:
        self._chunks = chunks.__aiter__()
        self._delimiter = b"\r\n--" + boundary
        # A leading CRLF lets the first boundary line match the same delimiter as the others.
        self._buffer = bytearray(b"\r\n")
        self._state = "start"  # start, body, delimited, done
        self._parts = 0
        self._max_parts = max_parts

    async def _fill(self) -> None:
        while True:
            try:
                chunk = await anext(self._chunks)
            except StopAsyncIteration:
                raise MalformedMultipart("the body ended before its closing boundary") from None
            if chunk:
                self._buffer += chunk
                return

    async def next_part(self) -> Part | None:
        """The next part's headers, skipping what is left of the current part; None at the end."""
        if self._state == "body":
            async for _ in self.read_body():
                pass
        if self._state == "done":
            return None
        if self._state == "start":
            while (found := self._buffer.find(self._delimiter)) < 0:
                if len(self._buffer) > MAX_PREAMBLE_BYTES:
                    raise MalformedMultipart("no opening boundary")
                await self._fill()
            del self._buffer[:found + len(self._delimiter)]
        while len(self._buffer) < 2:
            await self._fill()
        if self._buffer[:2] == b"--":
            self._state = "done"  # the epilogue is ignored
            return None
        # The rest of the boundary line (only padding), then headers up to an empty line.
        while (end := self._buffer.find(b"\r\n\r\n")) < 0:
            if len(self._buffer) > MAX_HEADER_BYTES:
                raise MalformedMultipart("part headers too large")
            await self._fill()
        if end > MAX_HEADER_BYTES:
            raise MalformedMultipart("part headers too large")
        line_end = self._buffer.find(b"\r\n")
        if self._buffer[:line_end].strip(b" \t"):
            raise MalformedMultipart("unexpected text after a boundary")
        raw_headers = bytes(self._buffer[line_end + 2:end])
        del self._buffer[:end + 4]
        self._parts += 1
        if self._parts > self._max_parts:
            raise MalformedMultipart(f"more than {self._max_parts} parts")
        headers: dict[str, str] = {}
        for line in raw_headers.split(b"\r\n") if raw_headers else []:
            name, colon, value = line.partition(b":")
            if not colon:
                raise MalformedMultipart("invalid part header")
            headers[name.strip().lower().decode("latin-1")] = value.strip().decode("utf-8", "replace")
        disposition, params = parse_header(headers.get("content-disposition", ""))
        if disposition != "form-data" or "name" not in params:
            raise MalformedMultipart("a part has no form-data name")
        self._state = "body"
        return Part(name=params["name"], filename=_filename(params),
                    content_type=headers.get("content-type") or None)

    async def read_body(self) -> AsyncGenerator[bytes, None]:
        """The current part's bytes, in chunks, up to the next boundary."""
        if self._state != "body":
            return
        delimiter = self._delimiter
        # Bytes that could be the start of a delimiter split across chunks stay buffered.
        keep = len(delimiter) - 1
        while True:
            found = self._buffer.find(delimiter)
            if found >= 0:
                chunk = bytes(self._buffer[:found])
                del self._buffer[:found + len(delimiter)]
                self._state = "delimited"
                if chunk:
                    yield chunk
                return
            if len(self._buffer) > keep:
                cut = len(self._buffer) - keep
                chunk = bytes(self._buffer[:cut])
                del self._buffer[:cut]
                yield chunk
            await self._fill()

    async def read_all(self, max_bytes: int) -> bytes:
        """The current part's bytes, refusing more than `max_bytes`."""
        collected = bytearray()
        async with aclosing(self.read_body()) as chunks:
            async for chunk in chunks:
                collected += chunk
                if len(collected) > max_bytes:
                    raise FieldTooLarge(f"more than {max_bytes} bytes")
        return bytes(collected)
