//! Test harness: runs one test body against a fresh SQLite file or a fresh PostgreSQL database,
//! plus fixtures, a deadline poller and a cuttable TCP proxy for outage tests.
//!
//! PostgreSQL: the server at `HEXFLEET_TEST_PG_URL` (default
//! `postgres://postgres@127.0.0.1:5432/test`). Each test creates `hexfleet_t_<random>` and drops
//! it `WITH (FORCE)` at the end, even when the test panics. When the server is unreachable the
//! test fails if `CI=true`, otherwise it prints a note and passes.

#![allow(dead_code)]

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use geo::{Coord, LineString, MultiPolygon, Polygon};
use hexfleet_actors::domain::{
    AssignmentRecord, CourierId, CourierRecord, CourierStatus, DomainEvent, EntityKind, Fix, LatLng, Offer, Order,
    OrderId, OrderState, TenantId, Vehicle, ZoneId, ZoneRecord,
};
use hexfleet_persistence::{SqlStore, StoreOptions};
use sqlx::Connection;
use tokio::net::{TcpListener, TcpStream};

/// Generates `mod $name { sqlite(), postgres() }`, each running the async fn `$name(Ctx)`.
#[allow(unused_macros)]
macro_rules! both_backends {
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn sqlite() {
                crate::common::run(crate::common::Kind::Sqlite, super::$name).await;
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn postgres() {
                crate::common::run(crate::common::Kind::Postgres, super::$name).await;
            }
        }
    )*};
}

/// Which backend a test runs on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Sqlite,
    Postgres,
}

/// What a test body gets: the URL of its own empty database.
#[derive(Clone, Debug)]
pub struct Ctx {
    pub kind: Kind,
    pub url: String,
}

impl Ctx {
    /// Options that keep tests fast: short flush interval and timeouts.
    pub fn options(&self) -> StoreOptions {
        StoreOptions {
            snapshot_flush: Duration::from_millis(50),
            acquire_timeout: Duration::from_millis(800),
            statement_timeout: Duration::from_secs(3),
            ..StoreOptions::default()
        }
    }

    /// Opens a store on this test's database.
    pub async fn open(&self) -> SqlStore {
        SqlStore::open(&self.url, self.options()).await.expect("open store")
    }

    /// Runs raw SQL on the test database through a separate connection (fixtures only).
    pub async fn exec(&self, sql: &str) {
        match self.kind {
            Kind::Postgres => {
                let mut c = sqlx::PgConnection::connect(&self.url).await.expect("connect");
                sqlx::raw_sql(sqlx::AssertSqlSafe(sql.to_owned())).execute(&mut c).await.expect("exec");
            }
            Kind::Sqlite => {
                let mut c = sqlx::SqliteConnection::connect(&format!("sqlite:{}", self.url)).await.expect("connect");
                sqlx::raw_sql(sqlx::AssertSqlSafe(sql.to_owned())).execute(&mut c).await.expect("exec");
            }
        }
    }
}

/// The admin URL of the test PostgreSQL server.
pub fn pg_admin_url() -> String {
    std::env::var("HEXFLEET_TEST_PG_URL").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned())
}

/// `url` with its database name replaced.
fn with_database(url: &str, db: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (url, None),
    };
    let scheme_end = base.find("://").map_or(0, |i| i + 3);
    let host_part = match base[scheme_end..].find('/') {
        Some(i) => &base[..scheme_end + i],
        None => base,
    };
    match query {
        Some(q) => format!("{host_part}/{db}?{q}"),
        None => format!("{host_part}/{db}"),
    }
}

/// Host and port of a PostgreSQL URL (for the proxy).
pub fn pg_host_port(url: &str) -> String {
    let rest = &url[url.find("://").map_or(0, |i| i + 3)..];
    let rest = rest.split(['/', '?']).next().unwrap_or(rest);
    let hp = rest.rsplit_once('@').map_or(rest, |(_, hp)| hp);
    if hp.contains(':') { hp.to_owned() } else { format!("{hp}:5432") }
}

/// `url` pointing at `addr` instead of its host and port.
pub fn via(url: &str, addr: SocketAddr) -> String {
    url.replacen(&pg_host_port(url), &addr.to_string(), 1)
}

