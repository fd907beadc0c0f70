//! The simulator's clients against a tiny in-test WebSocket server (tokio-tungstenite on
//! `127.0.0.1:0`): the courier's offer → assigned → picked_up → delivered flow and reconnect,
//! trace replay, and a small load run with a console that echoes positions back.
//!
//! No sleeps: every wait is for an expected message, under a deadline.

// tungstenite's handshake callback returns its own large `ErrorResponse`; not ours to box.
#![allow(clippy::result_large_err)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt as _, StreamExt as _};
use hexfleet_sim::CancellationToken;
use hexfleet_sim::courier::{CourierOptions, CourierSpec, CourierToken, SimStats, run_courier};
use hexfleet_sim::geomath::{BBox, LatLng, offset};
use hexfleet_sim::load::{LoadConfig, run_load};
use hexfleet_sim::movement::Vehicle;
use hexfleet_sim::net::Server;
use hexfleet_sim::token::{Claims, Role, TokenMint};
use serde_json::{Value, json};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{broadcast, mpsc};
use tokio::time::timeout;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::handshake::server::{Request, Response};

const SECRET: &str = "test-secret";
const DEADLINE: Duration = Duration::from_secs(10);

type ServerWs = WebSocketStream<TcpStream>;

/// The in-test server's socket, and the address the clients are given.
async fn fake_server() -> (TcpListener, Server) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let server = Server::parse(&format!("http://{}", listener.local_addr().unwrap())).unwrap();
    (listener, server)
}

/// Accepts one WebSocket; returns it with the request's path and query.
async fn accept(listener: &TcpListener) -> (ServerWs, String, SocketAddr) {
    let (tcp, peer) = timeout(DEADLINE, listener.accept()).await.expect("no connection before the deadline").unwrap();
    let mut uri = String::new();
    let ws = tokio_tungstenite::accept_hdr_async(tcp, |req: &Request, resp: Response| {
        uri = req.uri().to_string();
        Ok(resp)
    })
    .await
    .unwrap();
    (ws, uri, peer)
}

/// The next text frame as JSON, under the deadline.
async fn next_json(ws: &mut ServerWs) -> Value {
    loop {
        let m = timeout(DEADLINE, ws.next()).await.expect("no frame before the deadline").expect("socket ended").unwrap();
        if let Message::Text(t) = m {
            return serde_json::from_str(t.as_str()).unwrap_or_else(|e| panic!("client sent non-json {t:?}: {e}"));
        }
    }
}

/// The next frame whose `t` is `kind`, skipping others (e.g. `loc`), under the deadline.
async fn next_of(ws: &mut ServerWs, kind: &str) -> Value {
    let wait = async {
        loop {
            let v = next_json(ws).await;
            if v["t"] == kind {
                return v;
            }
        }
    };
    timeout(DEADLINE, wait).await.unwrap_or_else(|_| panic!("no {kind:?} before the deadline"))
}

async fn send(ws: &mut ServerWs, v: Value) {
    ws.send(Message::Text(v.to_string().into())).await.unwrap();
}

fn token_claims(uri: &str) -> Claims {
    let token = uri.split("token=").nth(1).expect("token in query").split('&').next().unwrap();
    let mut v = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::HS256);
    v.validate_exp = true;
    jsonwebtoken::decode::<Claims>(token, &jsonwebtoken::DecodingKey::from_secret(SECRET.as_bytes()), &v).unwrap().claims
}

