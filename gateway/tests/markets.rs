//! Market leases between nodes, on one PostgreSQL database and one Redis: a market's requests
//! reach its owner from any node (HTTP, WebSockets and OsmAnd device reports), a market whose owner dies (SIGKILL of a
//! real `hexfleet serve` process) is taken over from the store when its lease lapses, and a
//! node that lost a market can no longer write it and stops.

mod common;

use std::time::Duration;

use common::*;
use hexfleet_gateway::ServeConfig;
use hexfleet_gateway::auth::Role;
use hexfleet_gateway::markets::MarketConfig;
use hexfleet_gateway::relay::Topic;
use serde_json::{Value, json};

const PICKUP: (f64, f64) = (52.5215, 13.4075);
const DROPOFF: (f64, f64) = (52.5300, 13.4200);
const NEAR: (f64, f64) = (52.5200, 13.4050);

fn order(id: &str) -> Value {
    json!({"id":id,"pickup":{"lat":PICKUP.0,"lng":PICKUP.1},"dropoff":{"lat":DROPOFF.0,"lng":DROPOFF.1}})
}

/// A node with market leases of `ttl`, renewed every `renew`.
fn leased(db: &str, redis: &str, prefix: &str, name: &str, ttl: Duration, renew: Duration) -> ServeConfig {
    let mut cfg = fast_config(db);
    cfg.redis_url = Some(redis.into());
    cfg.redis_prefix = prefix.into();
    cfg.node_id = name.into();
    cfg.markets = Some(MarketConfig { ttl, renew_every: renew, advertise_url: String::new(), forward_timeout: hexfleet_gateway::markets::FORWARD_TIMEOUT });
    cfg
}

/// The Redis and a fresh PostgreSQL database for one test, and a Redis key prefix of its own;
/// `None` (the test skips) only when a service is missing outside CI.
async fn services() -> Option<(String, PgDb, String)> {
    let redis = redis_or_skip().await?;
    let db = PgDb::create().await?;
    Some((redis, db, format!("hexfleet:test:{}:", uuid_like())))
}

/// Nodes A and B on one database and Redis (a key prefix of their own), with leases of 5 s
/// renewed every 500 ms, each configuration adjusted by `tune` (called with the node's name);
/// `None` (the test skips) only when a service is missing outside CI.
async fn two_nodes(tune: impl Fn(&str, &mut ServeConfig)) -> Option<(TestServer, TestServer, PgDb)> {
    let (redis, db, prefix) = services().await?;
    let (ttl, renew) = (Duration::from_secs(5), Duration::from_millis(500));
    let node = |name: &str| {
        let mut cfg = leased(&db.url, &redis, &prefix, name, ttl, renew);
        tune(name, &mut cfg);
        TestServer::start(cfg)
    };
    let a = node("node-a").await;
    let b = node("node-b").await;
    Some((a, b, db))
}

/// Stops both nodes, then drops the test's database.
async fn stop_both(mut a: TestServer, mut b: TestServer, db: PgDb) {
    a.stop().await;
    b.stop().await;
    db.drop_db().await;
}

/// Node A, which reaches the database through a proxy the test cuts or stalls, and node B, with
/// a 2 s lease renewed every 300 ms; A takes `tenant` by creating order `o1` there.
async fn a_behind_a_proxy(tenant: &str) -> Option<(Proxy, TestServer, TestServer, PgDb)> {
    let (redis, db, prefix) = services().await?;
    let (proxy, via) = Proxy::in_front_of(&db.url).await;
    let (ttl, renew) = (Duration::from_secs(2), Duration::from_millis(300));
    let a = TestServer::start(leased(&via, &redis, &prefix, "node-a", ttl, renew)).await;
    let b = TestServer::start(leased(&db.url, &redis, &prefix, "node-b", ttl, renew)).await;
    assert_eq!(a.post("/v1/orders", &a.dispatcher(tenant), order("o1")).await.0, 201);
    Some((proxy, a, b, db))
}

/// Courier `c1`'s app on `srv` goes available near the pickup, is offered `o1` by the
/// dispatcher of the node that runs the market and accepts it.
async fn takes_o1(srv: &TestServer, tenant: &str) -> Ws {
    let mut courier = srv.ws("/v1/ws/courier", &srv.token(Role::Courier, "c1", tenant, None)).await;
    courier.send(json!({"t":"status","status":"available"})).await;
    courier.send(json!({"t":"loc","lat":NEAR.0,"lng":NEAR.1,"ts":now_ms()})).await;
    courier.expect("offer of o1", |v| t(v) == "offer" && v["order_id"] == "o1").await;
    courier.send(json!({"t":"offer_reply","order_id":"o1","accept":true})).await;
    courier.expect("assigned", |v| t(v) == "assigned" && v["order_id"] == "o1").await;
    courier
}

/// A courier app on each of B's ports (ingest, then HTTP), relayed to A, the market's owner:
/// `c1` and `c2`, each seen on A at its first position.
async fn relayed_couriers(a: &TestServer, b: &TestServer, tenant: &str) -> Vec<(Port, Ws)> {
    let disp = a.dispatcher(tenant);
    let mut relayed = Vec::new();
    for (port, id, lat) in [(Port::Ingest, "c1", NEAR.0), (Port::Http, "c2", NEAR.0 + 0.001)] {
        let mut courier = b.courier(port, &b.token(Role::Courier, id, tenant, None)).await;
        courier.send(json!({"t":"loc","lat":lat,"lng":NEAR.1,"ts":now_ms()})).await;
        a.courier_at(&disp, id, lat).await;
        relayed.push((port, courier));
    }
    relayed
}

async fn lease_row(db: &str, tenant: &str) -> (String, i64) {
    use sqlx::Connection as _;
    let mut c = sqlx::PgConnection::connect(db).await.unwrap();
    sqlx::query_as("SELECT holder, epoch FROM market_leases WHERE tenant = $1").bind(tenant).fetch_one(&mut c).await.unwrap()
}

