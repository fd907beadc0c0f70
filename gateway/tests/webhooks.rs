//! Webhooks end to end: the API (roles, tenants, validation), signed deliveries to a real HTTP
//! receiver, retries with backoff, giving up, and an outbox that survives a restart (SQLite and
//! PostgreSQL).

mod common;

use std::net::TcpListener;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use actix_web::{App, HttpRequest, HttpResponse, HttpServer, web};
use common::{DEADLINE, PgDb, TestServer, eventually, fast_config};
use hexfleet_gateway::auth::Role;
use hmac::{Hmac, Mac};
use serde_json::{Value, json};
use sha2::Sha256;
use tokio::sync::mpsc;

const HOOK_SECRET: &str = "whsec-0123456789abcdef";

/// One request the receiver got.
#[derive(Debug)]
struct Got {
    headers: Vec<(String, String)>,
    body: Vec<u8>,
    answered: u16,
}

impl Got {
    fn header(&self, name: &str) -> &str {
        self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str()).unwrap_or("")
    }
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).expect("JSON body")
    }
}

struct ReceiverState {
    /// Requests still to be refused with 500.
    fail: AtomicUsize,
    /// When set, each request waits for a permit before it is answered (a slow endpoint).
    hold: Option<std::sync::Arc<tokio::sync::Semaphore>>,
    tx: mpsc::UnboundedSender<Got>,
}

/// A real HTTP server (actix-web) standing in for a customer's endpoint.
struct Receiver {
    url: String,
    state: web::Data<ReceiverState>,
    rx: mpsc::UnboundedReceiver<Got>,
    handle: actix_web::dev::ServerHandle,
}

async fn receive(st: web::Data<ReceiverState>, req: HttpRequest, body: web::Bytes) -> HttpResponse {
    let failing = st.fail.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1)).is_ok();
    let answered = if failing { 500 } else { 204 };
    let headers = req.headers().iter().map(|(k, v)| (k.to_string(), v.to_str().unwrap_or("").to_owned())).collect();
    let _ = st.tx.send(Got { headers, body: body.to_vec(), answered });
    if let Some(hold) = &st.hold {
        hold.acquire().await.expect("semaphore open").forget();
    }
    if failing { HttpResponse::InternalServerError().body("try again") } else { HttpResponse::NoContent().finish() }
}

impl Receiver {
    async fn start(fail_first: usize) -> Receiver {
        Self::start_with(fail_first, None).await
    }

    async fn start_with(fail_first: usize, hold: Option<std::sync::Arc<tokio::sync::Semaphore>>) -> Receiver {
        let (tx, rx) = mpsc::unbounded_channel();
        let state = web::Data::new(ReceiverState { fail: AtomicUsize::new(fail_first), hold, tx });
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/hooks", listener.local_addr().unwrap());
        let st = state.clone();
        let srv = HttpServer::new(move || App::new().app_data(st.clone()).default_service(web::to(receive)))
            .workers(1)
            .disable_signals()
            .listen(listener)
            .unwrap()
            .run();
        let handle = srv.handle();
        tokio::spawn(srv);
        Receiver { url, state, rx, handle }
    }

    /// The next request whose body satisfies `pred`, within the deadline.
    async fn next(&mut self, what: &str, pred: impl Fn(&Value) -> bool) -> Got {
        let until = tokio::time::Instant::now() + DEADLINE;
        loop {
            let got = tokio::time::timeout_at(until, self.rx.recv())
                .await
                .unwrap_or_else(|_| panic!("{what}: no matching webhook request within {DEADLINE:?}"))
                .expect("receiver alive");
            if pred(&got.json()) {
                return got;
            }
        }
    }
}

fn verify_signature(got: &Got, secret: &str) {
    let sig = got.header("x-hexfleet-signature");
    let (t, v1) = sig
        .split_once(',')
        .and_then(|(t, v)| Some((t.strip_prefix("t=")?, v.strip_prefix("v1=")?)))
        .unwrap_or_else(|| panic!("malformed signature header {sig:?}"));
    let t: i64 = t.parse().expect("t is Unix seconds");
    assert!((t - common::now_ms() / 1000).abs() < 60, "signature time {t} is now");
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(format!("{t}.").as_bytes());
    mac.update(&got.body);
    let want: String = mac.finalize().into_bytes().iter().map(|b| format!("{b:02x}")).collect();
    assert_eq!(v1, want, "signature verifies over the raw body");
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(&got.body);
    let want: String = mac.finalize().into_bytes().iter().map(|b| format!("{b:02x}")).collect();
    assert_eq!(got.header("x-hexfleet-signature-256"), format!("sha256={want}"), "the body's own signature");
}

