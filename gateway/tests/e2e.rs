//! End to end through every layer: real server, real sockets, SQLite (and PostgreSQL) storage.

mod common;

use common::*;
use hexfleet_gateway::auth::Role;
use serde_json::json;

const C_LAT: f64 = 52.5200;
const C_LNG: f64 = 13.4050;
const PICKUP: (f64, f64) = (52.5215, 13.4075);
const DROPOFF: (f64, f64) = (52.5300, 13.4200);

/// A courier streams → nearby finds it → an order is created → offered and accepted → the
/// customer's tracking socket sees positions → arrival at pickup is detected → picked up →
/// arrival at drop-off → delivered → GET says delivered, also after a restart.
async fn full_lifecycle(db: &str, port: Port) {
    let mut srv = TestServer::start(fast_config(db)).await;
    let tenant = "acme";
    let disp = srv.dispatcher(tenant);
    let mut courier = srv.courier(port, &srv.token(Role::Courier, "c1", tenant, None)).await;
    let t0 = now_ms() - 600_000;
    courier.send(json!({"t":"status","status":"available"})).await;
    courier.send(json!({"t":"loc","lat":C_LAT,"lng":C_LNG,"ts":t0,"speed":3.0,"heading":90})).await;

    let near = eventually("nearby finds c1", || async {
        let (s, v) = srv.get(&format!("/v1/couriers/nearby?lat={C_LAT}&lng={C_LNG}&k=5"), Some(&disp)).await;
        assert_eq!(s, 200, "{v}");
        let items = v["items"].as_array().unwrap().clone();
        items.iter().find(|i| i["courier"]["id"] == "c1" && i["courier"]["status"] == "available").cloned()
    })
    .await;
    assert!(near["distance_m"].as_f64().unwrap() < 1.0, "{near}");

    let (s, o) = srv.post("/v1/orders", &disp, json!({"id":"o1","pickup":{"lat":PICKUP.0,"lng":PICKUP.1},"dropoff":{"lat":DROPOFF.0,"lng":DROPOFF.1}})).await;
    assert_eq!(s, 201, "{o}");
    assert_eq!(o["state"], "created");

    let mut customer = srv.ws("/v1/ws/track/o1", &srv.token(Role::Customer, "cust1", tenant, Some("o1"))).await;
    customer.expect("snapshot", |v| t(v) == "order_update" && v["order_id"] == "o1").await;

    let offer = courier.expect("offer", |v| t(v) == "offer").await;
    assert_eq!(offer["order_id"], "o1");
    assert!(offer["seq"].as_u64().unwrap() >= 1);
    courier.send(json!({"t":"offer_reply","order_id":"o1","accept":true})).await;
    courier.expect("assigned", |v| t(v) == "assigned" && v["order_id"] == "o1").await;
    courier.expect("route", |v| t(v) == "route" && v["stops"].as_array().is_some_and(|s| s.len() == 2)).await;
    let assigned = customer.expect("assigned update", |v| t(v) == "order_update" && v["state"] == "assigned").await;
    // The customer is not shown the dispatch record (the other candidates and their costs).
    assert!(assigned["order"]["courier_id"] == "c1" && assigned["order"].get("assignment").is_none(), "{assigned}");

    // Moving toward the pickup: the customer sees the courier with an ETA.
    courier.send(json!({"t":"loc","lat":52.5208,"lng":13.4062,"ts":t0 + 60_000})).await;
    let pos = customer.expect("courier position", |v| t(v) == "courier").await;
    assert_eq!(pos["courier_id"], "c1");
    assert!(pos["eta_s"].as_f64().is_some(), "{pos}");
    // A page opened now has the courier in its snapshot, with an ETA too, numbered in order.
    let mut late = srv.ws("/v1/ws/track/o1", &srv.token(Role::Customer, "cust1", tenant, Some("o1"))).await;
    let first = late.expect("snapshot", |v| t(v) == "order_update").await;
    let snap = late.expect("snapshot position", |v| t(v) == "courier").await;
    assert!(snap["eta_s"].as_f64().is_some_and(|e| e > 0.0), "{snap}");
    assert!(snap["seq"].as_u64().unwrap() > first["seq"].as_u64().unwrap(), "{first} then {snap}");
    drop(late);

    // Arrival at the pickup is detected without the app asking.
    courier.send(json!({"t":"loc","lat":PICKUP.0,"lng":PICKUP.1,"ts":t0 + 120_000})).await;
    customer.expect("at_pickup", |v| t(v) == "order_update" && v["state"] == "at_pickup").await;
    courier.send(json!({"t":"order_event","order_id":"o1","event":"picked_up"})).await;
    customer.expect("picked_up", |v| t(v) == "order_update" && v["state"] == "picked_up").await;
    courier.send(json!({"t":"loc","lat":DROPOFF.0,"lng":DROPOFF.1,"ts":t0 + 300_000})).await;
    customer.expect("at_dropoff", |v| t(v) == "order_update" && v["state"] == "at_dropoff").await;
    courier.send(json!({"t":"order_event","order_id":"o1","event":"delivered"})).await;
    customer.expect("delivered", |v| t(v) == "order_update" && v["state"] == "delivered").await;

    let (s, o) = srv.get("/v1/orders/o1", Some(&disp)).await;
    assert_eq!((s, o["state"].as_str()), (200, Some("delivered")), "{o}");
    assert_eq!(o["courier_id"], "c1");
    assert_eq!(o["assignment"]["courier_id"], "c1", "{o}");
    let (s, o) = srv.get("/v1/orders/o1", Some(&srv.token(Role::Customer, "cust1", tenant, Some("o1")))).await;
    assert_eq!((s, o["courier_id"].as_str()), (200, Some("c1")), "{o}");
    assert!(o.get("assignment").is_none(), "the customer's answer holds the dispatch record: {o}");
    let (s, ev) = srv.get("/v1/events?entity=order&id=o1", Some(&disp)).await;
    assert_eq!(s, 200);
    let kinds: Vec<&str> = ev["items"].as_array().unwrap().iter().filter_map(|e| e["kind"].as_str()).collect();
    for k in ["order.created", "order.offered", "order.assigned", "order.at_pickup", "order.picked_up", "order.at_dropoff", "order.delivered"] {
        assert!(kinds.contains(&k), "missing {k} in {kinds:?}");
    }

    drop(courier);
    drop(customer);
    srv.stop().await;

    // Restart on the same database: the order and the courier are still there.
    let srv = TestServer::start(fast_config(db)).await;
    let disp = srv.dispatcher(tenant);
    let (s, o) = srv.get("/v1/orders/o1", Some(&disp)).await;
    assert_eq!((s, o["state"].as_str()), (200, Some("delivered")), "{o}");
    let (s, c) = srv.get("/v1/couriers/c1", Some(&disp)).await;
    assert_eq!(s, 200, "{c}");
    // Tenants are separate: another tenant does not see it.
    let (s, _) = srv.get("/v1/orders/o1", Some(&srv.dispatcher("other"))).await;
    assert_eq!(s, 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lifecycle_on_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    full_lifecycle(dir.path().join("hexfleet.db").to_str().unwrap(), Port::Http).await;
}

/// The same lifecycle with the courier app on the ingest port (`--ingest-listen`): offers,
/// assignment and route reach it there, and its fixes and events drive the order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lifecycle_through_the_ingest_port() {
    let dir = tempfile::tempdir().unwrap();
    full_lifecycle(dir.path().join("hexfleet.db").to_str().unwrap(), Port::Ingest).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lifecycle_on_postgres() {
    let Some(db) = PgDb::create().await else { return };
    full_lifecycle(&db.url, Port::Http).await;
    db.drop_db().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_orders_survive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("h.db");
    let db = db.to_str().unwrap();
    let mut srv = TestServer::start(fast_config(db)).await;
    let disp = srv.dispatcher("t1");
    for i in 0..20 {
        let (s, v) = srv.post("/v1/orders", &disp, json!({"id":format!("o{i}"),"pickup":{"lat":52.5,"lng":13.4},"dropoff":{"lat":52.51,"lng":13.41}})).await;
        assert_eq!(s, 201, "{v}");
    }
    let (s, _) = srv.post("/v1/orders/o3/cancel", &disp, json!({})).await;
    assert_eq!(s, 200);
    srv.stop().await;
    let srv = TestServer::start(fast_config(db)).await;
    for i in 0..20 {
        let (s, v) = srv.get(&format!("/v1/orders/o{i}"), Some(&disp)).await;
        assert_eq!(s, 200, "{v}");
        assert_eq!(v["state"], if i == 3 { "cancelled" } else { "created" });
    }
}

/// Stopping the server closes ingest-port sessions with 1001 (going away), and a fix accepted
/// before the stop is still there after a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ingest_sessions_close_on_shutdown_and_their_fixes_survive_it() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("h.db");
    let db = db.to_str().unwrap();
    let mut srv = TestServer::start(fast_config(db)).await;
    let disp = srv.dispatcher("t1");
    let mut courier = srv.courier(Port::Ingest, &srv.token(Role::Courier, "c1", "t1", None)).await;
    courier.send(json!({"t":"loc","lat":52.5123,"lng":13.3877,"ts":now_ms()})).await;
    srv.courier_at(&disp, "c1", 52.5123).await;
    let stopping = tokio::spawn(srv.running.take().unwrap().stop());
    let close = courier.expect_close().await.expect("a close frame");
    assert_eq!(close.code, tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode::Away, "{close:?}");
    stopping.await.unwrap().expect("clean shutdown");
    let srv = TestServer::start(fast_config(db)).await;
    let (s, c) = srv.get("/v1/couriers/c1", Some(&disp)).await;
    assert_eq!((s, c["position"]["lat"].as_f64()), (200, Some(52.5123)), "{c}");
}

