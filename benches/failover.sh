#!/bin/bash
# A failover drill (BENCHMARKS.md, "Failover drill"): two `hexfleet serve` nodes share one fresh
# PostgreSQL database and the Redis at 127.0.0.1:6379 (market leases on). A simulated fleet
# (`hexfleet-sim demo`: couriers answering offers and driving their orders, Poisson orders,
# customers watching) talks to node B only. While it runs, the node that owns the market is
# killed with SIGKILL twice and stopped with SIGTERM once (a crash, a crash, a rolling
# restart), each time started again after RESTART_S seconds. At the end the script checks, in
# the database and the logs, what a production operator would ask:
#   - every order the server answered 201 for is in the database (no accepted order lost);
#   - no order was delivered twice, or held by two couriers at once;
#   - no courier holds more orders than its capacity;
#   - dispatch and deliveries went on after each failover: orders were offered and couriers
#     reached pickups and drop-offs between every restart and the next, and after the last;
#   - every order is either finished or younger than STUCK_S (none stuck for good; the default
#     is long, since trips with a saturated fleet take 10 minutes and more);
#   - every customer watching an order that ended saw it end (tracking pages reconnect);
#   - no node panicked.
# It prints what it found and exits 1 if a check fails.
#
# Build first: cargo build --release --bin hexfleet --bin hexfleet-sim (or PROFILE=debug)
# usage: benches/failover.sh            (DUR=600 seconds of fleet by default)
#   COURIERS=200  ORDERS_PER_MIN=40  RESTART_S=15  STUCK_S=1800  LEASE_MS=5000
#   KEEP=1 keeps the database and the logs; SIM_LOG=hexfleet_sim=trace logs every server frame
set -u
cd "$(dirname "$0")/.."
BIN=./target/${PROFILE:-release}
DUR=${DUR:-600}; RESTART_S=${RESTART_S:-15}; STUCK_S=${STUCK_S:-1800}
DB=hexfleet_drill_$$
PFX="hx:drill:$$:"
LOGS=${LOGS:-${TMPDIR:-/tmp}/hexfleet-drill-$$}
mkdir -p "$LOGS"
TENANT=drill
export HEXFLEET_JWT_SECRET=drill-secret-0123456789abcdef0123456789 RUST_LOG=${RUST_LOG:-warn}
psql -h 127.0.0.1 -U postgres -d test -qc "CREATE DATABASE $DB" >/dev/null || exit 1
URL=postgres://postgres@127.0.0.1:5432/$DB
q() { psql -h 127.0.0.1 -U postgres -d $DB -Atc "$1"; }

declare -A PID PORT=([a]=8094 [b]=8096)
start() { # node
  $BIN/hexfleet serve --listen 127.0.0.1:${PORT[$1]} --advertise-url http://127.0.0.1:${PORT[$1]} \
    --database-url $URL --redis-url redis://127.0.0.1:6379 --redis-prefix $PFX --node-id $1 \
    --market-leases true --market-lease-ms ${LEASE_MS:-5000} >>"$LOGS/$1.log" 2>&1 &
  PID[$1]=$!
  for _ in $(seq 300); do curl -sf http://127.0.0.1:${PORT[$1]}/healthz >/dev/null && return; sleep 0.1; done
  echo "node $1 did not start"; tail "$LOGS/$1.log"; exit 1
}
owner() { q "SELECT holder FROM market_leases WHERE tenant = '$TENANT'" | cut -d'#' -f1; }
start a; start b
# Node A takes the market first, so the first kill is of a node the fleet is not connected to.
tok=$($BIN/hexfleet token --role dispatcher --sub d --tenant $TENANT --jwt-secret $HEXFLEET_JWT_SECRET 2>/dev/null)
curl -s -o /dev/null -H "Authorization: Bearer $tok" http://127.0.0.1:${PORT[a]}/v1/orders/none
echo "market owner at start: $(owner)"

RUST_LOG=${SIM_LOG:-hexfleet_sim::demo=debug,hexfleet_sim=info} $BIN/hexfleet-sim demo --url http://127.0.0.1:${PORT[b]} \
  --jwt-secret $HEXFLEET_JWT_SECRET --tenant $TENANT --couriers ${COURIERS:-200} \
  --orders-per-min ${ORDERS_PER_MIN:-40} --duration ${DUR}s >"$LOGS/sim.log" 2>&1 &