/// Creates webhook `id` of the token's tenant on `order.created` to `url`; asserts 201.
async fn put_hook(srv: &TestServer, token: &str, id: &str, url: &str) {
    let (s, b) = srv.put(&format!("/v1/webhooks/{id}"), token, json!({"url": url, "events": ["order.created"], "secret": HOOK_SECRET})).await;
    assert_eq!(s, 201, "{b}");
}

/// A server whose webhook worker polls and retries every 20 ms and opens a circuit after
/// `breaker_after` failures, for longer than any test (600 s); tenant acme has a webhook
/// "broken" (its endpoint always answers 500) and one "healthy". `tune` adjusts the
/// configuration first. Returns the server, acme's dispatcher token and the two endpoints.
async fn broken_and_healthy(
    dir: &tempfile::TempDir,
    breaker_after: u32,
    tune: impl FnOnce(&mut hexfleet_gateway::ServeConfig),
) -> (TestServer, String, Receiver, Receiver) {
    let mut cfg = fast_config(dir.path().join("h.db").to_str().unwrap());
    cfg.webhooks.poll = Duration::from_millis(20);
    cfg.webhooks.backoff = Duration::from_millis(20);
    cfg.webhooks.max_attempts = 50;
    cfg.webhooks.timeout = Duration::from_secs(2);
    cfg.webhooks.breaker_after = breaker_after;
    cfg.webhooks.breaker_cooldown = Duration::from_secs(600);
    cfg.webhooks.allow_private = true;
    tune(&mut cfg);
    let srv = TestServer::start(cfg).await;
    let disp = srv.dispatcher("acme");
    let broken = Receiver::start(usize::MAX).await;
    let healthy = Receiver::start(0).await;
    put_hook(&srv, &disp, "broken", &broken.url).await;
    put_hook(&srv, &disp, "healthy", &healthy.url).await;
    (srv, disp, broken, healthy)
}

