//! A request limit per client address on the HTTP port (`--http-limit-per-ip`): a token bucket
//! per address (the `governor` crate's GCRA), so that one address flooding the API (made-up
//! OsmAnd device ids, each a store query; a retry loop; a storm of WebSocket upgrades) gets
//! 429 `rate_limited` with `Retry-After` instead of the server's time, and other clients are
//! served as before. Off by default: behind a reverse proxy or a load balancer every request
//! comes from the proxy's address, so the limit needs `--trust-forwarded-for` there (the client
//! is then the last address the proxy appended to `X-Forwarded-For`). What another node of a
//! cluster forwards to a market's owner carries the nodes' key (`markets::NODE_KEY`) and is not
//! counted again: the node it first reached counted it.
//! IPv6 clients are counted per /64, the block one subscriber gets. Probes and the metrics
//! scrape (`/healthz`, `/readyz`, `/metrics`) are never limited.

use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use actix_web::body::{BoxBody, MessageBody};
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::http::{StatusCode, header};
use actix_web::middleware::Next;
use actix_web::{ResponseError as _, web};
use governor::clock::{Clock as _, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota};
use ipnet::IpNet;

use crate::error::ApiError;
use crate::server::AppState;

/// The limit's settings.
#[derive(Clone, Debug, Default)]
pub struct HttpLimitConfig {
    /// Requests per second per address; 0: no limit.
    pub per_s: u32,
    /// Requests an address may send at once after a quiet spell; 0: twice `per_s`.
    pub burst: u32,
    /// Key by the last `X-Forwarded-For` hop when there is one (behind a proxy that appends it).
    pub trust_forwarded_for: bool,
    /// Addresses never limited (the cluster's other nodes, health checkers).
    pub exempt: Vec<IpNet>,
}

/// The limiter; `None` from [`HttpLimit::new`] when off.
#[derive(Debug)]
pub struct HttpLimit {
    limiter: DefaultKeyedRateLimiter<IpAddr>,
    clock: DefaultClock,
    trust_forwarded_for: bool,
    exempt: Vec<IpNet>,
}

impl HttpLimit {
    pub fn new(cfg: &HttpLimitConfig) -> Option<Arc<Self>> {
        let per_s = NonZeroU32::new(cfg.per_s)?;
        let burst = NonZeroU32::new(cfg.burst).or(NonZeroU32::new(cfg.per_s.saturating_mul(2))).unwrap_or(per_s);
        Some(Arc::new(HttpLimit {
            limiter: DefaultKeyedRateLimiter::keyed(Quota::per_second(per_s).allow_burst(burst)),
            clock: DefaultClock::default(),
            trust_forwarded_for: cfg.trust_forwarded_for,
            exempt: cfg.exempt.clone(),
        }))
    }

    /// Whose request this is, or `None` when it is not limited.
    fn client(&self, req: &ServiceRequest) -> Option<IpAddr> {
        let peer = req.peer_addr()?.ip();
        let forwarded = self.trust_forwarded_for.then(|| req.headers().get_all("x-forwarded-for").last()).flatten().and_then(|v| last_hop(v.as_bytes()));
        let ip = forwarded.unwrap_or(peer).to_canonical(); // `::ffff:a.b.c.d` is a.b.c.d
        if self.exempt.iter().any(|n| n.contains(&ip)) {
            return None;
        }
        Some(match ip {
            IpAddr::V6(v6) => {
                let mut o = v6.octets();
                o[8..].fill(0);
                IpAddr::from(o)
            }
            v4 => v4,
        })
    }

    /// `Ok`, or how long until this address may send again.
    pub fn check(&self, ip: IpAddr) -> Result<(), Duration> {
        self.limiter.check_key(&ip).map_err(|not_until| not_until.wait_time_from(self.clock.now()))
    }

    /// Forgets the addresses whose buckets are full again; run every minute, so that a scan
    /// from many addresses does not keep memory.
    pub fn sweep(&self) {
        self.limiter.retain_recent();
        self.limiter.shrink_to_fit();
    }

