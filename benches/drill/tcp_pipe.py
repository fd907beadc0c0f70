"""Byte copying for the drill's TCP helpers (tcp_proxy.py, balancer.py)."""
import asyncio


async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Copies `reader` to `writer` until either side ends, then resets `writer`'s connection
    (so the other direction of the pair ends too)."""
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        writer.transport.abort()
