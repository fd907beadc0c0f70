//! The load generator (`hexfleet-sim load`) against the real server: every courier a real
//! WebSocket, consoles and customers watching, couriers created over HTTP first
//! (`--preregister`) so the memory report can split sockets from couriers' state.

mod common;

use std::time::Duration;

use common::*;
use hexfleet_sim::load::{LoadConfig, run_load};
use tokio_util::sync::CancellationToken;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn load_run_against_the_real_server_tracks_and_splits_memory() {
    let dir = tempfile::tempdir().unwrap();
    let srv = TestServer::start(fast_config(dir.path().join("hexfleet.db").to_str().unwrap())).await;
    let cfg = LoadConfig {
        base_url: srv.base.clone(),
        jwt_secret: SECRET.into(),
        couriers: 60,
        rate: 300.0,
        duration: Duration::from_secs(3),
        ramp: Duration::from_millis(300),
        watchers: 2,
        track: 3,
        source_addrs: 2,
        shards: 2,
        // The server runs in this process: its RSS is ours.
        server_pid: Some(std::process::id()),
        preregister: true,
        progress: false,
        ..LoadConfig::default()
    };
    let report = tokio::time::timeout(Duration::from_secs(60), run_load(cfg, CancellationToken::new())).await.expect("load run ends").expect("load run");
    assert_eq!(report.couriers_connected, 60, "{report:#?}");
    assert_eq!((report.connect_errors, report.send_errors, report.server_error_frames, report.disconnects), (0, 0, 0, 0), "{report:#?}");
    assert!(report.sent >= 500, "300/s for 3 s: {report:#?}");
    // Two consoles watch the whole city: together they see more positions than were sent.
    assert!(report.watcher_deliveries >= report.sent, "{report:#?}");
    assert!(report.console_latency.samples > 0, "{:?}", report.console_latency);
    // The tracked orders were offered, accepted and their customers saw the courier move.
    assert_eq!(report.trackers_connected, 3, "{report:#?}");
    assert!(report.track_latency.samples > 0, "{:?}", report.track_latency);
    let mem = report.memory.as_ref().expect("memory report");
    let registered = mem.rss_registered_kib.expect("--preregister reads the memory before any socket");
    assert!(registered >= mem.rss_before_kib && mem.rss_connected_kib > 0, "{mem:?}");
    assert!(mem.kib_per_courier_registered.is_some(), "{mem:?}");
    assert!(report.table().contains("sockets only"), "{}", report.table());
}
