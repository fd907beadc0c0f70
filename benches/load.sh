#!/bin/bash
# One end-to-end load run on this machine (BENCHMARKS.md, "End-to-end load"): a fresh release
# server on a fresh SQLite file, the load generator beside it, 4 consoles and 50 trackers.
# Build first: cargo build --release --bin hexfleet --bin hexfleet-sim
# usage: benches/load.sh RATE [COURIERS]
#   DUR=30s          measured run time after connecting
#   BIN=path         server binary (to compare two builds on the same machine)
#   SERVER_ARGS=...  extra `hexfleet serve` flags (e.g. "--workers 1")
#   EXTRA=...        extra generator flags (e.g. "--redis-url redis://127.0.0.1:6379")
#   INGEST=1         courier sockets on the server's ingest port (--ingest-listen 127.0.0.1:8091)
#   PG=1             store on the PostgreSQL at 127.0.0.1:5432 (a fresh database per run, dropped
#                    after) instead of a fresh SQLite file: what a production node runs on
#   METRICS=1        also read the server's own count of accepted fixes (hexfleet_fixes_total)
#                    12 s and 32 s into the run and print the rate between (needs DUR of 40s):
#                    what the server took, not only what the generator wrote
#   PSTAT=1          also count the server's user instructions and cycles (perf stat, 15 s in
#                    the middle of the run; needs DUR of 30s or more): steadier than CPU
#                    seconds on a shared machine
set -u
cd "$(dirname "$0")/.."
R=$1; N=${2:-19500}
DIR=${TMPDIR:-/tmp}/hexfleet-load-$$
mkdir -p "$DIR"; ulimit -n 20000
if [ -n "${INGEST:-}" ]; then
  SERVER_ARGS="${SERVER_ARGS:-} --ingest-listen 127.0.0.1:8091"; EXTRA="${EXTRA:-} --courier-url ws://127.0.0.1:8091"
fi
STORE="sqlite:$DIR/h.db"
if [ -n "${PG:-}" ]; then
  PGDB=hexfleet_load_$$
  psql -h 127.0.0.1 -U postgres -d test -qc "CREATE DATABASE $PGDB" >/dev/null || exit 1
  STORE=postgres://postgres@127.0.0.1:5432/$PGDB
fi
RUST_LOG=warn ${BIN:-./target/release/hexfleet} serve --dev-secret --listen 127.0.0.1:8090 --database-url "$STORE" ${SERVER_ARGS:-} 2>"$DIR/server.log" &
S=$!
for _ in $(seq 100); do curl -sf http://127.0.0.1:8090/healthz >/dev/null && break; sleep 0.1; done
if [ -n "${PSTAT:-}" ]; then
  (sleep 15; perf stat -x, -e instructions:u,cycles:u,cycles:k -p $S -- sleep 15 2>"$DIR/pstat.txt" >/dev/null
   awk -F, '{printf "  server %s over 15 s: %.3e\n", $3, $1}' "$DIR/pstat.txt") &
fi
if [ -n "${METRICS:-}" ]; then
  fixes() { echo "$(date +%s.%N) $(curl -s http://127.0.0.1:8090/metrics | awk '$1 == "hexfleet_fixes_total" {print $2}')"; }
  (sleep 12; A=$(fixes); sleep 20; B=$(fixes)
   echo "$A $B" | awk '{printf "  server accepted fixes (12-32 s)  %d in %.2f s = %.0f/s\n", $4 - $2, $3 - $1, ($4 - $2) / ($3 - $1)}') &
fi
./target/release/hexfleet-sim load --url http://127.0.0.1:8090 --couriers "$N" --rate "$R" --duration "${DUR:-30s}" \
  --ramp 5s --watchers 4 --track 50 --server-pid $S ${EXTRA:-} --quiet
kill $S; wait $S 2>/dev/null
wait
[ -n "${PG:-}" ] && psql -h 127.0.0.1 -U postgres -d test -qc "DROP DATABASE $PGDB WITH (FORCE)" >/dev/null
rm -rf "$DIR"