fn order_body(id: &str) -> Value {
    json!({"id": id, "pickup": {"lat": 52.52, "lng": 13.405}, "dropoff": {"lat": 52.5163, "lng": 13.3777}})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_signed_delivery_retries_and_giving_up() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = fast_config(dir.path().join("h.db").to_str().unwrap());
    cfg.webhooks.poll = Duration::from_millis(20);
    cfg.webhooks.backoff = Duration::from_millis(50);
    cfg.webhooks.max_attempts = 3;
    cfg.webhooks.timeout = Duration::from_secs(2);
    cfg.webhooks.allow_private = true; // the receiver is on 127.0.0.1
    let mut srv = TestServer::start(cfg).await;
    let disp = srv.dispatcher("acme");
    // Refuses the first two attempts, then takes them.
    let mut rx = Receiver::start(2).await;

    // --- the API: roles, validation, tenants ---
    let good = json!({"url": rx.url, "events": ["order.*"], "secret": HOOK_SECRET});
    let courier = srv.token(Role::Courier, "c1", "acme", None);
    assert_eq!(srv.put("/v1/webhooks/w1", &courier, good.clone()).await.0, 403, "couriers cannot add webhooks");
    for (bad, why) in [
        (json!({"url": "ftp://x.example/", "events": ["*"], "secret": HOOK_SECRET}), "scheme"),
        // What the URL parser forgives and the OpenAPI document's pattern does not.
        (json!({"url": format!(" {}", rx.url), "events": ["*"], "secret": HOOK_SECRET}), "leading space"),
        (json!({"url": "http:\\\\x.example/", "events": ["*"], "secret": HOOK_SECRET}), "backslashes"),
        (json!({"url": "http:x.example", "events": ["*"], "secret": HOOK_SECRET}), "no slashes"),
        (json!({"url": "HTTPS://x.example/a b", "events": ["*"], "secret": HOOK_SECRET}), "a space"),
        (json!({"url": rx.url, "events": [], "secret": HOOK_SECRET}), "no events"),
        (json!({"url": rx.url, "events": ["Order.Created"], "secret": HOOK_SECRET}), "pattern"),
        (json!({"url": rx.url, "events": ["*"], "secret": ""}), "empty secret"),
        (json!({"url": rx.url, "events": ["*"], "secret": "s".repeat(257)}), "secret too long"),
        (json!({"url": rx.url, "events": ["*"], "secret": HOOK_SECRET, "extra": 1}), "unknown field"),
    ] {
        let (s, b) = srv.put("/v1/webhooks/w1", &disp, bad).await;
        assert_eq!(s, 400, "{why}: {b}");
        assert!(b["error"]["code"].is_string(), "{why}: error shape {b}");
    }
    let (s, b) = srv.put("/v1/webhooks/bad%20id", &disp, good.clone()).await;
    assert_eq!((s, b["error"]["code"].as_str()), (400, Some("bad_id")), "{b}");
    let (s, b) = srv.put("/v1/webhooks/w1", &disp, good.clone()).await;
    assert_eq!(s, 201, "{b}");
    assert_eq!(b["url"], rx.url.as_str());
    assert!(b.get("secret").is_none(), "the secret is never read back: {b}");
    assert_eq!(srv.put("/v1/webhooks/w1", &disp, good.clone()).await.0, 200, "replace");
    let (s, list) = srv.get("/v1/webhooks", Some(&disp)).await;
    assert_eq!((s, list["items"].as_array().map(Vec::len)), (200, Some(1)));
    assert_eq!(srv.get("/v1/webhooks/w1", Some(&srv.dispatcher("other"))).await.0, 404, "tenants are apart");

    // --- a signed delivery that succeeds on the third attempt ---
    let (s, o) = srv.post("/v1/orders", &disp, order_body("o-hook-1")).await;
    assert_eq!(s, 201, "{o}");
    let is_created = |v: &Value| v["kind"] == "order.created" && v["entity_id"] == "o-hook-1";
    let mut attempts = Vec::new();
    for _ in 0..3 {
        attempts.push(rx.next("order.created", is_created).await);
    }
    assert_eq!(attempts.iter().map(|g| g.answered).collect::<Vec<_>>(), [500, 500, 204]);
    assert_eq!(attempts.iter().map(|g| g.header("x-hexfleet-attempt").to_owned()).collect::<Vec<_>>(), ["1", "2", "3"]);
    let first = attempts[0].json();
    for g in &attempts {
        verify_signature(g, HOOK_SECRET);
        assert_eq!(g.header("content-type"), "application/json");
        assert_eq!(g.header("x-hexfleet-event"), "order.created");
        let v = g.json();
        assert_eq!(v["id"], first["id"], "a retry carries the same id");
        assert_eq!(g.header("x-hexfleet-delivery"), v["id"].as_str().unwrap());
    }
    assert_eq!((first["tenant"].as_str(), first["entity"].as_str(), first["webhook_id"].as_str()), (Some("acme"), Some("order"), Some("w1")));
    let seq = first["seq"].as_i64().expect("seq");
    // The same event is in the tenant's log under that seq.
    let (_, evs) = srv.get("/v1/events?entity=order&id=o-hook-1", Some(&disp)).await;
    assert!(evs.to_string().contains(&format!("\"seq\":{seq}")), "{evs}");

    let d = eventually("delivery recorded", || async {
        let (_, d) = srv.get("/v1/webhooks/w1/deliveries", Some(&disp)).await;
        let item = d["items"].as_array()?.iter().find(|i| i["seq"] == seq)?.clone();
        (item["state"] == "delivered").then_some(item)
    })
    .await;
    assert_eq!((d["attempts"].as_i64(), d["last_status"].as_i64(), d["kind"].as_str()), (Some(3), Some(204), Some("order.created")));
    let (_, w) = srv.get("/v1/webhooks/w1", Some(&disp)).await;
    assert!(w["deliveries"]["delivered"].as_i64() >= Some(1), "{w}");

    // --- an endpoint that never answers is given up after max_attempts ---
    let closed = TcpListener::bind("127.0.0.1:0").unwrap();
    let dead_url = format!("http://{}/gone", closed.local_addr().unwrap());
    drop(closed);
    let (s, _) = srv.put("/v1/webhooks/dead", &disp, json!({"url": dead_url, "events": ["order.created"], "secret": HOOK_SECRET})).await;
    assert_eq!(s, 201);
    assert_eq!(srv.post("/v1/orders", &disp, order_body("o-hook-2")).await.0, 201);
    let item = eventually("the dead delivery", || async {
        let (_, d) = srv.get("/v1/webhooks/dead/deliveries", Some(&disp)).await;
        let item = d["items"].as_array()?.first()?.clone();
        (item["state"] == "dead").then_some(item)
    })
    .await;
    assert_eq!(item["attempts"], 3);
    assert!(item["last_status"].is_null() && !item["last_error"].as_str().unwrap_or("").is_empty(), "{item}");
    // The healthy webhook got order 2 as well, first time.
    let g = rx.next("order 2", |v| v["kind"] == "order.created" && v["entity_id"] == "o-hook-2").await;
    assert_eq!((g.answered, g.header("x-hexfleet-attempt")), (204, "1"));

    // --- redelivery, once the endpoint is fixed ---
    let dead_seq = item["seq"].as_i64().unwrap();
    let (s, b) = srv.post("/v1/webhooks/dead/redeliver", &disp, json!({"seq": dead_seq + 100_000})).await;
    assert_eq!((s, b["error"]["code"].as_str()), (404, Some("not_found")), "no such delivery: {b}");
    assert_eq!(srv.post("/v1/webhooks/nope/redeliver", &disp, json!({})).await.0, 404);
    assert_eq!(srv.post("/v1/webhooks/dead/redeliver", &courier, json!({})).await.0, 403);
    assert_eq!(srv.post("/v1/webhooks/dead/redeliver", &disp, json!({"seq": "x"})).await.0, 400);
    let (s, _) = srv.put("/v1/webhooks/dead", &disp, json!({"url": rx.url, "events": ["order.created"], "secret": HOOK_SECRET})).await;
    assert_eq!(s, 200, "pointed at a working endpoint");
    let (s, b) = srv.post("/v1/webhooks/dead/redeliver", &disp, json!({})).await;
    assert_eq!((s, b["requeued"].as_u64()), (200, Some(1)), "{b}");
    let g = rx.next("the redelivery", |v| v["webhook_id"] == "dead" && v["seq"] == dead_seq).await;
    assert_eq!((g.answered, g.header("x-hexfleet-attempt")), (204, "1"), "it starts over");
    let item = eventually("redelivered", || async {
        let (_, d) = srv.get("/v1/webhooks/dead/deliveries", Some(&disp)).await;
        let item = d["items"].as_array()?.first()?.clone();
        (item["state"] == "delivered").then_some(item)
    })
    .await;
    assert_eq!(item["attempts"], 1);
    // Nothing dead is left; a delivered one can be sent again by its seq; a pending one cannot.
    let (s, b) = srv.post("/v1/webhooks/dead/redeliver", &disp, json!({})).await;
    assert_eq!((s, b["requeued"].as_u64()), (200, Some(0)));
    let (s, b) = srv.post("/v1/webhooks/dead/redeliver", &disp, json!({"seq": dead_seq})).await;
    assert_eq!((s, b["requeued"].as_u64()), (200, Some(1)), "{b}");
    rx.next("sent again", |v| v["webhook_id"] == "dead" && v["seq"] == dead_seq).await;
    let (_, evs) = srv.get("/v1/events?entity=webhook&id=dead", Some(&disp)).await;
    assert_eq!(evs.to_string().matches("webhook.redelivered").count(), 2, "audited: {evs}");

    // --- delete ---
    assert_eq!(srv.delete("/v1/webhooks/dead", &disp).await.0, 204);
    assert_eq!(srv.delete("/v1/webhooks/dead", &disp).await.0, 404);
    assert_eq!(srv.get("/v1/webhooks/dead", Some(&disp)).await.0, 404);
    assert_eq!(srv.get("/v1/webhooks/dead/deliveries", Some(&disp)).await.0, 404);

    srv.stop().await;
    rx.handle.stop(true).await;
}