SIM=$!
T0=$(date +%s)
at() { while [ $(( $(date +%s) - T0 )) -lt $1 ]; do sleep 1; done; }
hit() { # second signal
  at $1
  local o; o=$(owner)
  [ -z "$o" ] && { echo "t=$1 s: no market owner"; return; }
  echo "t=$1 s: $2 the owner, node $o (pid ${PID[$o]})"
  KILLS+=("$(date +%s%3N)")
  kill -$2 ${PID[$o]}; wait ${PID[$o]} 2>/dev/null
  sleep $RESTART_S; start $o
  echo "t=$(( $(date +%s) - T0 )) s: node $o back; owner now $(owner)"
  MARKS+=("$(date +%s%3N)")
}
MARKS=(); KILLS=()
hit $((DUR / 5)) KILL
hit $((DUR * 2 / 5)) KILL
hit $((DUR * 3 / 5)) TERM
wait $SIM
sleep 3
NOW=$(( $(date +%s%3N) ))
FAIL=0
check() { # description count-of-bad [details]
  if [ "$2" = 0 ]; then echo "ok    $1"; else echo "FAIL  $1: $2"; [ -n "${3:-}" ] && echo "$3" | head -20 | sed 's/^/      /'; FAIL=1; fi
}
echo "== sim"; sed 's/\x1b\[[0-9;]*m//g' "$LOGS/sim.log" | grep -a ' sim ' | tail -1 | sed 's/.*INFO//'
sed 's/\x1b\[[0-9;]*m//g' "$LOGS/sim.log" | grep -a 'order accepted' | grep -ao 'order=[A-Za-z0-9_-]*' | cut -d= -f2 | sort -u >"$LOGS/accepted.txt"
q "SELECT id FROM orders WHERE tenant = '$TENANT'" | sort -u >"$LOGS/stored.txt"
echo "== orders: $(wc -l <"$LOGS/accepted.txt") accepted by the server, $(wc -l <"$LOGS/stored.txt") stored"
q "SELECT state, count(*) FROM orders WHERE tenant = '$TENANT' GROUP BY state ORDER BY 2 DESC" | sed 's/^/   /'
LOST=$(comm -23 "$LOGS/accepted.txt" "$LOGS/stored.txt")
check "every accepted order is stored" "$(echo -n "$LOST" | grep -c .)" "$LOST"
NOLOG=$(q "SELECT o.id FROM orders o WHERE o.tenant = '$TENANT' AND NOT EXISTS (SELECT 1 FROM events e
            WHERE e.tenant = o.tenant AND e.entity = 'order' AND e.entity_id = o.id AND e.kind = 'order.created')")