#[tokio::test]
async fn courier_answers_offers_delivers_and_reconnects() {
    let (listener, server) = fake_server().await;
    let bbox = BBox::from_array(hexfleet_sim::DEFAULT_BBOX);
    let start = bbox.center();
    let mint = TokenMint::new(SECRET, "t1", 3600);
    let spec = CourierSpec { id: "c1".into(), token: CourierToken::Fixed(mint.courier("c1").unwrap()), vehicle: Vehicle::Bike, start, seed: 5 };
    let opts = CourierOptions {
        loc_every: (Duration::from_millis(50), Duration::from_millis(50)),
        tick: Duration::from_millis(20),
        accept_prob: 1.0,
        reply_delay: (Duration::ZERO, Duration::from_millis(10)),
        dwell: (Duration::from_millis(10), Duration::from_millis(10)),
        max_reconnects: 3,
        ..CourierOptions::default()
    };
    let stats = Arc::new(SimStats::default());
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(run_courier(server, spec, bbox, opts, stats.clone(), shutdown.clone()));

    let (mut ws, uri, _) = accept(&listener).await;
    assert!(uri.starts_with("/v1/ws/courier?token="), "{uri}");
    let claims = token_claims(&uri);
    assert_eq!((claims.sub.as_str(), claims.role, claims.tenant.as_str()), ("c1", Role::Courier, "t1"));

    // A position first, then available.
    let first = next_json(&mut ws).await;
    assert_eq!(first["t"], "loc");
    assert!((first["lat"].as_f64().unwrap() - start.lat).abs() < 1e-5);
    assert!(first["ts"].as_i64().unwrap() > 1_600_000_000_000);
    assert_eq!(next_json(&mut ws).await, json!({"t":"status","status":"available"}));

    let pickup = offset(start, 90.0, 5.0);
    let dropoff = offset(start, 0.0, 10.0);
    let p = json!({"lat": pickup.lat, "lng": pickup.lng});
    let d = json!({"lat": dropoff.lat, "lng": dropoff.lng});
    send(&mut ws, json!({"t":"offer","seq":1,"order_id":"o1","pickup":p,"dropoff":d,"expires_at":hexfleet_sim::unix_ms() + 20_000})).await;
    assert_eq!(next_of(&mut ws, "offer_reply").await, json!({"t":"offer_reply","order_id":"o1","accept":true}));
    send(&mut ws, json!({"t":"assigned","seq":2,"order_id":"o1","pickup":p,"dropoff":d})).await;
    assert_eq!(next_of(&mut ws, "order_event").await, json!({"t":"order_event","order_id":"o1","event":"picked_up"}));
    assert_eq!(next_of(&mut ws, "order_event").await, json!({"t":"order_event","order_id":"o1","event":"delivered"}));
    // Garbage and unknown messages from the server do not break the client.
    ws.send(Message::Text("not json".into())).await.unwrap();
    send(&mut ws, json!({"t":"something_new","seq":3})).await;
    send(&mut ws, json!({"t":"order_update","seq":4,"order_id":"o1","state":"delivered","courier_id":"c1","ts":1})).await;
    let loc = next_of(&mut ws, "loc").await;
    assert!(loc["speed"].as_f64().unwrap() <= Vehicle::Bike.max_speed());

    // The server drops the socket: the courier comes back, position first.
    drop(ws);
    let (mut ws, _, _) = accept(&listener).await;
    assert_eq!(next_json(&mut ws).await["t"], "loc");
    assert_eq!(next_json(&mut ws).await["t"], "status");
    // On connect the server tells it again of the orders it holds (`assigned` is not sent
    // again): it finishes them, from where each one is.
    let order = |pu: LatLng, d: LatLng| json!({"pickup": {"lat": pu.lat, "lng": pu.lng}, "dropoff": {"lat": d.lat, "lng": d.lng}});
    let (p2, d2, p3, d3) = (offset(start, 180.0, 5.0), offset(start, 270.0, 5.0), offset(start, 45.0, 5.0), offset(start, 135.0, 5.0));
    // o5 first: its drop-off heads the plan. It is then taken back (a dispatcher's release):
    // the order goes back to `created` with no courier, and its stop leaves the plan.
    send(&mut ws, json!({"t":"order_update","seq":1,"order_id":"o5","state":"picked_up","courier_id":"c1","ts":1,"order":order(p3, d2)})).await;
    send(&mut ws, json!({"t":"order_update","seq":2,"order_id":"o3","state":"picked_up","courier_id":"c1","ts":1,"order":order(p3, d3)})).await;
    send(&mut ws, json!({"t":"order_update","seq":3,"order_id":"o2","state":"assigned","courier_id":"c1","ts":1,"order":order(p2, d2)})).await;
    // Another courier's order (a tracking-style update) is not this app's to do.
    send(&mut ws, json!({"t":"order_update","seq":4,"order_id":"o4","state":"assigned","courier_id":"c9","ts":1,"order":order(p3, d3)})).await;
    send(&mut ws, json!({"t":"order_update","seq":5,"order_id":"o5","state":"created","courier_id":null,"ts":2,"order":order(p3, d2)})).await;
    assert_eq!(next_of(&mut ws, "order_event").await, json!({"t":"order_event","order_id":"o3","event":"delivered"}), "o5 was taken back");
    assert_eq!(next_of(&mut ws, "order_event").await, json!({"t":"order_event","order_id":"o2","event":"picked_up"}));
    assert_eq!(next_of(&mut ws, "order_event").await, json!({"t":"order_event","order_id":"o2","event":"delivered"}));

    // Shutdown: goes offline and ends.
    shutdown.cancel();
    assert_eq!(next_of(&mut ws, "status").await, json!({"t":"status","status":"offline"}));
    timeout(DEADLINE, task).await.expect("courier did not stop").unwrap().unwrap();
    use std::sync::atomic::Ordering::Relaxed;
    assert_eq!((stats.offers.load(Relaxed), stats.picked_up.load(Relaxed), stats.delivered.load(Relaxed)), (1, 2, 3));
    assert_eq!(stats.disconnects.load(Relaxed), 1);
}