/// Node A owns the market (the first request reached it); everything sent to node B about that
/// market is served by A: orders created and read through B live on A, a courier whose app is
/// connected to B gets A's offers and its answers reach A's order actors, and a console on B
/// sees A's live state. A customer tracking socket stays on B and is fed through Redis.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_reach_the_markets_owner_from_any_node() {
    let Some((redis, db, prefix)) = services().await else { return };
    let (ttl, renew) = (Duration::from_secs(5), Duration::from_millis(500));
    let mut a = TestServer::start(leased(&db.url, &redis, &prefix, "node-a", ttl, renew)).await;
    let mut b = TestServer::start(leased(&db.url, &redis, &prefix, "node-b", ttl, renew)).await;
    let tenant = "berlin";
    let (disp_a, disp_b) = (a.dispatcher(tenant), b.dispatcher(tenant));

    // The first request for the market takes it: node A.
    let (s, v) = a.post("/v1/orders", &disp_a, order("o1")).await;
    assert_eq!(s, 201, "{v}");
    let (holder, epoch) = lease_row(&db.url, tenant).await;
    assert!(holder.starts_with("node-a#"), "{holder}");
    assert_eq!(epoch, 1);

    // Either node says who runs the market.
    for (srv, tok, here) in [(&a, &disp_a, true), (&b, &disp_b, false)] {
        let (s, v) = srv.get("/v1/market", Some(tok)).await;
        assert_eq!(s, 200, "{v}");
        assert_eq!((v["node"].as_str(), v["epoch"].as_i64(), v["live"].as_bool(), v["here"].as_bool()), (Some("node-a"), Some(1), Some(true), Some(here)), "{v}");
        assert_eq!(v["addr"], a.base.as_str());
    }
    let (s, _) = b.get("/v1/market", Some(&b.token(Role::Courier, "c1", tenant, None))).await;
    assert_eq!(s, 403, "staff only");

    // Created through B: live on A (its actor and dispatcher), not on B.
    let (s, v) = b.post("/v1/orders", &disp_b, order("o2")).await;
    assert_eq!(s, 201, "{v}");
    let live = |srv: &TestServer| srv.running.as_ref().unwrap().state.fleet.open_orders(&tenant.into()).len();
    assert_eq!((live(&a), live(&b)), (2, 0));
    let (s, v) = b.get("/v1/orders/o1", Some(&disp_b)).await;
    assert_eq!((s, v["state"].as_str()), (200, Some("created")), "{v}");
    assert_eq!(lease_row(&db.url, tenant).await.0, holder, "B forwards and takes nothing");

    // A customer tracks o1 on node B.
    let mut customer = b.ws("/v1/ws/track/o1", &b.token(Role::Customer, "cust", tenant, Some("o1"))).await;
    customer.expect("snapshot", |v| t(v) == "order_update" && v["order_id"] == "o1").await;
    // B listens to the order's fan-out channel for it; A, which runs the market, does not.
    let channel = format!("{prefix}fanout:o:{}:{tenant}:o1", tenant.len());
    assert_eq!(subscribers(&redis, &channel).await, 1);
    assert_eq!(subscribers(&redis, &format!("{prefix}fanout:t:{tenant}")).await, 0, "a tracking page needs its order, not the market");

    // A courier app connected to B: forwarded to A, it gets A's offers and answers them.
    let mut courier = b.ws("/v1/ws/courier", &b.token(Role::Courier, "c1", tenant, None)).await;
    courier.send(json!({"t":"status","status":"available"})).await;
    courier.send(json!({"t":"loc","lat":NEAR.0,"lng":NEAR.1,"ts":now_ms()})).await;
    let offer = courier.expect("an offer from A's dispatcher", |v| t(v) == "offer").await;
    let first = offer["order_id"].as_str().unwrap().to_owned();
    courier.send(json!({"t":"offer_reply","order_id":first,"accept":true})).await;
    courier.expect("assigned", |v| t(v) == "assigned" && v["order_id"] == first.as_str()).await;
    let (s, v) = a.get(&format!("/v1/orders/{first}"), Some(&disp_a)).await;
    assert_eq!((s, v["state"].as_str(), v["courier_id"].as_str()), (200, Some("assigned"), Some("c1")), "{v}");
    assert!(a.running.as_ref().unwrap().state.fleet.courier(&tenant.into(), &"c1".into()).is_ok(), "the courier's actor runs on A");
    assert!(b.running.as_ref().unwrap().state.fleet.courier(&tenant.into(), &"c1".into()).is_err(), "and not on B");
    // Its history exported through B is A's answer, streamed through.
    let history = "/v1/couriers/c1/history";
    let direct = eventually("c1's fix in A's history", || async {
        let (s, v) = a.get(history, Some(&disp_a)).await;
        (s == 200 && v["features"].as_array().is_some_and(|f| !f.is_empty())).then_some(v)
    })
    .await;
    let r = b.http.get(format!("{}{history}", b.base)).bearer_auth(&disp_b).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 200);
    assert_eq!(r.headers()["content-type"], "application/geo+json");
    assert_eq!(r.json::<serde_json::Value>().await.unwrap(), direct);
    if first == "o1" {
        customer.expect("assigned, through Redis", |v| t(v) == "order_update" && v["state"] == "assigned").await;
    }

    // A console on B shows A's couriers in its snapshot.
    let mut console = b.ws("/v1/ws/console", &disp_b).await;
    console.send(json!({"t":"subscribe","bbox":[13.0, 52.0, 14.0, 53.0]})).await;
    let snap = console.expect("couriers snapshot", |v| t(v) == "couriers" && v["snapshot"] == true).await;
    assert!(snap["items"].as_array().unwrap().iter().any(|c| c.to_string().contains("\"c1\"")), "{snap}");
    assert_eq!(subscribers(&redis, &channel).await, 1, "the console is served by A, which needs no channel");

    // A courier app on B's ingest port is relayed to A the same way; A's answers come back.
    let mut c2 = b.courier(Port::Ingest, &b.token(Role::Courier, "c2", tenant, None)).await;
    c2.send(json!({"t":"loc","lat":NEAR.0,"lng":NEAR.1,"ts":now_ms()})).await;
    a.courier_at(&disp_a, "c2", NEAR.0).await;
    assert!(b.running.as_ref().unwrap().state.fleet.courier(&tenant.into(), &"c2".into()).is_err(), "c2 has no actor on B");
    c2.send_raw("{not json").await;
    c2.expect("A's error frame, relayed", |v| t(v) == "error" && v["code"] == "malformed_json").await;
    // A ping is answered once, not by B and again by A: count the pongs that come before the
    // answer to a message sent after it.
    use futures_util::{SinkExt as _, StreamExt as _};
    use tokio_tungstenite::tungstenite::Message;
    c2.s.send(Message::Ping(b"p1".to_vec().into())).await.unwrap();
    c2.send_raw("{not json either").await;
    let pongs = tokio::time::timeout(DEADLINE, async {
        let mut pongs = 0;
        loop {
            match c2.s.next().await {
                Some(Ok(Message::Pong(p))) => {
                    assert_eq!(&p[..], b"p1");
                    pongs += 1;
                }
                Some(Ok(Message::Text(_))) => return pongs,
                other => panic!("unexpected {other:?}"),
            }
        }
    })
    .await
    .expect("the error frame");
    assert_eq!(pongs, 1, "one pong per ping");
    drop(c2);

    // A Traccar/OsmAnd device (no token) registered to a courier of A's market reports to B:
    // B finds the device's market in the store and forwards the report to A.
    let (s, v) = b.put("/v1/couriers/c9", &disp_b, json!({"device_id":"864895030279986","vehicle":"car"})).await;
    assert_eq!(s, 200, "{v}");
    let key = hexfleet_gateway::auth::Keys::new(SECRET).device_key(tenant, "c9", "864895030279986");
    let url = format!("{}/osmand?id=864895030279986&timestamp={}&lat=52.5163&lon=13.3777&key={key}", b.base, now_ms() / 1000 - 5);
    let r = b.http.get(url).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 200, "{:?}", r.text().await);
    a.courier_at(&disp_a, "c9", 52.5163).await;
    let r = b.http.get(format!("{}/osmand?id=nobody&lat=52.5&lon=13.4", b.base)).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 400, "an unknown device is refused by B itself");
    let unknown: serde_json::Value = r.json().await.unwrap();
    // Without its key, A's device is refused by B as an unknown one, before any forwarding:
    // a 503 `market_moving` (a client may send the forwarding header itself) or the hop to A
    // told registered devices from others.
    for forwarded in [false, true] {
        let mut rq = b.http.get(format!("{}/osmand?id=864895030279986&lat=52.5&lon=13.4&key=00112233445566778899aabbccddeeff", b.base));
        if forwarded {
            rq = rq.header(hexfleet_gateway::markets::FORWARDED, "1");
        }
        let r = rq.send().await.unwrap();
        assert_eq!(r.status().as_u16(), 400, "forwarded header: {forwarded}");
        let answer: serde_json::Value = r.json().await.unwrap();
        assert_eq!(answer["error"]["message"].as_str().unwrap().replace("864895030279986", "nobody"), unknown["error"]["message"].as_str().unwrap());
    }
    // The device goes to another courier of A's market (a phone handed over). B cached its
    // owner as c9: c8's key is refused at first and taken within seconds (a refused key reads
    // the store again once B's entry is 5 s old), not for the cache's whole minute; c9's key
    // is refused from then on.
    assert_eq!(b.put("/v1/couriers/c9", &disp_b, json!({"device_id":"imei-c9-new"})).await.0, 200);
    assert_eq!(b.put("/v1/couriers/c8", &disp_b, json!({"device_id":"864895030279986"})).await.0, 200);
    let key8 = hexfleet_gateway::auth::Keys::new(SECRET).device_key(tenant, "c8", "864895030279986");
    let report = |key: &str| format!("{}/osmand?id=864895030279986&timestamp={}&lat=52.517&lon=13.3777&key={key}", b.base, now_ms() / 1000 - 2);
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    loop {
        let status = b.http.get(report(&key8)).send().await.unwrap().status().as_u16();
        if status == 200 {
            break;
        }
        assert_eq!(status, 400);
        assert!(std::time::Instant::now() < deadline, "c8's key still refused by B 15 s after the device moved to c8");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    a.courier_at(&disp_a, "c8", 52.517).await;
    assert_eq!(b.http.get(report(&key)).send().await.unwrap().status().as_u16(), 400, "c9's key, the device's previous courier");

    // Errors of the owner come back as they are; a bad token is refused by B itself.
    let (s, v) = b.get("/v1/orders/nope", Some(&disp_b)).await;
    assert_eq!((s, v["error"]["code"].as_str()), (404, Some("not_found")), "{v}");
    let (s, _) = b.get("/v1/orders/o1", Some("not-a-token")).await;
    assert_eq!(s, 401);
    // A body too large to forward is refused by B, with the error shape.
    let big = json!({"id":"o-big","pickup":{"lat":PICKUP.0,"lng":PICKUP.1},"dropoff":{"lat":DROPOFF.0,"lng":DROPOFF.1},"pad":"x".repeat(1_100_000)});
    let (s, v) = b.post("/v1/orders", &disp_b, big).await;
    assert_eq!((s, v["error"]["code"].as_str()), (413, Some("payload_too_large")), "{v}");
    // A request already forwarded once is never forwarded again.
    let r = b.http.get(format!("{}/v1/orders/o1", b.base)).bearer_auth(&disp_b).header("x-hexfleet-forwarded", "node-x").send().await.unwrap();
    assert_eq!(r.status().as_u16(), 503);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["code"], "market_moving");

    drop(courier);
    b.stop().await;
    a.stop().await;
    db.drop_db().await;
}


