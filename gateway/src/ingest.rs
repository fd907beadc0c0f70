//! The courier ingest port (`--ingest-listen`): `/v1/ws/courier` served by tokio-tungstenite
//! straight on the TCP stream, on the actors' runtime.
//!
//! Same protocol, tokens, limits and session logic as the courier socket on the HTTP port
//! ([`crate::ws::courier_session`]); only the transport differs. On the HTTP port each frame goes
//! through actix's h1 dispatcher, its payload channel and actix-ws before the session sees it,
//! and the session then wakes the courier's actor on another runtime. Here a frame is read and
//! decoded by the session task itself, on the runtime where the actor runs, so the wake-up
//! usually stays on the same thread. It is meant for fleets whose GPS rate makes that
//! difference matter (BENCHMARKS.md, issue 6); the HTTP port keeps serving couriers too.
//!
//! The handshake is read here (httparse, as tungstenite does) so that authentication, the
//! courier's registration and, with several nodes, the market's owner are settled before the
//! upgrade: a refused socket gets a plain HTTP error with the API's JSON body. A courier whose
//! market another node owns is relayed to that node's HTTP port, as the HTTP port does.
//!
//! Connections are capped ([`Limits`]): in all, so courier sockets never take the file
//! descriptors the database, Redis and the HTTP port need (the default cap leaves
//! [`FD_RESERVE`] of the process's limit free), and optionally per client address. A connection
//! over a cap is answered at once, before its head is read: 503 `over_capacity` or 429
//! `too_many_connections`, both with `Retry-After`. Apps reconnect with backoff, which spreads a
//! reconnect storm out instead of letting it exhaust the process.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use actix_web::http::StatusCode;
use actix_web::web;
use actix_ws::{CloseCode, CloseReason};
use futures_util::{SinkExt as _, StreamExt as _};
use hexfleet_actors::domain::CourierId;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::{self as tg, Message, protocol::Role};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::auth::Role as TokenRole;
use crate::error::ApiError;
use crate::server::AppState;
use crate::ws::{CourierSocket, MAX_FRAME, Next, Read, SocketTimes};

/// The only path served here.
pub const PATH: &str = "/v1/ws/courier";
/// Largest request head accepted (request line and headers).
const MAX_HEAD: usize = 8 * 1024;
/// A client must finish its handshake within this.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// File descriptors the default connection cap leaves to the rest of the process.
pub const FD_RESERVE: usize = 256;
/// Refusals answered at the same time at most: each holds its socket for up to a second (see
/// [`linger`]); past this, connections over a cap are closed without an answer.
const MAX_REFUSING: usize = 128;
/// What a refused client is told to wait before reconnecting.
const RETRY_AFTER_S: u32 = 5;

/// Connection caps of the ingest port.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Limits {
    /// Open connections at most, handshakes included. `None`: the process's file descriptor
    /// limit less [`FD_RESERVE`].
    pub max_connections: Option<usize>,
    /// Open connections per client address at most (an IPv6 client counts by its /64, the
    /// block one host is usually given); `None`: no such cap (couriers behind a carrier's NAT
    /// share addresses).
    pub max_per_ip: Option<usize>,
}

/// What the per-address cap counts by: an IPv4 address (also when mapped into IPv6), or the
/// /64 of an IPv6 address.
fn client_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(std::net::Ipv6Addr::from(u128::from(v6) & !((1u128 << 64) - 1))),
        },
        v4 => v4,
    }
}

impl Limits {
    /// The cap on all connections in effect.
    pub fn max_connections(&self) -> usize {
        self.max_connections.unwrap_or_else(|| {
            let fds = rlimit::getrlimit(rlimit::Resource::NOFILE).map_or(1024, |(soft, _)| soft);
            usize::try_from(fds).unwrap_or(usize::MAX).saturating_sub(FD_RESERVE).max(1)
        })
    }
}