/// `GET /v1/couriers/{id}/trail`: the courier's last `trail_len` fixes from memory, oldest
/// first, a late fix in its time order; for staff of the tenant and the courier itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_couriers_trail_is_its_recent_fixes_in_time_order() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = fast_config(dir.path().join("h.db").to_str().unwrap());
    cfg.fleet.trail_len = 3;
    let srv = TestServer::start(cfg).await;
    let disp = srv.dispatcher("t1");
    let own = srv.token(Role::Courier, "c1", "t1", None);
    let mut courier = srv.courier(Port::Ingest, &own).await;
    let t0 = now_ms() - 60_000;
    // One step of about 11 m a second, then a fix that arrives late.
    for (i, ts) in [t0, t0 + 1_000, t0 + 2_000, t0 + 3_000, t0 + 1_500].into_iter().enumerate() {
        courier.send(json!({"t":"loc","lat":52.5 + 0.0001 * i as f64,"lng":13.4,"ts":ts,"speed":3.0})).await;
    }
    let want = vec![t0 + 1_500, t0 + 2_000, t0 + 3_000];
    let v = eventually("the trail holds the last three fixes by time", || async {
        let (s, v) = srv.get("/v1/couriers/c1/trail", Some(&disp)).await;
        assert_eq!(s, 200, "{v}");
        let ts: Vec<i64> = v["items"].as_array().unwrap().iter().map(|p| p["ts"].as_i64().unwrap()).collect();
        (ts == want).then_some(v)
    })
    .await;
    assert_eq!(v["courier_id"], "c1");
    assert_eq!((v["items"][2]["lat"].as_f64(), v["items"][2]["speed"].as_f64()), (Some(52.5003), Some(3.0)), "{v}");
    // The live position is the newest fix, not the late one.
    let (_, c) = srv.get("/v1/couriers/c1", Some(&disp)).await;
    assert_eq!(c["position"]["ts"], t0 + 3_000);

    assert_eq!(srv.get("/v1/couriers/c1/trail", Some(&own)).await.0, 200, "the courier itself");
    let (s, v) = srv.get("/v1/couriers/c1/trail", Some(&srv.token(Role::Courier, "c2", "t1", None))).await;
    assert_eq!((s, v["error"]["code"].as_str()), (403, Some("forbidden")), "{v}");
    let (s, v) = srv.get("/v1/couriers/c1/trail", Some(&srv.dispatcher("t2"))).await;
    assert_eq!((s, v["error"]["code"].as_str()), (404, Some("not_found")), "another tenant: {v}");
    assert_eq!(srv.get("/v1/couriers/nobody/trail", Some(&disp)).await.0, 404);
    assert_eq!(srv.get("/v1/couriers/c1/trail", None).await.0, 401);
    let (_, doc) = srv.get("/openapi.json", None).await;
    assert!(doc["paths"]["/v1/couriers/{id}/trail"]["get"].is_object(), "trail not in OpenAPI");
    // The document describes what `nearby` answers (an object with `items`; it said an array).
    let nearby = &doc["paths"]["/v1/couriers/nearby"]["get"]["responses"]["200"]["content"]["application/json"]["schema"];
    assert_eq!(nearby["$ref"], "#/components/schemas/NearbyListDto", "{nearby}");
    assert_eq!(doc["components"]["schemas"]["NearbyListDto"]["properties"]["items"]["type"], "array");
}