check "every stored order has its order.created event" "$(echo -n "$NOLOG" | grep -c .)" "$NOLOG"
DUP=$(q "SELECT entity_id, count(*) FROM events WHERE tenant = '$TENANT' AND entity = 'order' AND kind = 'order.delivered' GROUP BY 1 HAVING count(*) > 1")
check "no order delivered twice" "$(echo -n "$DUP" | grep -c .)" "$DUP"
OVER=$(q "SELECT o.courier, count(*), max(c.capacity) FROM orders o JOIN couriers c ON c.tenant = o.tenant AND c.id = o.courier
          WHERE o.tenant = '$TENANT' AND o.state IN ('assigned','at_pickup','picked_up','at_dropoff')
          GROUP BY o.courier HAVING count(*) > max(c.capacity)")
check "no courier holds more than its capacity" "$(echo -n "$OVER" | grep -c .)" "$OVER"
STUCK=$(q "SELECT id, state, courier, ($NOW - created_at) / 1000 FROM orders WHERE tenant = '$TENANT'
           AND state NOT IN ('delivered','cancelled','failed','expired') AND created_at < $NOW - $STUCK_S * 1000 ORDER BY created_at")
check "no open order older than $STUCK_S s" "$(echo -n "$STUCK" | grep -c .)" "$STUCK"
# Two couriers at once: an order `assigned` again while a courier held it (no release, decline,
# lapse or failure in between), from the event log's order.
TWICE=$(q "WITH e AS (SELECT entity_id, seq, kind, attrs->>'courier' AS c,
             lag(kind) OVER (PARTITION BY entity_id ORDER BY seq) AS prev_kind,
             lag(attrs->>'courier') OVER (PARTITION BY entity_id ORDER BY seq) AS prev_c
           FROM events WHERE tenant = '$TENANT' AND entity = 'order')
           SELECT entity_id, seq, prev_kind, prev_c, c FROM e WHERE kind = 'order.assigned'
           AND prev_kind IN ('order.assigned', 'order.at_pickup', 'order.picked_up', 'order.at_dropoff')" 2>&1)
check "no order assigned while held" "$(echo -n "$TWICE" | grep -c .)" "$TWICE"
# Customers: a tracking page reconnects (with ?since=) when its node goes away; every order
# watched that ended must have been seen ending by its watcher, across the failovers.
sed 's/\x1b\[[0-9;]*m//g' "$LOGS/sim.log" | grep -a 'watching order' | grep -ao 'order=[A-Za-z0-9_-]*' | cut -d= -f2 | sort -u >"$LOGS/watched.txt"
sed 's/\x1b\[[0-9;]*m//g' "$LOGS/sim.log" | grep -a 'watcher saw the order end' | grep -ao 'order=[A-Za-z0-9_-]*' | cut -d= -f2 | sort -u >"$LOGS/seen.txt"
q "SELECT id FROM orders WHERE tenant = '$TENANT' AND state IN ('delivered','cancelled','failed','expired')" | sort -u >"$LOGS/ended.txt"
MISSED=$(comm -12 "$LOGS/watched.txt" "$LOGS/ended.txt" | comm -23 - "$LOGS/seen.txt")
echo "== customers: $(wc -l <"$LOGS/watched.txt") orders watched, $(comm -12 "$LOGS/watched.txt" "$LOGS/ended.txt" | wc -l) of them ended, $(wc -l <"$LOGS/seen.txt") seen ending"
check "every watched order that ended was seen ending by its watcher" "$(echo -n "$MISSED" | grep -c .)" "$MISSED"
# Liveness: between each restart and the next (and the end), orders were offered and couriers
# got on with their orders.
MARKS+=("$NOW")
for i in $(seq 0 $(( ${#MARKS[@]} - 2 ))); do
  from=${MARKS[$i]}; to=${MARKS[$((i + 1))]}
  n=$(q "SELECT count(*) FILTER (WHERE kind = 'order.offered') || ' ' || count(*) FILTER (WHERE kind IN ('order.at_pickup', 'order.picked_up', 'order.at_dropoff', 'order.delivered'))
         FROM events WHERE tenant = '$TENANT' AND ts > $from AND ts <= $to")
  set -- $n
  check "after restart $((i + 1)): $1 offers, $2 arrivals, pickups and deliveries in $(( (to - from) / 1000 )) s" "$([ "$1" -gt 0 ] && [ "$2" -gt 0 ] && echo 0 || echo 1)"
done
# How long each failover stopped the market: from the signal to the first order event
# (an offer, an acceptance, an arrival...) written by the next owner.
echo "== failovers: signal -> next order event (seconds)"
for k in "${KILLS[@]}"; do
  echo "   $(q "SELECT round((min(ts) - $k) / 1000.0, 1) FROM events WHERE tenant = '$TENANT' AND entity = 'order' AND ts > $k")"
done
PANIC=$(grep -a -i "panicked" "$LOGS/a.log" "$LOGS/b.log")
check "no panic" "$(echo -n "$PANIC" | grep -c .)" "$PANIC"
echo "== event kinds"; q "SELECT entity, kind, count(*) FROM events WHERE tenant = '$TENANT' GROUP BY 1, 2 ORDER BY 1, 3 DESC" | sed 's/^/   /'
echo "== node log lines at ERROR: a $(grep -ac ERROR "$LOGS/a.log"), b $(grep -ac ERROR "$LOGS/b.log")"
grep -ah ERROR "$LOGS/a.log" "$LOGS/b.log" | sed 's/^.*ERROR//' | cut -c1-200 | sort | uniq -c | sort -rn | head -10
kill ${PID[a]} ${PID[b]} 2>/dev/null; wait 2>/dev/null
if [ -z "${KEEP:-}" ]; then
  psql -h 127.0.0.1 -U postgres -d test -qc "DROP DATABASE $DB WITH (FORCE)" >/dev/null
  redis-cli -h 127.0.0.1 --scan --pattern "${PFX}*" | xargs -r redis-cli -h 127.0.0.1 del >/dev/null
  rm -rf "$LOGS"
else
  echo "kept: database $DB, logs in $LOGS"
fi
exit $FAIL