/// Node A (a real process) owns the market and dies by SIGKILL with an order open and its
/// lease held. Node B takes the market over when the lease lapses: it loads the open order
/// from the store, its dispatcher offers it, and the lease's epoch moves on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_market_whose_owner_dies_is_taken_over_when_its_lease_lapses() {
    let Some((redis, db, prefix)) = services().await else { return };
    let tenant = "paris";
    let mut a = Proc::spawn_with(
        &db.url,
        &[
            ("REDIS_URL", redis.as_str()),
            ("HEXFLEET_REDIS_PREFIX", prefix.as_str()),
            ("HEXFLEET_NODE_ID", "node-a"),
            ("HEXFLEET_MARKET_LEASE_MS", "1500"),
            ("HEXFLEET_DISPATCH_TICK_MS", "50"),
        ],
    );
    let http = reqwest::Client::new();
    let keys = hexfleet_gateway::auth::Keys::new(SECRET);
    let disp = keys.mint(Role::Dispatcher, "disp", tenant, None, Duration::from_secs(3600));
    let r = http.post(format!("{}/v1/orders", a.base)).bearer_auth(&disp).json(&order("o1")).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 201, "{:?}", r.text().await);
    let (holder_a, epoch_a) = lease_row(&db.url, tenant).await;
    assert!(holder_a.starts_with("node-a#"), "{holder_a}");

    let ttl = Duration::from_millis(1500);
    let mut b = TestServer::start(leased(&db.url, &redis, &prefix, "node-b", ttl, ttl / 3)).await;
    assert_eq!(b.get("/v1/orders/o1", Some(&disp)).await.0, 200, "forwarded to A while A lives");
    let started = std::time::Instant::now();
    a.kill9();

    // B takes the market over by itself (its keeper), without any request for it.
    eventually("node b holds the market", || async {
        let (holder, epoch) = lease_row(&db.url, tenant).await;
        (holder.starts_with("node-b#") && b.running.as_ref().unwrap().state.fleet.open_orders(&tenant.into()).len() == 1).then_some(epoch)
    })
    .await;
    eprintln!("take-over {:?} after SIGKILL (lease {ttl:?})", started.elapsed());
    assert!(started.elapsed() >= ttl / 2, "not before the lease could lapse");
    let (_, epoch_b) = lease_row(&db.url, tenant).await;
    assert_eq!(epoch_b, epoch_a + 1);
    let (s, v) = b.get("/v1/orders/o1", Some(&disp)).await;
    assert_eq!((s, v["state"].as_str()), (200, Some("created")), "{v}");

    // B's dispatcher now offers the order to a courier connected to B.
    let courier = takes_o1(&b, tenant).await;
    let (_, ev) = b.get("/v1/events?entity=order&id=o1", Some(&disp)).await;
    let kinds: Vec<&str> = ev["items"].as_array().unwrap().iter().filter_map(|e| e["kind"].as_str()).collect();
    assert_eq!(kinds, ["order.created", "order.offered", "order.assigned"], "{ev}");
    drop(courier);
    b.stop().await;
    db.drop_db().await;
}

/// The lease of a market node A owns is taken from under it (as if A had been paused longer
/// than the TTL and another node took over): A's next write of that market is refused by the
/// fence (503 `market_moving`, nothing written), its order actor lives on, and at its next
/// renewal A stops with the reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_lost_its_market_cannot_write_it_and_stops() {
    let Some((redis, db, prefix)) = services().await else { return };
    let tenant = "lyon";
    // Renewals far apart: the write below happens before A looks at its lease again.
    let mut a = TestServer::start(leased(&db.url, &redis, &prefix, "node-a", Duration::from_secs(60), Duration::from_secs(3600))).await;
    let disp = a.dispatcher(tenant);
    assert_eq!(a.post("/v1/orders", &disp, order("o1")).await.0, 201);
    {
        use sqlx::Connection as _;
        let mut c = sqlx::PgConnection::connect(&db.url).await.unwrap();
        let n = sqlx::query("UPDATE market_leases SET holder = 'thief#1', epoch = epoch + 1 WHERE tenant = $1").bind(tenant).execute(&mut c).await.unwrap();
        assert_eq!(n.rows_affected(), 1);
    }
    let (s, v) = a.post("/v1/orders/o1/cancel", &disp, json!({})).await;
    assert_eq!((s, v["error"]["code"].as_str()), (503, Some("market_moving")), "{v}");
    let (s, v) = a.post("/v1/orders", &disp, order("o2")).await;
    assert_eq!((s, v["error"]["code"].as_str()), (503, Some("market_moving")), "{v}");
    let (s, v) = a.get("/v1/orders/o1", Some(&disp)).await;
    assert_eq!((s, v["state"].as_str()), (200, Some("created")), "the order actor lives on: {v}");
    {
        use sqlx::Connection as _;
        let mut c = sqlx::PgConnection::connect(&db.url).await.unwrap();
        let (state,): (String,) = sqlx::query_as("SELECT state FROM orders WHERE tenant = $1 AND id = 'o1'").bind(tenant).fetch_one(&mut c).await.unwrap();
        assert_eq!(state, "created");
        let (n,): (i64,) = sqlx::query_as("SELECT COUNT(*) FROM orders WHERE tenant = $1").bind(tenant).fetch_one(&mut c).await.unwrap();
        assert_eq!(n, 1, "o2 was not written");
    }
    // The renewal finds the lease gone: the node stops and says why.
    let running = a.running.take().unwrap();
    let markets = running.state.markets.clone().unwrap();
    assert_eq!(markets.renew().await.iter().map(|t| t.to_string()).collect::<Vec<_>>(), [tenant]);
    drop(markets);
    running.stop().await.expect("stops");
    db.drop_db().await;
}

/// The keeper stops the node when a renewal shows the lease was taken.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_keeper_stops_a_node_whose_lease_was_taken() {
    let Some((redis, db, prefix)) = services().await else { return };
    let tenant = "nantes";
    let mut a = TestServer::start(leased(&db.url, &redis, &prefix, "node-a", Duration::from_secs(5), Duration::from_millis(200))).await;
    let disp = a.dispatcher(tenant);
    assert_eq!(a.post("/v1/orders", &disp, order("o1")).await.0, 201);
    {
        use sqlx::Connection as _;
        let mut c = sqlx::PgConnection::connect(&db.url).await.unwrap();
        sqlx::query("UPDATE market_leases SET holder = 'thief#1', epoch = epoch + 1 WHERE tenant = $1").bind(tenant).execute(&mut c).await.unwrap();
    }
    let running = a.running.take().unwrap();
    let err = tokio::time::timeout(DEADLINE, running.wait()).await.expect("the node stops in time").expect_err("it stops with an error");
    assert!(err.to_string().contains("lost the lease of market nantes"), "{err}");
    // The thief's lease is untouched by A's shutdown (A releases only its own).
    assert_eq!(lease_row(&db.url, tenant).await.0, "thief#1");
    db.drop_db().await;
}