/// A courier disconnected because its token expired (the server's 1008) comes back with a
/// fresh token, as an app refreshing its credentials does: a demo outlives its tokens.
#[tokio::test]
async fn a_courier_disconnected_at_token_expiry_reconnects_with_a_fresh_token() {
    use tokio_tungstenite::tungstenite::protocol::{CloseFrame, frame::coding::CloseCode};
    let (listener, server) = fake_server().await;
    let bbox = BBox::from_array(hexfleet_sim::DEFAULT_BBOX);
    // Tokens that live one second.
    let mint = TokenMint::new(SECRET, "t1", 1);
    let spec = CourierSpec { id: "c1".into(), token: CourierToken::Minted(mint), vehicle: Vehicle::Bike, start: bbox.center(), seed: 5 };
    let opts = CourierOptions { max_reconnects: 3, ..CourierOptions::default() };
    let stats = Arc::new(SimStats::default());
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(run_courier(server, spec, bbox, opts, stats.clone(), shutdown.clone()));

    let (mut ws, uri, _) = accept(&listener).await;
    let first = token_claims(&uri);
    assert_eq!(next_json(&mut ws).await["t"], "loc");
    // The server's side of an expiry: once the token's `exp` has passed, close with 1008.
    let expired_at = std::time::UNIX_EPOCH + Duration::from_secs(first.exp);
    if let Ok(left) = expired_at.duration_since(std::time::SystemTime::now()) {
        tokio::time::sleep(left + Duration::from_millis(10)).await;
    }
    let frame = CloseFrame { code: CloseCode::Policy, reason: "token expired".into() };
    ws.send(Message::Close(Some(frame))).await.unwrap();
    drop(ws);

    let (mut ws, uri, _) = accept(&listener).await;
    let second = token_claims(&uri);
    let now_s = hexfleet_sim::unix_ms() as u64 / 1000;
    assert!(second.exp > first.exp && second.exp >= now_s, "the reconnect carries a fresh token: {first:?} then {second:?} at {now_s}");
    assert_eq!((second.sub.as_str(), second.role), ("c1", Role::Courier));
    assert_eq!(next_json(&mut ws).await["t"], "loc");

    shutdown.cancel();
    timeout(DEADLINE, task).await.expect("courier did not stop").unwrap().unwrap();
}

#[tokio::test]
async fn courier_gives_up_after_bounded_failed_connects() {
    // A port nobody listens on: bind, learn the port, close.
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let server = Server::parse(&format!("http://127.0.0.1:{port}")).unwrap();
    let bbox = BBox::from_array(hexfleet_sim::DEFAULT_BBOX);
    let spec = CourierSpec { id: "c".into(), token: CourierToken::Fixed("x".into()), vehicle: Vehicle::Car, start: bbox.center(), seed: 1 };
    let opts = CourierOptions { max_reconnects: 1, ..CourierOptions::default() };
    let r = timeout(DEADLINE, run_courier(server, spec, bbox, opts, Arc::default(), CancellationToken::new())).await.unwrap();
    assert!(r.unwrap_err().to_string().contains("gave up"));
}

fn trace_path(name: &str) -> Option<std::path::PathBuf> {
    let p = std::path::PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../shared/data/traces/")).join(name);
    if p.exists() {
        return Some(p);
    }
    assert!(std::env::var("CI").as_deref() != Ok("true"), "test data missing: {} (the shared data directory must be checked out beside the repo)", p.display());
    eprintln!("note: {} is missing; skipping", p.display());
    None
}

