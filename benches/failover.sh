#!/bin/bash
# A failover drill (BENCHMARKS.md, "Failover drill"): two `hexfleet serve` nodes share one fresh
# PostgreSQL database and the Redis at 127.0.0.1:6379 (market leases on). A simulated fleet
# (`hexfleet-sim demo`: couriers answering offers and driving their orders, Poisson orders,
# customers watching) reaches the nodes through a load balancer (benches/drill/balancer.py:
# round-robin over the nodes whose /readyz answers 200), or node B alone with VIA=b. While it
# runs, the node that owns the market is
# killed with SIGKILL twice and stopped with SIGTERM once (a crash, a crash, a rolling
# restart), each time started again after RESTART_S seconds; then it is cut off from the
# database for CUT_S seconds (each node reaches PostgreSQL through a proxy the drill controls)
# and restarted when it stops. At the end the script checks, in the database and the logs, what
# a production operator would ask:
#   - every order the server answered 201 for is in the database (no accepted order lost), with
#     exactly one `order.created` event;
#   - no order was delivered twice, or offered or assigned while a courier held it;
#   - no order waited at its pickup or drop-off for more than 90 s (a courier's report lost);
#   - a dispatcher's releases (one every OVERRIDE_S seconds, as the apps reach the nodes) are in the event
#     log, and no order goes back to the courier it was taken from;
#   - no courier holds more than its capacity (in size units), at the end nor at any time
#     before (replayed from the event log);
#   - dispatch and deliveries went on after each failover: orders were offered and couriers
#     reached pickups and drop-offs between every restart and the next, and after the last;
#   - every customer watching an order that ended saw it end (tracking pages reconnect);
#   - a dispatcher's console (reconnecting, subscribing again) shows at the end the store's open
#     orders in their states;
#   - a webhook on `order.*` got every order event, signed (at least once: a killed node's
#     sends are made again), its receiver refusing some first attempts;
#   - every order is either finished or younger than STUCK_S (none stuck for good; the default
#     is long, since trips with a saturated fleet take 10 minutes and more);
#   - the node cut off stepped down, the other took the market, and the cut node stopped once
#     it saw that with the database back (it must not act on a market another node ran);
#   - no node panicked.
# It prints what it found and exits 1 if a check fails (or a query of the checks fails).
#
# Build first: cargo build --release --bin hexfleet --bin hexfleet-sim (or PROFILE=debug)
# usage: benches/failover.sh            (DUR=600 seconds of fleet by default)
#   COURIERS=200  ORDERS_PER_MIN=40  RESTART_S=15  STUCK_S=1800  LEASE_MS=5000  OVERRIDE_S=20
#   CUT_S=15  VIA=lb (apps through the balancer) or b (node B alone)
#   KEEP=1 keeps the database and the logs; SIM_LOG=hexfleet_sim=trace logs every server frame
set -u
cd "$(dirname "$0")/.."
export LC_ALL=C # one collation for sort, comm and join
export PYTHONDONTWRITEBYTECODE=1 # the helpers import tcp_pipe: no __pycache__ in the tree
BIN=./target/${PROFILE:-release}
DUR=${DUR:-600}; RESTART_S=${RESTART_S:-15}; STUCK_S=${STUCK_S:-1800}; CUT_S=${CUT_S:-15}
DB=hexfleet_drill_$$
PFX="hx:drill:$$:"
LOGS=${LOGS:-${TMPDIR:-/tmp}/hexfleet-drill-$$}
mkdir -p "$LOGS"
TENANT=drill
export HEXFLEET_JWT_SECRET=drill-secret-0123456789abcdef0123456789 RUST_LOG=${RUST_LOG:-warn}
declare -A PID PORT=([a]=8094 [b]=8096)
declare -A PX PXPORT=([a]=15494 [b]=15496)
SIM=; OVR=; HOOK=; LB=
cleanup() {
  [ -n "$SIM" ] && kill "$SIM" 2>/dev/null
  [ -n "$LB" ] && kill "$LB" 2>/dev/null
  [ -n "$OVR" ] && kill "$OVR" 2>/dev/null
  [ -n "$HOOK" ] && kill "$HOOK" 2>/dev/null
  for p in "${PID[@]}"; do kill "$p" 2>/dev/null; done
  # The proxies after the nodes, so a node's last writes (releasing its leases) get through.
  for p in "${PID[@]}"; do wait "$p" 2>/dev/null; done
  for p in "${PX[@]}"; do kill "$p" 2>/dev/null; done
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
# Each node reaches PostgreSQL through a proxy of its own (benches/drill/tcp_proxy.py), so the
# drill can cut one node off the database; its checks connect directly.
for n in a b; do
  python3 benches/drill/tcp_proxy.py ${PXPORT[$n]} 5432 >>"$LOGS/proxy-$n.log" 2>&1 &
  PX[$n]=$!
done
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
    --database-url postgres://postgres@127.0.0.1:${PXPORT[$1]}/$DB --redis-url redis://127.0.0.1:6379 --redis-prefix $PFX --node-id $1 \
    --market-leases true --market-lease-ms ${LEASE_MS:-5000} >>"$LOGS/$1.log" 2>&1 &
  PID[$1]=$!
  for _ in $(seq 300); do curl -sf http://127.0.0.1:${PORT[$1]}/healthz >/dev/null && return; sleep 0.1; done
  echo "node $1 did not start"; tail "$LOGS/$1.log"; exit 1
}
owner() { q "SELECT holder FROM market_leases WHERE tenant = '$TENANT'" | cut -d'#' -f1; }
start a; start b
# Where the apps, the customers and the dispatcher connect.
if [ "${VIA:-lb}" = lb ]; then
  python3 benches/drill/balancer.py 8090 ${PORT[a]} ${PORT[b]} >>"$LOGS/balancer.log" 2>&1 &
  LB=$!
  APPS=http://127.0.0.1:8090
  for _ in $(seq 100); do [ "$(curl -s -o /dev/null -w '%{http_code}' $APPS/readyz)" = 200 ] && break; sleep 0.1; done