/// Markets taken by requests while renewals run: a renewal never mistakes a market taken
/// during it for one it lost (which would stop the node).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn markets_taken_during_a_renewal_are_not_reported_lost() {
    let Some((redis, db, prefix)) = services().await else { return };
    let mut a = TestServer::start(leased(&db.url, &redis, &prefix, "node-a", Duration::from_secs(60), Duration::from_secs(3600))).await;
    let markets = a.running.as_ref().unwrap().state.markets.clone().unwrap();
    let taking = {
        let m = markets.clone();
        tokio::spawn(async move {
            for i in 0..300 {
                let route = m.route(&format!("m{i}").as_str().into()).await.expect("a free market is taken");
                assert_eq!(route, hexfleet_gateway::markets::Route::Local);
            }
        })
    };
    let mut renewals = 0;
    while !taking.is_finished() {
        assert_eq!(markets.renew().await, Vec::<hexfleet_actors::domain::TenantId>::new(), "no market was lost");
        renewals += 1;
    }
    taking.await.unwrap();
    assert_eq!(markets.renew().await, Vec::<hexfleet_actors::domain::TenantId>::new());
    assert!(renewals > 10, "renewals ran during the take-overs ({renewals})");
    assert!((0..300).all(|i| markets.holds(&format!("m{i}").as_str().into())));
    drop(markets);
    a.stop().await;
    db.drop_db().await;
}

/// A node with market leases refuses to start with an advertise URL other nodes cannot use, or
/// on SQLite (each node would hold every market in a file of its own: a `DATABASE_URL` left
/// out of a deployment), and says why.
#[test]
fn a_bad_advertise_url_is_refused_at_start() {
    let cases =
        [("https://node-a:8080", "must be an http:// URL"), ("not a url", "is not a URL"), ("http://node-a:8080", "need the nodes' shared PostgreSQL")];
    for (url, why) in cases {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_hexfleet"))
            .arg("serve")
            .env_clear()
            .env("HEXFLEET_MARKET_LEASES", "true")
            .env("HEXFLEET_ADVERTISE_URL", url)
            .env("HEXFLEET_LISTEN", "127.0.0.1:0")
            .env("HEXFLEET_JWT_SECRET", SECRET)
            .env("DATABASE_URL", "/nonexistent-dir/never-opened.db")
            .output()
            .expect("run hexfleet serve");
        assert!(!out.status.success(), "{url}: started");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(why), "{url}: {err}");
    }
}

/// `hexfleet token` signs with any secret, and says when the server would take it on
/// loopback only (under 32 bytes, or the development secret).
#[test]
fn the_token_command_checks_its_secret() {
    let token = |secret: Option<&str>| {
        let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_hexfleet"));
        c.args(["token", "--role", "dispatcher", "--sub", "d"]).env_clear();
        if let Some(s) = secret {
            c.env("HEXFLEET_JWT_SECRET", s);
        }
        c.output().expect("run hexfleet token")
    };
    let short = token(Some("too-short"));
    assert!(short.status.success());
    assert!(String::from_utf8_lossy(&short.stderr).contains("at least 32"), "{}", String::from_utf8_lossy(&short.stderr));
    let dev = token(None);
    assert!(dev.status.success());
    assert!(String::from_utf8_lossy(&dev.stderr).contains("development secret"), "{}", String::from_utf8_lossy(&dev.stderr));
    let good = token(Some(SECRET));
    assert!(good.status.success() && good.stderr.is_empty(), "{}", String::from_utf8_lossy(&good.stderr));
    assert_eq!(String::from_utf8_lossy(&good.stdout).trim().split('.').count(), 3, "a JWT");
}

/// Waits for `srv` to step down: `courier`, connected to it, is closed with 1013.
async fn expect_step_down(srv: &TestServer, courier: &mut Ws) -> std::sync::Arc<hexfleet_gateway::markets::Markets> {
    let close = courier.expect_close().await.expect("a close frame once the node steps down");
    assert_eq!(close.code, tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode::Again, "{close:?}");
    let markets = srv.running.as_ref().unwrap().state.markets.clone().unwrap();
    assert!(markets.stepped_down());
    markets
}

/// Node A reaches the database through a TCP proxy the test cuts. Once A has gone a whole
/// lease without a renewal it stops serving its market: its courier socket closes with 1013
/// and its requests answer 503. Node B takes the market over when the lease lapses, and the
/// courier reconnects there. When the proxy is restored, A finds its lease taken and stops.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_cut_off_from_the_database_steps_down_and_its_market_moves() {
    let tenant = "porto";
    let Some((proxy, mut a, mut b, db)) = a_behind_a_proxy(tenant).await else { return };
    let (disp_a, disp_b) = (a.dispatcher(tenant), b.dispatcher(tenant));
    assert!(lease_row(&db.url, tenant).await.0.starts_with("node-a#"));
    let token = a.token(Role::Courier, "c1", tenant, None);
    let mut courier = a.courier(Port::Ingest, &token).await;
    courier.send(json!({"t":"loc","lat":NEAR.0,"lng":NEAR.1,"ts":now_ms()})).await;
    a.courier_at(&disp_a, "c1", NEAR.0).await;
    // A dispatcher's console and a customer's tracking page on A.
    let mut console = a.ws("/v1/ws/console", &disp_a).await;
    console.send(json!({"t":"subscribe","bbox":[-180.0,-90.0,180.0,90.0]})).await;
    console.expect("the console's snapshot", |v| t(v) == "couriers").await;
    let mut track = a.ws("/v1/ws/track/o1", &a.token(Role::Customer, "u1", tenant, Some("o1"))).await;
    track.expect("the order's state", |v| t(v) == "order_update").await;

    proxy.cut();
    let markets_a = expect_step_down(&a, &mut courier).await;
    // They are closed too, so they reconnect to whichever node takes the market.
    for (what, ws) in [("console", &mut console), ("tracking", &mut track)] {
        let close = ws.expect_close().await.unwrap_or_else(|| panic!("a close frame for the {what}"));
        assert_eq!(close.code, tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode::Again, "{what}: {close:?}");
    }
    let (s, v) = a.get("/v1/orders/o1", Some(&disp_a)).await;
    assert_eq!(s, 503, "A no longer serves the market: {v}");

    // B takes the market over from the store once A's lease lapses; the app reconnects to B.
    let (s, v) = eventually("B serves the market", || async {
        let (s, v) = b.get("/v1/orders/o1", Some(&disp_b)).await;
        (s == 200).then_some((s, v))
    })
    .await;
    assert_eq!((s, v["state"].as_str()), (200, Some("created")), "{v}");
    assert!(lease_row(&db.url, tenant).await.0.starts_with("node-b#"));
    let mut courier = b.courier(Port::Http, &token).await;
    courier.send(json!({"t":"loc","lat":PICKUP.0,"lng":PICKUP.1,"ts":now_ms()})).await;
    b.courier_at(&disp_b, "c1", PICKUP.0).await;

    // Back in reach, A's next renewal finds the lease taken: A stops and says why.
    proxy.restore();
    drop(markets_a);
    let err = tokio::time::timeout(DEADLINE, a.running.take().unwrap().wait()).await.expect("A stops in time").expect_err("with an error");
    assert!(err.to_string().contains("lost the lease of market porto"), "{err}");
    drop(courier);
    b.stop().await;
    db.drop_db().await;
}