/// A failing endpoint trips its webhook's circuit: after `breaker_after` failures its
/// deliveries are neither sent nor counted as attempts while the circuit is open, and the other
/// webhook's deliveries go on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_endpoint_is_paused_and_does_not_hold_up_the_others() {
    let dir = tempfile::tempdir().unwrap();
    // The circuit stays open once it opens (600 s).
    let (mut srv, disp, broken, mut healthy) = broken_and_healthy(&dir, 3, |_| {}).await;
    for i in 0..6 {
        assert_eq!(srv.post("/v1/orders", &disp, order_body(&format!("o-cb-{i}"))).await.0, 201);
    }
    // Sent concurrently: in any order.
    let mut seen = std::collections::BTreeSet::new();
    while seen.len() < 6 {
        let g = healthy.next("healthy deliveries", |v| v["entity_id"].as_str().is_some_and(|id| id.starts_with("o-cb-"))).await;
        seen.insert(g.json()["entity_id"].as_str().unwrap().to_owned());
    }
    // The circuit opened: the broken webhook's waiting deliveries were moved to the end of its
    // pause (600 s), without spending attempts; with it closed they would be retried every
    // 20–40 ms. Every attempt counted is a request the endpoint got (once the sends under way
    // when it opened have arrived).
    let attempts = |items: &[Value]| items.iter().map(|i| i["attempts"].as_i64().unwrap_or(0)).sum::<i64>();
    let (_, sent) = eventually("the broken webhook paused, each attempt a request", || async {
        let (_, d) = srv.get("/v1/webhooks/broken/deliveries", Some(&disp)).await;
        let items = d["items"].as_array()?.clone();
        let now = common::now_ms();
        let sent = usize::MAX - broken.state.fail.load(Ordering::SeqCst);
        (items.len() == 6
            && items.iter().all(|i| i["state"] == "pending")
            && attempts(&items) >= 3
            && attempts(&items) == sent as i64
            && items.iter().any(|i| i["next_attempt_at"].as_i64().is_some_and(|t| t > now + 500_000)))
        .then_some((items, sent))
    })
    .await;
    assert!((3..=12).contains(&sent), "at least breaker_after, at most one batch beyond: {sent}");
    // The worker polls on: a later order reaches the healthy endpoint, after the broken
    // deliveries were due...
    assert_eq!(srv.post("/v1/orders", &disp, order_body("o-cb-late")).await.0, 201);
    healthy.next("a later delivery", |v| v["entity_id"] == "o-cb-late").await;
    // ...and the broken endpoint got nothing more: no request, no attempt spent, none given up.
    assert_eq!(usize::MAX - broken.state.fail.load(Ordering::SeqCst), sent, "requests to the paused endpoint");
    let (_, d) = srv.get("/v1/webhooks/broken/deliveries", Some(&disp)).await;
    let items = d["items"].as_array().unwrap();
    assert_eq!(items.len(), 7);
    assert_eq!(attempts(items), sent as i64, "paused deliveries spend no attempts: {d}");
    assert!(items.iter().all(|i| i["state"] == "pending"), "none given up: {d}");
    // Pointed at a working URL, the webhook is a new circuit, and its waiting deliveries are
    // due at once: all seven arrive.
    let (s, _) = srv.put("/v1/webhooks/broken", &disp, json!({"url": healthy.url, "events": ["order.created"], "secret": HOOK_SECRET})).await;
    assert_eq!(s, 200);
    let mut moved = std::collections::BTreeSet::new();
    while moved.len() < 7 {
        let g = healthy.next("the paused deliveries, at the new URL", |v| v["webhook_id"] == "broken").await;
        moved.insert(g.json()["seq"].as_i64().unwrap());
    }
    srv.stop().await;
    broken.handle.stop(true).await;
    healthy.handle.stop(true).await;
}

