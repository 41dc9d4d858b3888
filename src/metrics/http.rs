//! The metrics endpoint: `GET /metrics` (Prometheus text), `GET /healthz` (the process
//! answers) and `GET /readyz` (200 once every configured image serves, 503 before).
//!
//! A deliberately small HTTP/1.1 server, one request per connection: it only answers GETs of
//! three paths, and a scraper must never cost the node more than a bounded share. At most
//! [`MAX_CONNECTIONS`] at once (more are closed at accept), a request head of at most
//! [`MAX_HEAD`] bytes read within [`IO_TIMEOUT`], `/metrics` rendered on the blocking pool
//! within [`IO_TIMEOUT`] (the health answers need no disk and are given at once), and the reply
//! written within [`IO_TIMEOUT`], no lock held meanwhile. A scraper, or a hung cache disk,
//! therefore holds one connection slot for at most three times that, and renders run one at a
//! time (a render a hung disk keeps past its timeout answers later scrapes with 503).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::registry::Registry;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Semaphore};

/// Connections served at once.
pub const MAX_CONNECTIONS: usize = 16;
/// Longest request head (request line and headers).
pub const MAX_HEAD: usize = 8192;
/// Time allowed to read the request, and again to write the reply.
pub const IO_TIMEOUT: Duration = Duration::from_secs(5);

/// What the endpoint serves.
pub struct Endpoint {
    registry: Arc<Registry>,
    /// True once the service is ready.
    ready: watch::Receiver<bool>,
    /// A render is running on the blocking pool. One at a time: a render that outlives its
    /// timeout (a hung cache disk) keeps its thread, and scrapes must not add more.
    rendering: Arc<AtomicBool>,
}

impl Endpoint {
    pub fn new(registry: Registry, ready: watch::Receiver<bool>) -> Endpoint {
        Endpoint { registry: Arc::new(registry), ready, rendering: Arc::new(AtomicBool::new(false)) }
    }
}

/// Clears [`Endpoint::rendering`] when the render ends, however it ends.
struct Rendering(Arc<AtomicBool>);

impl Drop for Rendering {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

/// Serves `endpoint` on `listener` until `shutdown` turns true.
pub async fn serve(listener: TcpListener, endpoint: Arc<Endpoint>, mut shutdown: watch::Receiver<bool>) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let accepted = tokio::select! {
            r = listener.accept() => r,
            _ = async { let _ = shutdown.wait_for(|v| *v).await; } => return,
        };
        let s = match accepted {
            Ok((s, _)) => s,
            Err(e) => {
                // Out of descriptors, say: wait a little instead of spinning on accept.
                tracing::debug!(error = %e, "metrics accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            continue; // Dropped: closed at once.
        };
        let endpoint = endpoint.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let _ = answer(s, endpoint).await;
        });
    }
}

async fn answer(mut s: TcpStream, endpoint: Arc<Endpoint>) -> std::io::Result<()> {
    let head = match tokio::time::timeout(IO_TIMEOUT, read_head(&mut s)).await {
        Ok(Ok(Some(h))) => h,
        Ok(Ok(None)) => {
            let body = "request head too large\n".to_string();
            return reply(&mut s, 431, "text/plain", body.len(), body).await;
        }
        Ok(Err(e)) => return Err(e),
        Err(_) => return Ok(()),
    };
    let head_only = head.starts_with("HEAD ");
    let (status, kind, mut body) = match classify(&head) {
        // Rendering may stat cache files: off the runtime's threads, which serve the guests,
        // and within the I/O timeout, so a hung cache disk cannot keep a slot forever. The
        // health answers need no disk and are given here, whatever the disk does.
        Route::Metrics if endpoint.rendering.swap(true, Ordering::AcqRel) => {
            (503, "text/plain", "the last render of the metrics has not ended yet\n".into())
        }
        Route::Metrics => {
            let (guard, registry) = (Rendering(endpoint.rendering.clone()), endpoint.registry.clone());
            let render = tokio::task::spawn_blocking(move || {
                let _guard = guard;
                super::render(&registry)
            });
            match tokio::time::timeout(IO_TIMEOUT, render).await {
                Ok(Ok(text)) => (200, "text/plain; version=0.0.4; charset=utf-8", text),
                _ => (500, "text/plain", "rendering the metrics failed or timed out\n".into()),
            }
        }
        Route::Healthz => (200, "text/plain", "ok\n".into()),
        Route::Readyz if *endpoint.ready.borrow() => (200, "text/plain", "ready\n".into()),
        Route::Readyz => (503, "text/plain", "not ready\n".into()),
        Route::BadMethod => (405, "text/plain", "only GET\n".into()),
        Route::NotFound => (404, "text/plain", "not found: try /metrics, /healthz or /readyz\n".into()),
    };
    let len = body.len();
    if head_only {
        body.clear();
    }
    reply(&mut s, status, kind, len, body).await
}

/// What a request asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    Metrics,
    Healthz,
    Readyz,
    NotFound,
    /// Not a GET (or HEAD).
    BadMethod,
}

/// Classifies a request head (the request line and headers, as received). Pure: the fuzz
/// target `metrics_http` drives it with arbitrary bytes.
pub fn classify(head: &str) -> Route {
    let mut parts = head.lines().next().unwrap_or("").split(' ');
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    if method != "GET" && method != "HEAD" {
        return Route::BadMethod;
    }
    match target.split('?').next().unwrap_or("") {
        "/metrics" => Route::Metrics,
        "/healthz" => Route::Healthz,
        "/readyz" => Route::Readyz,
        _ => Route::NotFound,
    }
}

