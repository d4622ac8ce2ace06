"""Local-disk storage for uploaded files and archived outputs, written atomically."""

from __future__ import annotations

import asyncio
import hashlib
import os
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

CHUNK_BYTES = 64 * 1024


class TooLarge(ValueError):
    """The content passed the size limit; nothing was kept."""


@dataclass(frozen=True)
class Stored:
    """What was written: its key, size and digests."""

    key: str
    size: int
    sha256: str
    md5: str


class LocalStorage:
    """Files under one directory, named by random keys; never by anything a client chose."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def path(self, key: str) -> Path:
        """The file behind a key (keys are ours: two hex levels and a random name)."""
        parts = key.split("/")
        if len(parts) != 3 or not all(part.isalnum() for part in parts):
            raise ValueError("invalid storage key")
        return self.root / key

    async def write(self, chunks: AsyncIterator[bytes], *, max_bytes: int) -> Stored:
        """Stream chunks to a new file, refusing more than `max_bytes`."""
        name = secrets.token_hex(16)
        key = f"{name[:2]}/{name[2:4]}/{name}"
        target = self.path(key)
        await asyncio.to_thread(target.parent.mkdir, parents=True, exist_ok=True)
        partial = target.with_suffix(".part")
        sha256, md5 = hashlib.sha256(), hashlib.md5()  # noqa: S324  (a checksum, not security)
        size = 0
        handle = await asyncio.to_thread(partial.open, "wb")
        try:
            async for chunk in chunks:
                size += len(chunk)
                if size > max_bytes:
                    raise TooLarge(f"more than {max_bytes} bytes")
                sha256.update(chunk)
                md5.update(chunk)
                await asyncio.to_thread(handle.write, chunk)
            await asyncio.to_thread(handle.flush)
            await asyncio.to_thread(os.fsync, handle.fileno())
        except BaseException:
            await asyncio.to_thread(handle.close)
            await asyncio.to_thread(partial.unlink, missing_ok=True)
            raise
        await asyncio.to_thread(handle.close)
        await asyncio.to_thread(partial.replace, target)
        return Stored(key=key, size=size, sha256=sha256.hexdigest(), md5=md5.hexdigest())

    async def read_chunks(self, key: str) -> AsyncIterator[bytes]:
        """The file's bytes in chunks."""
        handle = await asyncio.to_thread(self.path(key).open, "rb")
        try:
            while chunk := await asyncio.to_thread(handle.read, CHUNK_BYTES):
                yield chunk
        finally:
            await asyncio.to_thread(handle.close)

    async def read(self, key: str) -> bytes:
        """The whole file (for small files only)."""
        return await asyncio.to_thread(self.path(key).read_bytes)

    async def exists(self, key: str) -> bool:
        """Whether the file is there."""
        return await asyncio.to_thread(self.path(key).is_file)

    async def delete(self, key: str) -> None:
        """Remove the file if it is there."""
        await asyncio.to_thread(self.path(key).unlink, missing_ok=True)
