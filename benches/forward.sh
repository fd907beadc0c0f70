#!/bin/bash
# Forwarding cost between two nodes with market leases (BENCHMARKS.md, "Two nodes: forwarding
# to a market's owner"). Node A owns the market `load`; the load generator connects to A
# (`a`, direct) or to B (`b`, every courier socket and console forwarded to A).
# Needs PostgreSQL (psql, trust auth) and Redis on 127.0.0.1, and release binaries:
#   cargo build --release --workspace --bins
# usage: benches/forward.sh a|b COURIERS RATE   (DUR=20s by default)
set -u
cd "$(dirname "$0")/.."
TARGET=$1; N=$2; R=$3
DB=hexfleet_fwd_$$
psql -h 127.0.0.1 -U postgres -d test -qc "CREATE DATABASE $DB" >/dev/null
URL=postgres://postgres@127.0.0.1:5432/$DB
PFX="hx:fwd:$$:"
ulimit -n 20000
export HEXFLEET_JWT_SECRET=loadtest-secret-0123456789abcdef RUST_LOG=warn
./target/release/hexfleet serve --listen 127.0.0.1:8091 --database-url $URL --redis-url redis://127.0.0.1:6379 --redis-prefix $PFX --node-id a 2>${TMPDIR:-/tmp}/hexfleet-fwd-a.log &
A=$!
for i in $(seq 100); do curl -sf http://127.0.0.1:8091/healthz >/dev/null && break; sleep 0.1; done
./target/release/hexfleet serve --listen 127.0.0.1:8092 --database-url $URL --redis-url redis://127.0.0.1:6379 --redis-prefix $PFX --node-id b 2>${TMPDIR:-/tmp}/hexfleet-fwd-b.log &
B=$!
for i in $(seq 100); do curl -sf http://127.0.0.1:8092/healthz >/dev/null && break; sleep 0.1; done
TOK=$(./target/release/hexfleet token --role dispatcher --sub d --tenant load --jwt-secret $HEXFLEET_JWT_SECRET)
curl -s -o /dev/null -w "A takes the market: %{http_code}\n" -H "Authorization: Bearer $TOK" http://127.0.0.1:8091/v1/orders/none
psql -h 127.0.0.1 -U postgres -d $DB -Atc "SELECT tenant, holder, epoch FROM market_leases"
cpu() { awk '{print $14+$15}' /proc/$1/stat; }
a0=$(cpu $A); b0=$(cpu $B); t0=$(date +%s.%N)
PORT=$([ $TARGET = a ] && echo 8091 || echo 8092)
./target/release/hexfleet-sim load --url http://127.0.0.1:$PORT --jwt-secret $HEXFLEET_JWT_SECRET --tenant load --couriers $N --rate $R --duration ${DUR:-20s} --ramp 3s --watchers 2 --track 20 --quiet
a1=$(cpu $A); b1=$(cpu $B); t1=$(date +%s.%N)
echo "cores: A=$(echo "($a1-$a0)/100/($t1-$t0)" | bc -l | cut -c1-5) B=$(echo "($b1-$b0)/100/($t1-$t0)" | bc -l | cut -c1-5) over $(echo "$t1-$t0" | bc | cut -c1-5) s"
kill $A $B; wait $A $B 2>/dev/null
psql -h 127.0.0.1 -U postgres -d test -qc "DROP DATABASE $DB WITH (FORCE)" >/dev/null
