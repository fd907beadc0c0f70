#!/usr/bin/env python3
"""A TCP proxy the failover drill puts between one node and PostgreSQL, to cut that node off.

usage: tcp_proxy.py LISTEN_PORT TARGET_PORT   (both on 127.0.0.1)

SIGUSR1 cuts: every connection through it is reset and new ones are reset as they come, as a
network partition between the node and the database looks to the node. SIGUSR2 mends it.
"""
import asyncio
import signal
import sys

from tcp_pipe import pipe

listen, target = int(sys.argv[1]), int(sys.argv[2])
cut = False
pairs = set()


async def handle(client_r, client_w):
    if cut:
        client_w.transport.abort()
        return
    try:
        server_r, server_w = await asyncio.open_connection("127.0.0.1", target)
    except OSError:
        client_w.transport.abort()
        return
    pair = (client_w, server_w)
    pairs.add(pair)
    try:
        await asyncio.gather(pipe(client_r, server_w), pipe(server_r, client_w))
    finally:
        pairs.discard(pair)


def set_cut(value):
    global cut
    cut = value
    if value:
        for client_w, server_w in list(pairs):
            client_w.transport.abort()
            server_w.transport.abort()
    print("cut" if value else "mended", flush=True)


async def main():
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGUSR1, set_cut, True)
    loop.add_signal_handler(signal.SIGUSR2, set_cut, False)
    server = await asyncio.start_server(handle, "127.0.0.1", listen)
    print(f"proxy 127.0.0.1:{listen} -> 127.0.0.1:{target}", flush=True)
    async with server:
        await server.serve_forever()


asyncio.run(main())