/// An offer made while the courier's app was away (a network switch) is sent again when it
/// reconnects, and can be accepted: otherwise it would lapse unseen and the courier count as
/// having declined the order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_offer_made_while_the_app_was_away_is_sent_on_reconnect() {
    let dir = tempfile::tempdir().unwrap();
    let mut srv = TestServer::start(fast_config(dir.path().join("h.db").to_str().unwrap())).await;
    let (tenant, disp) = ("acme", srv.dispatcher("acme"));
    let token = srv.token(Role::Courier, "c1", tenant, None);
    let mut courier = srv.courier(Port::Ingest, &token).await;
    courier.send(json!({"t":"status","status":"available"})).await;
    courier.send(json!({"t":"loc","lat":C_LAT,"lng":C_LNG,"ts":now_ms()})).await;
    srv.courier_at(&disp, "c1", C_LAT).await;
    drop(courier);
    let (s, o) = srv.post("/v1/orders", &disp, json!({"id":"o1","pickup":{"lat":PICKUP.0,"lng":PICKUP.1},"dropoff":{"lat":DROPOFF.0,"lng":DROPOFF.1}})).await;
    assert_eq!(s, 201, "{o}");
    eventually("o1 offered to c1 while it is away", || async {
        let (_, o) = srv.get("/v1/orders/o1", Some(&disp)).await;
        (o["state"] == "offered").then_some(())
    })
    .await;
    let mut courier = srv.courier(Port::Ingest, &token).await;
    let offer = courier.expect("the offer, again", |v| t(v) == "offer" && v["order_id"] == "o1").await;
    assert!(offer["expires_at"].as_i64().unwrap() > now_ms(), "{offer}");
    courier.send(json!({"t":"offer_reply","order_id":"o1","accept":true})).await;
    courier.expect("assigned", |v| t(v) == "assigned" && v["order_id"] == "o1").await;
    drop(courier);
    srv.stop().await;
}

