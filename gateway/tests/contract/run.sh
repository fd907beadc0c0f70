#!/usr/bin/env bash
# The API contract check: schemathesis (https://schemathesis.readthedocs.io) generates requests
# from the server's own OpenAPI document and checks every answer against it (no 5xx, documented
# statuses, content types and bodies; schema-valid requests accepted, invalid ones refused; the
# stateful phase chains creates, reads and deletes). It is not part of `cargo test` (it needs
# Python); run it after changing a handler or the document:
#
#   pip install schemathesis==4.32.5
#   cargo build --bin hexfleet && gateway/tests/contract/run.sh [ROLE] [extra schemathesis flags]
#
# ROLE is the token's role (default admin). With TWO_NODES=1 two nodes share a fresh database
# in the PostgreSQL at 127.0.0.1:5432 and the Redis at 127.0.0.1:6379 (market leases on); node
# A takes the market and the requests go to node B, so every one of them is forwarded.
# Failures the document cannot rule out are listed, with why, in `baseline.md` beside this
# script and recorded in `baseline.json`, which schemathesis then does not count; the exit
# status is schemathesis's.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
bin=${HEXFLEET_BIN:-$here/../../../target/debug/hexfleet}
role=${1:-admin}
shift || true
port=${PORT:-18090}
dir=$(mktemp -d)
pids=()
db=""
cleanup() {
  for p in "${pids[@]}"; do kill -INT "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
  [ -n "$db" ] && psql -h 127.0.0.1 -U postgres -d test -qc "DROP DATABASE IF EXISTS $db" > /dev/null 2>&1
  rm -rf "$dir"
}
trap cleanup EXIT
export HEXFLEET_JWT_SECRET=contract-check-secret-0123456789abcdef
up() { # port
  for _ in $(seq 1 150); do curl -sf "http://127.0.0.1:$1/healthz" > /dev/null && return; sleep 0.2; done
  echo "the server on port $1 did not start" >&2; cat "$dir"/*.log >&2; exit 2
}
token=$("$bin" token --role "$role" --sub ops@example.com --tenant contract 2>/dev/null)
if [ -n "${TWO_NODES:-}" ]; then
  db=hexfleet_contract_$$
  psql -h 127.0.0.1 -U postgres -d test -qc "CREATE DATABASE $db"
  shared=(--database-url "postgres://postgres@127.0.0.1:5432/$db" --redis-url redis://127.0.0.1:6379 --redis-prefix "hx:contract:$$:")
  "$bin" serve --listen "127.0.0.1:$((port + 1))" "${shared[@]}" --node-id a > "$dir/a.log" 2>&1 &
  pids+=($!)
  up $((port + 1))
  # A first request makes node A the market's owner.
  admin=$("$bin" token --role admin --sub ops@example.com --tenant contract 2>/dev/null)
  curl -s -o /dev/null -H "Authorization: Bearer $admin" "http://127.0.0.1:$((port + 1))/v1/orders/none"
  "$bin" serve --listen "127.0.0.1:$port" "${shared[@]}" --node-id b > "$dir/b.log" 2>&1 &
  pids+=($!)
else
  "$bin" serve --listen "127.0.0.1:$port" --database-url "$dir/hexfleet.db" > "$dir/server.log" 2>&1 &
  pids+=($!)
fi
up "$port"
# One worker: CPython 3.11 fails building schemathesis's strategies from two threads at once
# ("AST constructor recursion depth mismatch").
schemathesis run "http://127.0.0.1:$port/v1/openapi.json" \
  -H "Authorization: Bearer $token" --checks all --workers 1 --max-examples "${EXAMPLES:-100}" \
  --seed "${SEED:-1}" --baseline "$here/baseline.json" "$@"