/// A node that stepped down while another node ran its market, and finds the market free
/// again when it is back (that node stopped and released it), does not serve it with the
/// actors it kept: they missed the other node's changes (here, a cancel). It stops, as a node
/// that lost its market does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_back_after_another_ran_its_market_does_not_serve_its_stale_actors() {
    let tenant = "coimbra";
    let Some((proxy, mut a, mut b, db)) = a_behind_a_proxy(tenant).await else { return };
    let (disp_a, disp_b) = (a.dispatcher(tenant), b.dispatcher(tenant));
    let markets_a = a.running.as_ref().unwrap().state.markets.clone().unwrap();

    proxy.cut();
    eventually("A steps down", || async { markets_a.stepped_down().then_some(()) }).await;
    eventually("B serves the market", || async { (b.get("/v1/orders/o1", Some(&disp_b)).await.0 == 200).then_some(()) }).await;
    let (s, v) = b.post("/v1/orders/o1/cancel", &disp_b, json!({})).await;
    assert_eq!((s, v["state"].as_str()), (200, Some("cancelled")), "{v}");
    b.stop().await;

    // Back in reach, with the market free. A stepped-down node takes nothing (its taker may
    // run before its next renewal); the renewal finds the lease gone.
    proxy.restore();
    markets_a.take_over().await;
    // A may have stopped listening already; if it answers, it is not with what it kept.
    if let Ok(r) = a.http.get(format!("{}/v1/orders/o1", a.base)).bearer_auth(&disp_a).send().await {
        let s = r.status().as_u16();
        let v: Value = r.json().await.unwrap_or(Value::Null);
        assert!(s != 200 || v["state"] == "cancelled", "A serves the order as it knew it before B cancelled it: {s} {v}");
    }
    let err = tokio::time::timeout(DEADLINE, a.running.take().unwrap().wait()).await.expect("A stops in time").expect_err("with an error");
    let err = err.to_string();
    assert!(err.contains("lost the lease of market coimbra") || err.contains("market coimbra was owned by another node"), "{err}");
    db.drop_db().await;
}

/// A stepped-down node comes back only through a renewal, never by taking a market again: a
/// take would serve the market with the watchdog off (it steps down only a serving node), so
/// that if the link dropped again the node would serve on beside the market's next owner.
/// Here renewals are an hour apart, so the watchdog steps the node down with the database in
/// reach, and the lease then lapses.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stepped_down_node_does_not_take_its_market_back() {
    let Some((redis, db, prefix)) = services().await else { return };
    let mut a = TestServer::start(leased(&db.url, &redis, &prefix, "node-a", Duration::from_secs(2), Duration::from_secs(3600))).await;
    let tenant = "lagos";
    let disp = a.dispatcher(tenant);
    assert_eq!(a.post("/v1/orders", &disp, order("o1")).await.0, 201);
    let (s, v) = a.put("/v1/couriers/c1", &disp, json!({"device_id": "imei-31"})).await;
    assert_eq!(s, 200, "{v}");
    let key = hexfleet_gateway::auth::Keys::new(SECRET).device_key(tenant, "c1", "imei-31");
    let report = |lat: f64| a.http.get(format!("{}/osmand?id=imei-31&lat={lat}&lon={}&key={key}", a.base, NEAR.1)).send();
    assert_eq!(report(NEAR.0).await.unwrap().status().as_u16(), 200, "served: a device report is taken");
    let epoch = lease_row(&db.url, tenant).await.1;
    let markets = a.running.as_ref().unwrap().state.markets.clone().unwrap();
    eventually("A steps down without renewals", || async { markets.stepped_down().then_some(()) }).await;
    // A device it knows is not taken while the market is not served here: a 200 would make
    // the app drop a report this node cannot keep.
    assert_eq!(report(NEAR.0 + 0.0001).await.unwrap().status().as_u16(), 503, "stepped down: the report is refused");
    eventually("A's lease lapses", || async {
        use sqlx::Connection as _;
        let mut c = sqlx::PgConnection::connect(&db.url).await.unwrap();
        let live: bool = sqlx::query_scalar("SELECT expires_at > (EXTRACT(EPOCH FROM clock_timestamp()) * 1000)::bigint FROM market_leases WHERE tenant = $1")
            .bind(tenant)
            .fetch_one(&mut c)
            .await
            .unwrap();
        (!live).then_some(())
    })
    .await;
    markets.take_over().await;
    let (s, v) = a.get("/v1/orders/o1", Some(&disp)).await;
    assert_eq!((s, v["error"]["code"].as_str()), (503, Some("market_moving")), "{v}");
    assert!(markets.stepped_down());
    assert_eq!(lease_row(&db.url, tenant).await.1, epoch, "not taken again");
    drop(markets);
    a.stop().await;
    db.drop_db().await;
}

/// A device id (OsmAnd/Traccar) names one courier across all markets: the node running one
/// market refuses to give a device that a courier of a market run elsewhere already has, which
/// its own device map cannot know.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_of_a_market_run_elsewhere_cannot_be_taken() {
    let Some((a, b, db)) = two_nodes(|_, _| {}).await else { return };
    let (s, v) = b.put("/v1/couriers/c1", &b.dispatcher("vigo"), json!({"device_id": "imei-77"})).await;
    assert_eq!(s, 200, "{v}");
    let (s, v) = a.put("/v1/couriers/c9", &a.dispatcher("leon"), json!({"device_id": "imei-77"})).await;
    assert!(lease_row(&db.url, "leon").await.0.starts_with("node-a#") && lease_row(&db.url, "vigo").await.0.starts_with("node-b#"));
    assert_eq!((s, v["error"]["code"].as_str()), (409, Some("conflict")), "{v}");
    // Its own courier may keep (or set again) its device.
    assert_eq!(b.put("/v1/couriers/c1", &b.dispatcher("vigo"), json!({"device_id": "imei-77", "capacity": 2})).await.0, 200);
    stop_both(a, b, db).await;
}

/// A node whose database connections hang (no reset, no answer) steps down by its local
/// deadline, before the lease can lapse, although each of its renewals takes half a lease to
/// give up: when node B takes the market over, A no longer serves it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_whose_database_hangs_steps_down_before_its_lease_can_be_taken() {
    let tenant = "faro";
    let Some((proxy, a, mut b, db)) = a_behind_a_proxy(tenant).await else { return };
    let markets_a = a.running.as_ref().unwrap().state.markets.clone().unwrap();

    proxy.stall();
    eventually("B takes the market over", || async { lease_row(&db.url, tenant).await.0.starts_with("node-b#").then_some(()) }).await;
    assert!(markets_a.stepped_down(), "A still serves a market whose lease another node holds");

    proxy.restore();
    let err = tokio::time::timeout(DEADLINE, a.running.unwrap().wait()).await.expect("A stops in time").expect_err("with an error");
    assert!(err.to_string().contains("lost the lease of market faro"), "{err}");
    b.stop().await;
    db.drop_db().await;
}

/// A lone node cut off from the database steps down after a lease without renewals and, when
/// the database is back and no one took its market, serves it again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_stepped_down_serves_again_when_no_one_took_its_market() {
    let Some((redis, db, prefix)) = services().await else { return };
    let (proxy, via) = Proxy::in_front_of(&db.url).await;
    let mut a = TestServer::start(leased(&via, &redis, &prefix, "node-a", Duration::from_secs(2), Duration::from_millis(300))).await;
    let tenant = "braga";
    let disp = a.dispatcher(tenant);
    assert_eq!(a.post("/v1/orders", &disp, order("o1")).await.0, 201);
    let epoch = lease_row(&db.url, tenant).await.1;
    let token = a.token(Role::Courier, "c1", tenant, None);
    let mut courier = a.courier(Port::Http, &token).await;
    courier.send(json!({"t":"loc","lat":NEAR.0,"lng":NEAR.1,"ts":now_ms()})).await;

    proxy.cut();
    let markets = expect_step_down(&a, &mut courier).await;
    proxy.restore();
    eventually("A serves the market again", || async {
        let (s, v) = a.get("/v1/orders/o1", Some(&disp)).await;
        (s == 200 && !markets.stepped_down()).then_some(v)
    })
    .await;
    // Renewed as it was (the renewal came first) or taken again by A at the next epoch (its
    // take-over pass came first, the lease having lapsed): A's either way.
    let (holder, now) = lease_row(&db.url, tenant).await;
    assert!(holder.starts_with("node-a#") && (now == epoch || now == epoch + 1), "{holder} {now} (was {epoch})");
    let mut courier = a.courier(Port::Http, &token).await;
    // About 20 m on from its last fix: a plausible move, accepted at once.
    let lat = NEAR.0 + 0.0002;
    courier.send(json!({"t":"loc","lat":lat,"lng":NEAR.1,"ts":now_ms()})).await;
    a.courier_at(&disp, "c1", lat).await;
    drop(markets);
    a.stop().await;
    db.drop_db().await;
}