/// A courier hands an order back before pickup over its socket, and a dispatcher takes one
/// back over HTTP: each time the courier is told (`order_update`, state `created`, no
/// courier), and the order is offered to another courier, never again to the one it left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_order_handed_back_is_offered_to_another_courier() {
    let dir = tempfile::tempdir().unwrap();
    let srv = TestServer::start(fast_config(dir.path().join("h.db").to_str().unwrap())).await;
    let (tenant, disp) = ("acme", srv.dispatcher("acme"));
    let mut c1 = srv.courier(Port::Http, &srv.token(Role::Courier, "c1", tenant, None)).await;
    let mut c2 = srv.courier(Port::Http, &srv.token(Role::Courier, "c2", tenant, None)).await;
    for (ws, id, lat) in [(&mut c1, "c1", C_LAT), (&mut c2, "c2", C_LAT + 0.01)] {
        ws.send(json!({"t":"status","status":"available"})).await;
        ws.send(json!({"t":"loc","lat":lat,"lng":C_LNG,"ts":now_ms()})).await;
        srv.courier_at(&disp, id, lat).await;
    }
    let (s, o) = srv.post("/v1/orders", &disp, json!({"id":"o1","pickup":{"lat":PICKUP.0,"lng":PICKUP.1},"dropoff":{"lat":DROPOFF.0,"lng":DROPOFF.1}})).await;
    assert_eq!(s, 201, "{o}");
    c1.expect("the offer", |v| t(v) == "offer" && v["order_id"] == "o1").await;
    c1.send(json!({"t":"offer_reply","order_id":"o1","accept":true})).await;
    c1.expect("assigned", |v| t(v) == "assigned" && v["order_id"] == "o1").await;

    // Only staff take an order back over HTTP; an unknown event name is refused.
    assert_eq!(srv.post("/v1/orders/o1/release", &srv.token(Role::Courier, "c1", tenant, None), json!({})).await.0, 403);
    assert_eq!(srv.post("/v1/orders/o1/release", &srv.token(Role::Customer, "u", tenant, Some("o1")), json!({})).await.0, 403);
    assert_eq!(srv.post("/v1/orders/nope/release", &disp, json!({})).await.0, 404);
    c1.send(json!({"t":"order_event","order_id":"o1","event":"gave_up"})).await;
    let e = c1.expect("an error frame", |v| t(v) == "error").await;
    assert!(e["code"] == "bad_event" && e["message"].as_str().unwrap().contains("released"), "{e}");

    // c1 hands it back: it is told, and c2 gets the offer.
    c1.send(json!({"t":"order_event","order_id":"o1","event":"released"})).await;
    let u = c1.expect("the order left c1", |v| t(v) == "order_update" && v["order_id"] == "o1" && v["state"] == "created").await;
    assert!(u["courier_id"].is_null() && u["order"].is_object() && u["order"].get("released_at").is_none(), "a courier is not shown it: {u}");
    c2.expect("the offer to c2", |v| t(v) == "offer" && v["order_id"] == "o1").await;
    c2.send(json!({"t":"offer_reply","order_id":"o1","accept":true})).await;
    c2.expect("assigned to c2", |v| t(v) == "assigned" && v["order_id"] == "o1").await;

    // A dispatcher takes it back from c2: c2 is told; nobody is left to offer it to.
    let (s, o) = srv.post("/v1/orders/o1/release", &disp, json!({})).await;
    assert_eq!((s, o["state"].as_str()), (200, Some("created")), "{o}");
    assert!(o["courier_id"].is_null() && o["released_at"].as_i64().is_some(), "{o}");
    let u = c2.expect("the order left c2", |v| t(v) == "order_update" && v["order_id"] == "o1" && v["state"] == "created").await;
    assert!(u["courier_id"].is_null(), "{u}");
    let (s, ev) = srv.get("/v1/events?entity=order&id=o1", Some(&disp)).await;
    assert_eq!(s, 200);
    let released: Vec<&str> = ev["items"].as_array().unwrap().iter().filter(|e| e["kind"] == "order.released").filter_map(|e| e["reason"].as_str()).collect();
    assert_eq!(released, ["handed back by c1", "taken back from c2"], "{ev}");
    // Once taken back it cannot be taken back again.
    let (s, v) = srv.post("/v1/orders/o1/release", &disp, json!({})).await;
    assert_eq!(s, 409, "{v}");
}