/// Reads up to the blank line ending the head; `None` when it does not fit in [`MAX_HEAD`].
async fn read_head(s: &mut TcpStream) -> std::io::Result<Option<String>> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    loop {
        let n = s.read(&mut chunk).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        buf.extend_from_slice(&chunk[..n]);
        if buf.windows(4).any(|w| w == b"\r\n\r\n") || buf.windows(2).any(|w| w == b"\n\n") {
            return Ok(Some(String::from_utf8_lossy(&buf).into_owned()));
        }
        if buf.len() > MAX_HEAD {
            return Ok(None);
        }
    }
}

/// Writes the answer: `len` is the body's length, also when a HEAD request gets no body.
async fn reply(s: &mut TcpStream, status: u16, kind: &str, len: usize, body: String) -> std::io::Result<()> {
    let reason = match status {
        200 => "OK",
        404 => "Not Found",
        405 => "Method Not Allowed",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        _ => "Service Unavailable",
    };
    let head = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: {kind}\r\nContent-Length: {len}\r\nConnection: close\r\n\r\n"
    );
    let write = async {
        s.write_all(head.as_bytes()).await?;
        s.write_all(body.as_bytes()).await?;
        s.shutdown().await
    };
    tokio::time::timeout(IO_TIMEOUT, write).await.unwrap_or(Ok(()))
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn get(addr: std::net::SocketAddr, req: &str) -> String {
        let mut s = TcpStream::connect(addr).await.unwrap();
        // A connection closed at accept fails either call: that reads as an empty answer.
        let _ = s.write_all(req.as_bytes()).await;
        let mut out = String::new();
        let _ = s.read_to_string(&mut out).await;
        out
    }

    #[tokio::test]
    async fn routes_bounds_and_readiness() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let (ready_tx, ready) = watch::channel(false);
        let (_stop, stop) = watch::channel(false);
        tokio::spawn(serve(l, Arc::new(Endpoint::new(super::super::registry(), ready)), stop));
        let m = get(addr, "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").await;
        assert!(m.starts_with("HTTP/1.1 200"), "{m}");
        assert!(m.contains("vmthunder_build_info{version=\""), "{m}");
        assert!(get(addr, "GET /readyz HTTP/1.1\r\n\r\n").await.starts_with("HTTP/1.1 503"));
        ready_tx.send(true).unwrap();
        assert!(get(addr, "GET /readyz HTTP/1.1\r\n\r\n").await.starts_with("HTTP/1.1 200"));
        assert!(get(addr, "GET /healthz HTTP/1.0\r\n\r\n").await.starts_with("HTTP/1.1 200"));
        let head = get(addr, "HEAD /healthz HTTP/1.1\r\n\r\n").await;
        assert!(
            head.starts_with("HTTP/1.1 200") && head.contains("Content-Length: 3\r\n") && head.ends_with("\r\n\r\n"),
            "{head}"
        );
        assert!(get(addr, "GET /nope HTTP/1.1\r\n\r\n").await.starts_with("HTTP/1.1 404"));
        assert!(get(addr, "POST /metrics HTTP/1.1\r\n\r\n").await.starts_with("HTTP/1.1 405"));
        let huge = format!("GET /metrics HTTP/1.1\r\nX: {}\r\n\r\n", "a".repeat(3 * MAX_HEAD));
        let mut s = TcpStream::connect(addr).await.unwrap();
        let _ = s.write_all(huge.as_bytes()).await;
        let mut out = String::new();
        let _ = s.read_to_string(&mut out).await;
        assert!(out.starts_with("HTTP/1.1 431"), "{out}");
    }

    #[test]
    fn classify_routes() {
        assert_eq!(classify("GET /metrics?x=1 HTTP/1.1\r\nHost: a\r\n\r\n"), Route::Metrics);
        assert_eq!(classify("HEAD /readyz HTTP/1.0\n\n"), Route::Readyz);
        assert_eq!(classify("PUT /metrics HTTP/1.1\r\n\r\n"), Route::BadMethod);
        assert_eq!(classify(""), Route::BadMethod);
        assert_eq!(classify("GET"), Route::NotFound);
        assert_eq!(classify("GET /metricsx HTTP/1.1"), Route::NotFound);
    }

    proptest::proptest! {
        #[test]
        fn classify_never_panics(head in "\\PC{0,300}") {
            let _ = classify(&head);
        }
    }

    #[tokio::test]
    async fn silent_clients_time_out_and_free_their_slots() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let (_r, ready) = watch::channel(true);
        let (_stop, stop) = watch::channel(false);
        tokio::spawn(serve(l, Arc::new(Endpoint::new(super::super::registry(), ready)), stop));
        // Every slot taken by a client that never sends a byte.
        let mut silent = Vec::new();
        for _ in 0..MAX_CONNECTIONS {
            silent.push(TcpStream::connect(addr).await.unwrap());
        }
        // Wait (on the condition, not a guess of the time) until they time out: a scrape is
        // answered again.
        let start = std::time::Instant::now();
        loop {
            let m = get(addr, "GET /healthz HTTP/1.1\r\n\r\n").await;
            if m.starts_with("HTTP/1.1 200") {
                break;
            }
            assert!(m.is_empty(), "{m}");
            assert!(start.elapsed() < IO_TIMEOUT * 6, "silent clients kept their slots");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(start.elapsed() >= IO_TIMEOUT / 2, "a full endpoint answered at once");
        drop(silent);
    }
}
