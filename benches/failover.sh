#!/bin/bash
# A failover drill (BENCHMARKS.md, "Failover drill"): two `hexfleet serve` nodes share one fresh
# PostgreSQL database and the Redis at 127.0.0.1:6379 (market leases on). A simulated fleet
# (`hexfleet-sim demo`: couriers answering offers and driving their orders, Poisson orders,
# customers watching) talks to node B only. While it runs, the node that owns the market is
# killed with SIGKILL twice and stopped with SIGTERM once (a crash, a crash, a rolling
# restart), each time started again after RESTART_S seconds. At the end the script checks, in
# the database and the logs, what a production operator would ask:
#   - every order the server answered 201 for is in the database (no accepted order lost), with
#     exactly one `order.created` event;
#   - no order was delivered twice, or offered or assigned while a courier held it;
#   - no courier holds more than its capacity (in size units) at the end;
#   - dispatch and deliveries went on after each failover: orders were offered and couriers
#     reached pickups and drop-offs between every restart and the next, and after the last;
#   - every customer watching an order that ended saw it end (tracking pages reconnect);
#   - every order is either finished or younger than STUCK_S (none stuck for good; the default
#     is long, since trips with a saturated fleet take 10 minutes and more);
#   - no node panicked.
# It prints what it found and exits 1 if a check fails (or a query of the checks fails).
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
declare -A PID PORT=([a]=8094 [b]=8096)
SIM=
cleanup() {
  [ -n "$SIM" ] && kill "$SIM" 2>/dev/null
  for p in "${PID[@]}"; do kill "$p" 2>/dev/null; done
  wait 2>/dev/null
  if [ -z "${KEEP:-}" ]; then
    psql -h 127.0.0.1 -U postgres -d test -qc "DROP DATABASE IF EXISTS $DB WITH (FORCE)" >/dev/null
    redis-cli -h 127.0.0.1 --scan --pattern "${PFX}*" | xargs -r redis-cli -h 127.0.0.1 del >/dev/null
    rm -rf "$LOGS"
  else
    echo "kept: database $DB, logs in $LOGS"
  fi
}
trap cleanup EXIT
psql -h 127.0.0.1 -U postgres -d test -qc "CREATE DATABASE $DB" >/dev/null || exit 1
URL=postgres://postgres@127.0.0.1:5432/$DB
FAIL=0
# A query of the checks; one that fails fails the drill (its empty answer would pass a check).
# Most run in a subshell, so the failure is noted in a file.
q() {
  local out
  if ! out=$(psql -h 127.0.0.1 -U postgres -d $DB -v ON_ERROR_STOP=1 -Atc "$1" 2>&1); then
    echo "query failed: $out" >&2; echo "$out" >>"$LOGS/query-failures"; return 1
  fi
  [ -n "$out" ] && echo "$out"
  return 0
}

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

# The checks read the sim's debug lines (accepted orders, watched orders).
RUST_LOG="hexfleet_sim::demo=debug,${SIM_LOG:-hexfleet_sim=info}" $BIN/hexfleet-sim demo --url http://127.0.0.1:${PORT[b]} \
  --jwt-secret $HEXFLEET_JWT_SECRET --tenant $TENANT --couriers ${COURIERS:-200} \
  --orders-per-min ${ORDERS_PER_MIN:-40} --duration ${DUR}s >"$LOGS/sim.log" 2>&1 &
