//! The control requests: each `Request` answered with one `Response`, errors as messages.

use std::sync::Arc;
use std::time::Duration;

use super::control::{self, Request, Response};
use super::{complete, done, unknown, Daemon, DaemonError, Image};

impl Daemon {
    /// The node's state, as `vmt status` and the metrics show it; `used` is the caches' usage
    /// (measured by the caller, off the runtime's threads).
    pub(super) fn status(&self, used: u64) -> Response {
        let images: Vec<Arc<Image>> = self.images.read().unwrap().values().cloned().collect();
        Response::Status {
            version: env!("CARGO_PKG_VERSION").into(),
            images: images
                .iter()
                .map(|i| i.status(self.holders(&i.name), self.profile_of(i).map(|p| p.entries.len() as u64)))
                .collect(),
            profiles_rejected: self.profiles_rejected.load(std::sync::atomic::Ordering::Relaxed),
            p2p: self.peers.as_ref().map(|p| Box::new(p.status())),
            cache: self.cache_usage(used),
            nbd: control::NbdStatus {
                connections: self.nbd.connections() as u64,
                max_connections: self.nbd.limits.max_connections as u64,
                refused: self.nbd.refused.load(std::sync::atomic::Ordering::Relaxed),
                bytes_in_flight: self.nbd.node_bytes_in_flight() as u64,
                node_bytes: self.nbd.limits.node_bytes as u64,
            },
        }
    }

