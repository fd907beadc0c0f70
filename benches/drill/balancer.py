#!/usr/bin/env python3
"""A load balancer for the failover drill, as a TCP-mode HAProxy or a cloud balancer would
sit in front of the nodes: connections go round-robin to the nodes whose `/readyz` answers
200 (checked every 500 ms), and a connection stays with its node until either side closes it.

usage: balancer.py LISTEN_PORT BACKEND_PORT [BACKEND_PORT ...]   (all on 127.0.0.1)
"""
import asyncio
import itertools
import sys

from tcp_pipe import pipe

listen, backends = int(sys.argv[1]), [int(p) for p in sys.argv[2:]]
ready = {port: False for port in backends}
turn = itertools.count()


async def probe(port):
    try:
        r, w = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 1.0)
        w.write(b"GET /readyz HTTP/1.1\r\nHost: drill\r\nConnection: close\r\n\r\n")
        line = await asyncio.wait_for(r.readline(), 1.0)
        w.transport.abort()
        return line.split(b" ")[1:2] == [b"200"]
    except (OSError, asyncio.TimeoutError, IndexError):
        return False


async def health():
    while True:
        for port in backends:
            up = await probe(port)
            if up != ready[port]:
                print(f"node :{port} {'ready' if up else 'not ready'}", flush=True)
            ready[port] = up
        await asyncio.sleep(0.5)


async def handle(client_r, client_w):
    up = [p for p in backends if ready[p]]
    if not up:
        client_w.transport.abort()
        return
    port = up[next(turn) % len(up)]
    try:
        server_r, server_w = await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        client_w.transport.abort()
        return
    await asyncio.gather(pipe(client_r, server_w), pipe(server_r, client_w))


async def main():
    asyncio.create_task(health())
    server = await asyncio.start_server(handle, "127.0.0.1", listen, backlog=1024)
    print(f"balancer 127.0.0.1:{listen} -> {backends}", flush=True)
    async with server:
        await server.serve_forever()


asyncio.run(main())