SIM=$!
T0=$(date +%s)
at() { while [ $(( $(date +%s) - T0 )) -lt $1 ]; do sleep 1; done; }
MARKS=(); KILLS=()
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
hit $((DUR / 5)) KILL
hit $((DUR * 2 / 5)) KILL
hit $((DUR * 3 / 5)) TERM
wait $SIM
SIM=
# The sim stopped its watchers at T0 + DUR; an order that ended after that was not watched.
SIM_STOP=$(( (T0 + DUR) * 1000 - 2000 ))
sleep 3
NOW=$(( $(date +%s%3N) ))
check() { # description count-of-bad [details]
  if [ "$2" = 0 ]; then echo "ok    $1"; else echo "FAIL  $1: $2"; [ -n "${3:-}" ] && echo "$3" | head -20 | sed 's/^/      /'; FAIL=1; fi
}
count() { echo -n "$1" | grep -c .; }
plain() { sed 's/\x1b\[[0-9;]*m//g' "$LOGS/sim.log"; }
logged() { plain | grep -a "$1" | grep -ao 'order=[A-Za-z0-9_-]*' | cut -d= -f2 | sort -u; } # order ids of the sim's lines with $1
echo "== sim"; plain | grep -a ' sim ' | tail -1 | sed 's/.*INFO//'
CREATED=$(plain | grep -a ' sim ' | tail -1 | grep -o 'orders_created=[0-9]*' | cut -d= -f2)
logged 'order accepted' >"$LOGS/accepted.txt"
q "SELECT id FROM orders WHERE tenant = '$TENANT'" | sort -u >"$LOGS/stored.txt"
echo "== orders: $(wc -l <"$LOGS/accepted.txt") accepted by the server, $(wc -l <"$LOGS/stored.txt") stored"
q "SELECT state, count(*) FROM orders WHERE tenant = '$TENANT' GROUP BY state ORDER BY 2 DESC" | sed 's/^/   /'
check "the sim's log names every order it created (${CREATED:-?})" "$([ "${CREATED:-0}" -gt 0 ] && [ "$(wc -l <"$LOGS/accepted.txt")" = "$CREATED" ] && echo 0 || echo 1)"
LOST=$(comm -23 "$LOGS/accepted.txt" "$LOGS/stored.txt")
check "every accepted order is stored" "$(count "$LOST")" "$LOST"
NOLOG=$(q "SELECT o.id, (SELECT count(*) FROM events e WHERE e.tenant = o.tenant AND e.entity = 'order' AND e.entity_id = o.id
            AND e.kind = 'order.created') AS n FROM orders o WHERE o.tenant = '$TENANT'" | grep -v '|1$')
