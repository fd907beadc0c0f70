//! Shared by the actor test files.

use std::time::Duration;

/// Waits until `cond` holds, polling every 2 ms; false if it did not within 5 s.
pub async fn eventually(mut cond: impl FnMut() -> bool) -> bool {
    tokio::time::timeout(Duration::from_secs(5), async {
        while !cond() {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    })
    .await
    .is_ok()
}