/// The owner of a market publishes its couriers' positions only while another node listens:
/// with no listener it goes quiet on the order's channel, and a node that starts listening (a
/// customer tracking the order on node B) makes it publish again at once, through its listen
/// notice, not at the next probe (set to two minutes here, so only the notice can do it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_owner_publishes_positions_only_while_another_node_listens() {
    let Some((redis, db, prefix)) = services().await else { return };
    let (ttl, renew) = (Duration::from_secs(5), Duration::from_millis(500));
    let mut cfg_a = leased(&db.url, &redis, &prefix, "node-a", ttl, renew);
    cfg_a.fanout_probe = Duration::from_secs(120);
    let a = TestServer::start(cfg_a).await;
    let b = TestServer::start(leased(&db.url, &redis, &prefix, "node-b", ttl, renew)).await;
    let tenant = "quiet";
    let disp_a = a.dispatcher(tenant);
    let quiet = |srv: &TestServer| srv.running.as_ref().unwrap().state.broker.relay().unwrap().is_quiet(Topic::Order(tenant, "o1"));

    // A runs the market; its courier takes o1 and moves, and no other node listens.
    let (s, v) = a.post("/v1/orders", &disp_a, order("o1")).await;
    assert_eq!(s, 201, "{v}");
    let mut courier = takes_o1(&a, tenant).await;
    let mut lat = NEAR.0;
    let deadline = std::time::Instant::now() + DEADLINE;
    while !quiet(&a) {
        assert!(std::time::Instant::now() < deadline, "A did not go quiet on o1's channel within {DEADLINE:?}");
        lat += 0.0001;
        courier.send(json!({"t":"loc","lat":lat,"lng":NEAR.1,"ts":now_ms()})).await;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // A customer tracks o1 on B: B listens, A publishes again, and the next moves reach B.
    let mut customer = b.ws("/v1/ws/track/o1", &b.token(Role::Customer, "cust", tenant, Some("o1"))).await;
    customer.expect("snapshot", |v| t(v) == "order_update" && v["order_id"] == "o1").await;
    eventually("A publishes again", || async { (!quiet(&a)).then_some(()) }).await;
    let mut seen = None;
    for _ in 0..50 {
        lat += 0.0001;
        courier.send(json!({"t":"loc","lat":lat,"lng":NEAR.1,"ts":now_ms()})).await;
        let got = customer.try_expect(|v| t(v) == "courier" && v["courier_id"] == "c1");
        if let Ok(Ok(v)) = tokio::time::timeout(Duration::from_millis(200), got).await {
            seen = v["seq"].as_u64();
            break;
        }
    }
    let seen = seen.expect("the courier's moves reach the customer on node b");

    // The customer leaves: B stops hearing the order, so its stream stops counting. The order
    // moves on meanwhile; a customer coming back to B with `since` gets a resync and a fresh
    // snapshot, not "nothing missed".
    drop(customer);
    let channel = format!("{prefix}fanout:o:{}:{tenant}:o1", tenant.len());
    eventually("node b left the order's channel", || async { (subscribers(&redis, &channel).await == 0).then_some(()) }).await;
    let (s, v) = a.post("/v1/orders/o1/cancel", &disp_a, json!({})).await;
    assert_eq!((s, v["state"].as_str()), (200, Some("cancelled")), "{v}");
    let mut back = b.ws(&format!("/v1/ws/track/o1?since={seen}"), &b.token(Role::Customer, "cust", tenant, Some("o1"))).await;
    back.expect("a resync", |v| t(v) == "resync").await;
    back.expect("a fresh snapshot", |v| t(v) == "order_update" && v["state"] == "cancelled").await;
    drop((courier, back));
    stop_both(a, b, db).await;
}

/// Node B's Redis subscription dies without closing (here a proxy in front of Redis keeps the
/// connection open and passes nothing: a NAT that forgot the flow, an address a failover left
/// behind). B notices (a quiet subscription is pinged) and subscribes again on a new
/// connection, then closes the pages it fed (1013): a customer tracking an order of A's market
/// on B reconnects, gets a resync and a fresh snapshot, and the courier's moves again. Before,
/// the subscription waited for messages for good and the page stayed frozen; and after a
/// reconnect a page was not told that it had missed updates (an order delivered meanwhile).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_subscription_that_dies_silently_is_opened_again() {
    let Some((redis, db, prefix)) = services().await else { return };
    let hp = redis.trim_start_matches("redis://").split('/').next().unwrap().to_owned();
    let proxy = Proxy::start(hp.clone()).await;
    let via = redis.replacen(&hp, &proxy.addr.to_string(), 1);
    let (ttl, renew) = (Duration::from_secs(5), Duration::from_millis(500));
    let a = TestServer::start(leased(&db.url, &redis, &prefix, "node-a", ttl, renew)).await;
    let b = TestServer::start(leased(&db.url, &via, &prefix, "node-b", ttl, renew)).await;
    let tenant = "stranded";
    let disp_a = a.dispatcher(tenant);
    assert_eq!(a.post("/v1/orders", &disp_a, order("o1")).await.0, 201);
    let mut courier = takes_o1(&a, tenant).await;
    let mut customer = b.ws("/v1/ws/track/o1", &b.token(Role::Customer, "cust", tenant, Some("o1"))).await;
    customer.expect("snapshot", |v| t(v) == "order_update" && v["order_id"] == "o1").await;
    let mut lat = NEAR.0;
    let seen = a_move_arrives(&mut courier, &mut customer, &mut lat, DEADLINE).await.expect("the courier's moves reach the customer on node b");
    proxy.strand();
    // The check comes after `SUBSCRIPTION_CHECK` of silence, its ping waits up to 2 s. Once
    // subscribed again, B closes the page (1013): what A published meanwhile is gone.
    let within = hexfleet_gateway::relay::SUBSCRIPTION_CHECK + Duration::from_secs(10);
    let closed = tokio::time::timeout(within, async {
        loop {
            lat += 0.000_005;
            courier.send(json!({"t":"loc","lat":lat,"lng":NEAR.1,"ts":now_ms()})).await;
            if let Ok(c) = tokio::time::timeout(Duration::from_millis(200), customer.expect_close()).await {
                return c;
            }
        }
    })
    .await
    .expect("node b closes the tracking page once its subscription is back");
    assert_eq!(closed.map(|c| u16::from(c.code)), Some(1013));
    // The page reconnects with the last `seq` it saw: a resync and a fresh snapshot (the
    // stream it knew is gone), then the courier's moves again.
    let since = seen["seq"].as_u64().unwrap();
    let mut customer = b.ws(&format!("/v1/ws/track/o1?since={since}"), &b.token(Role::Customer, "cust", tenant, Some("o1"))).await;
    customer.expect("a resync", |v| t(v) == "resync").await;
    customer.expect("a fresh snapshot", |v| t(v) == "order_update" && v["order_id"] == "o1").await;
    assert!(
        a_move_arrives(&mut courier, &mut customer, &mut lat, DEADLINE).await.is_some(),
        "the courier's moves reach the customer on node b again"
    );
    drop((courier, customer, proxy));
    stop_both(a, b, db).await;
}

/// The courier moves north (from `lat`) until one of its moves sent now reaches the customer,
/// within `within`; an older move still on its way is not counted. The move as it arrived.
async fn a_move_arrives(courier: &mut Ws, customer: &mut Ws, lat: &mut f64, within: Duration) -> Option<Value> {
    let from = *lat;
    let deadline = std::time::Instant::now() + within;
    while std::time::Instant::now() < deadline {
        // Half a metre a step: a plausible speed even when the last move arrived at once.
        *lat += 0.000_005;
        courier.send(json!({"t":"loc","lat":*lat,"lng":NEAR.1,"ts":now_ms()})).await;
        let got = customer.try_expect(|v| t(v) == "courier" && v["courier_id"] == "c1" && v["lat"].as_f64().is_some_and(|l| l > from));
        if let Ok(Ok(v)) = tokio::time::timeout(Duration::from_millis(200), got).await {
            return Some(v);
        }
    }
    None
}

