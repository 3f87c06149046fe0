"""A bare-socket HTTP/1.1 client for tests that need what httpx will not do: declare a body and not
send it, trickle it byte by byte, or send chunked bodies of a chosen shape."""

from __future__ import annotations

import asyncio
import contextlib


def request_head(path: str, length: int | None, headers: dict[str, str] | None = None) -> bytes:
    """A POST head: ``content-length: length``, or chunked transfer encoding when ``length`` is None."""
    lines = [f"POST {path} HTTP/1.1", "host: test"]
    lines += [f"{name}: {value}" for name, value in (headers or {"content-type": "application/json"}).items()]
    lines.append(f"content-length: {length}" if length is not None else "transfer-encoding: chunked")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


async def exchange(base: str, head: bytes, body_parts: list[bytes], pause: float = 0.0) -> tuple[int | None, bytes]:
    """Send ``head``, then ``body_parts`` ``pause`` s apart until an answer starts to arrive (as a
    real client stops sending then); read until the server closes. Returns the status (None if the
    server closed without answering) and the whole answer."""
    host, port = base.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    answer = bytearray()

    async def read_all() -> None:
        with contextlib.suppress(ConnectionError):
            while chunk := await reader.read(65536):
                answer.extend(chunk)

    reading = asyncio.ensure_future(read_all())
    try:
        with contextlib.suppress(ConnectionError):
            writer.write(head)
            for part in body_parts:
                if answer or reading.done():
                    break
                writer.write(part)
                await writer.drain()
                await asyncio.sleep(pause)
        await reading
    finally:
        reading.cancel()
        writer.close()
    return (int(answer.split(b" ", 2)[1]) if answer else None), bytes(answer)
