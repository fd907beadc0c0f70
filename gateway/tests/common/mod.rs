//! Test harness: a real server on 127.0.0.1:0, real WebSocket and HTTP clients, and waiting on
//! expected messages with deadlines (never sleep-and-hope).

#![allow(dead_code)]

use std::io::{BufRead as _, BufReader};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use futures_util::{SinkExt as _, StreamExt as _};
use hexfleet_gateway::auth::{Keys, Role};
use hexfleet_gateway::{Running, ServeConfig};
use serde_json::Value;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use tokio_util::sync::CancellationToken;

pub const SECRET: &str = "test-secret-0123456789-abcdefghij";
pub const DEADLINE: Duration = Duration::from_secs(15);

pub struct TestServer {
    pub running: Option<Running>,
    pub base: String,
    pub ws: String,
    /// `ws://` address of the courier ingest port (`--ingest-listen`), when it is on.
    pub ingest: Option<String>,
    pub keys: Keys,
    pub http: reqwest::Client,
}

/// A fleet configuration with fast dispatch for tests.
pub fn fast_config(db: &str) -> ServeConfig {
    let mut cfg = ServeConfig::new(db, SECRET);
    cfg.fleet.dispatch_tick = Duration::from_millis(50);
    cfg.fleet.index_rebuild = Duration::from_millis(20);
    cfg.fleet.offer_timeout_ms = 10_000;
    cfg.workers = Some(2);
    cfg.ingest_listen = Some("127.0.0.1:0".into());
    cfg
}

/// Which port a courier app connects to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Port {
    /// `/v1/ws/courier` on the HTTP port (actix-ws).
    Http,
    /// The ingest port (tokio-tungstenite on the raw stream).
    Ingest,
}

impl TestServer {
    pub async fn start(cfg: ServeConfig) -> TestServer {
        Self::start_on(cfg, TcpListener::bind("127.0.0.1:0").unwrap()).await
    }

    /// As [`TestServer::start`], on a listener bound beforehand (its address given to a proxy
    /// that other nodes reach it through).
    pub async fn start_on(cfg: ServeConfig, listener: TcpListener) -> TestServer {
        let running = hexfleet_gateway::start(cfg, listener, CancellationToken::new()).await.expect("server starts");
        let addr = running.addr;
        TestServer {
            ingest: running.ingest_addr.map(|a| format!("ws://{a}")),
            running: Some(running),
            base: format!("http://{addr}"),
            ws: format!("ws://{addr}"),
            keys: Keys::new(SECRET),
            http: reqwest::Client::new(),
        }
    }

    pub fn token(&self, role: Role, sub: &str, tenant: &str, order: Option<&str>) -> String {
        self.keys.mint(role, sub, tenant, order, Duration::from_secs(3600))
    }

    pub fn dispatcher(&self, tenant: &str) -> String {
        self.token(Role::Dispatcher, "disp", tenant, None)
    }