    pub(super) async fn handle(&self, req: Request) -> Response {
        match req {
            Request::Status => {
                let (dir, budget) = (self.cfg.cache_dir.clone(), self.budget.clone());
                let used = tokio::task::spawn_blocking(move || super::cache::cache_used(&dir, budget.as_deref()))
                    .await
                    .unwrap_or(0);
                self.status(used)
            }
            Request::Assemble { domain, images } => match self.assemble(&domain, &images).await {
                Ok(sockets) => Response::Assembled { sockets },
                Err(e) => Response::Error { message: e.to_string() },
            },
            Request::Release { domain } => {
                self.release(&domain).await;
                Response::Done
            }
            Request::RecordStart { image, duration_ms, domain } => {
                let d = duration_ms.map(Duration::from_millis).unwrap_or(self.tuning.record_duration);
                if d.is_zero() || d > Duration::from_secs(3600) {
                    return Response::Error { message: "recording duration must be between 1ms and 60m".into() };
                }
                match self.image(&image) {
                    Some(img) => done(self.start_recording(&img, domain, d)),
                    None => unknown(image),
                }
            }
            Request::RecordStop { image } => match self.image(&image) {
                Some(img) => match self.stop_recording(&img).await {
                    Ok(p) => Response::Recorded {
                        path: self
                            .cfg
                            .profile_dir
                            .join(crate::profile::Profile::file_name(&p.root))
                            .display()
                            .to_string(),
                        boots: p.boots,
                        chunks: p.entries.len() as u64,
                        bytes: p.bytes(),
                    },
                    Err(e) => Response::Error { message: e.to_string() },
                },
                None => unknown(image),
            },
            Request::Prefetch { image, profile, rate } => match self.image(&image) {
                Some(img) => {
                    let given = match profile.map(|p| std::fs::read(&p).map_err(|e| format!("profile {p}: {e}"))) {
                        None => Ok(None),
                        Some(Err(e)) => Err(e),
                        Some(Ok(bytes)) => {
                            crate::profile::Profile::decode_for(&bytes, &img.manifest.root(), &img.manifest.geometry())
                                .map(|p| Some(Arc::new(p)))
                                .map_err(|e| e.to_string())
                        }
                    };
                    match given {
                        Ok(p) => done(self.start_prefetch(&img, p, rate)),
                        Err(message) => Response::Error { message },
                    }
                }
                None => unknown(image),
            },
            Request::PrefetchCancel { image } => match self.image(&image) {
                Some(img) => {
                    img.cancel_prefetch();
                    Response::Done
                }
                None => unknown(image),
            },
            Request::ProfileList => Response::Profiles { profiles: self.profile_list() },
            Request::TraceStart { image } => match self.image(&image) {
                Some(img) if img.tracer.start() => Response::Done,
                Some(_) => Response::Error { message: format!("image {image} is already being traced") },
                None => unknown(image),
            },
            Request::TraceStop { image, path } => match self.image(&image) {
                Some(img) => match self.stop_trace(&img, &path).await {
                    Ok(r) => r,
                    Err(message) => Response::Error { message },
                },
                None => unknown(image),
            },
            Request::Complete { name, rate } => match self.image(&name) {
                Some(img) => {
                    if !img.completing.swap(true, std::sync::atomic::Ordering::SeqCst) {
                        tokio::spawn(async move {
                            complete(&img, rate).await;
                            img.completing.store(false, std::sync::atomic::Ordering::SeqCst);
                        });
                    }
                    Response::Done
                }
                None => Response::Error { message: DaemonError::UnknownImage(name).to_string() },
            },
            Request::CacheVerify { image } => match self.image(&image) {
                Some(img) => {
                    let (store, manifest) = (img.store.clone(), img.manifest.clone());
                    // Committed before the answer: the chunks dropped are out of the state file
                    // even if the node crashes right after.
                    // A commit that fails (a full disk) matters only when chunks were dropped.
                    let verified = tokio::task::spawn_blocking(move || {
                        let report = store.verify(&manifest);
                        match store.commit() {
                            Err(e) if report.bad > 0 => Err(e),
                            _ => Ok(report),
                        }
                    });
                    match verified.await.map_err(|e| e.to_string()).and_then(|r| r.map_err(|e| e.to_string())) {
                        Ok(r) => {
                            tracing::info!(image, checked = r.checked, bad = r.bad, "cache verified");
                            Response::Verified { checked: r.checked, bad: r.bad }
                        }
                        Err(e) => Response::Error { message: format!("verifying {image}: {e}") },
                    }
                }
                None => unknown(image),
            },
            Request::CacheList => self.cache_ls(),
            Request::CacheGc { to } => self.cache_gc(to).await,
            Request::CachePin { image, pinned } => self.cache_pin(&image, pinned).await,
            Request::ImageAdd { image } => match self.add_image(&image).await {
                Ok(_) => Response::Done,
                Err(e) => Response::Error { message: e.to_string() },
            },
            Request::ImageRemove { name } => match self.remove_image(&name).await {
                Ok(()) => Response::Done,
                Err(e) => Response::Error { message: e.to_string() },
            },
        }
    }

    /// Stops the trace of `img` and writes it to `path`. The trace is gone afterwards even when
    /// writing fails: keeping it would leave tracing on with nobody to stop it.
    async fn stop_trace(&self, img: &Image, path: &str) -> Result<Response, String> {
        let traced = img.tracer.stop().ok_or_else(|| format!("image {} is not being traced", img.name))?;
        let file = std::path::PathBuf::from(path);
        if !file.is_absolute() {
            return Err(format!("trace path {path} is not absolute"));
        }
        let rows = traced.rows.len() as u64;
        // A full trace is hundreds of MiB of text: formatted off the runtime's threads too.
        let traced_rows = traced.rows;
        tokio::task::spawn_blocking(move || {
            let csv = crate::bench::trace::to_csv(&traced_rows);
            crate::fsutil::write_atomic(&file, csv.as_bytes(), 0o644)
        })
        .await
        .map_err(|e| format!("writing trace {path}: {e}"))?
        .map_err(|e| format!("writing trace {path}: {e}"))?;
        tracing::info!(image = %img.name, path, rows, dropped = traced.dropped, "trace written");
        Ok(Response::Traced { path: path.to_string(), rows, dropped: traced.dropped })
    }
}