/// A socket relayed to the market's owner notices an owner that stops answering without
/// closing its connections (its host or network died; here a proxy in front of it stalls):
/// the relay pings the owner and, hearing nothing for the idle timeout, closes the app's socket
/// with 1013 so that it reconnects, instead of holding it until TCP gives up (about 15 min).
/// Both relays: the ingest port's and the HTTP port's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relayed_socket_notices_an_owner_that_stopped_answering() {
    let Some((redis, db, prefix)) = services().await else { return };
    let (ttl, renew) = (Duration::from_secs(5), Duration::from_millis(500));
    // Other nodes reach A through the proxy: its advertised address.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let proxy = Proxy::start(listener.local_addr().unwrap().to_string()).await;
    let mut cfg_a = leased(&db.url, &redis, &prefix, "node-a", ttl, renew);
    cfg_a.markets.as_mut().unwrap().advertise_url = format!("http://{}", proxy.addr);
    let a = TestServer::start_on(cfg_a, listener).await;
    let mut cfg_b = leased(&db.url, &redis, &prefix, "node-b", ttl, renew);
    cfg_b.sockets.ping_every = Duration::from_millis(200);
    cfg_b.sockets.idle = Duration::from_secs(1);
    let b = TestServer::start(cfg_b).await;
    let tenant = "oslo";
    let disp = a.dispatcher(tenant);
    assert_eq!(a.post("/v1/orders", &disp, order("o1")).await.0, 201);
    let mut relayed = relayed_couriers(&a, &b, tenant).await;
    proxy.stall();
    // The apps keep sending (a silent one would be closed for its own idleness).
    let closed = relayed.iter_mut().map(|(port, courier)| async move {
        use futures_util::{SinkExt as _, StreamExt as _};
        use tokio_tungstenite::tungstenite::Message;
        let until = tokio::time::Instant::now() + DEADLINE;
        loop {
            assert!(tokio::time::Instant::now() < until, "{port:?}: no close frame");
            let fix = json!({"t":"loc","lat":NEAR.0,"lng":NEAR.1,"ts":now_ms()}).to_string();
            let _ = courier.s.send(Message::Text(fix.into())).await;
            match tokio::time::timeout(Duration::from_millis(200), courier.s.next()).await {
                Ok(Some(Ok(Message::Close(frame)))) => return (*port, frame),
                Ok(Some(Ok(_))) | Err(_) => {}
                Ok(other) => panic!("{port:?}: ended without a close frame: {other:?}"),
            }
        }
    });
    for (port, frame) in futures_util::future::join_all(closed).await {
        let close = frame.unwrap_or_else(|| panic!("{port:?}: a close frame"));
        assert_eq!(close.code, tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode::Again, "{port:?}: {close:?}");
    }
    proxy.restore();
    drop(relayed);
    stop_both(a, b, db).await;
}

/// A courier app that goes silent without closing (a phone off the network: it reads nothing,
/// so it answers no ping either) behind a relay is closed with "idle timeout" after the idle
/// time (while one that is only parked, answering pings, stays), on both of the relaying node's ports, and its session on the owner ends with it. The
/// owner alone never notices: the relay's pings keep its side of the connection busy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relayed_app_that_goes_silent_is_closed_on_both_nodes() {
    use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
    // The owner would keep a silent session a minute; the relaying node's idle time is 1 s,
    // and it pings the owner every 200 ms (more often than the owner's idle time).
    let Some((a, b, db)) = two_nodes(|name, cfg| {
        if name == "node-a" {
            cfg.sockets.idle = Duration::from_secs(60);
        } else {
            cfg.sockets.ping_every = Duration::from_millis(200);
            cfg.sockets.idle = Duration::from_secs(1);
        }
    })
    .await
    else {
        return;
    };
    let tenant = "oslo";
    assert_eq!(a.post("/v1/orders", &a.dispatcher(tenant), order("o1")).await.0, 201);
    let mut relayed = relayed_couriers(&a, &b, tenant).await;
    let owner = a.running.as_ref().unwrap().state.clone();
    assert_eq!(owner.broker.session_counts().0, 2, "both couriers' sessions run on the owner");
    // First parked, answering pings (tungstenite does while it reads): kept past three idle
    // times, the relaying node pinging it once it is quiet.
    let parked = async |port: &Port, courier: &mut Ws| {
        let pings = courier.read_answering_pings(&format!("{port:?}: a parked app"), Duration::from_secs(3)).await;
        assert!(pings >= 5, "{port:?}: {pings} pings");
    };
    let [(p1, c1), (p2, c2)] = &mut relayed[..] else { panic!("two couriers") };
    tokio::join!(parked(p1, c1), parked(p2, c2));
    assert_eq!(owner.broker.session_counts().0, 2, "both still served by the owner");
    let silent_since = std::time::Instant::now();
    // Then nothing read (reading would answer the relay's pings).
    eventually("the owner's sessions closed", || async { (owner.broker.session_counts().0 == 0).then_some(()) }).await;
    assert!(silent_since.elapsed() < Duration::from_secs(8), "closed only after {:?}", silent_since.elapsed());
    for (port, courier) in &mut relayed {
        // Read now, the close frame may come after pings whose pongs meet the closed socket.
        if let Some(close) = courier.expect_close().await {
            assert_eq!((close.code, close.reason.as_str()), (CloseCode::Normal, "idle timeout"), "{port:?}");
        }
    }
    drop(relayed);
    stop_both(a, b, db).await;
}

/// An app behind a relay that closes its socket gets its close answered (a clean close, not a
/// dropped connection), on both of the relaying node's ports, and its session on the owner ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relayed_app_that_closes_gets_its_close_answered() {
    use futures_util::StreamExt as _;
    use tokio_tungstenite::tungstenite::Message;
    let Some((a, b, db)) = two_nodes(|_, _| {}).await else { return };
    let tenant = "oslo";
    assert_eq!(a.post("/v1/orders", &a.dispatcher(tenant), order("o1")).await.0, 201);
    let mut relayed = relayed_couriers(&a, &b, tenant).await;
    let owner = a.running.as_ref().unwrap().state.clone();
    for (port, courier) in &mut relayed {
        courier.s.close(None).await.unwrap();
        let answer = tokio::time::timeout(DEADLINE, async {
            loop {
                match courier.s.next().await {
                    Some(Ok(Message::Close(_))) => return Ok(()),
                    Some(Ok(_)) => {}
                    other => return Err(format!("{other:?}")),
                }
            }
        })
        .await
        .unwrap_or_else(|_| panic!("{port:?}: no answer to the close"));
        assert_eq!(answer, Ok(()), "{port:?}: the connection ended without a close frame");
    }
    eventually("the owner's sessions closed", || async { (owner.broker.session_counts().0 == 0).then_some(()) }).await;
    drop(relayed);
    stop_both(a, b, db).await;
}

/// A long history export through a node that does not own the market is streamed to the end,
/// however slowly the client reads: the forward's timeout bounds the wait for the answer and for
/// each read, not the whole body (reqwest's client-wide timeout cut it off, at 30 s by default).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_history_export_through_another_node_is_not_cut_off() {
    use futures_util::StreamExt as _;
    use sqlx::Connection as _;
    let forward = Duration::from_secs(1);
    let Some((a, b, db)) = two_nodes(|name, cfg| {
        if name == "node-b" {
            cfg.markets.as_mut().unwrap().forward_timeout = forward;
        }
    })
    .await
    else {
        return;
    };
    let tenant = "oslo";
    let disp = a.dispatcher(tenant);
    assert_eq!(a.post("/v1/orders", &disp, order("o1")).await.0, 201);
    assert_eq!(a.put("/v1/couriers/c1", &disp, json!({"name": "van 1"})).await.0, 200);
    // 40,000 samples, about 8 MB of GeoJSON: more than the sockets between hold.
    let mut c = sqlx::PgConnection::connect(&db.url).await.unwrap();
    sqlx::query(
        "INSERT INTO location_history (tenant, courier, ts, lat, lng, speed) \
         SELECT 'oslo', 'c1', 1700000000000 + g * 1000, 59.9 + g * 1e-6, 10.7, 3.0 FROM generate_series(1, 40000) g",
    )
    .execute(&mut c)
    .await
    .unwrap();
    let resp = b.http.get(format!("{}/v1/couriers/c1/history?from=0", b.base)).bearer_auth(&disp).send().await.unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    let mut stream = resp.bytes_stream();
    let mut body = stream.next().await.expect("a first chunk").expect("a first chunk").to_vec();
    // A slow client: it stops reading for three forward timeouts (the export then waits on it).
    tokio::time::sleep(forward * 3).await;
    while let Some(chunk) = stream.next().await {
        body.extend_from_slice(&chunk.expect("the export broke off"));
    }
    let v: Value = serde_json::from_slice(&body).expect("a complete GeoJSON document");
    assert_eq!(v["features"].as_array().map(Vec::len), Some(40_000));
    stop_both(a, b, db).await;
}

