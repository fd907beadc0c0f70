#!/usr/bin/env python3
"""The failover drill's webhook receiver.

usage: webhook_receiver.py PORT SECRET LOG

Checks each request's body signature (`X-Hexfleet-Signature-256`) and logs one line per
request, "seq signature-ok status". The first attempt of every 20th event is answered 503, so
the drill sees retries too; every other request is answered 200.
"""
import hashlib
import hmac
import json
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

port, secret, log = int(sys.argv[1]), sys.argv[2].encode(), open(sys.argv[3], "a", buffering=1)
refused = set()


class Handler(BaseHTTPRequestHandler):
    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        want = "sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest()
        ok = hmac.compare_digest(want, self.headers.get("X-Hexfleet-Signature-256", ""))
        seq = json.loads(body)["seq"]
        first = seq % 20 == 0 and seq not in refused
        refused.add(seq)
        status = 503 if first else 200
        log.write(f"{seq} {int(ok)} {status}\n")
        self.send_response(status)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


ThreadingHTTPServer(("127.0.0.1", port), Handler).serve_forever()
