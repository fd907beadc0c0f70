#!/bin/bash
# Courier connections beyond one process's open-file limit (BENCHMARKS.md, "Two nodes, 20k
# courier sockets"): two `hexfleet serve` nodes on this machine share one fresh PostgreSQL
# database and the Redis at 127.0.0.1:6379 (market leases on), each running one market
# (tenant `east` on node A, `west` on node B). Two load generators, one per market, each open
# COURIERS/2 courier sockets straight to the ingest port of their market's owner, with
# WATCHERS consoles and TRACK tracked orders each, at RATE/2 updates/s each.
#
# The hard limit here is 20,000 open files per process, so one process cannot hold 20,000
# courier sockets plus its other descriptors; two nodes of 10,000 can. Each generator prints
# its own table (its market's latency, deliveries and its node's memory per connection); the
# script prints the two nodes' and PostgreSQL's CPU over the run.
#
# Build first: cargo build --release --bin hexfleet --bin hexfleet-sim
# usage: benches/two-nodes.sh RATE [COURIERS]     (DUR=30s by default)
#   WATCHERS=2      consoles per market (each sees its whole market)
#   TRACK=25        tracked orders per market
#   CROSS=1         consoles and customers connect to the other node (forwarded / via Redis)
#   NODE_ARGS=...   extra `hexfleet serve` flags for both nodes
#   FANOUT=...      replaces the Redis flags (FANOUT="--market-leases true": leases without
#                   cross-node fan-out, to see what the fan-out costs)
set -u
cd "$(dirname "$0")/.."
R=$1; N=${2:-20000}
DB=hexfleet_two_$$
PFX="hx:two:$$:"
LOGS=${TMPDIR:-/tmp}/hexfleet-two-$$
mkdir -p "$LOGS"; ulimit -n 20000
psql -h 127.0.0.1 -U postgres -d test -qc "CREATE DATABASE $DB" >/dev/null || exit 1
URL=postgres://postgres@127.0.0.1:5432/$DB
export HEXFLEET_JWT_SECRET=loadtest-secret-0123456789abcdef RUST_LOG=warn
node() { # name http-port ingest-port
  ${BIN:-./target/release/hexfleet} serve --listen 127.0.0.1:$2 --ingest-listen 127.0.0.1:$3 --database-url $URL \
    ${FANOUT:---redis-url redis://127.0.0.1:6379 --redis-prefix $PFX} --node-id $1 ${NODE_ARGS:-} 2>"$LOGS/$1.log" &
}
node a 8090 8091; A=$!
node b 8092 8093; B=$!
for port in 8090 8092; do
  for _ in $(seq 150); do curl -sf http://127.0.0.1:$port/healthz >/dev/null && break; sleep 0.1; done
done
take() { # node-port tenant: a first request makes that node the market's owner
  local tok; tok=$(./target/release/hexfleet token --role dispatcher --sub d --tenant $2 --jwt-secret $HEXFLEET_JWT_SECRET)
  curl -s -o /dev/null -H "Authorization: Bearer $tok" http://127.0.0.1:$1/v1/orders/none
}
take 8090 east; take 8092 west
psql -h 127.0.0.1 -U postgres -d $DB -Atc "SELECT tenant, holder, epoch FROM market_leases ORDER BY tenant" | sed 's/^/  lease: /'
cpu() { awk '{print $14+$15}' /proc/$1/stat; }
pgcpu() { ( for p in $(pgrep -x postgres); do awk '{print $14+$15}' /proc/$p/stat 2>/dev/null; done
            awk '{print $16+$17}' /proc/$(pgrep -o -x postgres)/stat ) | awk '{s+=$1} END{print s}'; }
a0=$(cpu $A); b0=$(cpu $B); p0=$(pgcpu); t0=$(date +%s.%N)
gen() { # tenant http-port ingest-port server-pid seed
  ./target/release/hexfleet-sim load --url http://127.0.0.1:$2 --courier-url ws://127.0.0.1:$3 \
    --jwt-secret $HEXFLEET_JWT_SECRET --tenant $1 --couriers $((N / 2)) --rate $((R / 2)) --duration "${DUR:-30s}" \
    --ramp 5s --watchers ${WATCHERS:-2} --track ${TRACK:-25} --server-pid $4 --seed $5 ${EXTRA:-} --quiet >"$LOGS/gen-$1.txt" 2>&1
}
if [ -n "${CROSS:-}" ]; then
  # Consoles and customers on the other node: consoles are forwarded to the owner, tracking
  # pages are fed through Redis (the order's channel).
  gen east 8092 8091 $A 1 & GA=$!
  gen west 8090 8093 $B 2 & GB=$!
else
  gen east 8090 8091 $A 1 & GA=$!
  gen west 8092 8093 $B 2 & GB=$!
fi
wait $GA $GB
a1=$(cpu $A); b1=$(cpu $B); p1=$(pgcpu); t1=$(date +%s.%N)
for t in east west; do echo "== market $t"; cat "$LOGS/gen-$t.txt"; done
echo "cores over $(echo "$t1 - $t0" | bc | cut -c1-5) s (setup and connecting included): node A $(echo "($a1-$a0)/100/($t1-$t0)" | bc -l | cut -c1-5), node B $(echo "($b1-$b0)/100/($t1-$t0)" | bc -l | cut -c1-5), PostgreSQL $(echo "($p1-$p0)/100/($t1-$t0)" | bc -l | cut -c1-5)"
grep -ih "error\|warn" "$LOGS/a.log" "$LOGS/b.log" | head -5
kill $A $B; wait $A $B 2>/dev/null
psql -h 127.0.0.1 -U postgres -d test -qc "DROP DATABASE $DB WITH (FORCE)" >/dev/null
redis-cli -h 127.0.0.1 --scan --pattern "${PFX}*" | xargs -r redis-cli -h 127.0.0.1 del >/dev/null
rm -rf "$LOGS"