else
  APPS=http://127.0.0.1:${PORT[b]}
fi
# Node A takes the market first (with VIA=b, the first kill is of a node no app is connected to).
tok=$($BIN/hexfleet token --role dispatcher --sub d --tenant $TENANT --jwt-secret $HEXFLEET_JWT_SECRET 2>/dev/null)
curl -s -o /dev/null -H "Authorization: Bearer $tok" http://127.0.0.1:${PORT[a]}/v1/orders/none
echo "market owner at start: $(owner)"
# A webhook receiver for every order event (benches/drill/webhook_receiver.py): it checks each
# request's signature and refuses the first attempt of every 20th event, so retries happen.
HOOK_SECRET=drill-webhook-secret-0123456789
python3 benches/drill/webhook_receiver.py 8098 "$HOOK_SECRET" "$LOGS/hooks.log" &
HOOK=$!
code=$(curl -s -o "$LOGS/webhook.json" -w '%{http_code}' -X PUT -H "Authorization: Bearer $tok" -H 'Content-Type: application/json' \
  -d "{\"url\":\"http://127.0.0.1:8098/hook\",\"events\":[\"order.*\"],\"secret\":\"$HOOK_SECRET\"}" \
  http://127.0.0.1:${PORT[a]}/v1/webhooks/drill)
[ "$code" = 201 ] || { echo "webhook not created: $code $(cat "$LOGS/webhook.json")"; exit 1; }

# The checks read the sim's debug lines (accepted orders, watched orders).
RUST_LOG="hexfleet_sim::demo=debug,hexfleet_sim::courier=debug,${SIM_LOG:-hexfleet_sim=info}" $BIN/hexfleet-sim demo --url $APPS \
  --jwt-secret $HEXFLEET_JWT_SECRET --tenant $TENANT --couriers ${COURIERS:-200} \
  --orders-per-min ${ORDERS_PER_MIN:-40} --consoles 1 --duration ${DUR}s >"$LOGS/sim.log" 2>&1 &
SIM=$!
T0=$(date +%s)
# A dispatcher at the console: every OVERRIDE_S seconds it takes an assigned order back from its
# courier (release), reaching the nodes as the apps do, whoever owns the market. Logged as
# "ms order status"; a 503 while the market moves is not retried (the dispatcher moves on).
(
  dtok=$($BIN/hexfleet token --role dispatcher --sub drill-dispatcher --tenant $TENANT --ttl 3h --jwt-secret $HEXFLEET_JWT_SECRET 2>/dev/null)
  while sleep ${OVERRIDE_S:-20}; do
    id=$(q "SELECT id FROM orders WHERE tenant = '$TENANT' AND state = 'assigned' ORDER BY random() LIMIT 1") || continue
    [ -z "$id" ] && continue
    code=$(curl -s -m 10 -o /dev/null -w '%{http_code}' -X POST -H "Authorization: Bearer $dtok" \
      $APPS/v1/orders/$id/release)
    echo "$(date +%s%3N) $id $code" >>"$LOGS/overrides.log"
  done
) &
OVR=$!
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
# A network partition: the owner loses the database (its proxy resets every connection) for
# CUT_S seconds, longer than a lease. It should step down (its sessions closed with 1013),
# the other node take the market over, and the cut node stop once it sees, with the database
# back, that its market was taken (it must not serve stale actors); an orchestrator restarts it.
partition() {
  at $1
  local o; o=$(owner)
  [ -z "$o" ] && { echo "t=$1 s: no market owner"; return; }
  echo "t=$1 s: node $o (the owner) cut off from the database for ${CUT_S}s"
  KILLS+=("$(date +%s%3N)")
  kill -USR1 ${PX[$o]}; sleep $CUT_S; kill -USR2 ${PX[$o]}
  local after; after=$(owner)
  echo "t=$(( $(date +%s) - T0 )) s: database back for node $o; owner now $after"
  CUT_MOVED=$([ -n "$after" ] && [ "$after" != "$o" ] && echo 1 || echo 0)
  for _ in $(seq 600); do kill -0 ${PID[$o]} 2>/dev/null || break; sleep 0.1; done
  if kill -0 ${PID[$o]} 2>/dev/null; then
    CUT_STOPPED=0; echo "t=$(( $(date +%s) - T0 )) s: node $o still running 60 s after the database came back"
  else
    CUT_STOPPED=1; wait ${PID[$o]} 2>/dev/null
    echo "t=$(( $(date +%s) - T0 )) s: node $o stopped; restarting it"; start $o
  fi
  CUT_NODE=$o
  MARKS+=("$(date +%s%3N)")
}
CUT_NODE=; CUT_MOVED=; CUT_STOPPED=
partition $((DUR * 4 / 5))
wait $SIM
SIM=
kill $OVR 2>/dev/null; wait $OVR 2>/dev/null; OVR=
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
echo "== error frames to couriers: $(plain | grep -a 'server error frame' | grep -ao 'code=[a-z_]*' | cut -d= -f2 | sort | uniq -c | awk '{printf "%s×%s ", $1, $2}')"
plain | grep -a 'server error frame' | sed 's/.*DEBUG//' | cut -c1-200 | head -5 | sed 's/^/   /'
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
# Throughout, from the event log: who holds each order after each of its events, and each
# courier's load (in size units) after each change. Events are ordered by time, a release
# before a take within one millisecond.
OVER=$(q "WITH ev AS (SELECT seq, ts, entity_id AS oid, CASE WHEN attrs->>'to' IN ('assigned','at_pickup','picked_up','at_dropoff')
             THEN attrs->>'courier' END AS holder FROM events WHERE tenant = '$TENANT' AND entity = 'order'),
           ch AS (SELECT ev.*, lag(holder) OVER (PARTITION BY oid ORDER BY seq) AS prev, o.size
             FROM ev JOIN orders o ON o.tenant = '$TENANT' AND o.id = ev.oid),
           d AS (SELECT ts, seq, prev AS courier, -size AS delta FROM ch WHERE prev IS NOT NULL AND prev IS DISTINCT FROM holder
             UNION ALL SELECT ts, seq, holder, size FROM ch WHERE holder IS NOT NULL AND holder IS DISTINCT FROM prev),
           r AS (SELECT courier, ts, seq, sum(delta) OVER (PARTITION BY courier ORDER BY ts, delta, seq ROWS UNBOUNDED PRECEDING) AS held FROM d)
           SELECT r.courier, r.ts, r.held, c.capacity FROM r JOIN couriers c ON c.tenant = '$TENANT' AND c.id = r.courier
           WHERE r.held > c.capacity ORDER BY r.ts")
PEAK=$(q "SELECT count(*) FROM events WHERE tenant = '$TENANT' AND entity = 'order' AND attrs->>'to' = 'assigned'")
check "no courier held more than its capacity at any time (${PEAK:-?} assignments replayed)" "$(count "$OVER")" "$OVER"
STUCK=$(q "SELECT id, state, courier, ($NOW - created_at) / 1000 FROM orders WHERE tenant = '$TENANT'
           AND state NOT IN ('delivered','cancelled','failed','expired') AND created_at < $NOW - $STUCK_S * 1000 ORDER BY created_at")
check "no open order older than $STUCK_S s" "$(count "$STUCK")" "$STUCK"
# A courier at the pickup or drop-off reports it within its dwell (5-20 s in the sim): an order
# left there for longer when the sim stopped had its report lost (answered with an error the
# app did not act on) and would be held for good.
WAITING=$(q "SELECT entity_id, state, courier, ($SIM_STOP - ts) / 1000 AS s FROM (SELECT DISTINCT ON (entity_id) entity_id,
             attrs->>'to' AS state, attrs->>'courier' AS courier, ts FROM events WHERE tenant = '$TENANT' AND entity = 'order'
             AND ts <= $SIM_STOP ORDER BY entity_id, ts DESC, seq DESC) l
           WHERE state IN ('at_pickup', 'at_dropoff') AND ts < $SIM_STOP - 90000")
check "no order left at its pickup or drop-off for more than 90 s" "$(count "$WAITING")" "$WAITING"
# Two couriers at once: an order offered or assigned again while a courier held it (no
# release, decline, lapse or failure in between), from the event log's order.
TWICE=$(q "WITH e AS (SELECT entity_id, seq, kind, attrs->>'courier' AS c,
             lag(kind) OVER (PARTITION BY entity_id ORDER BY seq) AS prev_kind,
             lag(attrs->>'courier') OVER (PARTITION BY entity_id ORDER BY seq) AS prev_c
           FROM events WHERE tenant = '$TENANT' AND entity = 'order')
           SELECT entity_id, seq, kind, prev_kind, prev_c, c FROM e WHERE kind IN ('order.offered', 'order.assigned')
           AND prev_kind IN ('order.assigned', 'order.at_pickup', 'order.picked_up', 'order.at_dropoff')")
check "no order offered or assigned while held" "$(count "$TWICE")" "$TWICE"
# The dispatcher's releases: an order taken back from a courier is not offered or assigned to
# that courier again (the dispatch rounds skip it), whichever node decided.
touch "$LOGS/overrides.log"
echo "== dispatcher releases: $(wc -l <"$LOGS/overrides.log") tried, answered $(awk '{print $3}' "$LOGS/overrides.log" | sort | uniq -c | awk '{printf "%s×%s ", $1, $2}')"
BACK=$(q "SELECT r.entity_id, r.attrs->>'courier', o.kind FROM events r JOIN events o ON o.tenant = r.tenant AND o.entity = 'order'
          AND o.entity_id = r.entity_id AND o.seq > r.seq AND o.kind IN ('order.offered', 'order.assigned')
          AND o.attrs->>'courier' = r.attrs->>'courier' WHERE r.tenant = '$TENANT' AND r.kind = 'order.released'")
RELEASED=$(q "SELECT count(*) FROM events WHERE tenant = '$TENANT' AND kind = 'order.released'")
check "no order offered or assigned again to the courier it was taken back from (${RELEASED:-?} releases)" "$(count "$BACK")" "$BACK"
OKREL=$(awk '$3 == 200' "$LOGS/overrides.log" | wc -l)
check "the dispatcher's releases reached the orders (${OKREL} answered 200, ${RELEASED:-?} in the event log)" \
  "$([ "${RELEASED:-0}" -ge "$OKREL" ] && [ "$OKREL" -gt 0 ] && echo 0 || echo 1)"
# Customers: a tracking page reconnects (with ?since=) when its node goes away; every order
# watched that ended while the sim ran must have been seen ending by its watcher.
logged 'watching order' >"$LOGS/watched.txt"
logged 'watcher saw the order end' >"$LOGS/seen.txt"
q "SELECT entity_id FROM events WHERE tenant = '$TENANT' AND entity = 'order' AND ts <= $SIM_STOP
   AND kind IN ('order.delivered','order.cancelled','order.failed','order.expired')" | sort -u >"$LOGS/ended.txt"
MISSED=$(comm -12 "$LOGS/watched.txt" "$LOGS/ended.txt" | comm -23 - "$LOGS/seen.txt")
echo "== customers: $(wc -l <"$LOGS/watched.txt") orders watched, $(comm -12 "$LOGS/watched.txt" "$LOGS/ended.txt" | wc -l) of them ended while watched, $(wc -l <"$LOGS/seen.txt") seen ending"
check "every watched order that ended was seen ending by its watcher" "$(count "$MISSED")" "$MISSED"
# A dispatcher's console (reconnecting with since, subscribing again) shows, when the sim stops,
# the open orders the store had then, in the same states; orders that changed within 3 s
# before or 1 s after are left out (in flight).
AT=$(plain | grep -a 'console view' | tail -1 | grep -ao 'at_ms=[0-9]*' | cut -d= -f2)
plain | grep -a 'console shows order' | sed 's/.*order=\([^ ]*\) state=\([a-z_]*\).*/\1|\2/' | sort >"$LOGS/console.txt"
q "WITH last AS (SELECT DISTINCT ON (entity_id) entity_id, attrs->>'to' AS state FROM events WHERE tenant = '$TENANT'
     AND entity = 'order' AND ts <= ${AT:-0} ORDER BY entity_id, ts DESC, seq DESC),
   busy AS (SELECT DISTINCT entity_id FROM events WHERE tenant = '$TENANT' AND entity = 'order' AND ts > ${AT:-0} - 3000 AND ts <= ${AT:-0} + 1000)
   SELECT entity_id || '|' || state FROM last WHERE state NOT IN ('delivered','cancelled','failed','expired')
   AND entity_id NOT IN (SELECT entity_id FROM busy)" | sort >"$LOGS/console-want.txt"
q "SELECT DISTINCT entity_id FROM events WHERE tenant = '$TENANT' AND entity = 'order' AND ts > ${AT:-0} - 3000 AND ts <= ${AT:-0} + 1000" \
  | sort >"$LOGS/console-busy.txt"
# The console's lines less the orders in flight.
sort -t'|' -k1,1 "$LOGS/console.txt" | join -t'|' -v1 - "$LOGS/console-busy.txt" | sort >"$LOGS/console-got.txt"
DIFF=$(diff "$LOGS/console-want.txt" "$LOGS/console-got.txt" | grep '^[<>]')
echo "== console: $(wc -l <"$LOGS/console.txt") open orders shown, $(wc -l <"$LOGS/console-want.txt") open in the store and settled, $(wc -l <"$LOGS/console-busy.txt") in flight left out"
check "the dispatcher's console showed the store's open orders, in their states (< store, > console)" \
  "$(if [ -n "$AT" ]; then count "$DIFF"; else echo 1; fi)" "$DIFF"
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
# Webhooks: at least once, across the kills (a killed node's claimed rows are sent again when
# their lease lapses). Every order event up to now must reach the receiver, signed, once the
# outbox has drained (deadline 240 s: leases of about 40 s, retries from 1 s).
LAST=$(q "SELECT coalesce(max(seq), 0) FROM events WHERE tenant = '$TENANT'")
for _ in $(seq 240); do
  [ "$(q "SELECT count(*) FROM webhook_outbox WHERE tenant = '$TENANT' AND state = 'pending' AND event_seq <= ${LAST:-0}")" = 0 ] && break
  sleep 1
done
q "SELECT seq FROM events WHERE tenant = '$TENANT' AND kind LIKE 'order.%' AND seq <= ${LAST:-0}" | sort -u >"$LOGS/hook-want.txt"
awk '$3 == 200 {print $1}' "$LOGS/hooks.log" | sort -u >"$LOGS/hook-got.txt"
echo "== webhooks: $(wc -l <"$LOGS/hook-want.txt") order events, $(wc -l <"$LOGS/hooks.log") requests ($(awk '$3 == 503' "$LOGS/hooks.log" | wc -l) refused on purpose), \
$(awk '$3 == 200 {print $1}' "$LOGS/hooks.log" | sort | uniq -d | wc -l) events received twice; outbox: $(q "SELECT string_agg(state || ' ' || n, ', ') FROM
  (SELECT state, count(*) AS n FROM webhook_outbox WHERE tenant = '$TENANT' GROUP BY 1) s")"
UNSENT=$(comm -23 "$LOGS/hook-want.txt" "$LOGS/hook-got.txt")
check "every order event reached the webhook receiver" "$(count "$UNSENT")" "$UNSENT"
BADSIG=$(awk '$2 != 1' "$LOGS/hooks.log")
check "every webhook request was signed with the secret" "$(count "$BADSIG")" "$BADSIG"
if [ -n "$CUT_NODE" ]; then
  o=$CUT_NODE
  check "node $o, cut off from the database, stepped down" "$(grep -ac 'no lease renewal for a whole lease' "$LOGS/$o.log" | grep -qv '^0$' && echo 0 || echo 1)"
  check "the market moved to the other node during the cut" "$([ "$CUT_MOVED" = 1 ] && echo 0 || echo 1)"
  check "node $o stopped once the database was back and its market taken" "$([ "$CUT_STOPPED" = 1 ] && echo 0 || echo 1)"
fi
PANIC=$(grep -a -i "panicked" "$LOGS/a.log" "$LOGS/b.log")
check "no panic" "$(count "$PANIC")" "$PANIC"
echo "== event kinds"; q "SELECT entity, kind, count(*) FROM events WHERE tenant = '$TENANT' GROUP BY 1, 2 ORDER BY 1, 3 DESC" | sed 's/^/   /'
echo "== node log lines at ERROR: a $(grep -ac ERROR "$LOGS/a.log"), b $(grep -ac ERROR "$LOGS/b.log")"
grep -ah ERROR "$LOGS/a.log" "$LOGS/b.log" | sed 's/^.*ERROR//' | cut -c1-200 | sort | uniq -c | sort -rn | head -10
[ -s "$LOGS/query-failures" ] && { echo "FAIL  $(wc -l <"$LOGS/query-failures") queries of the checks failed"; FAIL=1; }
[ "$FAIL" = 0 ] || echo "FAILED"
exit $FAIL
