//! Network plumbing: the server's base URL, WebSocket connects (optionally from a chosen
//! 127.0.0.x source address), and a tiny HTTP/1.1 client for `POST /v1/orders`.
//!
//! Architecture invariant: the simulator connects only to loopback addresses. It is a load
//! generator; pointing it at someone else's host by mistake must fail before the first byte.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use anyhow::{bail, Context as _};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::WebSocketStream;

/// A WebSocket client stream over a plain TCP connection.
pub type Ws = WebSocketStream<TcpStream>;

/// The server we talk to: `http://host:port`, resolved once.
#[derive(Debug, Clone)]
pub struct Server {
    /// `host:port` as given, used for the `Host` header.
    pub authority: String,
    pub addr: SocketAddr,
}

impl Server {
    /// Parses `http://127.0.0.1:8080` (a trailing `/` or path is ignored) and checks that it
    /// resolves to loopback.
    pub fn parse(base_url: &str) -> anyhow::Result<Self> {
        let rest = base_url
            .strip_prefix("http://")
            .or_else(|| base_url.strip_prefix("ws://"))
            .with_context(|| format!("base url must start with http:// (no TLS in the simulator): {base_url:?}"))?;
        let authority = rest.split('/').next().unwrap_or("").to_owned();
        if authority.is_empty() {
            bail!("base url has no host: {base_url:?}");
        }
        let with_port = if authority.rsplit_once(':').is_some_and(|(_, p)| p.parse::<u16>().is_ok()) {
            authority.clone()
        } else {
            format!("{authority}:80")
        };
        let addrs: Vec<SocketAddr> =
            std::net::ToSocketAddrs::to_socket_addrs(&with_port).with_context(|| format!("resolving {with_port}"))?.collect();
        // Every address must be loopback (a name that also resolves elsewhere is refused), and
        // IPv4 is preferred: `localhost` often lists `::1` first while servers listen on
        // 127.0.0.1, and 127.0.0.x source addresses only work with IPv4.
        if let Some(bad) = addrs.iter().find(|a| !a.ip().is_loopback()) {
            bail!("{authority} resolves to {bad}, not loopback; the simulator only connects to loopback");
        }
        let addr = addrs
            .iter()
            .find(|a| a.is_ipv4())
            .or_else(|| addrs.first())
            .copied()
            .with_context(|| format!("{authority} resolves to no address"))?;
        Ok(Self { authority, addr })
    }

    /// `ws://host:port{path_and_query}`.
    pub fn ws_url(&self, path_and_query: &str) -> String {
        format!("ws://{}{}", self.authority, path_and_query)
    }
}

/// Small buffers for clients that hold tens of thousands of sockets (tungstenite defaults to
/// 128 KiB read and write buffers per socket).
pub fn lean_ws_config() -> WebSocketConfig {
    WebSocketConfig::default().read_buffer_size(4 * 1024).write_buffer_size(0).max_write_buffer_size(1024 * 1024)
}

/// Opens a WebSocket to `path_and_query`, binding the local end to `source` if given
/// (`127.0.0.x`, port chosen by the kernel). Times out after `timeout`.
pub async fn connect_ws(
    server: &Server,
    path_and_query: &str,
    source: Option<Ipv4Addr>,
    config: Option<WebSocketConfig>,
    timeout: Duration,
) -> anyhow::Result<Ws> {
    let fut = async {
        let sock = match server.addr {
            SocketAddr::V4(_) => TcpSocket::new_v4()?,
            SocketAddr::V6(_) => TcpSocket::new_v6()?,
        };
        if let (Some(ip), SocketAddr::V4(_)) = (source, server.addr) {
            if !IpAddr::V4(ip).is_loopback() {
                bail!("source address {ip} is not loopback");
            }
            sock.bind(SocketAddr::new(IpAddr::V4(ip), 0)).with_context(|| format!("binding {ip}"))?;
        }
        sock.set_nodelay(true)?;
        let stream = sock.connect(server.addr).await.with_context(|| format!("connecting to {}", server.addr))?;
        let url = server.ws_url(path_and_query);
        let (ws, _resp) = tokio_tungstenite::client_async_with_config(url, stream, config)
            .await
            .with_context(|| format!("websocket handshake on {}", path_and_query.split('?').next().unwrap_or("")))?;
        anyhow::Ok(ws)
    };
    tokio::time::timeout(timeout, fut).await.context("websocket connect timed out")?
}

/// An HTTP response: status, body, and `Retry-After` when it gives whole seconds.
#[derive(Debug, Clone)]
pub struct HttpResponse {
    pub status: u16,
    pub body: Vec<u8>,
    pub retry_after: Option<Duration>,
}

/// `POST {path}` with a JSON body and a bearer token; see [`request_json`].
pub async fn post_json(
    server: &Server,
    path: &str,
    bearer: &str,
    body: &serde_json::Value,
    timeout: Duration,
) -> anyhow::Result<HttpResponse> {
    request_json(server, "POST", path, bearer, body, timeout).await
}

