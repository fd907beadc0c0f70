//! Replays a recorded trace as one courier over the courier socket, time-scaled: the gaps
//! between fixes are divided by `speedup`, and each fix is sent with `ts` = now.
//!
//! Note: at `speedup` > 1 the server sees the courier move `speedup` times faster than it did,
//! which may trip the server's impossible-speed filter; 1.0 replays in real time.

use std::time::Duration;

use anyhow::Context as _;
use futures_util::{SinkExt as _, StreamExt as _};
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;

use crate::geomath::{bearing_deg, distance_m, LatLng};
use crate::net::{connect_ws, Server};
use crate::protocol::CourierMsg;
use crate::trace::Trace;

/// What a replay did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ReplayReport {
    pub sent: u64,
    pub server_frames: u64,
    pub server_errors: u64,
}

/// Sends every fix of `trace` as `loc` on `/v1/ws/courier?token=…`. Ends after the last fix (plus
/// a short grace to read replies) or on `shutdown`.
pub async fn replay(
    server: &Server,
    token: &str,
    trace: &Trace,
    speedup: f64,
    shutdown: &CancellationToken,
) -> anyhow::Result<ReplayReport> {
    anyhow::ensure!(speedup > 0.0 && speedup.is_finite(), "speedup must be positive");
    let path = format!("/v1/ws/courier?token={token}");
    let mut ws = connect_ws(server, &path, None, None, Duration::from_secs(10)).await?;
    let mut report = ReplayReport::default();
    // No `available`: a recorded trace cannot answer offers, and beside a demo each order
    // offered to it would wait out the offer timeout. It moves on the map as an offline courier.
    let start = tokio::time::Instant::now();
    let t0 = trace.fixes.first().map_or(0, |f| f.ts);
    let mut prev: Option<(LatLng, i64)> = None;
    for fix in &trace.fixes {
        let due = start + Duration::from_secs_f64(((fix.ts - t0).max(0) as f64 / 1000.0) / speedup);
        // Read replies while waiting for the fix's time.
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return Ok(report),
                _ = tokio::time::sleep_until(due) => break,
                m = ws.next() => {
                    let m = m.context("server closed the socket during replay")??;
                    count_frame(&m, &mut report);
                }
            }
        }
        let here = LatLng::new(fix.lat, fix.lng);
        let (speed, heading) = match prev {
            Some((p, pts)) if fix.ts > pts => {
                let d = distance_m(p, here);
                (Some(d / ((fix.ts - pts) as f64 / 1000.0)), (d > 0.5).then(|| bearing_deg(p, here).round()))
            }
            _ => (None, None),
        };
        prev = Some((here, fix.ts));
        let msg = CourierMsg::Loc { lat: fix.lat, lng: fix.lng, ts: crate::unix_ms(), speed, heading, acc: None };
        ws.send(Message::Text(serde_json::to_string(&msg)?.into())).await?;
        report.sent += 1;
    }
    // A short grace period to collect error frames about the last fixes.
    let grace = tokio::time::sleep(Duration::from_millis(500));
    tokio::pin!(grace);
    loop {
        tokio::select! {
            _ = &mut grace => break,
            m = ws.next() => match m {
                Some(Ok(m)) => count_frame(&m, &mut report),
                _ => break,
            }
        }
    }
    let _ = tokio::time::timeout(Duration::from_secs(1), ws.close(None)).await;
    Ok(report)
}

fn count_frame(m: &Message, report: &mut ReplayReport) {
    if let Message::Text(t) = m {
        report.server_frames += 1;
        if t.as_str().contains("\"t\":\"error\"") {
            report.server_errors += 1;
            tracing::warn!(frame = t.as_str(), "server error during replay");
        }
    }
}