/// An endpoint that stays down does not grow the outbox for ever: once its circuit is open its
/// deliveries wait unattempted, and after `give_up_after` they are given up (dead, with the
/// reason), while the other webhook's are delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deliveries_to_an_endpoint_down_for_long_are_given_up() {
    let dir = tempfile::tempdir().unwrap();
    let (mut srv, disp, broken, mut healthy) = broken_and_healthy(&dir, 2, |cfg| {
        cfg.webhooks.give_up_after = Duration::from_secs(1);
        cfg.webhooks.housekeeping = Duration::from_millis(100);
    })
    .await;
    for i in 0..4 {
        assert_eq!(srv.post("/v1/orders", &disp, order_body(&format!("o-gu-{i}"))).await.0, 201);
        healthy.next("healthy deliveries", |v| v["entity_id"] == format!("o-gu-{i}").as_str()).await;
    }
    let items = eventually("the broken webhook's deliveries given up", || async {
        let (_, d) = srv.get("/v1/webhooks/broken/deliveries", Some(&disp)).await;
        let items = d["items"].as_array()?.clone();
        (items.len() == 4 && items.iter().all(|i| i["state"] == "dead")).then_some(items)
    })
    .await;
    for i in &items {
        assert_eq!(i["last_error"], "gave up: not attempted for 1 s", "{i}");
    }
    let sent = usize::MAX - broken.state.fail.load(Ordering::SeqCst);
    assert!(sent < 4, "the open circuit held back some of them: {sent} sent");
    let (_, d) = srv.get("/v1/webhooks/healthy/deliveries", Some(&disp)).await;
    assert!(d["items"].as_array().unwrap().iter().all(|i| i["state"] == "delivered"), "{d}");
    srv.stop().await;
    broken.handle.stop(true).await;
    healthy.handle.stop(true).await;
}

/// Six delivery slots, two per webhook, and a send timeout far longer than the tests wait for
/// the deliveries that must go on around a hanging endpoint.
fn slow_endpoints_config(dir: &tempfile::TempDir) -> hexfleet_gateway::ServeConfig {
    let mut cfg = fast_config(dir.path().join("h.db").to_str().unwrap());
    cfg.webhooks.poll = Duration::from_millis(20);
    cfg.webhooks.timeout = Duration::from_secs(30);
    cfg.webhooks.concurrency = 6;
    cfg.webhooks.per_webhook = 2;
    cfg.webhooks.allow_private = true;
    cfg
}

