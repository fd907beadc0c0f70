//! Durability at the server level, each on SQLite and on the real PostgreSQL (fresh database per
//! test): SIGKILL of the `hexfleet` process while a client creates and advances orders; a
//! database outage while serving (PostgreSQL behind a TCP proxy the test cuts; SQLite locked by
//! another connection); location history export, erase and the retention purge over HTTP; the
//! event log endpoint.

mod common;

use std::collections::{HashMap, HashSet};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use common::*;
use hexfleet_gateway::auth::{Keys, Role};
use serde_json::{Value, json};

const PICKUP: (f64, f64) = (52.5215, 13.4075);
const DROPOFF: (f64, f64) = (52.5300, 13.4200);

fn order_body(id: &str) -> Value {
    json!({"id": id, "pickup": {"lat": PICKUP.0, "lng": PICKUP.1}, "dropoff": {"lat": DROPOFF.0, "lng": DROPOFF.1}})
}

/// Runs `body` on a fresh SQLite file.
async fn on_sqlite<F, Fut>(body: F)
where
    F: FnOnce(String) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let dir = tempfile::tempdir().unwrap();
    body(dir.path().join("hexfleet.db").to_string_lossy().into_owned()).await;
}

/// Runs `body` on a fresh PostgreSQL database (fails when unreachable and `CI=true`).
async fn on_postgres<F, Fut>(body: F)
where
    F: FnOnce(String) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let Some(db) = PgDb::create().await else { return };
    body(db.url.clone()).await;
    db.drop_db().await;
}

// ---------------------------------------------------------------------------------------------
// SIGKILL of the real server process
// ---------------------------------------------------------------------------------------------


/// What the client knows about one order.
#[derive(Clone, Debug, Default)]
struct Track {
    /// The last acknowledged answer: (version, state, courier_id).
    acked: Option<(u64, String, Option<String>)>,
    /// A request sent and not answered when the server died: (expected state, expected courier).
    inflight: Option<(String, Option<String>)>,
}

/// One client task: create, assign to its c1, reassign to its c2, and cancel every second order.
async fn client_task(
    http: reqwest::Client,
    base: String,
    token: String,
    task: usize,
    tracks: Arc<parking_lot::Mutex<HashMap<String, Track>>>,
    acks: Arc<std::sync::atomic::AtomicUsize>,
) {
    // Each task has its own two couriers (capacity 100): overrides respect capacity, and the
    // orders left assigned stay well under it before the kill.
    let (c1, c2) = (format!("c1-{task}"), format!("c2-{task}"));
    for n in 0.. {
        let id = format!("o{task}-{n}");
        let mut steps: Vec<(String, Value, &str, Option<&str>)> = vec![
            ("/v1/orders".into(), order_body(&id), "created", None),
            (format!("/v1/orders/{id}/assign"), json!({"courier_id": c1}), "assigned", Some(c1.as_str())),
            (format!("/v1/orders/{id}/assign"), json!({"courier_id": c2}), "assigned", Some(c2.as_str())),
        ];
        if n % 2 == 0 {
            steps.push((format!("/v1/orders/{id}/cancel"), json!({}), "cancelled", None));
        }
        for (path, body, state, courier) in steps {
            tracks.lock().entry(id.clone()).or_default().inflight = Some((state.into(), courier.map(Into::into)));
            let r = http.post(format!("{base}{path}")).bearer_auth(&token).json(&body).send().await;
            let Ok(r) = r else { return }; // the server is gone: this request stays in flight
            let status = r.status().as_u16();
            let Ok(v) = r.json::<Value>().await else { return };
            assert!((200..300).contains(&status), "{path}: {status} {v}");
            assert_eq!(v["state"], state, "{v}");
            let mut g = tracks.lock();
            let t = g.get_mut(&id).unwrap();
            t.acked = Some((v["version"].as_u64().unwrap(), state.into(), v["courier_id"].as_str().map(Into::into)));
            t.inflight = None;
            acks.fetch_add(1, Ordering::SeqCst);
        }
    }
}