    /// Addresses tracked now.
    pub fn tracked(&self) -> usize {
        self.limiter.len()
    }
}

/// The last hop of an `X-Forwarded-For` value: the one the proxy in front appended, read
/// alone, so that what the client wrote before it (garbage, non-ASCII) cannot make the whole
/// value unreadable. `1.2.3.4`, `2001:db8::1`, and with a port `1.2.3.4:5678` or
/// `[2001:db8::1]:5678`, as some load balancers write them.
fn last_hop(value: &[u8]) -> Option<IpAddr> {
    let hop = value.rsplit(|b| *b == b',').next()?;
    let hop = std::str::from_utf8(hop).ok()?.trim();
    hop.parse::<IpAddr>().ok().or_else(|| hop.parse::<std::net::SocketAddr>().ok().map(|s| s.ip()))
}

/// Probes and the scrape are never limited.
fn exempt_path(path: &str) -> bool {
    matches!(path.strip_prefix("/v1").unwrap_or(path), "/healthz" | "/readyz" | "/metrics")
}

/// Middleware: answers 429 `rate_limited` with `Retry-After` (whole seconds) to an address
/// over its limit, before anything else is done for the request.
pub async fn limit(req: ServiceRequest, next: Next<impl MessageBody + 'static>) -> Result<ServiceResponse<BoxBody>, actix_web::Error> {
    let st = req.app_data::<web::Data<AppState>>();
    let from_a_node = || {
        req.headers().get(crate::markets::NODE_KEY).zip(st).is_some_and(|(k, st)| st.keys.is_node_key(k.as_bytes()))
    };
    let over = st
        .and_then(|s| s.http_limit.clone())
        .filter(|_| !exempt_path(req.path()) && !from_a_node())
        .and_then(|l| l.check(l.client(&req)?).err());
    let Some(wait) = over else {
        return next.call(req).await.map(ServiceResponse::map_into_boxed_body);
    };
    metrics::counter!("hexfleet_http_rate_limited_total").increment(1);
    let secs = wait.as_secs_f64().ceil().max(1.0) as u64;
    let e = ApiError::new(StatusCode::TOO_MANY_REQUESTS, "rate_limited", format!("too many requests from this address; retry in {secs} s"));
    let mut resp = e.error_response();
    resp.headers_mut().insert(header::RETRY_AFTER, header::HeaderValue::from(secs));
    Ok(req.into_response(resp))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_flooding_address_is_held_back_and_others_are_not() {
        let l = HttpLimit::new(&HttpLimitConfig { per_s: 10, burst: 5, ..Default::default() }).unwrap();
        let a: IpAddr = "203.0.113.7".parse().unwrap();
        let b: IpAddr = "203.0.113.8".parse().unwrap();
        for _ in 0..5 {
            assert!(l.check(a).is_ok());
        }
        let wait = l.check(a).unwrap_err();
        assert!(wait > Duration::ZERO && wait <= Duration::from_millis(100), "{wait:?}");
        assert!(l.check(b).is_ok(), "another address has its own bucket");
        assert_eq!(l.tracked(), 2);
        assert!(HttpLimit::new(&HttpLimitConfig::default()).is_none(), "0 is off");
    }

    #[test]
    fn the_last_forwarded_hop_is_read_alone() {
        let ip = |s: &str| s.parse::<IpAddr>().ok();
        assert_eq!(last_hop(b"198.51.100.1, 203.0.113.9"), ip("203.0.113.9"));
        assert_eq!(last_hop("caf\u{e9}, \u{1F600}garbage,203.0.113.9".as_bytes()), ip("203.0.113.9"));
        assert_eq!(last_hop(b"\xff\xfe, 2001:db8::1"), ip("2001:db8::1"));
        assert_eq!(last_hop(b"203.0.113.9:5678"), ip("203.0.113.9"));
        assert_eq!(last_hop(b"[2001:db8::1]:443"), ip("2001:db8::1"));
        assert_eq!(last_hop(b"203.0.113.9, nonsense"), None, "an unreadable last hop: the connection's address");
    }
}
