//! Shutdown signalling: a `watch` channel that turns `true` once, and a future that completes
//! when it has (or when its sender is gone, which also means "stop").

use tokio::sync::watch;

/// Completes once `rx` has seen `true` or its sender was dropped.
pub async fn stopped(rx: &mut watch::Receiver<bool>) {
    let _ = rx.wait_for(|s| *s).await;
}