    pub async fn post(&self, path: &str, token: &str, body: Value) -> (u16, Value) {
        let r = self.http.post(format!("{}{path}", self.base)).bearer_auth(token).json(&body).send().await.unwrap();
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    pub async fn put(&self, path: &str, token: &str, body: Value) -> (u16, Value) {
        let r = self.http.put(format!("{}{path}", self.base)).bearer_auth(token).json(&body).send().await.unwrap();
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    pub async fn delete(&self, path: &str, token: &str) -> (u16, Value) {
        let r = self.http.delete(format!("{}{path}", self.base)).bearer_auth(token).send().await.unwrap();
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    pub async fn get(&self, path: &str, token: Option<&str>) -> (u16, Value) {
        let mut req = self.http.get(format!("{}{path}", self.base));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        let r = req.send().await.unwrap();
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    pub async fn ws(&self, path: &str, token: &str) -> Ws {
        let sep = if path.contains('?') { '&' } else { '?' };
        let url = format!("{}{path}{sep}token={token}", self.ws);
        let (s, _) = tokio_tungstenite::connect_async(url).await.expect("websocket connects");
        Ws { s }
    }

    /// A courier app's socket on `port`.
    pub async fn courier(&self, port: Port, token: &str) -> Ws {
        let base = match port {
            Port::Http => self.ws.as_str(),
            Port::Ingest => self.ingest.as_deref().expect("the ingest port is on"),
        };
        let (s, _) = tokio_tungstenite::connect_async(format!("{base}/v1/ws/courier?token={token}")).await.expect("websocket connects");
        Ws { s }
    }

    /// Waits until this server shows courier `id` at latitude `lat`.
    pub async fn courier_at(&self, token: &str, id: &str, lat: f64) {
        eventually(&format!("{id} at {lat} on {}", self.base), || async {
            let (_, c) = self.get(&format!("/v1/couriers/{id}"), Some(token)).await;
            (c["position"]["lat"].as_f64() == Some(lat)).then_some(())
        })
        .await;
    }

    pub async fn stop(&mut self) {
        if let Some(r) = self.running.take() {
            r.stop().await.expect("clean shutdown");
        }
    }
}

pub struct Ws {
    pub s: WebSocketStream<MaybeTlsStream<TcpStream>>,
}

impl Ws {
    pub async fn send(&mut self, v: Value) {
        self.s.send(Message::Text(v.to_string().into())).await.unwrap();
    }

    pub async fn send_raw(&mut self, text: &str) {
        self.s.send(Message::Text(text.into())).await.unwrap();
    }

    /// Waits for the first JSON message matching `pred`, skipping others; panics at the deadline.
    pub async fn expect(&mut self, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        match self.try_expect(pred).await {
            Ok(v) => v,
            Err(e) => panic!("did not receive {what} within {DEADLINE:?}: {e}"),
        }
    }

    pub async fn try_expect(&mut self, pred: impl Fn(&Value) -> bool) -> Result<Value, String> {
        let fut = async {
            loop {
                match self.s.next().await {
                    Some(Ok(Message::Text(t))) => {
                        let v: Value = serde_json::from_str(&t).map_err(|e| format!("bad json {t}: {e}"))?;
                        if pred(&v) {
                            return Ok(v);
                        }
                    }
                    Some(Ok(Message::Close(c))) => return Err(format!("closed: {c:?}")),
                    Some(Ok(_)) => {}
                    Some(Err(e)) => return Err(format!("error: {e}")),
                    None => return Err("stream ended".into()),
                }
            }
        };
        tokio::time::timeout(DEADLINE, fut).await.map_err(|_| "timeout".to_string())?
    }

    /// Waits for the server to close the socket; returns the close frame.
    /// Reads for `dur` as a client that is there (tungstenite answers each ping while it
    /// reads) and returns how many pings came; a close or the end of the socket fails `what`.
    pub async fn read_answering_pings(&mut self, what: &str, dur: Duration) -> usize {
        let (mut pings, until) = (0, tokio::time::Instant::now() + dur);
        loop {
            match tokio::time::timeout_at(until, self.s.next()).await {
                Err(_) => return pings,
                Ok(Some(Ok(Message::Ping(_)))) => pings += 1,
                Ok(Some(Ok(Message::Close(c)))) => panic!("{what}: closed while it answered pings: {c:?}"),
                Ok(Some(Ok(_))) => {}
                Ok(other) => panic!("{what}: the socket ended: {other:?}"),
            }
        }
    }

    pub async fn expect_close(&mut self) -> Option<tokio_tungstenite::tungstenite::protocol::CloseFrame> {
        let fut = async {
            loop {
                match self.s.next().await {
                    Some(Ok(Message::Close(c))) => return c,
                    Some(Ok(_)) => {}
                    Some(Err(_)) | None => return None,
                }
            }
        };
        tokio::time::timeout(DEADLINE, fut).await.expect("server closes the socket in time")
    }
}

pub fn t(v: &Value) -> &str {
    v["t"].as_str().unwrap_or("")
}

pub fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as i64
}

/// Polls `f` until it returns `Some`, or panics at the deadline.
pub async fn eventually<T, F, Fut>(what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let start = std::time::Instant::now();
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(start.elapsed() < DEADLINE, "{what} did not happen within {DEADLINE:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Subscribers of a channel in the test Redis (`PUBSUB NUMSUB`).
pub async fn subscribers(url: &str, channel: &str) -> i64 {
    let mut c = redis::Client::open(url).unwrap().get_multiplexed_async_connection().await.unwrap();
    let (_, n): (String, i64) = redis::cmd("PUBSUB").arg("NUMSUB").arg(channel).query_async(&mut c).await.unwrap();
    n
}

/// The test Redis (`HEXFLEET_TEST_REDIS_URL`, default 127.0.0.1:6379). `None` (with a note) when
/// it is unreachable and CI is not set; a panic when `CI=true`.
pub async fn redis_or_skip() -> Option<String> {
    let url = std::env::var("HEXFLEET_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    let reachable = async { redis::Client::open(url.as_str())?.get_multiplexed_async_connection().await.map(|_| ()) };
    if let Err(e) = reachable.await {
        assert!(!std::env::var("CI").is_ok_and(|v| v == "true"), "Redis at {url} is unreachable and CI=true: {e}");
        eprintln!("NOTE: skipping the Redis test, {url} unreachable: {e}");
        return None;
    }
    Some(url)
}

/// A fresh PostgreSQL database for one test, dropped by [`PgDb::drop_db`]. `None` (with a note)
/// when PostgreSQL is unreachable and CI is not set; a panic when `CI=true`.
pub struct PgDb {
    pub url: String,
    admin: String,
    name: String,
}

impl PgDb {
    pub async fn create() -> Option<PgDb> {
        use sqlx::Connection as _;
        let admin = std::env::var("HEXFLEET_TEST_PG_URL").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into());
        let mut conn = match sqlx::PgConnection::connect(&admin).await {
            Ok(c) => c,
            Err(e) => {
                if std::env::var("CI").is_ok_and(|v| v == "true") {
                    panic!("PostgreSQL at {admin} is unreachable and CI=true: {e}");
                }
                eprintln!("NOTE: skipping PostgreSQL test, {admin} unreachable: {e}");
                return None;
            }
        };
        let name = format!("hexfleet_gw_{}", uuid_like());
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}"))).execute(&mut conn).await.unwrap();
        let base = admin.rsplit_once('/').map(|(b, _)| b.to_owned()).unwrap();
        Some(PgDb { url: format!("{base}/{name}"), admin, name })
    }

    pub async fn drop_db(self) {
        use sqlx::Connection as _;
        if let Ok(mut c) = sqlx::PgConnection::connect(&self.admin).await {
            let _ = sqlx::query(sqlx::AssertSqlSafe(format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name))).execute(&mut c).await;
        }
    }
}

pub fn uuid_like() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    format!("{}_{}_{}", std::process::id(), now_ms(), N.fetch_add(1, Ordering::Relaxed))
}

/// The `hexfleet serve` binary on a random port; its stderr is drained by a thread.
pub struct Proc {
    pub child: Child,
    pub base: String,
}

impl Proc {
    pub fn spawn(db: &str) -> Proc {
        Self::spawn_with(db, &[])
    }

    pub fn spawn_with(db: &str, env: &[(&str, &str)]) -> Proc {
        let mut child = Command::new(env!("CARGO_BIN_EXE_hexfleet"))
            .arg("serve")
            .env_clear()
            .envs(env.iter().copied())
            .env("DATABASE_URL", db)
            .env("HEXFLEET_LISTEN", "127.0.0.1:0")
            .env("HEXFLEET_JWT_SECRET", SECRET)
            .env("HEXFLEET_WORKERS", "2")
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn hexfleet serve");
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel::<String>();
        std::thread::spawn(move || {
            let mut tx = Some(tx);
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if let Some(addr) = line.strip_prefix("hexfleet listening on ") {
                    if let Some(tx) = tx.take() {
                        let _ = tx.send(addr.trim().to_owned());
                    }
                } else if !line.trim().is_empty() {
                    eprintln!("[hexfleet] {line}");
                }
            }
        });
        let base = rx.recv_timeout(Duration::from_secs(30)).expect("hexfleet serve prints its address");
        Proc { child, base }
    }

    /// SIGKILL: no shutdown path, no flush.
    pub fn kill9(&mut self) {
        self.child.kill().expect("SIGKILL");
        self.child.wait().unwrap();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A TCP proxy in front of PostgreSQL that the test cuts (drops every connection and refuses
/// new ones) or stalls (holds every connection open and moves no byte: a network that drops
/// packets), and restores; the shared server is never touched.
pub struct Proxy {
    pub addr: SocketAddr,
    up: Arc<AtomicBool>,
    stalled: tokio::sync::watch::Sender<bool>,
    /// Bumped by [`Proxy::strand`]: connections opened before stop passing bytes for good.
    stranded: tokio::sync::watch::Sender<u64>,
    conns: Arc<parking_lot::Mutex<Vec<tokio::task::AbortHandle>>>,
    accept: tokio::task::JoinHandle<()>,
}

impl Proxy {
    pub async fn start(upstream: String) -> Proxy {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let up = Arc::new(AtomicBool::new(true));
        let conns: Arc<parking_lot::Mutex<Vec<tokio::task::AbortHandle>>> = Arc::default();
        let (up2, conns2) = (up.clone(), conns.clone());
        let (stalled, stall_rx) = tokio::sync::watch::channel(false);
        let (stranded, strand_rx) = tokio::sync::watch::channel(0u64);
        let accept = tokio::spawn(async move {
            loop {
                let Ok((mut client, _)) = listener.accept().await else { continue };
                if !up2.load(Ordering::SeqCst) {
                    drop(client);
                    continue;
                }
                let upstream = upstream.clone();
                let mut stall = stall_rx.clone();
                let mut strand = strand_rx.clone();
                let born = *strand.borrow();
                let task = tokio::spawn(async move {
                    let Ok(mut server) = TcpStream::connect(&upstream).await else { return };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                        // Both sockets stay open, silent, until the stall ends; then they close.
                        _ = async { stall.wait_for(|s| *s).await.map(|_| ()) } => {
                            let _ = stall.wait_for(|s| !*s).await.map(|_| ());
                        }
                        // Both sockets stay open, silent, until the proxy is dropped.
                        _ = async { strand.wait_for(|e| *e > born).await.map(|_| ()) } => {
                            std::future::pending::<()>().await;
                        }
                    }
                });
                let mut g = conns2.lock();
                g.retain(|h| !h.is_finished());
                g.push(task.abort_handle());
            }
        });
        Proxy { addr, up, stalled, stranded, conns, accept }
    }

    /// A proxy in front of the server of the PostgreSQL `url`, and `url` through it.
    pub async fn in_front_of(url: &str) -> (Proxy, String) {
        let hp = pg_host_port(url);
        let proxy = Proxy::start(hp.clone()).await;
        let via = url.replacen(&hp, &proxy.addr.to_string(), 1);
        assert_ne!(via, url, "the server must go through the proxy");
        (proxy, via)
    }

    pub fn cut(&self) {
        self.up.store(false, Ordering::SeqCst);
        for h in self.conns.lock().drain(..) {
            h.abort();
        }
    }

    /// Holds every connection, new ones too, open without passing a byte.
    pub fn stall(&self) {
        self.stalled.send_replace(true);
    }

    /// Holds the connections open now, silent, for good (a NAT that forgot them, an address a
    /// failover left behind); new connections pass as before.
    pub fn strand(&self) {
        self.stranded.send_modify(|e| *e += 1);
    }

    /// Ends a cut or a stall (stalled connections close).
    pub fn restore(&self) {
        self.stalled.send_replace(false);
        self.up.store(true, Ordering::SeqCst);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.accept.abort();
        for h in self.conns.lock().drain(..) {
            h.abort();
        }
    }
}

/// Host and port of a PostgreSQL URL (`postgres://user@host:port/db`).
pub fn pg_host_port(url: &str) -> String {
    let rest = &url[url.find("://").map_or(0, |i| i + 3)..];
    let rest = rest.split(['/', '?']).next().unwrap_or(rest);
    let hp = rest.rsplit_once('@').map_or(rest, |(_, hp)| hp);
    if hp.contains(':') { hp.to_owned() } else { format!("{hp}:5432") }
}