/// `{method} {path}` with a JSON body and a bearer token, one connection per request
/// (`Connection: close`), read to the end. Enough for a few orders per second.
pub async fn request_json(
    server: &Server,
    method: &str,
    path: &str,
    bearer: &str,
    body: &serde_json::Value,
    timeout: Duration,
) -> anyhow::Result<HttpResponse> {
    let body = serde_json::to_vec(body)?;
    let fut = async {
        let mut stream = TcpStream::connect(server.addr).await.with_context(|| format!("connecting to {}", server.addr))?;
        let head = format!(
            "{method} {path} HTTP/1.1\r\nHost: {}\r\nAuthorization: Bearer {bearer}\r\nContent-Type: application/json\r\nAccept: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            server.authority,
            body.len()
        );
        stream.write_all(head.as_bytes()).await?;
        stream.write_all(&body).await?;
        let mut buf = Vec::with_capacity(1024);
        // Bounded: a response larger than 1 MiB is an error, not a reason to grow forever.
        let mut limited = (&mut stream).take(1 << 20);
        limited.read_to_end(&mut buf).await?;
        parse_response(&buf)
    };
    tokio::time::timeout(timeout, fut).await.context("http request timed out")?
}

/// Parses a complete HTTP/1.1 response (Content-Length, chunked, or read-to-close body).
pub fn parse_response(buf: &[u8]) -> anyhow::Result<HttpResponse> {
    let split = buf.windows(4).position(|w| w == b"\r\n\r\n").context("http response without header end")?;
    let head = std::str::from_utf8(&buf[..split]).context("http head is not utf-8")?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or("");
    let status: u16 = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("bad status line {status_line:?}"))?;
    let mut chunked = false;
    let mut length = None;
    let mut retry_after = None;
    for l in lines {
        if let Some((k, v)) = l.split_once(':') {
            let (k, v) = (k.trim().to_ascii_lowercase(), v.trim());
            if k == "transfer-encoding" && v.to_ascii_lowercase().contains("chunked") {
                chunked = true;
            } else if k == "content-length" {
                length = v.parse::<usize>().ok();
            } else if k == "retry-after" {
                retry_after = v.parse::<u64>().ok().map(Duration::from_secs);
            }
        }
    }
    let raw = &buf[split + 4..];
    let body = if chunked {
        let mut out = Vec::new();
        let mut rest = raw;
        loop {
            let nl = rest.windows(2).position(|w| w == b"\r\n").context("bad chunk header")?;
            let size_str = std::str::from_utf8(&rest[..nl])?.split(';').next().unwrap_or("").trim().to_owned();
            let size = usize::from_str_radix(&size_str, 16).with_context(|| format!("bad chunk size {size_str:?}"))?;
            rest = &rest[nl + 2..];
            if size == 0 {
                break;
            }
            if rest.len() < size {
                bail!("truncated chunk");
            }
            out.extend_from_slice(&rest[..size]);
            rest = rest.get(size + 2..).unwrap_or(&[]);
        }
        out
    } else if let Some(n) = length {
        if raw.len() < n {
            bail!("truncated body: {} of {n} bytes", raw.len());
        }
        raw[..n].to_vec()
    } else {
        raw.to_vec()
    };
    Ok(HttpResponse { status, body, retry_after })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_loopback() {
        assert!(Server::parse("http://127.0.0.1:8080").is_ok());
        assert!(Server::parse("http://localhost:8080/").is_ok());
        assert!(Server::parse("http://10.1.2.3:8080").is_err());
        assert!(Server::parse("https://127.0.0.1").is_err());
        assert!(Server::parse("http://").is_err());
        assert!(Server::parse("127.0.0.1:8080").is_err());
        let s = Server::parse("http://localhost:9/v1").unwrap();
        assert!(s.addr.is_ipv4(), "localhost should prefer 127.0.0.1, got {}", s.addr);
        assert_eq!(s.ws_url("/v1/ws/console"), "ws://localhost:9/v1/ws/console");
        assert_eq!(Server::parse("http://127.0.0.1").unwrap().addr.port(), 80);
    }

    #[test]
    fn parses_responses() {
        let r = parse_response(b"HTTP/1.1 201 Created\r\ncontent-length: 10\r\n\r\n{\"id\":\"a\"}").unwrap();
        assert_eq!((r.status, r.body.as_slice()), (201, &b"{\"id\":\"a\"}"[..]));
        let c = parse_response(b"HTTP/1.1 201 Created\r\nTransfer-Encoding: chunked\r\n\r\n4\r\n{\"id\r\n6\r\n\":\"a\"}\r\n0\r\n\r\n").unwrap();
        assert_eq!(c.body, b"{\"id\":\"a\"}");
        assert_eq!((r.retry_after, c.retry_after), (None, None));
        let busy = parse_response(b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 2\r\ncontent-length: 2\r\n\r\n{}").unwrap();
        assert_eq!((busy.status, busy.retry_after), (503, Some(Duration::from_secs(2))));
        // Garbage is an error, not a panic.
        assert!(parse_response(b"").is_err());
        assert!(parse_response(b"hello\r\n\r\n").is_err());
        assert!(parse_response(b"HTTP/1.1 200 OK\r\nContent-Length: 50\r\n\r\nshort").is_err());
        assert!(parse_response(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n").is_err());
    }
}