/// Runs `body` on a fresh database of `kind`, cleaning up afterwards (also on panic).
pub async fn run<F, Fut>(kind: Kind, body: F)
where
    F: FnOnce(Ctx) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    match kind {
        Kind::Sqlite => {
            let dir = tempfile::tempdir().expect("tempdir");
            let path = dir.path().join("hexfleet.db");
            let ctx = Ctx { kind, url: path.to_string_lossy().into_owned() };
            let res = tokio::spawn(body(ctx)).await;
            drop(dir);
            if let Err(e) = res {
                std::panic::resume_unwind(e.into_panic());
            }
        }
        Kind::Postgres => {
            let admin_url = pg_admin_url();
            let admin = tokio::time::timeout(Duration::from_secs(5), sqlx::PgConnection::connect(&admin_url)).await;
            let mut admin = match admin {
                Ok(Ok(c)) => c,
                Ok(Err(e)) => return pg_unreachable(&admin_url, &e.to_string()),
                Err(_) => return pg_unreachable(&admin_url, "connect timed out"),
            };
            let name = format!("hexfleet_t_{}", uuid::Uuid::new_v4().simple());
            sqlx::raw_sql(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
                .execute(&mut admin)
                .await
                .expect("create test database");
            let ctx = Ctx { kind, url: with_database(&admin_url, &name) };
            let res = tokio::spawn(body(ctx)).await;
            // The store under test may still hold connections: FORCE terminates them.
            let dropped = sqlx::raw_sql(sqlx::AssertSqlSafe(format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)")))
                .execute(&mut admin)
                .await;
            let _ = admin.close().await;
            if let Err(e) = res {
                std::panic::resume_unwind(e.into_panic());
            }
            dropped.expect("drop test database");
        }
    }
}

fn pg_unreachable(url: &str, why: &str) {
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("PostgreSQL at {url} is unreachable ({why}) and CI=true: storage tests must run against it");
    }
    eprintln!("note: PostgreSQL at {url} is unreachable ({why}); skipping this PostgreSQL test (set CI=true to fail)");
}

/// Polls `cond` every 20 ms until it holds or `within` passes; panics with `what` on timeout.
pub async fn eventually<F, Fut>(within: Duration, what: &str, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + within;
    loop {
        if cond().await {
            return;
        }
        assert!(Instant::now() < deadline, "timed out after {within:?} waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A TCP proxy in front of PostgreSQL that a test can cut (drop every connection, refuse new
/// ones), stall (a network partition: connections stay open but no byte gets through) and
/// restore, to simulate outages without touching the shared server.
pub struct Proxy {
    pub addr: SocketAddr,
    up: Arc<AtomicBool>,
    flowing: tokio::sync::watch::Sender<bool>,
    conns: Arc<parking_lot::Mutex<Vec<tokio::task::AbortHandle>>>,
    accept: tokio::task::JoinHandle<()>,
}

impl Proxy {
    pub async fn start(upstream: String) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let addr = listener.local_addr().expect("proxy addr");
        let up = Arc::new(AtomicBool::new(true));
        let (flowing, flow_rx) = tokio::sync::watch::channel(true);
        let conns: Arc<parking_lot::Mutex<Vec<tokio::task::AbortHandle>>> = Arc::default();
        let (up2, conns2) = (up.clone(), conns.clone());
        let accept = tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else { continue };
                if !up2.load(Ordering::SeqCst) {
                    drop(client); // refused: closed at once
                    continue;
                }
                let upstream = upstream.clone();
                let flow = flow_rx.clone();
                let task = tokio::spawn(async move {
                    let Ok(server) = TcpStream::connect(&upstream).await else { return };
                    let (cr, cw) = client.into_split();
                    let (sr, sw) = server.into_split();
                    tokio::join!(pump(cr, sw, flow.clone()), pump(sr, cw, flow));
                });
                let mut g = conns2.lock();
                g.retain(|h| !h.is_finished());
                g.push(task.abort_handle());
            }
        });
        Proxy { addr, up, flowing, conns, accept }
    }

    /// Drops every open connection and refuses new ones.
    pub fn cut(&self) {
        self.up.store(false, Ordering::SeqCst);
        for h in self.conns.lock().drain(..) {
            h.abort();
        }
    }

    /// Keeps every connection open but forwards nothing (new connections too).
    pub fn stall(&self) {
        self.flowing.send_replace(false);
    }

    /// Accepts and forwards again; stalled connections resume.
    pub fn restore(&self) {
        self.up.store(true, Ordering::SeqCst);
        self.flowing.send_replace(true);
    }
}

/// Copies one direction, holding bytes back while the proxy is stalled.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut flowing: tokio::sync::watch::Receiver<bool>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if flowing.wait_for(|f| *f).await.is_err() || to.write_all(&buf[..n]).await.is_err() {
            break;
        }
    }
    let _ = to.shutdown().await;
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.accept.abort();
        for h in self.conns.lock().drain(..) {
            h.abort();
        }
    }
}