#[tokio::test]
async fn replay_sends_every_fix_in_order() {
    let Some(path) = trace_path("denver_trace_2.csv") else { return };
    let traces = hexfleet_sim::trace::load(&path).unwrap();
    let trace = traces.into_iter().next().unwrap();
    let (listener, server) = fake_server().await;
    let token = TokenMint::new(SECRET, "t1", 3600).courier("replay-1").unwrap();
    let shutdown = CancellationToken::new();
    let fixes = trace.fixes.clone();
    // 799 fixes at 1 Hz in about 0.2 s.
    let task = tokio::spawn(async move { hexfleet_sim::replay::replay(&server, &token, &trace, 4000.0, &shutdown).await });
    let (mut ws, uri, _) = accept(&listener).await;
    assert_eq!(token_claims(&uri).sub, "replay-1");
    send(&mut ws, json!({"t":"error","code":"bad_coordinates","message":"test"})).await;
    let mut got = Vec::new();
    while got.len() < fixes.len() {
        let v = next_json(&mut ws).await;
        assert_ne!(v["t"], "status", "a replay takes no work: {v}");
        if v["t"] == "loc" {
            got.push((v["lat"].as_f64().unwrap(), v["lng"].as_f64().unwrap()));
        }
    }
    let want: Vec<(f64, f64)> = fixes.iter().map(|f| (f.lat, f.lng)).collect();
    assert_eq!(got, want);
    let report = timeout(DEADLINE, task).await.unwrap().unwrap().unwrap();
    assert_eq!(report.sent, fixes.len() as u64);
    assert_eq!(report.server_errors, 1);
}

