//! Crash test: a child process (this test binary, re-run with an environment variable) commits
//! and advances orders and prints each acknowledgement; the parent kills it with SIGKILL
//! mid-stream, reopens the database and checks that every acknowledged order is back in at
//! least its acknowledged version (at most one transition further: a commit may be durable
//! before its acknowledgement was printed). Runs on SQLite and PostgreSQL.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{Ctx, Kind, new_order};
use hexfleet_actors::domain::{OrderId, OrderState, TenantId};
use hexfleet_actors::store::{Store, Write};

const CHILD_ENV: &str = "HEXFLEET_CRASH_CHILD_URL";
const TASKS: usize = 8;
/// Transitions each order goes through (versions 0..STEPS).
const STEPS: u32 = 4;

/// The child: runs only when the parent sets `HEXFLEET_CRASH_CHILD_URL`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_child() {
    let Ok(url) = std::env::var(CHILD_ENV) else { return };
    let ctx = Ctx { kind: if url.starts_with("postgres") { Kind::Postgres } else { Kind::Sqlite }, url };
    let store = ctx.open().await;
    let mut tasks = Vec::new();
    for task in 0..TASKS {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            for n in 0.. {
                let id = format!("o{task}-{n}");
                let mut o = new_order("t1", &id, 1);
                for v in 0..STEPS {
                    o.version = v;
                    o.state = OrderState::ALL[v as usize];
                    store.commit(vec![Write::Order(o.clone())]).await.expect("commit");
                    println!("ack {id} {v}");
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
}

async fn crash(ctx: Ctx) {
    // Create the schema first so the child starts committing at once.
    ctx.open().await.close().await.unwrap();
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["crash_child", "--exact", "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, &ctx.url)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn child");
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut acked: std::collections::HashMap<String, u32> = Default::default();
    let deadline = Instant::now() + Duration::from_secs(20);
    let read_ack = |line: &str, acked: &mut std::collections::HashMap<String, u32>| {
        if let Some(rest) = line.strip_prefix("ack ") {
            let (id, v) = rest.split_once(' ').unwrap();
            let v: u32 = v.parse().unwrap();
            let e = acked.entry(id.to_owned()).or_default();
            *e = (*e).max(v);
            return true;
        }
        false
    };
    let mut n = 0;
    while n < 400 {
        let line = lines.next().expect("child ended early").unwrap();
        if read_ack(&line, &mut acked) {
            n += 1;
        }
        assert!(Instant::now() < deadline, "child too slow: {n} acks");
    }
    child.kill().expect("SIGKILL child");
    // Acknowledgements printed before the kill are still in the pipe.
    for line in lines {
        let Ok(line) = line else { break };
        read_ack(&line, &mut acked);
    }
    child.wait().unwrap();
    eprintln!("{:?}: {} orders acknowledged before SIGKILL", ctx.kind, acked.len());

    let store = ctx.open().await;
    for (id, v) in &acked {
        let o = store.order(&TenantId::new("t1"), &OrderId::new(id)).await.unwrap();
        let o = o.unwrap_or_else(|| panic!("acknowledged order {id} lost"));
        assert!(o.version == *v || o.version == v + 1, "{id}: acknowledged v{v}, stored v{}", o.version);
        assert_eq!(o.state, OrderState::ALL[o.version as usize]);
    }
    store.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_keeps_acknowledged_orders_sqlite() {
    common::run(Kind::Sqlite, crash).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_keeps_acknowledged_orders_postgres() {
    common::run(Kind::Postgres, crash).await;
}