// ---- fixtures ----

pub fn ll(lat: f64, lng: f64) -> LatLng {
    LatLng::new(lat, lng).expect("valid position")
}

/// An order with every optional field set.
pub fn full_order(tenant: &str, id: &str) -> Order {
    Order {
        tenant: TenantId::new(tenant),
        id: OrderId::new(id),
        pickup: ll(52.520_008_123_456_7, 13.404_954_987_654_3),
        dropoff: ll(52.5163, 13.3777),
        size: 3,
        ready_at: Some(1_700_000_001_000),
        deliver_by: Some(1_700_000_901_000),
        state: OrderState::Offered,
        courier: Some(CourierId::new("c-held")),
        offer: Some(Offer { courier: CourierId::new("c-offer"), expires_at: 1_700_000_020_000 }),
        declined: vec![CourierId::new("c-no-1"), CourierId::new("c-no-2")],
        assignment: Some(AssignmentRecord {
            at: 1_700_000_000_500,
            policy: "optimal".into(),
            courier: CourierId::new("c-offer"),
            cost_s: 123.456_789,
            candidates: vec![
                (CourierId::new("c-offer"), 123.456_789),
                (CourierId::new("c-2"), 0.1 + 0.2),
                (CourierId::new("c-far"), f64::INFINITY),
            ],
        }),
        created_at: 1_700_000_000_000,
        updated_at: 1_700_000_000_600,
        version: 2,
        released_at: Some(1_700_000_000_300),
    }
}

/// A minimal freshly created order.
pub fn new_order(tenant: &str, id: &str, created_at: i64) -> Order {
    Order {
        tenant: TenantId::new(tenant),
        id: OrderId::new(id),
        pickup: ll(45.5, -73.57),
        dropoff: ll(45.51, -73.56),
        size: 1,
        ready_at: None,
        deliver_by: None,
        state: OrderState::Created,
        courier: None,
        offer: None,
        declined: Vec::new(),
        assignment: None,
        created_at,
        updated_at: created_at,
        version: 0,
        released_at: None,
    }
}

pub fn courier(tenant: &str, id: &str, updated_at: i64, lat: f64) -> CourierRecord {
    CourierRecord {
        tenant: TenantId::new(tenant),
        id: CourierId::new(id),
        name: Some(format!("Courier {id}")),
        vehicle: Vehicle::Scooter,
        capacity: 4,
        device_id: Some(format!("dev-{id}")),
        status: CourierStatus::Available,
        on_shift: true,
        last_fix: Some(Fix { pos: ll(lat, 13.4), ts: updated_at, speed: Some(4.25), heading: Some(271.5), acc: Some(3.3) }),
        updated_at,
    }
}

pub fn event(tenant: &str, entity: EntityKind, id: &str, kind: &str, ts: i64) -> DomainEvent {
    DomainEvent {
        tenant: TenantId::new(tenant),
        entity,
        entity_id: id.to_owned(),
        kind: kind.to_owned(),
        actor: "dispatcher:d1".to_owned(),
        reason: Some("because".to_owned()),
        ts,
        attrs: vec![("z".into(), "1".into()), ("a".into(), "ü\"x".into())],
    }
}

fn ring(pts: &[(f64, f64)]) -> LineString<f64> {
    LineString::new(pts.iter().map(|&(x, y)| Coord { x, y }).collect())
}

/// Two polygons, the first with a hole; coordinates that do not survive a lossy float format.
pub fn zone(tenant: &str, id: &str) -> ZoneRecord {
    let outer = ring(&[(13.3, 52.4), (13.5 + 1e-12, 52.4), (13.5, 52.6), (13.3, 52.6), (13.3, 52.4)]);
    let hole = ring(&[(13.35, 52.45), (13.1 + 0.2 + 0.05, 52.55), (13.45, 52.55), (13.35, 52.45)]);
    let other = ring(&[(-73.6, 45.5), (-73.55, 45.5), (-73.55, 45.533_333_333_333_33), (-73.6, 45.5)]);
    ZoneRecord {
        tenant: TenantId::new(tenant),
        id: ZoneId::new(id),
        kind: "service_area".into(),
        name: Some("Mitte".into()),
        geometry: MultiPolygon(vec![Polygon::new(outer, vec![hole]), Polygon::new(other, vec![])]),
        updated_at: 1_700_000_000_000,
    }
}