/// A fake server for the load generator: courier sockets feed their `loc`s to every console,
/// which receives each as a one-item `couriers` batch right away.
async fn fake_load_server(listener: TcpListener, sources: mpsc::UnboundedSender<SocketAddr>) {
    let (tx, _) = broadcast::channel::<String>(65_536);
    loop {
        let Ok(Ok((tcp, peer))) = timeout(Duration::from_secs(30), listener.accept()).await else { return };
        let _ = sources.send(peer);
        let tx = tx.clone();
        tokio::spawn(async move {
            let mut uri = String::new();
            let Ok(ws) = tokio_tungstenite::accept_hdr_async(tcp, |req: &Request, resp: Response| {
                uri = req.uri().to_string();
                Ok(resp)
            })
            .await
            else {
                return;
            };
            let (mut sink, mut stream) = ws.split();
            if uri.starts_with("/v1/ws/courier") {
                let id = token_claims(&uri).sub;
                while let Some(Ok(m)) = stream.next().await {
                    if let Message::Text(t) = m {
                        let v: Value = serde_json::from_str(t.as_str()).unwrap();
                        if v["t"] == "loc" {
                            let item = json!({"id": id, "lat": v["lat"], "lng": v["lng"], "ts": v["ts"], "status": "available"});
                            let _ = tx.send(json!({"t":"couriers","seq":0,"items":[item]}).to_string());
                        }
                    }
                }
            } else if uri.starts_with("/v1/ws/console") {
                assert_eq!(token_claims(&uri).role, Role::Dispatcher);
                let Some(Ok(Message::Text(sub))) = stream.next().await else { return };
                assert!(sub.as_str().starts_with(r#"{"t":"subscribe","bbox":["#), "{sub}");
                let mut rx = tx.subscribe();
                loop {
                    tokio::select! {
                        m = rx.recv() => match m {
                            Ok(m) => if sink.send(Message::Text(m.into())).await.is_err() { return },
                            Err(broadcast::error::RecvError::Lagged(_)) => {}
                            Err(_) => return,
                        },
                        m = stream.next() => if !matches!(m, Some(Ok(_))) { return },
                    }
                }
            }
        });
    }
}

/// A rate the server would cut per socket (its 50 messages/s) is refused up front: the frames
/// it drops would count as sent.
#[tokio::test]
async fn a_load_rate_past_the_servers_per_socket_limit_is_refused() {
    let cfg = LoadConfig { base_url: "http://127.0.0.1:9".into(), jwt_secret: SECRET.into(), couriers: 2, rate: 400.0, progress: false, ..LoadConfig::default() };
    let err = run_load(cfg, CancellationToken::new()).await.unwrap_err().to_string();
    assert!(err.contains("200 updates/s per socket"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn load_run_measures_rate_and_latency_over_several_sources() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let (src_tx, mut src_rx) = mpsc::unbounded_channel();
    let server = tokio::spawn(fake_load_server(listener, src_tx));
    let cfg = LoadConfig {
        base_url: url,
        jwt_secret: SECRET.into(),
        couriers: 40,
        rate: 400.0,
        duration: Duration::from_millis(1500),
        ramp: Duration::from_millis(300),
        watchers: 2,
        source_addrs: 3,
        shards: 2,
        server_pid: Some(std::process::id()),
        progress: false,
        ..LoadConfig::default()
    };
    let report = timeout(Duration::from_secs(30), run_load(cfg, CancellationToken::new())).await.unwrap().unwrap();
    server.abort();
    assert_eq!(report.couriers_connected, 40, "{report:#?}");
    assert_eq!(report.watchers_connected, 2);
    assert_eq!((report.connect_errors, report.send_errors, report.disconnects), (0, 0, 0), "{report:#?}");
    // 400/s for 1.5 s with a 0.3 s linear ramp: 540 due.
    assert!((440..=600).contains(&report.sent), "sent {}", report.sent);
    assert!(report.console_latency.samples > 0 && report.console_latency.p99_ms < 1000.0, "{:?}", report.console_latency);
    assert!(report.watcher_deliveries >= report.sent, "two consoles see every update: {report:#?}");
    let mem = report.memory.as_ref().expect("memory report");
    assert!(mem.rss_before_kib > 0 && mem.rss_after_updates_kib > 0);
    let table = report.table();
    assert!(table.contains("update -> console latency") && table.contains("p99"), "{table}");
    let json: Value = serde_json::to_value(&report).unwrap();
    assert_eq!(json["couriers_connected"], 40);
    let mut sources = std::collections::BTreeSet::new();
    while let Ok(a) = src_rx.try_recv() {
        sources.insert(a.ip());
    }
    let want: std::collections::BTreeSet<_> = ["127.0.0.1", "127.0.0.2", "127.0.0.3"].iter().map(|s| s.parse().unwrap()).collect();
    assert_eq!(sources, want);
}

#[tokio::test]
async fn redis_comparison_cleans_up_its_key() {
    let url = "redis://127.0.0.1:6379";
    let client = redis::Client::open(url).unwrap();
    let Ok(Ok(mut con)) = timeout(Duration::from_secs(2), client.get_multiplexed_async_connection()).await else {
        eprintln!("note: no redis at 127.0.0.1:6379; skipping");
        return;
    };
    let bbox = BBox::from_array(hexfleet_sim::DEFAULT_BBOX);
    let r = hexfleet_sim::load::redis_compare(url, 100, 5_000, 32, &bbox, 3, 1.0, &CancellationToken::new()).await.unwrap();
    assert_eq!(r.updates, 5_000);
    assert!(r.updates_per_s > 0.0);
    let keys: Vec<String> = redis::cmd("KEYS").arg(format!("hexfleet-sim:{}:*", std::process::id())).query_async(&mut con).await.unwrap();
    assert!(keys.is_empty(), "left behind: {keys:?}");
    assert!(hexfleet_sim::load::redis_compare("redis://10.0.0.1:6379", 1, 1, 1, &bbox, 1, 1.0, &CancellationToken::new()).await.is_err());
}

/// A courier that reconnects after an outage goes on from where it was: the first step after
/// the reconnect used to span the whole outage, a jump of thousands of m/s in one fix that the
/// server holds as suspect (the courier frozen on consoles, arrivals late) until it re-anchors.
#[tokio::test]
async fn a_courier_back_from_an_outage_does_not_jump() {
    let (listener, server) = fake_server().await;
    let bbox = BBox::from_array(hexfleet_sim::DEFAULT_BBOX);
    let mint = TokenMint::new(SECRET, "t1", 3600);
    let spec = CourierSpec { id: "c1".into(), token: CourierToken::Fixed(mint.courier("c1").unwrap()), vehicle: Vehicle::Bike, start: bbox.center(), seed: 7 };
    let opts = CourierOptions { loc_every: (Duration::from_millis(50), Duration::from_millis(50)), tick: Duration::from_millis(20), max_reconnects: 3, ..CourierOptions::default() };
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(run_courier(server, spec, bbox, opts, Arc::new(SimStats::default()), shutdown.clone()));
    let (mut ws, _, _) = accept(&listener).await;
    next_of(&mut ws, "status").await;
    next_of(&mut ws, "loc").await;
    // The server drops the socket and is away for a second.
    drop(ws);
    let outage = tokio::time::sleep(Duration::from_secs(1));
    outage.await;
    let (mut ws, _, _) = accept(&listener).await;
    let back = next_json(&mut ws).await;
    assert_eq!(back["t"], "loc");
    assert_eq!(next_json(&mut ws).await["t"], "status");
    let then = next_of(&mut ws, "loc").await;
    let at = |v: &Value| LatLng::new(v["lat"].as_f64().unwrap(), v["lng"].as_f64().unwrap());
    let dt_s = (then["ts"].as_i64().unwrap() - back["ts"].as_i64().unwrap()).max(1) as f64 / 1000.0;
    let speed = hexfleet_sim::geomath::distance_m(at(&back), at(&then)) / dt_s;
    // (Timestamps in ms over a 50 ms step are noisy: the bound is the server's suspect-jump
    // filter, 70 m/s.)
    assert!(speed < 70.0, "{speed:.0} m/s between the first two fixes after the reconnect");
    shutdown.cancel();
    timeout(DEADLINE, task).await.expect("courier did not stop").unwrap().unwrap();
}

/// Reads one HTTP request (head and `Content-Length` body) off `tcp`: its request line and body.
async fn read_http_request(tcp: &mut TcpStream) -> (String, Vec<u8>) {
    use tokio::io::AsyncReadExt as _;
    let mut buf = Vec::new();
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let mut chunk = [0u8; 4096];
        let n = timeout(DEADLINE, tcp.read(&mut chunk)).await.expect("no request before the deadline").unwrap();
        assert!(n > 0, "connection closed mid-request");
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
    let len: usize = head
        .lines()
        .find_map(|l| l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().parse().unwrap()))
        .unwrap_or(0);
    while buf.len() < head_end + len {
        let mut chunk = [0u8; 4096];
        let n = timeout(DEADLINE, tcp.read(&mut chunk)).await.expect("request body before the deadline").unwrap();
        assert!(n > 0, "connection closed mid-body");
        buf.extend_from_slice(&chunk[..n]);
    }
    (head.lines().next().unwrap_or_default().to_owned(), buf[head_end..head_end + len].to_vec())
}

/// The demo's order arrivals go on while one creation waits out a 503's `Retry-After`, as a
/// shop's customers keep ordering while its backend retries; the retry names the same order.
/// (The order loop awaited each creation with its retries, so one failover stopped the
/// arrivals behind it, and they came in a bunch after.)
#[tokio::test]
async fn orders_arrive_while_a_creation_waits_to_retry() {
    let (listener, server) = fake_server().await;
    let cfg = hexfleet_sim::DemoConfig {
        base_url: format!("http://{}", server.addr),
        jwt_secret: SECRET.into(),
        couriers: 0,
        orders_per_min: 1_200.0,
        watchers: 0,
        ..hexfleet_sim::DemoConfig::default()
    };
    let stats = Arc::new(SimStats::default());
    let stop = CancellationToken::new();
    let demo = tokio::spawn(hexfleet_sim::demo::run_demo_with(cfg, CourierOptions::default(), stop.clone(), stats.clone()));
    // Each request: (order id, answered 503). The first order is refused with Retry-After: 2.
    let mut seen: Vec<(String, bool)> = Vec::new();
    let first = loop {
        let (mut tcp, _) = timeout(DEADLINE, listener.accept()).await.expect("no order request before the deadline").unwrap();
        let (line, body) = read_http_request(&mut tcp).await;
        assert!(line.starts_with("POST /v1/orders "), "{line}");
        let id = serde_json::from_slice::<Value>(&body).unwrap()["id"].as_str().unwrap().to_owned();
        let refuse = seen.is_empty();
        let resp: &[u8] = if refuse {
            b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 2\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}"
        } else {
            b"HTTP/1.1 201 Created\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}"
        };
        tokio::io::AsyncWriteExt::write_all(&mut tcp, resp).await.unwrap();
        seen.push((id.clone(), refuse));
        if seen.len() > 1 && id == seen[0].0 {
            break seen.len() - 1;
        }
    };
    // The answers read back: every order answered 201 counts as created, the retried one too.
    timeout(DEADLINE, async {
        while SimStats::get(&stats.orders_created) < first as u64 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("the orders answered 201 were not all counted as created");
    stop.cancel();
    timeout(DEADLINE, demo).await.expect("demo stopped").unwrap().unwrap();
    // About 40 arrivals in the 2 s the first order waited; a loop that waits lets none through.
    assert!(first >= 5, "only {} orders arrived while the first waited to retry: {seen:?}", first - 1);
    let ids: std::collections::HashSet<&str> = seen[1..first].iter().map(|(id, _)| id.as_str()).collect();
    assert_eq!(ids.len(), first - 1, "each arrival is an order of its own: {seen:?}");
    assert!(!ids.contains(seen[0].0.as_str()));
    assert_eq!(SimStats::get(&stats.order_retries), 1);
}