/// An endpoint that answers slowly holds at most `per_webhook` of the worker's slots: the other
/// webhook's deliveries go on while its requests hang, and its own arrive once it answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_endpoint_does_not_hold_up_the_others() {
    let dir = tempfile::tempdir().unwrap();
    let mut srv = TestServer::start(slow_endpoints_config(&dir)).await;
    let disp = srv.dispatcher("acme");
    let hold = std::sync::Arc::new(tokio::sync::Semaphore::new(0));
    let mut slow = Receiver::start_with(0, Some(hold.clone())).await;
    let mut healthy = Receiver::start(0).await;
    put_hook(&srv, &disp, "slow", &slow.url).await;
    put_hook(&srv, &disp, "healthy", &healthy.url).await;
    assert_eq!(srv.post("/v1/orders", &disp, order_body("o-slow-0")).await.0, 201);
    slow.next("the slow endpoint's first request, left hanging", |v| v["entity_id"] == "o-slow-0").await;
    healthy.next("the first delivery", |v| v["entity_id"] == "o-slow-0").await;
    // While it hangs, every later order reaches the healthy endpoint at once.
    let started = std::time::Instant::now();
    for i in 1..=8 {
        assert_eq!(srv.post("/v1/orders", &disp, order_body(&format!("o-slow-{i}"))).await.0, 201);
    }
    let mut seen = std::collections::BTreeSet::new();
    while seen.len() < 8 {
        let g = healthy.next("the healthy deliveries", |v| v["entity_id"].as_str().is_some_and(|id| id != "o-slow-0")).await;
        seen.insert(g.json()["entity_id"].as_str().unwrap().to_owned());
    }
    assert!(started.elapsed() < Duration::from_secs(10), "held up behind the slow endpoint: {:?}", started.elapsed());
    // The slow endpoint never had more than two requests at once.
    slow.next("its second request", |_| true).await;
    assert!(slow.rx.try_recv().is_err(), "a third request while two hang");
    // Once it answers, all nine of its deliveries arrive.
    hold.add_permits(1000);
    let mut got = 2;
    while got < 9 {
        slow.next("the rest of the slow deliveries", |_| true).await;
        got += 1;
    }
    srv.stop().await;
    slow.handle.stop(true).await;
    healthy.handle.stop(true).await;
}

/// A tenant whose endpoints all hang holds at most `per_tenant` of the worker's slots: another
/// tenant's deliveries go on meanwhile, and the first tenant's arrive once its endpoints answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_with_slow_endpoints_leaves_slots_to_the_others() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = slow_endpoints_config(&dir);
    // Three slow webhooks at two sends each could take all six slots; the tenant gets three.
    cfg.webhooks.per_tenant = 3;
    let mut srv = TestServer::start(cfg).await;
    let (acme, globex) = (srv.dispatcher("acme"), srv.dispatcher("globex"));
    let hold = std::sync::Arc::new(tokio::sync::Semaphore::new(0));
    let mut slow = Receiver::start_with(0, Some(hold.clone())).await;
    let mut healthy = Receiver::start(0).await;
    for id in ["slow-a", "slow-b", "slow-c"] {
        put_hook(&srv, &acme, id, &slow.url).await;
    }
    put_hook(&srv, &globex, "healthy", &healthy.url).await;
    for i in 0..3 {
        assert_eq!(srv.post("/v1/orders", &acme, order_body(&format!("o-acme-{i}"))).await.0, 201);
    }
    for _ in 0..3 {
        slow.next("acme's requests, left hanging", |_| true).await;
    }
    // Acme has nine deliveries due and three hanging; globex's go through around them.
    let started = std::time::Instant::now();
    for i in 0..2 {
        let id = format!("o-globex-{i}");
        assert_eq!(srv.post("/v1/orders", &globex, order_body(&id)).await.0, 201);
        healthy.next("globex's delivery", |v| v["entity_id"] == id.as_str()).await;
    }
    assert!(started.elapsed() < Duration::from_secs(10), "held up behind acme's endpoints: {:?}", started.elapsed());
    assert!(slow.rx.try_recv().is_err(), "acme got a fourth slot while three of its sends hang");
    // Once its endpoints answer, all nine of acme's deliveries arrive.
    hold.add_permits(1000);
    for _ in 3..9 {
        slow.next("the rest of acme's deliveries", |_| true).await;
    }
    srv.stop().await;
    slow.handle.stop(true).await;
    healthy.handle.stop(true).await;
}

