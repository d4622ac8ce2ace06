"""The incremental multipart reader, fed bodies from real encoders split at every chunk size."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import httpx
import pytest

from app.files.multipart import (
    FieldTooLarge,
    MalformedMultipart,
    MultipartReader,
    boundary_of,
    parse_header,
)


async def _chunks(body: bytes, size: int) -> AsyncIterator[bytes]:
    for start in range(0, len(body), size):
        yield body[start:start + size]
    yield b""


async def _read(body: bytes, boundary: bytes, size: int) -> list[tuple[str, str | None, str | None, bytes]]:
    reader = MultipartReader(_chunks(body, size), boundary, max_parts=10)
    parts = []
    while (part := await reader.next_part()) is not None:
        content = b"".join([chunk async for chunk in reader.read_body()])
        parts.append((part.name, part.filename, part.content_type, content))
    return parts


def _encoded(**kwargs: object) -> tuple[bytes, bytes]:
    request = httpx.Request("POST", "http://x/", **kwargs)  # type: ignore[arg-type]
    boundary = boundary_of(request.headers["content-type"])
    assert boundary is not None
    return request.read(), boundary


CONTENT = b"\r\n--\r\n" + bytes(range(256)) * 3 + b"\r\n-"


@pytest.mark.parametrize("size", [1, 2, 3, 7, 31, 64, 1000, 100_000])
def test_httpx_body_round_trips_at_any_chunk_size(size: int) -> None:
    body, boundary = _encoded(
        data={"metadata": '{"a": 1}'},
        files={"content": ('we"ird na\\me.png', CONTENT, "image/png")},
    )
    parts = asyncio.run(_read(body, boundary, size))
    assert parts == [
        ("metadata", None, None, b'{"a": 1}'),
        ("content", 'we%22ird na\\me.png', "image/png", CONTENT),
    ]


def test_npm_style_body_with_a_metadata_file_part() -> None:
    boundary = b"----formdata-undici-0123456789"
    body = (
        b"------formdata-undici-0123456789\r\n"
        b'Content-Disposition: form-data; name="content"; filename="photo.png"\r\n'
        b"Content-Type: image/png\r\n\r\n" + CONTENT + b"\r\n"
        b"------formdata-undici-0123456789\r\n"
        b'Content-Disposition: form-data; name="metadata"; filename="blob"\r\n'
        b"Content-Type: application/json\r\n\r\n"
        b'{"k":"v"}\r\n'
        b"------formdata-undici-0123456789--\r\n"
    )
    for size in (1, 5, 4096):
        parts = asyncio.run(_read(body, boundary, size))
        assert parts == [
            ("content", "photo.png", "image/png", CONTENT),
            ("metadata", "blob", "application/json", b'{"k":"v"}'),
        ]


def test_empty_part_and_rfc5987_filename() -> None:
    body = (
        b"--b\r\n"
        b"Content-Disposition: form-data; name=\"content\"; filename*=UTF-8''na%C3%AFve.txt\r\n\r\n"
        b"\r\n--b--"
    )
    assert asyncio.run(_read(body, b"b", 3)) == [("content", "naïve.txt", None, b"")]


@pytest.mark.parametrize("body", [
    b"--b\r\nContent-Disposition: form-data; name=\"a\"\r\n\r\nno closing boundary",
    b"no boundary at all",
    b"--b\r\nContent-Type: text/plain\r\n\r\nno disposition\r\n--b--",
    b"--b\r\nnot a header\r\n\r\nx\r\n--b--",
])
def test_malformed_bodies_are_refused(body: bytes) -> None:
    with pytest.raises(MalformedMultipart):
        asyncio.run(_read(body, b"b", 4))


def test_too_many_parts_are_refused() -> None:
    body = b"".join(b'--b\r\nContent-Disposition: form-data; name="f"\r\n\r\nx\r\n' for _ in range(11)) + b"--b--"
    with pytest.raises(MalformedMultipart, match="more than 10 parts"):
        asyncio.run(_read(body, b"b", 100))


def test_read_all_refuses_a_long_field() -> None:
    async def go() -> None:
        body = b'--b\r\nContent-Disposition: form-data; name="f"\r\n\r\n' + b"x" * 100 + b"\r\n--b--"
        reader = MultipartReader(_chunks(body, 7), b"b", max_parts=2)
        assert await reader.next_part() is not None
        await reader.read_all(99)

    with pytest.raises(FieldTooLarge):
        asyncio.run(go())


def test_headers() -> None:
    assert boundary_of("multipart/form-data; boundary=abc") == b"abc"
    assert boundary_of('Multipart/Form-Data; charset=utf-8; boundary="a b:c"') == b"a b:c"
    assert boundary_of("application/json") is None
    assert boundary_of("multipart/form-data") is None
    assert boundary_of("multipart/form-data; boundary=" + "a" * 71) is None
    assert parse_header('form-data; name="a;b"; filename=x.png; flag') == (
        "form-data", {"name": "a;b", "filename": "x.png"}
    )