/// A tracking page that reconnects with the `seq` of its snapshot, nothing having happened
/// since, is told nothing (no `resync`, no second snapshot), and then gets the next update. The
/// snapshot reserves a number for the courier's position: with none to send (no courier yet),
/// its order update takes that number, or the reconnect counted as a gap.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_page_reconnecting_after_a_quiet_snapshot_is_told_nothing_was_missed() {
    let dir = tempfile::tempdir().unwrap();
    let mut srv = TestServer::start(fast_config(dir.path().join("h.db").to_str().unwrap())).await;
    let disp = srv.dispatcher("acme");
    let (s, o) = srv.post("/v1/orders", &disp, json!({"id":"o1","pickup":{"lat":PICKUP.0,"lng":PICKUP.1},"dropoff":{"lat":DROPOFF.0,"lng":DROPOFF.1}})).await;
    assert_eq!(s, 201, "{o}");
    let customer = srv.token(Role::Customer, "cust1", "acme", Some("o1"));
    let mut page = srv.ws("/v1/ws/track/o1", &customer).await;
    let snap = page.expect("snapshot", |_| true).await;
    assert_eq!((t(&snap), snap["state"].as_str()), ("order_update", Some("created")), "{snap}");
    drop(page);
    let mut back = srv.ws(&format!("/v1/ws/track/o1?since={}", snap["seq"]), &customer).await;
    let (s, _) = srv.post("/v1/orders/o1/cancel", &disp, json!({})).await;
    assert_eq!(s, 200);
    let next = back.expect("the next message", |_| true).await;
    assert_eq!((t(&next), next["state"].as_str()), ("order_update", Some("cancelled")), "nothing missed, no resync: {next}");
    assert!(next["seq"].as_u64() > snap["seq"].as_u64(), "{next}");
    srv.stop().await;
}

