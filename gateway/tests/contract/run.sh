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
# ROLE is the token's role (default admin). Failures the document cannot rule out are listed,
# with why, in `baseline.md` beside this script and recorded in `baseline.json`, which
# schemathesis then does not count; the exit status is schemathesis's.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
bin=${HEXFLEET_BIN:-$here/../../../target/debug/hexfleet}
role=${1:-admin}
shift || true
port=${PORT:-18090}
dir=$(mktemp -d)
trap 'kill -INT "$pid" 2>/dev/null; wait "$pid" 2>/dev/null; rm -rf "$dir"' EXIT
"$bin" serve --listen "127.0.0.1:$port" --database-url "$dir/hexfleet.db" > "$dir/server.log" 2>&1 &
pid=$!
for _ in $(seq 1 100); do
  curl -sf "http://127.0.0.1:$port/healthz" > /dev/null && break
  sleep 0.2
done
token=$("$bin" token --role "$role" --sub ops@example.com --tenant contract 2>/dev/null)
# One worker: CPython 3.11 fails building schemathesis's strategies from two threads at once
# ("AST constructor recursion depth mismatch").
schemathesis run "http://127.0.0.1:$port/v1/openapi.json" \
  -H "Authorization: Bearer $token" --checks all --workers 1 --max-examples "${EXAMPLES:-100}" \
  --seed "${SEED:-1}" --baseline "$here/baseline.json" "$@"