async fn sigkill_mid_stream(db: String) {
    let mut p = Proc::spawn(&db);
    let keys = Keys::new(SECRET);
    let disp = keys.mint(Role::Dispatcher, "disp", "t1", None, Duration::from_secs(3600));
    let http = reqwest::Client::new();
    for c in (0..6).flat_map(|t| [format!("c1-{t}"), format!("c2-{t}")]) {
        let r = http.put(format!("{}/v1/couriers/{c}", p.base)).bearer_auth(&disp).json(&json!({"name": c, "capacity": 100})).send().await.unwrap();
        assert_eq!(r.status().as_u16(), 200);
    }
    let tracks: Arc<parking_lot::Mutex<HashMap<String, Track>>> = Arc::default();
    let acks = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for task in 0..6 {
        tasks.push(tokio::spawn(client_task(http.clone(), p.base.clone(), disp.clone(), task, tracks.clone(), acks.clone())));
    }
    let start = Instant::now();
    while acks.load(Ordering::SeqCst) < 1_000 {
        assert!(start.elapsed() < Duration::from_secs(60), "server too slow: {} acks", acks.load(Ordering::SeqCst));
        for t in &tasks {
            assert!(!t.is_finished(), "a client stopped before the kill");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    p.kill9();
    for t in tasks {
        t.await.expect("client task");
    }
    let tracks = tracks.lock().clone();
    let inflight = tracks.values().filter(|t| t.inflight.is_some()).count();
    eprintln!("{} acknowledgements over {} orders before SIGKILL; {inflight} requests in flight", acks.load(Ordering::SeqCst), tracks.len());

    let p2 = Proc::spawn(&db);
    for (id, t) in &tracks {
        let r = http.get(format!("{}/v1/orders/{id}", p2.base)).bearer_auth(&disp).send().await.unwrap();
        let status = r.status().as_u16();
        let v: Value = r.json().await.unwrap();
        match (&t.acked, &t.inflight) {
            (None, Some(_)) => {
                // Creation was never acknowledged: absent, or created (durable before the kill).
                assert!(status == 404 || v["state"] == "created", "{id}: unacknowledged creation came back as {v}");
            }
            (None, None) => unreachable!("tracked orders were sent"),
            (Some((ver, state, courier)), inflight) => {
                assert_eq!(status, 200, "acknowledged order {id} lost: {v}");
                let got = (v["version"].as_u64().unwrap(), v["state"].as_str().unwrap(), v["courier_id"].as_str());
                if got.0 == *ver {
                    assert_eq!((got.1, got.2), (state.as_str(), courier.as_deref()), "{id}: acknowledged state differs: {v}");
                } else {
                    // One step further only if that step was in flight when the server died.
                    let (st, c) = inflight.as_ref().unwrap_or_else(|| panic!("{id}: v{} stored, v{ver} acknowledged, nothing in flight: {v}", got.0));
                    assert_eq!(got.0, ver + 1, "{id}: {v}");
                    assert_eq!(got.1, st, "{id}: {v}");
                    if st == "assigned" {
                        assert_eq!(got.2, c.as_deref(), "{id}: {v}");
                    }
                }
            }
        }
    }
    // Nothing that was never sent exists: every created order in the log is one the client sent.
    let r = http.get(format!("{}/v1/events?limit=1000", p2.base)).bearer_auth(&disp).send().await.unwrap();
    let mut since = 0;
    let mut created = 0;
    let mut page: Value = r.json().await.unwrap();
    loop {
        let items = page["items"].as_array().unwrap().clone();
        if items.is_empty() {
            break;
        }
        for e in &items {
            since = e["seq"].as_i64().unwrap();
            if e["kind"] == "order.created" {
                created += 1;
                let id = e["entity_id"].as_str().unwrap();
                assert!(tracks.contains_key(id), "order {id} exists but was never sent");
            }
        }
        let r = http.get(format!("{}/v1/events?limit=1000&since={since}", p2.base)).bearer_auth(&disp).send().await.unwrap();
        page = r.json().await.unwrap();
    }
    assert!(created >= tracks.values().filter(|t| t.acked.is_some()).count());
    drop(p2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_keeps_acknowledged_orders_sqlite() {
    on_sqlite(sigkill_mid_stream).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_keeps_acknowledged_orders_postgres() {
    on_postgres(sigkill_mid_stream).await;
}

/// One courier over the WebSocket takes orders through pickup and delivery while the server is
/// killed: an order's acknowledged step is the HTTP answer (creation, assignment) or the
/// `order_update` the courier receives; after the restart every order is at its acknowledged
/// step or, when a step was in flight, one further; nothing is delivered that was not
/// acknowledged or in flight.
async fn sigkill_while_a_courier_delivers(db: String) {
    // No dispatch rounds: the dispatcher assigns by override.
    let p = Proc::spawn_with(&db, &[("HEXFLEET_DISPATCH_TICK_MS", "3600000")]);
    let keys = Keys::new(SECRET);
    let disp = keys.mint(Role::Dispatcher, "disp", "t1", None, Duration::from_secs(3600));
    let http = reqwest::Client::new();
    let ws_url = format!("{}/v1/ws/courier?token={}", p.base.replace("http://", "ws://"), keys.mint(Role::Courier, "c1", "t1", None, Duration::from_secs(3600)));
    let (s, _) = tokio_tungstenite::connect_async(ws_url).await.expect("websocket connects");
    let mut courier = Ws { s };
    // Fix times start days back so each leg can take minutes of fix time (plausible speed).
    let mut ts = now_ms() - 5 * 86_400_000;
    courier.send(json!({"t":"status","status":"available"})).await;
    courier.send(json!({"t":"loc","lat":DROPOFF.0,"lng":DROPOFF.1,"ts":ts})).await;
    eventually("c1 known", || async {
        let r = http.get(format!("{}/v1/couriers/c1", p.base)).bearer_auth(&disp).send().await.unwrap();
        (r.status().as_u16() == 200).then_some(())
    })
    .await;
    let tracks: Arc<parking_lot::Mutex<HashMap<String, Track>>> = Arc::default();
    let acks = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let (tracks2, acks2, base, disp2, http2) = (tracks.clone(), acks.clone(), p.base.clone(), disp.clone(), http.clone());
    let client = tokio::spawn(async move {
        let set = |id: &str, inflight: Option<&str>, acked: Option<&str>| {
            let mut g = tracks2.lock();
            let t = g.entry(id.to_owned()).or_default();
            t.inflight = inflight.map(|s| (s.to_owned(), None));
            if let Some(a) = acked {
                let v = t.acked.as_ref().map_or(0, |a| a.0 + 1);
                t.acked = Some((v, a.to_owned(), None));
                acks2.fetch_add(1, Ordering::SeqCst);
            }
        };
        for n in 0.. {
            let id = format!("d{n}");
            for (path, body, state) in [
                ("/v1/orders".to_owned(), order_body(&id), "created"),
                (format!("/v1/orders/{id}/assign"), json!({"courier_id": "c1"}), "assigned"),
            ] {
                set(&id, Some(state), None);
                let Ok(r) = http2.post(format!("{base}{path}")).bearer_auth(&disp2).json(&body).send().await else { return };
                let status = r.status().as_u16();
                let Ok(v) = r.json::<Value>().await else { return };
                assert!((200..300).contains(&status), "{path}: {status} {v}");
                set(&id, None, Some(state));
            }
            let legs: [(Value, &str); 4] = [
                (json!({"t":"loc","lat":PICKUP.0,"lng":PICKUP.1}), "at_pickup"),
                (json!({"t":"order_event","order_id":id,"event":"picked_up"}), "picked_up"),
                (json!({"t":"loc","lat":DROPOFF.0,"lng":DROPOFF.1}), "at_dropoff"),
                (json!({"t":"order_event","order_id":id,"event":"delivered"}), "delivered"),
            ];
            for (mut msg, state) in legs {
                if msg["t"] == "loc" {
                    ts += 120_000;
                    msg["ts"] = json!(ts);
                }
                set(&id, Some(state), None);
                if futures_util::SinkExt::send(&mut courier.s, tokio_tungstenite::tungstenite::Message::Text(msg.to_string().into())).await.is_err() {
                    return;
                }
                let id2 = id.clone();
                match courier.try_expect(move |v| t(v) == "order_update" && v["order_id"] == id2.as_str() && v["state"] == state).await {
                    Ok(_) => set(&id, None, Some(state)),
                    Err(e) if e == "timeout" => panic!("{id}: no {state} update"),
                    Err(_) => return, // the server is gone
                }
            }
        }
    });
    let start = Instant::now();
    while acks.load(Ordering::SeqCst) < 120 {
        assert!(start.elapsed() < Duration::from_secs(60), "too slow: {} acks", acks.load(Ordering::SeqCst));
        assert!(!client.is_finished(), "the client stopped before the kill");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    drop(p); // SIGKILL
    client.await.expect("client");
    let tracks = tracks.lock().clone();
    eprintln!("{} acknowledged steps over {} orders before SIGKILL", acks.load(Ordering::SeqCst), tracks.len());
    let steps = ["created", "assigned", "at_pickup", "picked_up", "at_dropoff", "delivered"];
    let p2 = Proc::spawn(&db);
    let mut delivered = 0;
    for (id, tr) in &tracks {
        let r = http.get(format!("{}/v1/orders/{id}", p2.base)).bearer_auth(&disp).send().await.unwrap();
        let status = r.status().as_u16();
        let v: Value = r.json().await.unwrap();
        let Some((_, acked, _)) = &tr.acked else {
            assert!(status == 404 || v["state"] == "created", "{id}: unacknowledged creation came back as {v}");
            continue;
        };
        assert_eq!(status, 200, "acknowledged order {id} lost");
        let got = v["state"].as_str().unwrap();
        let at = |s: &str| steps.iter().position(|x| *x == s).unwrap();
        let ok = got == acked || tr.inflight.as_ref().is_some_and(|(next, _)| got == next && at(next) == at(acked) + 1);
        assert!(ok, "{id}: acknowledged {acked}, in flight {:?}, stored {got}", tr.inflight);
        delivered += usize::from(got == "delivered");
    }
    assert!(delivered > 0, "no order got delivered before the kill");
    drop(p2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_while_a_courier_delivers_sqlite() {
    on_sqlite(sigkill_while_a_courier_delivers).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_while_a_courier_delivers_postgres() {
    on_postgres(sigkill_while_a_courier_delivers).await;
}

// ---------------------------------------------------------------------------------------------
// Database outage while serving
// ---------------------------------------------------------------------------------------------


/// How a test takes the database away.
enum Outage {
    /// PostgreSQL through a proxy that is cut.
    Proxy(Proxy),
    /// SQLite with another connection holding an exclusive lock (as a backup tool might).
    Lock { path: String, conn: Option<sqlx::SqliteConnection> },
}

impl Outage {
    async fn begin(&mut self) {
        use sqlx::Connection as _;
        match self {
            Outage::Proxy(p) => p.cut(),
            Outage::Lock { path, conn } => {
                let mut c = sqlx::SqliteConnection::connect(&format!("sqlite:{path}")).await.unwrap();
                sqlx::raw_sql("BEGIN EXCLUSIVE").execute(&mut c).await.unwrap();
                *conn = Some(c);
            }
        }
    }

    async fn end(&mut self) {
        use sqlx::Connection as _;
        match self {
            Outage::Proxy(p) => p.restore(),
            Outage::Lock { conn, .. } => {
                let mut c = conn.take().unwrap();
                sqlx::raw_sql("ROLLBACK").execute(&mut c).await.unwrap();
                c.close().await.unwrap();
            }
        }
    }
}

fn outage_config(url: &str) -> hexfleet_gateway::ServeConfig {
    let mut cfg = fast_config(url);
    cfg.store.acquire_timeout = Duration::from_millis(800);
    cfg.store.statement_timeout = Duration::from_secs(2);
    cfg.store.snapshot_flush = Duration::from_millis(50);
    cfg.fleet.history_every_ms = 0;
    cfg
}

async fn courier_at(srv: &TestServer, disp: &str, id: &str, lat: f64, lng: f64) -> bool {
    let (s, v) = srv.get(&format!("/v1/couriers/nearby?lat={lat}&lng={lng}&k=5&radius_m=5"), Some(disp)).await;
    assert_eq!(s, 200, "{v}");
    v["items"].as_array().unwrap().iter().any(|i| i["courier"]["id"] == id)
}

/// `serve_url` is what the server uses (through the outage), `direct_url` the database itself.
async fn outage_while_serving(serve_url: String, direct_url: String, mut outage: Outage) {
    let mut srv = TestServer::start(outage_config(&serve_url)).await;
    let disp = srv.dispatcher("t1");
    // Fix times are "now": a fix older than the courier's registration is not persisted in its
    // snapshot (see `courier_snapshot_with_a_fix_older_than_its_registration_*`).
    let t0 = now_ms();
    let mut courier = srv.ws("/v1/ws/courier", &srv.token(Role::Courier, "c1", "t1", None)).await;
    courier.send(json!({"t":"loc","lat":52.50,"lng":13.40,"ts":t0})).await;
    eventually("c1 at A", || async { courier_at(&srv, &disp, "c1", 52.50, 13.40).await.then_some(()) }).await;

    let mut acked: HashMap<String, &str> = HashMap::new();
    for i in 0..5 {
        let id = format!("before-{i}");
        let (s, v) = srv.post("/v1/orders", &disp, order_body(&id)).await;
        assert_eq!(s, 201, "{v}");
        acked.insert(id, "created");
    }
    let (s, v) = srv.post("/v1/orders/before-1/cancel", &disp, json!({})).await;
    assert_eq!(s, 200, "{v}");
    acked.insert("before-1".into(), "cancelled");

    outage.begin().await;
    let started = Instant::now();
    let (s, v) = srv.post("/v1/orders", &disp, order_body("during")).await;
    assert_eq!(s, 503, "an order must not be accepted while the database is down: {v}");
    assert_eq!(v["error"]["code"], "store_unavailable", "{v}");
    assert!(v["error"]["message"].as_str().is_some_and(|m| !m.is_empty()), "{v}");
    assert!(started.elapsed() < Duration::from_secs(10), "503 took {:?}", started.elapsed());
    // It says when to try again (RFC 9110), so clients and proxies back off instead of hammering.
    let r = srv.http.post(format!("{}/v1/orders", srv.base)).bearer_auth(&disp).json(&order_body("during")).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 503);
    assert_eq!(r.headers().get("retry-after").and_then(|v| v.to_str().ok()), Some("2"));
    if matches!(outage, Outage::Proxy(_)) {
        // Unreachable database: not ready. (A locked SQLite file still answers reads.)
        let (s, v) = srv.get("/readyz", None).await;
        assert_eq!(s, 503, "{v}");
    }

    // Live tracking goes on in memory.
    // About 25 m in at least a second: a plausible move, not a suspect jump.
    let t1 = now_ms().max(t0 + 1_000);
    courier.send(json!({"t":"loc","lat":52.5002,"lng":13.4002,"ts":t1})).await;
    eventually("c1 at B during the outage", || async { courier_at(&srv, &disp, "c1", 52.5002, 13.4002).await.then_some(()) }).await;
    let (s, v) = srv.get("/v1/orders/before-0", Some(&disp)).await;
    assert_eq!((s, v["state"].as_str()), (200, Some("created")), "{v}");

    outage.end().await;
    eventually("orders accepted again", || async {
        let (s, v) = srv.post("/v1/orders", &disp, order_body("after")).await;
        assert!(s == 201 || s == 503, "{s} {v}");
        (s == 201).then_some(())
    })
    .await;
    acked.insert("after".into(), "created");
    let (s, v) = srv.get("/v1/orders/during", Some(&disp)).await;
    assert_eq!(s, 404, "the refused order must not exist: {v}");
    // The position taken during the outage reaches the history once the database is back.
    let c1_hist = eventually("sample from the outage flushed", || async {
        let (s, v) = srv.get("/v1/couriers/c1/history", Some(&disp)).await;
        if s != 200 {
            return None;
        }
        let f = v["features"].as_array().unwrap().clone();
        f.iter().any(|f| f["properties"]["ts"] == t1).then_some(f)
    })
    .await;
    assert!(c1_hist.iter().any(|f| f["properties"]["ts"] == t0), "{c1_hist:?}");
    drop(courier);
    srv.stop().await;

    // Nothing acknowledged was lost: a new server straight on the database.
    let mut srv = TestServer::start(outage_config(&direct_url)).await;
    for (id, state) in &acked {
        let (s, v) = srv.get(&format!("/v1/orders/{id}"), Some(&disp)).await;
        assert_eq!((s, v["state"].as_str()), (200, Some(*state)), "{id}: {v}");
    }
    let (s, v) = srv.get("/v1/orders/during", Some(&disp)).await;
    assert_eq!(s, 404, "{v}");
    let (s, c) = srv.get("/v1/couriers/c1", Some(&disp)).await;
    assert_eq!(s, 200, "{c}");
    assert_eq!(c["position"]["ts"], t1, "last position from the outage kept: {c}");
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn database_outage_postgres() {
    on_postgres(|url| async move {
        let (proxy, via) = Proxy::in_front_of(&url).await;
        outage_while_serving(via, url, Outage::Proxy(proxy)).await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn database_outage_sqlite() {
    on_sqlite(|path| async move {
        outage_while_serving(path.clone(), path.clone(), Outage::Lock { path, conn: None }).await;
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// Location history: export, erase, retention
// ---------------------------------------------------------------------------------------------

fn features(v: &Value) -> Vec<Value> {
    assert_eq!(v["type"], "FeatureCollection", "{v}");
    v["features"].as_array().unwrap().clone()
}

async fn history_over_http(db: String) {
    let hour = 3_600_000;
    let now = now_ms();
    let ts = [now - 3 * hour, now - 2 * hour, now - 60_000, now - 30_000];
    let pts = [(52.50, 13.40), (52.501, 13.401), (52.502, 13.402), (52.503, 13.403)];
    let mut srv = TestServer::start(fast_config(&db)).await; // default retention: 30 days
    let disp = srv.dispatcher("t1");
    let mut courier = srv.ws("/v1/ws/courier", &srv.token(Role::Courier, "c1", "t1", None)).await;
    // One at a time: fixes that arrive in one batch only move the courier to the newest, and
    // history is sampled from the live position.
    for (t, (lat, lng)) in ts.iter().zip(pts) {
        courier.send(json!({"t":"loc","lat":lat,"lng":lng,"ts":t,"speed":2.5})).await;
        eventually("fix applied", || async {
            let (_, c) = srv.get("/v1/couriers/c1", Some(&disp)).await;
            (c["position"]["ts"] == *t).then_some(())
        })
        .await;
    }
    let f = eventually("four samples stored", || async {
        let (s, v) = srv.get("/v1/couriers/c1/history", Some(&disp)).await;
        assert_eq!(s, 200, "{v}");
        let f = features(&v);
        (f.len() == 4).then_some(f)
    })
    .await;
    for (i, f) in f.iter().enumerate() {
        assert_eq!(f["type"], "Feature");
        assert_eq!(f["geometry"]["type"], "Point");
        assert_eq!(f["geometry"]["coordinates"], json!([pts[i].1, pts[i].0]), "[lng, lat]: {f}");
        assert_eq!(f["properties"]["ts"], ts[i]);
        assert_eq!(f["properties"]["courier_id"], "c1");
        assert!(f["properties"]["time"].as_str().unwrap().ends_with('Z'), "{f}");
        assert_eq!(f["properties"]["speed"], 2.5);
    }
    // Content type for GIS tools, time window, access rules.
    let r = srv.http.get(format!("{}/v1/couriers/c1/history", srv.base)).bearer_auth(&disp).send().await.unwrap();
    assert_eq!(r.headers()["content-type"], "application/geo+json");
    let (s, v) = srv.get(&format!("/v1/couriers/c1/history?from={}&to={}", now - 90 * 60_000, now), Some(&disp)).await;
    assert_eq!((s, features(&v).len()), (200, 2), "{v}");
    let (s, v) = srv.get("/v1/couriers/c1/history?from=10&to=5", Some(&disp)).await;
    assert_eq!((s, v["error"]["code"].as_str()), (400, Some("bad_range")), "{v}");
    // Negative times, which the OpenAPI document excludes, are refused too.
    for q in ["from=-1", "to=-9223372036854775808", "from=-10&to=-5"] {
        let (s, v) = srv.get(&format!("/v1/couriers/c1/history?{q}"), Some(&disp)).await;
        assert_eq!((s, v["error"]["code"].as_str()), (400, Some("bad_range")), "{q}: {v}");
    }
    let own = srv.token(Role::Courier, "c1", "t1", None);
    let (s, v) = srv.get("/v1/couriers/c1/history", Some(&own)).await;
    assert_eq!((s, features(&v).len()), (200, 4));
    let (s, v) = srv.get("/v1/couriers/c1/history", Some(&srv.token(Role::Courier, "c2", "t1", None))).await;
    assert_eq!((s, v["error"]["code"].as_str()), (403, Some("forbidden")), "{v}");
    let (s, v) = srv.get("/v1/couriers/c1/history", Some(&srv.token(Role::Customer, "u", "t1", Some("o1")))).await;
    assert_eq!(s, 403, "{v}");
    let (s, v) = srv.get("/v1/couriers/c1/history", Some(&srv.dispatcher("other"))).await;
    assert_eq!((s, v["error"]["code"].as_str()), (404, Some("not_found")), "other tenant: {v}");
    let (s, v) = srv.get("/v1/couriers/nobody/history", Some(&disp)).await;
    assert_eq!((s, v["error"]["code"].as_str()), (404, Some("not_found")), "{v}");
    let (s, v) = srv.get("/v1/couriers/c1/history", None).await;
    assert_eq!(s, 401, "{v}");
    // A history longer than a page is streamed page by page, whole and in order, also from a
    // `from` inside it.
    let store = srv.running.as_ref().unwrap().state.store.clone();
    let n = 2 * hexfleet_gateway::history::EXPORT_PAGE + 7;
    let base = now - 40 * hour;
    let long: Vec<LocationSample> =
        (0..n as i64).map(|i| LocationSample { pos: LatLng::new(52.4, 13.3).unwrap(), ts: base + i * 1_000, speed: None }).collect();
    use hexfleet_actors::domain::{CourierId, LatLng, LocationSample, TenantId};
    use hexfleet_actors::store::Store as _;
    store.record_locations(&TenantId::new("t1"), &CourierId::new("c1"), long).unwrap();
    store.flush().await.unwrap();
    for (from, expect) in [(base, n), (base + 1_000 * 4_999, n - 4_999)] {
        let (s, v) = srv.get(&format!("/v1/couriers/c1/history?from={from}&to={}", base + 10 * hour), Some(&disp)).await;
        assert_eq!(s, 200);
        let ts: Vec<i64> = features(&v).iter().map(|f| f["properties"]["ts"].as_i64().unwrap()).collect();
        let want: Vec<i64> = (0..expect as i64).map(|i| from + i * 1_000).collect();
        assert!(ts == want, "from {from}: {} samples, first {:?}, last {:?}", ts.len(), ts.first(), ts.last());
    }
    // Documented in the OpenAPI document.
    let (_, doc) = srv.get("/openapi.json", None).await;
    assert!(doc["paths"]["/v1/couriers/{id}/history"]["get"].is_object(), "history export not in OpenAPI");
    assert!(doc["paths"]["/v1/couriers/{id}/history"]["delete"].is_object(), "history erase not in OpenAPI");
    drop(courier);
    srv.stop().await;

    // The operator lowers the retention to one hour: the purge at start deletes the old samples.
    let mut cfg = fast_config(&db);
    cfg.history_retention = Duration::from_secs(3600);
    cfg.history_purge_every = Duration::from_secs(3600);
    let mut srv = TestServer::start(cfg).await;
    let f = eventually("old samples purged", || async {
        let (s, v) = srv.get("/v1/couriers/c1/history", Some(&disp)).await;
        assert_eq!(s, 200, "{v}");
        let f = features(&v);
        (f.len() == 2).then_some(f)
    })
    .await;
    assert_eq!(f[0]["properties"]["ts"], ts[2]);
    let m = srv.http.get(format!("{}/metrics", srv.base)).send().await.unwrap().text().await.unwrap();
    let purged: f64 = m
        .lines()
        .find_map(|l| l.strip_prefix("hexfleet_history_purged_total "))
        .unwrap_or_else(|| panic!("no purge counter in /metrics"))
        .trim()
        .parse()
        .unwrap();
    assert!(purged >= 2.0, "{purged}");

    // Erase: customers may not, the courier itself may; the audit log records it.
    let cust = srv.token(Role::Customer, "u", "t1", Some("o1"));
    let r = srv.http.delete(format!("{}/v1/couriers/c1/history", srv.base)).bearer_auth(cust).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 403);
    let r = srv.http.delete(format!("{}/v1/couriers/nobody/history", srv.base)).bearer_auth(&disp).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 404);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["code"], "not_found");
    let r = srv.http.delete(format!("{}/v1/couriers/c1/history", srv.base)).bearer_auth(&own).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["erased"], 2, "{v}");
    let (s, v) = srv.get("/v1/couriers/c1/history", Some(&disp)).await;
    assert_eq!((s, features(&v).len()), (200, 0), "{v}");
    let (s, v) = srv.get("/v1/events?entity=courier&id=c1", Some(&disp)).await;
    assert_eq!(s, 200);
    let erased = v["items"].as_array().unwrap().iter().find(|e| e["kind"] == "courier.history_erased").cloned();
    let erased = erased.unwrap_or_else(|| panic!("no audit event: {v}"));
    assert_eq!(erased["actor"], "courier:c1", "{erased}");
    assert_eq!(erased["attrs"]["erased"], "2", "{erased}");
    srv.stop().await;
}

/// The retention set through the environment of the real binary: samples older than one day
/// are gone after a restart with `HEXFLEET_HISTORY_RETENTION_DAYS=1`.
async fn retention_in_the_binary(db: String) {
    let keys = Keys::new(SECRET);
    let disp = keys.mint(Role::Dispatcher, "disp", "t1", None, Duration::from_secs(3600));
    let http = reqwest::Client::new();
    let p = Proc::spawn(&db);
    let ws_url = format!("{}/v1/ws/courier?token={}", p.base.replace("http://", "ws://"), keys.mint(Role::Courier, "c1", "t1", None, Duration::from_secs(3600)));
    let (s, _) = tokio_tungstenite::connect_async(ws_url).await.expect("websocket connects");
    let mut courier = Ws { s };
    let now = now_ms();
    let ts = [now - 3 * 86_400_000, now - 60_000];
    let count = |base: String| {
        let (http, disp) = (http.clone(), disp.clone());
        async move {
            let r = http.get(format!("{base}/v1/couriers/c1/history")).bearer_auth(&disp).send().await.unwrap();
            assert_eq!(r.status().as_u16(), 200);
            let v: Value = r.json().await.unwrap();
            features(&v).iter().map(|f| f["properties"]["ts"].as_i64().unwrap()).collect::<Vec<_>>()
        }
    };
    for (i, t) in ts.iter().enumerate() {
        courier.send(json!({"t":"loc","lat":52.5 + i as f64 * 0.001,"lng":13.4,"ts":t})).await;
        eventually("sample stored", || async { (count(p.base.clone()).await.len() == i + 1).then_some(()) }).await;
    }
    drop(courier);
    drop(p); // SIGKILL
    let p = Proc::spawn_with(&db, &[("HEXFLEET_HISTORY_RETENTION_DAYS", "1"), ("HEXFLEET_HISTORY_PURGE_INTERVAL", "1h")]);
    eventually("purged at start", || async { (count(p.base.clone()).await == vec![ts[1]]).then_some(()) }).await;
    drop(p);
    // A bad value is refused, so the variable is really read.
    let out = Command::new(env!("CARGO_BIN_EXE_hexfleet"))
        .arg("serve")
        .env_clear()
        .env("DATABASE_URL", &db)
        .env("HEXFLEET_HISTORY_RETENTION_DAYS", "0")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("history-retention-days"), "{}", String::from_utf8_lossy(&out.stderr));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_env_in_the_binary_sqlite() {
    on_sqlite(retention_in_the_binary).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_env_in_the_binary_postgres() {
    on_postgres(retention_in_the_binary).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_export_erase_retention_sqlite() {
    on_sqlite(history_over_http).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_export_erase_retention_postgres() {
    on_postgres(history_over_http).await;
}

// ---------------------------------------------------------------------------------------------
// The event log endpoint
// ---------------------------------------------------------------------------------------------

async fn events_endpoint(db: String) {
    let mut srv = TestServer::start(fast_config(&db)).await;
    let (a, b) = (srv.dispatcher("ta"), srv.dispatcher("tb"));
    for i in 0..3 {
        assert_eq!(srv.post("/v1/orders", &a, order_body(&format!("a{i}"))).await.0, 201);
    }
    for i in 0..2 {
        assert_eq!(srv.post("/v1/orders", &b, order_body(&format!("b{i}"))).await.0, 201);
    }
    let (s, v) = srv.get("/v1/events", Some(&a)).await;
    assert_eq!(s, 200, "{v}");
    let ids: HashSet<&str> = v["items"].as_array().unwrap().iter().map(|e| e["entity_id"].as_str().unwrap()).collect();
    assert_eq!(ids, HashSet::from(["a0", "a1", "a2"]), "tenant ta sees only its own: {v}");
    // Customers and couriers may not read the log.
    for tok in [srv.token(Role::Customer, "u", "ta", Some("a0")), srv.token(Role::Courier, "c1", "ta", None)] {
        let (s, v) = srv.get("/v1/events", Some(&tok)).await;
        assert_eq!((s, v["error"]["code"].as_str()), (403, Some("forbidden")), "{v}");
    }
    // Filtering and paging.
    let (_, v) = srv.get("/v1/events?entity=order&id=a1", Some(&a)).await;
    let items = v["items"].as_array().unwrap();
    assert!(!items.is_empty() && items.iter().all(|e| e["entity_id"] == "a1" && e["entity"] == "order"), "{v}");
    let (_, v) = srv.get("/v1/events?limit=2", Some(&a)).await;
    let first = v["items"].as_array().unwrap().clone();
    assert_eq!(first.len(), 2, "{v}");
    let (_, v) = srv.get(&format!("/v1/events?since={}", first[1]["seq"]), Some(&a)).await;
    let rest = v["items"].as_array().unwrap();
    assert_eq!(rest.len(), 1, "{v}");
    assert_eq!(rest[0]["entity_id"], "a2");
    let (s, v) = srv.get("/v1/events?entity=planet&id=x", Some(&a)).await;
    assert_eq!((s, v["error"]["code"].as_str()), (400, Some("bad_entity")), "{v}");
    let (s, v) = srv.get("/v1/events?limit=-1", Some(&a)).await;
    assert_eq!(s, 400, "{v}");

    // The limit is bounded: 1,000 per page however many are asked for and stored.
    let sem = Arc::new(tokio::sync::Semaphore::new(16));
    let mut puts = Vec::new();
    for i in 0..1_000 {
        let (http, base, tok, sem) = (srv.http.clone(), srv.base.clone(), a.clone(), sem.clone());
        puts.push(tokio::spawn(async move {
            let _p = sem.acquire().await.unwrap();
            let r = http.put(format!("{base}/v1/couriers/k{i}")).bearer_auth(tok).json(&json!({})).send().await.unwrap();
            assert_eq!(r.status().as_u16(), 200);
        }));
    }
    for p in puts {
        p.await.unwrap();
    }
    let (s, v) = srv.get("/v1/events?limit=100000", Some(&a)).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["items"].as_array().unwrap().len(), 1_000, "a page is at most 1000 events");
    let (_, v) = srv.get("/v1/events", Some(&a)).await;
    assert_eq!(v["items"].as_array().unwrap().len(), 100, "default page is 100");
    let (_, v) = srv.get("/v1/events?limit=100000", Some(&b)).await;
    assert_eq!(v["items"].as_array().unwrap().len(), 2, "{v}");
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_endpoint_sqlite() {
    on_sqlite(events_endpoint).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_endpoint_postgres() {
    on_postgres(events_endpoint).await;
}

// ---------------------------------------------------------------------------------------------
// Known bug, left for the owner of `actors/src/courier.rs`
// ---------------------------------------------------------------------------------------------

/// The courier actor sets `updated_at` to the fix time, and the store keeps the snapshot with the
/// newest `updated_at`; so after a registration or a profile edit at server time T, positions
/// whose fix time is before T (a phone clock behind, fixes buffered offline) never reach the
/// stored snapshot, and a restart brings the courier back without them (or with an older one).
async fn snapshot_with_old_fix(db: String) {
    let mut srv = TestServer::start(fast_config(&db)).await;
    let disp = srv.dispatcher("t1");
    let mut courier = srv.ws("/v1/ws/courier", &srv.token(Role::Courier, "c1", "t1", None)).await;
    let ts = now_ms() - 60_000; // a phone whose clock is a minute behind
    courier.send(json!({"t":"loc","lat":52.5,"lng":13.4,"ts":ts})).await;
    eventually("fix applied", || async {
        let (_, c) = srv.get("/v1/couriers/c1", Some(&disp)).await;
        (c["position"]["ts"] == ts).then_some(())
    })
    .await;
    drop(courier);
    srv.stop().await;
    let mut srv = TestServer::start(fast_config(&db)).await;
    let (_, c) = srv.get("/v1/couriers/c1", Some(&disp)).await;
    assert_eq!(c["position"]["ts"], ts, "position lost over a clean restart: {c}");
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn courier_snapshot_with_a_fix_older_than_its_registration_sqlite() {
    on_sqlite(snapshot_with_old_fix).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn courier_snapshot_with_a_fix_older_than_its_registration_postgres() {
    on_postgres(snapshot_with_old_fix).await;
}