/// A console that reconnects with the `seq` of the last message it got is sent the events it
/// missed meanwhile, then goes on live; one whose `since` is from another stream is told to
/// resync. (Consoles had a per-connection `seq` and no replay before.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_console_reconnecting_with_since_gets_the_events_it_missed() {
    let dir = tempfile::tempdir().unwrap();
    let mut srv = TestServer::start(fast_config(dir.path().join("h.db").to_str().unwrap())).await;
    let disp = srv.dispatcher("acme");
    let order = |id: &str| json!({"id":id,"pickup":{"lat":PICKUP.0,"lng":PICKUP.1},"dropoff":{"lat":DROPOFF.0,"lng":DROPOFF.1}});
    let created = |id: &'static str| move |v: &serde_json::Value| t(v) == "event" && v["event"]["kind"] == "order.created" && v["event"]["entity_id"] == id;
    let mut console = srv.ws("/v1/ws/console", &disp).await;
    console.send(json!({"t":"subscribe","bbox":[13.0,52.0,14.0,53.0]})).await;
    assert_eq!(srv.post("/v1/orders", &disp, order("o1")).await.0, 201);
    let seen = console.expect("o1's event", created("o1")).await;
    drop(console);
    assert_eq!(srv.post("/v1/orders", &disp, order("o2")).await.0, 201);
    let mut back = srv.ws(&format!("/v1/ws/console?since={}", seen["seq"]), &disp).await;
    let missed = back.expect("the first message", |_| true).await;
    assert!(created("o2")(&missed), "the missed event first: {missed}");
    assert!(missed["seq"].as_u64() > seen["seq"].as_u64());
    assert_eq!(srv.post("/v1/orders", &disp, order("o3")).await.0, 201);
    back.expect("o3's event, live", created("o3")).await;
    let mut other = srv.ws("/v1/ws/console?since=5", &disp).await;
    let first = other.expect("the first message", |_| true).await;
    assert_eq!(t(&first), "resync", "{first}");
    // A since that is not a number is refused before the upgrade, not ignored.
    for path in ["/v1/ws/console?since=abc", "/v1/ws/track/o1?since=-1", "/v1/ws/track/o1?since=1.5"] {
        let (s, v) = srv.get(path, Some(&disp)).await;
        assert_eq!((s, v["error"]["code"].as_str()), (400, Some("bad_since")), "{path}: {v}");
    }
    srv.stop().await;
}