/// A node shutting down closes the sockets it relays to another node's market with 1001
/// ("going away", so the apps reconnect at once, to a node that stays), on both ports, and
/// does not hold its own shutdown on them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_shutting_down_closes_its_relayed_sockets_with_going_away() {
    use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
    let Some((mut a, mut b, db)) = two_nodes(|_, _| {}).await else { return };
    let tenant = "oslo";
    let disp = a.dispatcher(tenant);
    assert_eq!(a.post("/v1/orders", &disp, order("o1")).await.0, 201);
    let mut relayed = relayed_couriers(&a, &b, tenant).await;
    let started = std::time::Instant::now();
    let closes = async {
        let mut codes = Vec::new();
        for (port, courier) in &mut relayed {
            let close = courier.expect_close().await.unwrap_or_else(|| panic!("{port:?}: a close frame"));
            codes.push((*port, close.code, close.reason.to_string()));
        }
        codes
    };
    let ((), codes) = tokio::join!(b.stop(), closes);
    let took = started.elapsed();
    for (port, code, reason) in codes {
        assert_eq!((code, reason.as_str()), (CloseCode::Away, "server shutting down"), "{port:?}");
    }
    assert!(took < Duration::from_secs(8), "node B took {took:?} to shut down");
    // The owner goes on: the couriers are still known there.
    a.courier_at(&disp, "c1", NEAR.0).await;
    drop(relayed);
    a.stop().await;
    db.drop_db().await;
}

/// A node shutting down gives its markets up before it waits for what may take long (webhook
/// sends in flight, here to an endpoint that never answers, and the retention purge): another
/// node takes the market over while the first one is still winding down, instead of after.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_shutting_down_releases_its_markets_before_waiting_for_webhook_sends() {
    use sqlx::Connection as _;
    let Some((redis, db, prefix)) = services().await else { return };
    let (ttl, renew) = (Duration::from_secs(30), Duration::from_millis(300));
    // An endpoint that accepts connections and never answers.
    let endpoint = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", endpoint.local_addr().unwrap());
    let mut cfg_a = leased(&db.url, &redis, &prefix, "node-a", ttl, renew);
    cfg_a.webhooks.allow_private = true;
    cfg_a.webhooks.poll = Duration::from_millis(50);
    cfg_a.webhooks.timeout = Duration::from_secs(6);
    let mut a = TestServer::start(cfg_a).await;
    let mut b = TestServer::start(leased(&db.url, &redis, &prefix, "node-b", ttl, renew)).await;
    let tenant = "oslo";
    let disp = a.dispatcher(tenant);
    let hook = json!({"url": url, "events": ["*"], "secret": "whsec-0123456789abcdef"});
    assert_eq!(a.put("/v1/webhooks/w1", &disp, hook).await.0, 201);
    assert_eq!(a.post("/v1/orders", &disp, order("o1")).await.0, 201);
    let holder = async || -> Option<String> {
        let mut c = sqlx::PgConnection::connect(&db.url).await.unwrap();
        sqlx::query_scalar("SELECT holder FROM market_leases WHERE tenant = $1 AND expires_at > 0")
            .bind(tenant)
            .fetch_optional(&mut c)
            .await
            .unwrap()
    };
    assert!(holder().await.is_some_and(|h| h.starts_with("node-a#")));
    // A delivery is in flight, waiting for an answer that does not come.
    let (_held, _) = tokio::time::timeout(Duration::from_secs(10), endpoint.accept()).await.expect("a webhook delivery").unwrap();

    let started = std::time::Instant::now();
    let stopping = tokio::spawn(a.running.take().unwrap().stop());
    eventually("node b holds the market", || async { holder().await.filter(|h| h.starts_with("node-b#")) }).await;
    let took_over = started.elapsed();
    assert!(!stopping.is_finished(), "B took the market over only after A had stopped ({took_over:?})");
    tokio::time::timeout(Duration::from_secs(20), stopping).await.expect("A stops").unwrap().unwrap();
    eprintln!("take-over {took_over:?} into A's shutdown, which took {:?}", started.elapsed());
    let (s, v) = b.get("/v1/orders/o1", Some(&disp)).await;
    assert_eq!((s, v["state"].as_str()), (200, Some("created")), "{v}");
    b.stop().await;
    db.drop_db().await;
}

/// `--http-limit-per-ip` with two nodes: what node B forwards to the market's owner carries the
/// nodes' key and is counted on B alone, so it does not spend, on A, the budget of B's address
/// (here the same address as the client's); and a client cannot pass the key off as its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarded_requests_are_counted_once_on_the_node_they_reached() {
    let Some((a, b, db)) = two_nodes(|_, cfg| {
        cfg.http_limit = hexfleet_gateway::http_limit::HttpLimitConfig { per_s: 1, burst: 4, ..Default::default() };
    })
    .await
    else {
        return;
    };
    let tenant = "limits";
    let (disp_a, disp_b) = (a.dispatcher(tenant), b.dispatcher(tenant));
    let (s, v) = a.post("/v1/orders", &disp_a, order("o1")).await;
    assert_eq!(s, 201, "A takes the market: {v}");
    // Three reads through B, each forwarded to A (B's budget: 4).
    for _ in 0..3 {
        let (s, v) = b.get("/v1/orders/o1", Some(&disp_b)).await;
        assert_eq!(s, 200, "{v}");
    }
    // A counted only the create: its budget for this address has room for more. (Had A
    // counted the forwarded reads too, 1 + 3 would have spent it, and this would be a 429.)
    for _ in 0..2 {
        let (s, v) = a.get("/v1/orders/o1", Some(&disp_a)).await;
        assert_eq!(s, 200, "{v}");
    }
    // A client sending a made-up node key is counted all the same.
    let spoof = |srv: &TestServer, tok: &str| {
        srv.http.get(format!("{}/v1/orders/o1", srv.base)).bearer_auth(tok.to_owned()).header(hexfleet_gateway::markets::NODE_KEY, "00".repeat(32)).send()
    };
    let mut statuses = Vec::new();
    for _ in 0..6 {
        statuses.push(spoof(&a, &disp_a).await.unwrap().status().as_u16());
    }
    assert!(statuses.contains(&429), "a forged key is no key: {statuses:?}");
    stop_both(a, b, db).await;
}

/// A WebSocket upgrade through a node that does not run the market, whose token is in the
/// query (so it is routed to the owner) but whose `Authorization` header is not visible ASCII
/// (it cannot be passed on): 401 with the API's error body, and the node goes on relaying
/// other apps.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relayed_upgrade_whose_authorization_is_not_ascii_is_refused() {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;
    let Some((a, b, db)) = two_nodes(|_, _| {}).await else {
        return;
    };
    let tenant = "bytes";
    assert_eq!(a.post("/v1/orders", &a.dispatcher(tenant), order("o1")).await.0, 201, "A takes the market");
    let token = b.token(Role::Courier, "c1", tenant, None);
    let mut req = format!("{}/v1/ws/courier?token={token}", b.ws).into_client_request().unwrap();
    req.headers_mut().insert("authorization", tokio_tungstenite::tungstenite::http::HeaderValue::from_bytes(b"Bearer \xff\xfe").unwrap());
    match tokio_tungstenite::connect_async(req).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(r)) => {
            let body: Value = serde_json::from_slice(r.body().as_deref().unwrap_or_default()).expect("a JSON error body");
            assert_eq!((r.status().as_u16(), body["error"]["code"].as_str()), (401, Some("unauthorized")), "{body}");
        }
        other => panic!("expected a refused upgrade, got {:?}", other.map(|_| ())),
    }
    // The same app with its token alone is relayed to A.
    let mut courier = b.courier(Port::Http, &token).await;
    courier.send(json!({"t":"loc","lat":NEAR.0,"lng":NEAR.1,"ts":now_ms()})).await;
    a.courier_at(&a.dispatcher(tenant), "c1", NEAR.0).await;
    stop_both(a, b, db).await;
}