/// Open connections, in all and per address.
struct Gate {
    max: usize,
    max_per_ip: Option<usize>,
    open: AtomicUsize,
    per_ip: parking_lot::Mutex<HashMap<IpAddr, usize>>,
    refusing: AtomicUsize,
}

/// Why a connection was not let in.
#[derive(Clone, Copy, Debug)]
enum Over {
    All,
    Address,
}

impl Gate {
    fn admit(self: &Arc<Self>, ip: IpAddr) -> Result<Admitted, Over> {
        if self.open.fetch_add(1, Ordering::AcqRel) >= self.max {
            self.open.fetch_sub(1, Ordering::AcqRel);
            return Err(Over::All);
        }
        if let Some(cap) = self.max_per_ip {
            let mut per_ip = self.per_ip.lock();
            let n = per_ip.entry(ip).or_insert(0);
            if *n >= cap {
                drop(per_ip);
                self.open.fetch_sub(1, Ordering::AcqRel);
                return Err(Over::Address);
            }
            *n += 1;
        }
        metrics::gauge!("hexfleet_ingest_connections").increment(1.0);
        Ok(Admitted { gate: self.clone(), ip })
    }
}

/// One admitted connection; frees its place when dropped.
struct Admitted {
    gate: Arc<Gate>,
    ip: IpAddr,
}

impl Drop for Admitted {
    fn drop(&mut self) {
        if self.gate.max_per_ip.is_some() {
            let mut per_ip = self.gate.per_ip.lock();
            if let Some(n) = per_ip.get_mut(&self.ip) {
                *n -= 1;
                if *n == 0 {
                    per_ip.remove(&self.ip);
                }
            }
        }
        self.gate.open.fetch_sub(1, Ordering::AcqRel);
        metrics::gauge!("hexfleet_ingest_connections").decrement(1.0);
    }
}