check "every stored order has exactly one order.created event" "$(count "$NOLOG")" "$NOLOG"
DUP=$(q "SELECT entity_id, count(*) FROM events WHERE tenant = '$TENANT' AND entity = 'order' AND kind = 'order.delivered' GROUP BY 1 HAVING count(*) > 1")
check "no order delivered twice" "$(count "$DUP")" "$DUP"
OVER=$(q "SELECT o.courier, sum(o.size), max(c.capacity) FROM orders o JOIN couriers c ON c.tenant = o.tenant AND c.id = o.courier
          WHERE o.tenant = '$TENANT' AND o.state IN ('assigned','at_pickup','picked_up','at_dropoff')
          GROUP BY o.courier HAVING sum(o.size) > max(c.capacity)")
check "no courier holds more than its capacity (at the end)" "$(count "$OVER")" "$OVER"
STUCK=$(q "SELECT id, state, courier, ($NOW - created_at) / 1000 FROM orders WHERE tenant = '$TENANT'
           AND state NOT IN ('delivered','cancelled','failed','expired') AND created_at < $NOW - $STUCK_S * 1000 ORDER BY created_at")
check "no open order older than $STUCK_S s" "$(count "$STUCK")" "$STUCK"
# Two couriers at once: an order offered or assigned again while a courier held it (no
# release, decline, lapse or failure in between), from the event log's order.
TWICE=$(q "WITH e AS (SELECT entity_id, seq, kind, attrs->>'courier' AS c,
             lag(kind) OVER (PARTITION BY entity_id ORDER BY seq) AS prev_kind,
             lag(attrs->>'courier') OVER (PARTITION BY entity_id ORDER BY seq) AS prev_c
           FROM events WHERE tenant = '$TENANT' AND entity = 'order')
           SELECT entity_id, seq, kind, prev_kind, prev_c, c FROM e WHERE kind IN ('order.offered', 'order.assigned')
           AND prev_kind IN ('order.assigned', 'order.at_pickup', 'order.picked_up', 'order.at_dropoff')")
check "no order offered or assigned while held" "$(count "$TWICE")" "$TWICE"
# Customers: a tracking page reconnects (with ?since=) when its node goes away; every order
# watched that ended while the sim ran must have been seen ending by its watcher.
logged 'watching order' >"$LOGS/watched.txt"
logged 'watcher saw the order end' >"$LOGS/seen.txt"
q "SELECT entity_id FROM events WHERE tenant = '$TENANT' AND entity = 'order' AND ts <= $SIM_STOP
   AND kind IN ('order.delivered','order.cancelled','order.failed','order.expired')" | sort -u >"$LOGS/ended.txt"
MISSED=$(comm -12 "$LOGS/watched.txt" "$LOGS/ended.txt" | comm -23 - "$LOGS/seen.txt")
echo "== customers: $(wc -l <"$LOGS/watched.txt") orders watched, $(comm -12 "$LOGS/watched.txt" "$LOGS/ended.txt" | wc -l) of them ended while watched, $(wc -l <"$LOGS/seen.txt") seen ending"
check "every watched order that ended was seen ending by its watcher" "$(count "$MISSED")" "$MISSED"
# Liveness: between each restart and the next (and the end), orders were offered and couriers
# got on with their orders.
MARKS+=("$NOW")
for i in $(seq 0 $(( ${#MARKS[@]} - 2 ))); do
  from=${MARKS[$i]}; to=${MARKS[$((i + 1))]}
  read -r offers moves <<<"$(q "SELECT count(*) FILTER (WHERE kind = 'order.offered') || ' ' || count(*) FILTER (WHERE kind IN
      ('order.at_pickup', 'order.picked_up', 'order.at_dropoff', 'order.delivered')) FROM events WHERE tenant = '$TENANT' AND ts > $from AND ts <= $to")"
  check "after restart $((i + 1)): ${offers:-?} offers, ${moves:-?} arrivals, pickups and deliveries in $(( (to - from) / 1000 )) s" \
    "$([ "${offers:-0}" -gt 0 ] && [ "${moves:-0}" -gt 0 ] && echo 0 || echo 1)"
done
# How long each failover stopped dispatch: from the signal to the next offer. Only a running
# dispatcher offers (a node shutting down stops its dispatcher first), so this is the next
# owner's; it includes waiting for an order and a free courier.
echo "== failovers: signal -> next offer (seconds)"
for k in ${KILLS[@]+"${KILLS[@]}"}; do
  echo "   $(q "SELECT round((min(ts) - $k) / 1000.0, 1) FROM events WHERE tenant = '$TENANT' AND kind = 'order.offered' AND ts > $k")"
done
PANIC=$(grep -a -i "panicked" "$LOGS/a.log" "$LOGS/b.log")
check "no panic" "$(count "$PANIC")" "$PANIC"
echo "== event kinds"; q "SELECT entity, kind, count(*) FROM events WHERE tenant = '$TENANT' GROUP BY 1, 2 ORDER BY 1, 3 DESC" | sed 's/^/   /'
echo "== node log lines at ERROR: a $(grep -ac ERROR "$LOGS/a.log"), b $(grep -ac ERROR "$LOGS/b.log")"
grep -ah ERROR "$LOGS/a.log" "$LOGS/b.log" | sed 's/^.*ERROR//' | cut -c1-200 | sort | uniq -c | sort -rn | head -10
[ -s "$LOGS/query-failures" ] && { echo "FAIL  $(wc -l <"$LOGS/query-failures") queries of the checks failed"; FAIL=1; }
[ "$FAIL" = 0 ] || echo "FAILED"
exit $FAIL