/// Deliveries the receiver refused before a restart are made after it, from the outbox.
async fn outbox_survives_restart(db: String) {
    let mut cfg = fast_config(&db);
    cfg.webhooks.poll = Duration::from_millis(20);
    cfg.webhooks.backoff = Duration::from_millis(100);
    cfg.webhooks.max_attempts = 50;
    cfg.webhooks.allow_private = true; // the receiver is on 127.0.0.1
    let mut rx = Receiver::start(usize::MAX).await;
    let mut srv = TestServer::start(cfg.clone()).await;
    let disp = srv.dispatcher("acme");
    let (s, _) = srv.put("/v1/webhooks/w", &disp, json!({"url": rx.url, "events": ["order.created"], "secret": HOOK_SECRET})).await;
    assert_eq!(s, 201);
    assert_eq!(srv.post("/v1/orders", &disp, order_body("o-restart")).await.0, 201);
    let is_it = |v: &Value| v["entity_id"] == "o-restart";
    let refused = rx.next("first attempt", is_it).await;
    assert_eq!(refused.answered, 500);
    srv.stop().await;

    // The receiver recovers while the server is down; the restarted server delivers.
    rx.state.fail.store(0, Ordering::SeqCst);
    let mut srv = TestServer::start(cfg).await;
    let ok = loop {
        let g = rx.next("delivery after restart", is_it).await;
        if g.answered == 204 {
            break g;
        }
    };
    verify_signature(&ok, HOOK_SECRET);
    assert_eq!(ok.json()["id"], refused.json()["id"]);
    assert!(ok.header("x-hexfleet-attempt").parse::<u32>().unwrap() >= 2);
    eventually("delivered state", || async {
        let (_, w) = srv.get("/v1/webhooks/w", Some(&disp)).await;
        (w["deliveries"]["delivered"] == 1 && w["deliveries"]["pending"] == 0).then_some(())
    })
    .await;
    srv.stop().await;
    rx.handle.stop(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outbox_survives_restart_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    outbox_survives_restart(dir.path().join("h.db").to_string_lossy().into_owned()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outbox_survives_restart_postgres() {
    let Some(db) = PgDb::create().await else { return };
    outbox_survives_restart(db.url.clone()).await;
    db.drop_db().await;
}

/// Housekeeping that takes long (here a purge waiting on a row another transaction holds, as a
/// purge of many rows would take minutes of batches) does not hold up deliveries: they are
/// claimed and sent meanwhile. The worker ran the purge in its own loop, so while it waited
/// nothing was claimed and the sends under way were not read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_purge_does_not_hold_up_deliveries() {
    use sqlx::Connection as _;
    let Some(db) = PgDb::create().await else { return };
    let mut cfg = fast_config(&db.url);
    cfg.webhooks.poll = Duration::from_millis(20);
    cfg.webhooks.allow_private = true;
    cfg.webhooks.housekeeping = Duration::from_millis(50);
    let mut rx = Receiver::start(0).await;
    let mut srv = TestServer::start(cfg).await;
    let disp = srv.dispatcher("acme");
    put_hook(&srv, &disp, "w", &rx.url).await;
    assert_eq!(srv.post("/v1/orders", &disp, order_body("o-old")).await.0, 201);
    rx.next("the first delivery", |v| v["entity_id"] == "o-old").await;
    eventually("the first delivery recorded", || async {
        let (_, w) = srv.get("/v1/webhooks/w", Some(&disp)).await;
        (w["deliveries"]["delivered"] == 1).then_some(())
    })
    .await;
    // Hold its row, then make it old enough to purge: the purge waits on it. A key-share lock
    // lets the update through but not a delete. (Made old first and locked after, the row
    // could be purged in between, and the purge then never waited: a flaky failure.)
    let mut holder = sqlx::PgConnection::connect(&db.url).await.unwrap();
    let mut tx = holder.begin().await.unwrap();
    let held = sqlx::query("SELECT 1 FROM webhook_outbox FOR KEY SHARE").fetch_all(&mut *tx).await.unwrap();
    assert_eq!(held.len(), 1);
    let mut ager = sqlx::PgConnection::connect(&db.url).await.unwrap();
    sqlx::query("UPDATE webhook_outbox SET updated_at = 0").execute(&mut ager).await.unwrap();
    let mut watch = sqlx::PgConnection::connect(&db.url).await.unwrap();
    let purge_waiting = "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() \
                         AND wait_event_type = 'Lock' AND query LIKE 'DELETE FROM webhook_outbox%'";
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while sqlx::query_scalar::<_, i64>(purge_waiting).fetch_one(&mut watch).await.unwrap() == 0 {
        assert!(tokio::time::Instant::now() < deadline, "the purge never reached the held row");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // While it waits (up to the statement timeout, 5 s, and again after), a new event is
    // delivered.
    assert_eq!(srv.post("/v1/orders", &disp, order_body("o-new")).await.0, 201);
    let got = tokio::time::timeout(Duration::from_millis(2_500), rx.next("the delivery during the purge", |v| v["entity_id"] == "o-new")).await;
    assert!(got.is_ok(), "no delivery while the purge waited");
    // Released, the old row is purged.
    tx.rollback().await.unwrap();
    let url = db.url.clone();
    eventually("the old delivery purged", || async {
        let mut c = sqlx::PgConnection::connect(&url).await.unwrap();
        let old: i64 = sqlx::query_scalar("SELECT count(*) FROM webhook_outbox WHERE updated_at = 0").fetch_one(&mut c).await.unwrap();
        (old == 0).then_some(())
    })
    .await;
    drop(watch);
    srv.stop().await;
    rx.handle.stop(true).await;
    db.drop_db().await;
}

/// By default (a server on a public address, or `--webhook-allow-private false`) a webhook
/// cannot target the operator's own network (SSRF).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn private_destinations_are_refused_by_default() {
    let dir = tempfile::tempdir().unwrap();
    let mut srv = TestServer::start(fast_config(dir.path().join("h.db").to_str().unwrap())).await;
    let disp = srv.dispatcher("acme");
    for url in ["http://127.0.0.1:8080/x", "http://169.254.169.254/latest/meta-data/", "http://10.0.0.7/hook", "http://[::1]/", "http://localhost/x"] {
        let (s, b) = srv.put("/v1/webhooks/w", &disp, json!({"url": url, "events": ["*"], "secret": HOOK_SECRET})).await;
        assert_eq!((s, b["error"]["code"].as_str()), (400, Some("forbidden_destination")), "{url}: {b}");
    }
    let (s, b) = srv.put("/v1/webhooks/w", &disp, json!({"url": "https://hooks.example.com/x", "events": ["*"], "secret": HOOK_SECRET})).await;
    assert_eq!(s, 201, "a public host name is accepted (and resolved, checked, at each delivery): {b}");
    srv.stop().await;
}

/// A send under way is read while the worker waits for a claim: a claim stuck behind a lock
/// (a slow database; up to the 5 s statement timeout) held up the sends in flight, and reqwest
/// checks its deadline before a response that is ready, so an endpoint that answered 2xx at
/// once was recorded as timed out, sent the event again and fed its breaker.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_waiting_on_the_database_does_not_time_out_the_sends_under_way() {
    use sqlx::Connection as _;
    let Some(db) = PgDb::create().await else { return };
    let mut cfg = fast_config(&db.url);
    cfg.webhooks.poll = Duration::from_millis(20);
    cfg.webhooks.backoff = Duration::from_millis(20);
    cfg.webhooks.timeout = Duration::from_millis(1_000);
    cfg.webhooks.allow_private = true;
    let hold = std::sync::Arc::new(tokio::sync::Semaphore::new(0));
    let mut rx = Receiver::start_with(0, Some(hold.clone())).await;
    let mut srv = TestServer::start(cfg).await;
    let disp = srv.dispatcher("acme");
    put_hook(&srv, &disp, "w", &rx.url).await;
    assert_eq!(srv.post("/v1/orders", &disp, order_body("o1")).await.0, 201);
    // The request is at the endpoint, unanswered. Now the outbox is locked (even against
    // reads), so the worker's next claim waits.
    rx.next("the delivery", |v| v["entity_id"] == "o1").await;
    let mut holder = sqlx::PgConnection::connect(&db.url).await.unwrap();
    let mut tx = holder.begin().await.unwrap();
    sqlx::query("LOCK TABLE webhook_outbox IN ACCESS EXCLUSIVE MODE").execute(&mut *tx).await.unwrap();
    let mut watch = sqlx::PgConnection::connect(&db.url).await.unwrap();
    let claim_waiting = "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() \
                         AND wait_event_type = 'Lock' AND query ILIKE '%webhook_outbox%' AND pid <> pg_backend_pid()";
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while sqlx::query_scalar::<_, i64>(claim_waiting).fetch_one(&mut watch).await.unwrap() == 0 {
        assert!(tokio::time::Instant::now() < deadline, "no claim ever waited on the lock");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // The endpoint answers now, and the lock is held past the send's 1 s timeout.
    hold.add_permits(1);
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    tx.rollback().await.unwrap();
    eventually("the delivery recorded", || async {
        let (_, w) = srv.get("/v1/webhooks/w", Some(&disp)).await;
        (w["deliveries"]["delivered"] == 1).then_some(())
    })
    .await;
    // Delivered at the first attempt: a timed-out one is sent again before it is delivered.
    assert!(rx.rx.try_recv().is_err(), "the event was sent again");
    drop(watch);
    srv.stop().await;
    rx.handle.stop(true).await;
    db.drop_db().await;
}