/// Accepts courier sockets on `listener` until `stop` is cancelled; each connection is one task
/// on `tracker` (the caller waits on it at shutdown).
pub async fn serve(listener: TcpListener, st: web::Data<AppState>, limits: Limits, stop: CancellationToken, tracker: TaskTracker) {
    let gate = Arc::new(Gate {
        max: limits.max_connections(),
        max_per_ip: limits.max_per_ip,
        open: AtomicUsize::new(0),
        per_ip: parking_lot::Mutex::default(),
        refusing: AtomicUsize::new(0),
    });
    tracing::info!(max_connections = gate.max, max_per_ip = ?gate.max_per_ip, "ingest: connection caps");
    loop {
        let accepted = tokio::select! {
            () = stop.cancelled() => break,
            a = listener.accept() => a,
        };
        match accepted {
            Ok((tcp, peer)) => match gate.admit(client_key(peer.ip())) {
                Ok(slot) => {
                    tracker.spawn(connection(tcp, st.clone(), slot));
                }
                Err(over) => over_cap(tcp, over, &gate, &tracker),
            },
            Err(e) => {
                // Out of file descriptors, mostly: back off instead of spinning.
                tracing::warn!(error = %e, "ingest: accept failed");
                metrics::counter!("hexfleet_ingest_accept_errors_total").increment(1);
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// The parts of a request head the handshake needs.
struct Head {
    query: String,
    authorization: Option<String>,
    key: Vec<u8>,
    /// Bytes read past the head (the client's first frames, if it did not wait for the 101).
    rest: Vec<u8>,
}

/// Answers a connection over a cap (503 or 429 with `Retry-After`), unless too many refusals are
/// under way already: then it is closed at once.
fn over_cap(mut tcp: TcpStream, over: Over, gate: &Arc<Gate>, tracker: &TaskTracker) {
    let (e, reason) = match over {
        Over::All => (ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "over_capacity", format!("this node serves {} courier connections at most; retry later", gate.max)), "capacity"),
        Over::Address => (ApiError::new(StatusCode::TOO_MANY_REQUESTS, "too_many_connections", "too many connections from this address; retry later"), "per_ip"),
    };
    if gate.refusing.fetch_add(1, Ordering::AcqRel) >= MAX_REFUSING {
        gate.refusing.fetch_sub(1, Ordering::AcqRel);
        metrics::counter!("hexfleet_ingest_refused_total", "reason" => "shed").increment(1);
        return;
    }
    metrics::counter!("hexfleet_ingest_refused_total", "reason" => reason).increment(1);
    let gate = gate.clone();
    tracker.spawn(async move {
        let retry = format!("retry-after: {RETRY_AFTER_S}\r\n");
        answer_with(&mut tcp, e.status, &retry, e.to_json().as_bytes()).await;
        gate.refusing.fetch_sub(1, Ordering::AcqRel);
    });
}

async fn connection(mut tcp: TcpStream, st: web::Data<AppState>, _slot: Admitted) {
    let _ = tcp.set_nodelay(true);
    let head = match tokio::time::timeout(HANDSHAKE_TIMEOUT, read_head(&mut tcp)).await {
        Ok(Ok(h)) => h,
        Ok(Err(e)) => return refuse(&mut tcp, &e).await,
        Err(_) => return,
    };
    let token = crate::auth::token_of_parts(head.authorization.as_deref(), &head.query);
    let auth = match crate::auth::authenticate_token(&st.keys, token.as_deref()).and_then(|a| a.require(&[TokenRole::Courier]).map(|()| a)) {
        Ok(a) => a,
        Err(e) => return refuse(&mut tcp, &e).await,
    };
    if let Some(markets) = st.markets.clone() {
        // Nodes forward to each other's HTTP port, never here: nothing arrives forwarded.
        match markets.route_request(&auth.tenant, false).await {
            Ok(crate::markets::Route::Local) => {}
            Ok(crate::markets::Route::Remote(owner)) => {
                metrics::counter!("hexfleet_market_forwarded_total").increment(1);
                return relay(tcp, head, &owner, &markets, st.sockets, &st.shutdown).await;
            }
            Err(e) => return refuse(&mut tcp, &e).await,
        }
    }
    let tap = match crate::ws::courier_tap(&st, &auth).await {
        Ok(t) => t,
        Err(e) => return refuse(&mut tcp, &e).await,
    };
    let Some(ws) = upgrade(tcp, head).await else { return };
    let id = CourierId::new(&auth.claims.sub);
    let times = st.sockets;
    let expires = auth.claims.session_deadline();
    crate::ws::courier_session(st, auth.tenant, id, tap, TungsteniteSocket { ws, times, idle: times.courier_idle() }, expires).await;
}

/// Reads and checks the request head: `GET /v1/ws/courier` asking for a WebSocket.
async fn read_head(tcp: &mut TcpStream) -> Result<Head, ApiError> {
    let mut buf = Vec::with_capacity(1024);
    loop {
        let mut chunk = [0u8; 1024];
        let n = tcp.read(&mut chunk).await.map_err(|e| ApiError::bad_request("bad_request", e.to_string()))?;
        if n == 0 {
            return Err(ApiError::bad_request("bad_request", "connection closed during the handshake"));
        }
        buf.extend_from_slice(&chunk[..n]);
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut req = httparse::Request::new(&mut headers);
        match req.parse(&buf) {
            Ok(httparse::Status::Complete(len)) => return parse_head(&req, buf[len..].to_vec()),
            Ok(httparse::Status::Partial) if buf.len() < MAX_HEAD => {}
            Ok(httparse::Status::Partial) => {
                return Err(ApiError::new(StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE, "head_too_large", format!("request head larger than {MAX_HEAD} bytes")));
            }
            Err(e) => return Err(ApiError::bad_request("bad_request", format!("malformed request: {e}"))),
        }
    }
}

fn parse_head(req: &httparse::Request<'_, '_>, rest: Vec<u8>) -> Result<Head, ApiError> {
    let target = req.path.unwrap_or("/");
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    if path != PATH {
        return Err(ApiError::not_found(format!("the ingest port serves {PATH} only")));
    }
    if req.method != Some("GET") {
        return Err(ApiError::new(StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed", "use GET"));
    }
    let header = |name: &str| req.headers.iter().find(|h| h.name.eq_ignore_ascii_case(name)).and_then(|h| std::str::from_utf8(h.value).ok());
    let has_token = |name: &str, token: &str| header(name).is_some_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)));
    if !has_token("upgrade", "websocket") || !has_token("connection", "upgrade") {
        return Err(ApiError::bad_request("not_websocket", "expected a WebSocket upgrade"));
    }
    if header("sec-websocket-version") != Some("13") {
        return Err(ApiError::bad_request("not_websocket", "Sec-WebSocket-Version must be 13"));
    }
    let key = header("sec-websocket-key").filter(|k| !k.is_empty()).ok_or_else(|| ApiError::bad_request("not_websocket", "Sec-WebSocket-Key is missing"))?;
    Ok(Head {
        query: query.to_owned(),
        authorization: header("authorization").map(str::to_owned),
        key: key.as_bytes().to_vec(),
        rest,
    })
}

/// Answers a refused handshake with the API's JSON error, then closes.
async fn refuse(tcp: &mut TcpStream, e: &ApiError) {
    answer(tcp, e.status, e.to_json().as_bytes()).await;
}

/// Writes a plain HTTP answer (JSON `body`) and closes.
async fn answer(tcp: &mut TcpStream, status: StatusCode, body: &[u8]) {
    answer_with(tcp, status, "", body).await;
}

/// [`answer`] with extra header lines (each ending in CRLF).
async fn answer_with(tcp: &mut TcpStream, status: StatusCode, extra: &str, body: &[u8]) {
    let head = format!(
        "HTTP/1.1 {} {}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n{extra}\r\n",
        status.as_u16(),
        status.canonical_reason().unwrap_or(""),
        body.len()
    );
    // One write: a client that reads only what has arrived with the head (tungstenite does,
    // for a refused upgrade) must get the body in the same segment.
    let mut answer = head.into_bytes();
    answer.extend_from_slice(body);
    let _ = tcp.write_all(&answer).await;
    linger(tcp).await;
}

/// Ends a refused connection: no more writes, then what the client is still sending is read and
/// dropped for a moment, so the kernel does not reset the connection (and lose the answer)
/// because of unread data.
async fn linger(tcp: &mut TcpStream) {
    let _ = tcp.shutdown().await;
    let drain = async {
        let mut sink = [0u8; 4096];
        let mut total = 0usize;
        while let Ok(n) = tcp.read(&mut sink).await {
            total += n;
            if n == 0 || total > 256 * 1024 {
                break;
            }
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(1), drain).await;
}

fn ws_config() -> tg::protocol::WebSocketConfig {
    // A courier sends small frames: a 2 KiB read buffer (it grows for a larger frame) keeps a
    // socket's memory low; writes go out at once (the outbox is the queue).
    tg::protocol::WebSocketConfig::default()
        .read_buffer_size(2 * 1024)
        .write_buffer_size(0)
        .max_write_buffer_size(256 * 1024)
        .max_frame_size(Some(MAX_FRAME))
        .max_message_size(Some(MAX_FRAME))
}

/// Completes the handshake (101) and wraps the stream.
async fn upgrade(mut tcp: TcpStream, head: Head) -> Option<WebSocketStream<TcpStream>> {
    let accept = tg::handshake::derive_accept_key(&head.key);
    let resp = format!("HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: Upgrade\r\nsec-websocket-accept: {accept}\r\n\r\n");
    tcp.write_all(resp.as_bytes()).await.ok()?;
    Some(WebSocketStream::from_partially_read(tcp, head.rest, Role::Server, Some(ws_config())).await)
}

/// A courier socket read by tokio-tungstenite.
struct TungsteniteSocket {
    ws: WebSocketStream<TcpStream>,
    times: SocketTimes,
    idle: crate::ws::IdleDeadline,
}

impl CourierSocket for TungsteniteSocket {
    type Text = tg::Utf8Bytes;

    async fn send(&mut self, text: String) -> bool {
        // A client that stopped reading is not waited for (see `ws::Peer`).
        match tokio::time::timeout(self.times.write, self.ws.send(Message::text(text))).await {
            Ok(sent) => sent.is_ok(),
            Err(_) => {
                metrics::counter!("hexfleet_ws_write_timeouts_total").increment(1);
                false
            }
        }
    }

    async fn recv(&mut self) -> Read<Self::Text> {
        let m = match self.idle.next(&mut self.ws).await {
            Next::Lapsed => return Read::Fatal(reason(CloseCode::Normal, "idle timeout")),
            Next::Ping => {
                let sent = crate::markets::send_within(&mut self.ws, Message::Ping(Default::default()), self.times.write).await;
                return if sent { Read::Other } else { Read::Closed };
            }
            Next::Item(m) => m,
        };
        match m {
            None | Some(Ok(Message::Close(_))) => Read::Closed,
            Some(Ok(Message::Text(t))) => Read::Text(t),
            // tungstenite queues the pong itself; it goes out with the next write or read.
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => Read::Control,
            Some(Ok(Message::Frame(_))) => Read::Other,
            Some(Ok(Message::Binary(_))) => Read::Text(tg::Utf8Bytes::default()),
            Some(Err(tg::Error::ConnectionClosed | tg::Error::AlreadyClosed | tg::Error::Io(_))) => Read::Closed,
            Some(Err(e)) => {
                metrics::counter!("hexfleet_ws_protocol_errors_total").increment(1);
                match e {
                    tg::Error::Capacity(_) => Read::Fatal(reason(CloseCode::Size, format!("frame larger than {MAX_FRAME} bytes"))),
                    tg::Error::Utf8(_) => Read::Fatal(reason(CloseCode::Invalid, "text frame is not UTF-8")),
                    other => Read::Fatal(reason(CloseCode::Protocol, other.to_string())),
                }
            }
        }
    }

    async fn close(mut self, reason: Option<CloseReason>) {
        let frame = reason.map(|r| tg::protocol::CloseFrame { code: u16::from(r.code).into(), reason: r.description.unwrap_or_default().into() });
        let handshake = async {
            let _ = self.ws.close(frame).await;
            // Then read until the client's close reply (or the end): a socket closed with
            // unread data (a client still flooding, a frame too large) is reset, and the client
            // would lose what it had not read yet, the close frame and error frames included.
            while let Some(Ok(_)) = self.ws.next().await {}
        };
        let _ = tokio::time::timeout(Duration::from_secs(5), handshake).await;
    }
}

fn reason(code: CloseCode, why: impl Into<String>) -> CloseReason {
    CloseReason { code, description: Some(why.into()) }
}

/// Relays a courier whose market another node owns to that node's HTTP port: the owner answers
/// the handshake (its refusal reaches the client as is), then frames are copied both ways.
async fn relay(mut tcp: TcpStream, head: Head, owner: &str, markets: &crate::markets::Markets, times: SocketTimes, shutdown: &CancellationToken) {
    use crate::markets::{OWNER_GONE, ping_owner, send_within};
    use crate::ws::{Beat, Liveness};
    let path_and_query = if head.query.is_empty() { PATH.to_owned() } else { format!("{PATH}?{}", head.query) };
    let upstream = match crate::markets::connect_owner_ws(owner, &path_and_query, head.authorization.as_deref(), markets).await {
        Ok(u) => u,
        Err(crate::markets::OwnerRefused::Http(status, body)) => return answer(&mut tcp, status, &body).await,
        Err(crate::markets::OwnerRefused::Error(e)) => return refuse(&mut tcp, &e).await,
    };
    let Some(client) = upgrade(tcp, head).await else { return };
    let (mut up_tx, mut up_rx) = upstream.split();
    let (mut tx, mut rx) = client.split();
    let mut alive = Liveness::new(times);
    // The app's own idle time, as the owner's session would keep it: the owner cannot see it,
    // since this relay's pings reach it whether the app is there or not. Without it, an app
    // gone without closing (a phone off the network) was held on both nodes until its token
    // expired.
    // Pinged when quiet, as on the owner: a parked app may send less often than the idle time.
    let mut client = times.courier_idle();
    // Every write waits at most the write timeout, as on the owner's own sockets.
    let close = |code: tg::protocol::frame::coding::CloseCode, why: &str| {
        Message::Close(Some(tg::protocol::CloseFrame { code, reason: why.to_owned().into() }))
    };
    let again = tg::protocol::frame::coding::CloseCode::Again;
    let to_client = loop {
        let more = tokio::select! {
            () = shutdown.cancelled() => {
                send_within(&mut up_tx, Message::Close(None), times.write).await;
                break Some(close(tg::protocol::frame::coding::CloseCode::Away, "server shutting down"));
            }
            beat = alive.beat() => match beat {
                Beat::Dead => {
                    tracing::warn!(?times.idle, "no answer from the market's owner; closing the relayed courier socket");
                    break Some(close(again, OWNER_GONE));
                }
                Beat::Ping => {
                    if !ping_owner(&mut up_tx, times.write).await {
                        break Some(close(again, OWNER_GONE));
                    }
                    true
                }
            },
            wake = client.wake() => match wake {
                crate::ws::Wake::Lapsed => {
                    send_within(&mut up_tx, Message::Close(None), times.write).await;
                    break Some(close(tg::protocol::frame::coding::CloseCode::Normal, "idle timeout"));
                }
                crate::ws::Wake::Ping => send_within(&mut tx, Message::Ping(Default::default()), times.write).await,
            },
            // Pings travel to the owner too (they keep the session alive there).
            m = rx.next() => {
                if matches!(m, Some(Ok(_))) {
                    client.heard();
                }
                pass(m, &mut up_tx, times.write).await
            }
            m = up_rx.next() => {
                if matches!(m, Some(Ok(_))) {
                    alive.heard();
                }
                match m {
                    // tungstenite has already answered the client's ping here: the owner's
                    // pongs (and those to the relay's own pings) are dropped.
                    Some(Ok(Message::Pong(_))) => true,
                    Some(Ok(m)) => pass(Some(Ok(m)), &mut tx, times.write).await,
                    // The owner went away: the app reconnects (1013), possibly to its successor.
                    _ => break Some(close(again, OWNER_GONE)),
                }
            },
        };
        if !more {
            break None;
        }
    };
    match to_client {
        Some(m) => {
            send_within(&mut tx, m, times.write).await;
        }
        // A close passed on, or a side gone. A client that closed first gets tungstenite's
        // reply to its close, which only goes out with a flush.
        None => {
            let _ = tokio::time::timeout(times.write, futures_util::SinkExt::close(&mut tx)).await;
        }
    }
}

/// Passes one relayed message on within `write`; `false` once either side closed or failed
/// (the other is then sent a close).
async fn pass<S>(m: Option<Result<Message, tg::Error>>, to: &mut S, write: Duration) -> bool
where
    S: futures_util::Sink<Message> + Unpin,
{
    match m {
        Some(Ok(m)) => {
            let close = m.is_close();
            crate::markets::send_within(to, m, write).await && !close
        }
        _ => {
            crate::markets::send_within(to, Message::Close(None), write).await;
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_per_address_cap_counts_ipv6_clients_by_their_64() {
        let key = |s: &str| client_key(s.parse().unwrap()).to_string();
        assert_eq!(key("203.0.113.7"), "203.0.113.7");
        assert_eq!(key("::ffff:203.0.113.7"), "203.0.113.7");
        assert_eq!(key("2001:db8:1:2:aaaa:bbbb:cccc:dddd"), "2001:db8:1:2::");
        assert_eq!(key("2001:db8:1:2::1"), key("2001:db8:1:2:ffff::9"));
        assert_ne!(key("2001:db8:1:2::1"), key("2001:db8:1:3::1"));
    }
}
