//! `vmtd`: the node daemon. Holds the image registry, serves each image's NBD export and the
//! control socket, runs the group-commit loop, and shuts down cleanly on SIGTERM/SIGINT.
//!
//! Lifecycle: bind everything → serve → on signal: stop accepting, stop connections, commit
//! every cache, remove sockets, exit 0. After a crash instead, the next start finds each cache
//! as of its last commit and stale sockets are replaced.

mod cache;
pub mod control;
mod holds;
pub mod image;
mod manifests;
mod metrics;
mod peers;
mod profiles;
mod requests;

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::CString;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Mutex;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use thiserror::Error;
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::watch;

use crate::config::{Config, ConfigError, ImageConfig, Tuning};
use crate::nbd::server::{self, Export, ExportLookup, SingleExport};
use control::{Request, Response};
pub use image::{Image, ImageError};

/// File that marks a directory as a vmtd `run_dir`.
pub const RUN_DIR_MARKER: &str = "vmtd.rundir";

/// Errors that stop the daemon or refuse a control request.
#[derive(Debug, Error)]
pub enum DaemonError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Image(#[from] Box<ImageError>),
    #[error("{what} {path}: {source}")]
    Io { what: &'static str, path: String, source: std::io::Error },
    #[error("image {0} is already served")]
    Duplicate(String),
    #[error("no image named {0}")]
    UnknownImage(String),
    #[error("export of image {0} is not listening")]
    NotListening(String),
    #[error("{0}")]
    Profile(String),
}

fn io_err(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> DaemonError {
    let path = path.display().to_string();
    move |source| DaemonError::Io { what, path, source }
}

/// The running daemon's shared state.
pub struct Daemon {
    cfg: Config,
    tuning: Tuning,
    export_uid: Option<u32>,
    images: RwLock<BTreeMap<String, Arc<Image>>>,
    /// Domain name → images it holds. Soft state: lost on restart, re-sent by the hook at the
    /// next domain start; a hold only informs operators (`vmt status`) what still needs vmtd.
    holds: Mutex<BTreeMap<String, BTreeSet<String>>>,
    profiles: RwLock<profiles::ProfileMap>,
    profile_watch: Mutex<Option<notify::RecommendedWatcher>>,
    profiles_rejected: std::sync::atomic::AtomicU64,
    /// Peer server and trackers, with `[p2p]` configured.
    peers: Option<Arc<peers::Peers>>,
    /// What NBD clients may cost the node, shared by every export and listener.
    nbd: Arc<crate::nbd::limits::Budgets>,
    /// For timers that must not keep the daemon alive.
    weak: std::sync::Weak<Daemon>,
    /// The node's cache budget, with `[cache] max` set.
    budget: Option<Arc<crate::store::Budget>>,
    /// Old versions of images that running domains still read.
    retired: Mutex<Vec<cache::Retired>>,
    /// Held while a cache is opened or a collection runs: a directory is never removed while
    /// an image is opening it.
    cache_gate: tokio::sync::Mutex<()>,
    /// True once every configured image serves (`/readyz`, systemd's READY=1).
    ready: watch::Sender<bool>,
    shutdown: watch::Sender<bool>,
}

impl ExportLookup for Daemon {
    fn find(&self, name: &str) -> Option<Arc<dyn Export>> {
        self.images.read().unwrap().get(name).map(|i| i.clone() as Arc<dyn Export>)
    }
    fn names(&self) -> Vec<String> {
        self.images.read().unwrap().keys().cloned().collect()
    }
}

impl Daemon {
    /// Runs the daemon until SIGTERM or SIGINT.
    pub async fn run(cfg: Config) -> Result<(), DaemonError> {
        let daemon = Daemon::start(cfg).await?;
        crate::metrics::notify::ready(&daemon.summary());
        crate::metrics::notify::spawn_watchdog();
        tokio::spawn(Daemon::report_status(Arc::downgrade(&daemon)));
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .map_err(io_err("signal", Path::new("SIGTERM")))?;
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
        tracing::info!("shutting down");
        crate::metrics::notify::stopping();
        daemon.stop().await;
        Ok(())
    }

    /// Opens every configured image and starts serving.
    pub async fn start(cfg: Config) -> Result<Arc<Daemon>, DaemonError> {
        cfg.validate()?;
        let tuning = cfg.tuning()?;
        let nbd_limits = cfg.nbd.limits()?;
        raise_fd_limit(nbd_limits.max_connections);
        for (dir, mode) in [(&cfg.run_dir, 0o755), (&cfg.cache_dir, 0o700), (&cfg.profile_dir, 0o755)] {
            std::fs::create_dir_all(dir).map_err(io_err("creating", dir))?;
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode)).map_err(io_err("chmod", dir))?;
        }
        let exports = cfg.run_dir.join("exports");
        std::fs::create_dir_all(&exports).map_err(io_err("creating", &exports))?;
        // Tells the libvirt hook that sockets under this run_dir are vmthunder exports, also
        // while vmtd is stopped (so a domain start fails with a clear message then).
        let marker = cfg.run_dir.join(RUN_DIR_MARKER);
        std::fs::write(&marker, b"vmthunder run_dir\n").map_err(io_err("writing", &marker))?;
        let export_uid = uid_of(&cfg.export_user);
        if export_uid.is_none() {
            tracing::warn!(user = %cfg.export_user, "export user does not exist; export sockets are root-only");
        }
        let p2p = match &cfg.p2p {
            Some(p) => {
                let t = p.tuning()?;
                let key = crate::p2p::auth::ClusterKey::load(&p.cluster_key_file)
                    .map_err(|e| ConfigError::Invalid { key: "p2p.cluster_key_file".into(), message: e.to_string() })?;
                let listener = tokio::net::TcpListener::bind(t.listen)
                    .await
                    .map_err(io_err("peer server listening on", Path::new(&t.listen.to_string())))?;
                Some((t, key, listener))
            }
            None => None,
        };
        let limits = cfg.cache.limits(cache::filesystem_bytes(&cfg.cache_dir))?;
        let budget = cache::budget(limits);
        let daemon = Arc::new_cyclic(|weak: &std::sync::Weak<Daemon>| Daemon {
            budget,
            retired: Mutex::new(Vec::new()),
            cache_gate: tokio::sync::Mutex::new(()),
            peers: p2p.as_ref().map(|(t, key, _)| Arc::new(peers::Peers::new(t, key.clone(), weak.clone()))),
            tuning,
            export_uid,
            nbd: crate::nbd::limits::Budgets::new(nbd_limits),
            images: RwLock::new(BTreeMap::new()),
            holds: Mutex::new(BTreeMap::new()),
            profiles: RwLock::new(Default::default()),
            profile_watch: Mutex::new(None),
            profiles_rejected: Default::default(),
            weak: weak.clone(),
            ready: watch::channel(false).0,
            shutdown: watch::channel(false).0,
            cfg: cfg.clone(),
        });
        if let Some(addr) = cfg.metrics_listen {
            let l = tokio::net::TcpListener::bind(addr)
                .await
                .map_err(io_err("metrics listening on", Path::new(&addr.to_string())))?;
            let mut registry = crate::metrics::registry();
            registry.register_collector(Box::new(metrics::NodeMetrics { daemon: Arc::downgrade(&daemon) }));
            let endpoint = crate::metrics::http::Endpoint::new(registry, daemon.ready.subscribe());
            tokio::spawn(crate::metrics::http::serve(l, Arc::new(endpoint), daemon.shutdown.subscribe()));
            tracing::info!(listen = %addr, "metrics endpoint listening");
        }
        daemon.load_profiles();
        match daemon.watch_profiles() {
            Ok(w) => *daemon.profile_watch.lock().unwrap() = Some(w),
            Err(e) => {
                tracing::warn!(dir = %cfg.profile_dir.display(), error = %e, "cannot watch the profile directory; new profiles load at restart")
            }
        }
        for img in &cfg.images {
            daemon.add_image(img).await?;
        }
        if let Some(b) = &daemon.budget {
            cache::measure(b, &cfg.cache_dir);
        }

        let control_path = cfg.control_socket();
        let control = bind_unix(&control_path, None)?;
        tokio::spawn(Daemon::serve_control(daemon.clone(), control));
        if let Some(addr) = cfg.listen {
            let l = tokio::net::TcpListener::bind(addr)
                .await
                .map_err(io_err("listening on", Path::new(&addr.to_string())))?;
            tokio::spawn(server::run(l, daemon.clone(), daemon.nbd.clone(), daemon.shutdown.subscribe()));
        }
        if let (Some(peers), Some((t, _, listener))) = (&daemon.peers, p2p) {
            tokio::spawn(peers.server.clone().run(listener, daemon.shutdown.subscribe()));
            let (w, trackers) = (Arc::downgrade(&daemon), t.trackers.clone());
            tokio::spawn(peers::Peers::heartbeats(w, trackers, t.tracker_replicas, daemon.shutdown.subscribe()));
            tracing::info!(node = %t.advertise, listen = %t.listen, "peer server listening");
        }
        tokio::spawn(Daemon::commit_loop(daemon.clone()));
        if let Some(b) = &daemon.budget {
            tokio::spawn(Daemon::collect_loop(daemon.clone(), b.clone()));
            tracing::info!(max = b.max, high = b.high, low = b.low, used = b.used(), "cache budget");
        }
        tracing::info!(control = %control_path.display(), images = cfg.images.len(), "vmtd ready");
        let _ = daemon.ready.send(true);
        Ok(daemon)
    }

    /// One line for systemd's status: images and NBD clients.
    fn summary(&self) -> String {
        let images: Vec<Arc<Image>> = self.images.read().unwrap().values().cloned().collect();
        let clients: u64 = images.iter().map(|i| i.clients()).sum();
        format!("serving {} images to {clients} NBD clients", images.len())
    }

    /// Keeps systemd's status line current while the daemon runs.
    async fn report_status(daemon: std::sync::Weak<Daemon>) {
        let mut tick = tokio::time::interval(Duration::from_secs(10));
        tick.tick().await;
        loop {
            tick.tick().await;
            let Some(d) = daemon.upgrade() else { return };
            crate::metrics::notify::status(&d.summary());
        }
    }

    /// Stops serving and makes every cache durable.
    pub async fn stop(&self) {
        let _ = self.shutdown.send(true);
        let mut images: Vec<Arc<Image>> = self.images.write().unwrap().values().cloned().collect();
        images.extend(self.retired.lock().unwrap().iter().map(|r| r.image.clone()));
        for img in images {
            img.cancel_prefetch();
            let _ = img.shutdown.send(true);
            let _ = std::fs::remove_file(&img.socket);
            commit(&img).await;
        }
        let _ = std::fs::remove_file(self.cfg.control_socket());
    }

    pub fn image(&self, name: &str) -> Option<Arc<Image>> {
        self.images.read().unwrap().get(name).cloned()
    }

    /// Opens image `cfg` and starts its export. Under a name already served, an image with
    /// another digest becomes its new version (see `cache.rs`); the same digest is refused.
    pub async fn add_image(&self, cfg: &ImageConfig) -> Result<Arc<Image>, DaemonError> {
        // One addition at a time, and none during a collection (which must never remove a
        // directory an image is opening).
        let _gate = self.cache_gate.lock().await;
        let current = self.image(&cfg.name);
        let socket = self.cfg.export_socket(&cfg.name);
        let ctx = self.peers.as_ref().map(|p| &p.ctx);
        let img = {
            match Image::open(cfg, &self.cfg.cache_dir, self.tuning, socket.clone(), ctx).await {
                Ok(img) => img,
                // The same digest as the version served: its cache is open already.
                Err(ImageError::Store { source: crate::store::StoreError::Locked(_), .. }) if current.is_some() => {
                    return Err(DaemonError::Duplicate(cfg.name.clone()))
                }
                Err(e) => return Err(Box::new(e).into()),
            }
        };
        if let Some(b) = &self.budget {
            img.store.set_budget(b.clone());
        }
        let listener = match current {
            Some(_) => bind_unix_replacing(&socket, self.export_uid)?,
            None => bind_unix(&socket, self.export_uid)?,
        };
        {
            let mut images = self.images.write().unwrap();
            let old = images.get(&cfg.name).cloned();
            if old.as_ref().map(Arc::as_ptr) != current.as_ref().map(Arc::as_ptr)
                || old.as_ref().is_some_and(|o| o.manifest.root() == img.manifest.root())
            {
                return Err(DaemonError::Duplicate(cfg.name.clone()));
            }
            images.insert(cfg.name.clone(), img.clone());
            if let Some(old) = old {
                self.retire(old);
            }
        }
        let lookup = Arc::new(SingleExport { name: cfg.name.clone(), export: img.clone() });
        let task = tokio::spawn(server::run(listener, lookup, self.nbd.clone(), img.shutdown.subscribe()));
        *img.listener.lock().unwrap() = Some(task.abort_handle());
        tracing::info!(image = %cfg.name, digest = %img.manifest.root(), socket = %socket.display(), "export listening");
        Ok(img)
    }

    /// Stops serving image `name`; its cache stays on disk.
    pub async fn remove_image(&self, name: &str) -> Result<(), DaemonError> {
        let img = self.images.write().unwrap().remove(name).ok_or_else(|| DaemonError::UnknownImage(name.into()))?;
        img.cancel_prefetch();
        let _ = img.shutdown.send(true);
        let _ = std::fs::remove_file(&img.socket);
        commit(&img).await;
        tracing::info!(image = %name, "image removed");
        Ok(())
    }

    async fn serve_control(self: Arc<Self>, listener: UnixListener) {
        let mut shutdown = self.shutdown.subscribe();
        let slots = Arc::new(tokio::sync::Semaphore::new(CONTROL_CONNECTIONS));
        loop {
            let stream = tokio::select! {
                r = listener.accept() => match r { Ok((s, _)) => s, Err(_) => continue },
                _ = crate::shutdown::stopped(&mut shutdown) => return,
            };
            let Ok(slot) = slots.clone().try_acquire_owned() else {
                tracing::warn!("control connection refused: {CONTROL_CONNECTIONS} are open");
                continue;
            };
            let me = self.clone();
            tokio::spawn(async move {
                me.control_connection(stream).await;
                drop(slot);
            });
        }
    }

    async fn control_connection(&self, mut s: UnixStream) {
        loop {
            let frame = tokio::time::timeout(CONTROL_IDLE, control::read_frame::<Request, _>(&mut s)).await;
            let resp = match frame {
                Err(_) | Ok(Ok(None)) => return,
                Ok(Ok(Some(req))) => self.handle(req).await,
                Ok(Err(e)) => {
                    let _ = control::write_frame(&mut s, &Response::Error { message: e.to_string() }).await;
                    return;
                }
            };
            if control::write_frame(&mut s, &resp).await.is_err() {
                return;
            }
        }
    }

    async fn commit_loop(self: Arc<Self>) {
        let mut shutdown = self.shutdown.subscribe();
        let mut tick = tokio::time::interval(self.tuning.commit_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = crate::shutdown::stopped(&mut shutdown) => return,
            }
            for img in self.sweep_retired() {
                commit(&img).await;
            }
            let mut images: Vec<Arc<Image>> = self.images.read().unwrap().values().cloned().collect();
            images.extend(self.retired.lock().unwrap().iter().map(|r| r.image.clone()));
            for img in images {
                if img.store.needs_commit() {
                    commit(&img).await;
                }
            }
        }
    }
}

fn done(r: Result<(), DaemonError>) -> Response {
    match r {
        Ok(()) => Response::Done,
        Err(e) => Response::Error { message: e.to_string() },
    }
}

fn unknown(image: String) -> Response {
    Response::Error { message: DaemonError::UnknownImage(image).to_string() }
}

/// Fills `img`'s cache with every chunk, one coalesced run at a time so guest misses are never
/// queued behind it, paced to `rate` bytes/s. Stops when the image is removed or vmtd stops.
async fn complete(img: &Arc<Image>, rate: Option<u64>) {
    let g = img.manifest.geometry();
    let step = img.fetcher.max_chunks();
    let mut shutdown = img.shutdown.subscribe();
    let start = tokio::time::Instant::now();
    let mut fetched = 0u64;
    let mut next = 0u32;
    tracing::info!(image = %img.name, ?rate, "completing the cache");
    while next < g.chunk_count() {
        if *shutdown.borrow() {
            return;
        }
        let end = next.saturating_add(step).min(g.chunk_count());
        if !img.store.has_all(next..end) {
            let before = img.fetcher.stats().bytes_from_origin.load(std::sync::atomic::Ordering::Relaxed);
            if let Err(e) = img.fetcher.ensure(next..end).await {
                tracing::warn!(image = %img.name, error = %e, "completing: fetch failed; retrying");
                tokio::select! {
                    _ = tokio::time::sleep(std::time::Duration::from_secs(1)) => {}
                    _ = crate::shutdown::stopped(&mut shutdown) => return,
                }
                continue;
            }
            fetched +=
                img.fetcher.stats().bytes_from_origin.load(std::sync::atomic::Ordering::Relaxed).saturating_sub(before);
            if let Some(rate) = rate.filter(|r| *r > 0) {
                let due = start + std::time::Duration::from_secs_f64(fetched as f64 / rate as f64);
                tokio::select! {
                    _ = tokio::time::sleep_until(due) => {}
                    _ = crate::shutdown::stopped(&mut shutdown) => return,
                }
            }
        }
        next = end;
    }
    tracing::info!(image = %img.name, fetched, "cache complete");
}

async fn commit(img: &Arc<Image>) {
    let store = img.store.clone();
    match tokio::task::spawn_blocking(move || store.commit()).await {
        Ok(Ok(_)) => {}
        // A full disk fails every commit until space returns: said now and then, not each time.
        Ok(Err(crate::store::StoreError::Io { source, .. })) if crate::fsutil::is_full(&source) => {
            static FULL: crate::throttle::Throttle = crate::throttle::Throttle::new();
            if FULL.due() {
                tracing::warn!(image = %img.name, error = %source, "cache commit failed: disk full; new chunks stay checked on every read until it succeeds");
            }
        }
        Ok(Err(e)) => {
            tracing::error!(image = %img.name, error = %e, "cache commit failed")
        }
        Err(e) => tracing::error!(image = %img.name, error = %e, "cache commit panicked"),
    }
}

/// Binds a unix socket, replacing a stale one, readable and writable by root and `uid` only.
/// Binds a socket that takes the place of this daemon's own socket at `path` in one rename:
/// a client connecting meanwhile reaches the old listener or the new one, never nothing.
fn bind_unix_replacing(path: &Path, uid: Option<u32>) -> Result<UnixListener, DaemonError> {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = path.with_file_name(format!(".{name}.new"));
    let _ = std::fs::remove_file(&tmp);
    let l = bind_unix(&tmp, uid)?;
    std::fs::rename(&tmp, path).map_err(io_err("replacing socket", path))?;
    Ok(l)
}

fn bind_unix(path: &Path, uid: Option<u32>) -> Result<UnixListener, DaemonError> {
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        use std::os::unix::fs::FileTypeExt;
        if !meta.file_type().is_socket() {
            return Err(DaemonError::Io {
                what: "refusing to replace non-socket",
                path: path.display().to_string(),
                source: std::io::Error::from(std::io::ErrorKind::AlreadyExists),
            });
        }
        // A live daemon would still be accepting here: refuse to steal its socket.
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(DaemonError::Io {
                what: "another process is serving",
                path: path.display().to_string(),
                source: std::io::Error::from(std::io::ErrorKind::AddrInUse),
            });
        }
        std::fs::remove_file(path).map_err(io_err("removing stale socket", path))?;
    }
    let l = UnixListener::bind(path).map_err(io_err("binding", path))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(io_err("chmod", path))?;
    if let Some(uid) = uid {
        std::os::unix::fs::chown(path, Some(uid), Some(0)).map_err(io_err("chown", path))?;
    }
    Ok(l)
}

/// Control connections open at once; more are closed at accept (the socket is root-only).
const CONTROL_CONNECTIONS: usize = 64;
/// How long a control connection may take to send its next request.
const CONTROL_IDLE: Duration = Duration::from_secs(60);

/// Raises the soft limit on open files to the hard one: every NBD connection, peer session and
/// cache file costs a descriptor, and the usual soft limit of 1024 is below the default caps.
fn raise_fd_limit(connections: usize) {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: plain system calls on a valid, owned struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
    if (lim.rlim_cur as usize) < connections + 256 {
        tracing::warn!(open_files = lim.rlim_cur, connections, "the open-file limit is below nbd.max_connections");
    }
}

/// The uid of a local user, if it exists.
fn uid_of(user: &str) -> Option<u32> {
    let name = CString::new(user).ok()?;
    let mut pw: libc::passwd = unsafe { std::mem::zeroed() };
    let mut buf = vec![0 as libc::c_char; 4096];
    let mut out: *mut libc::passwd = std::ptr::null_mut();
    // SAFETY: all pointers are valid for the call; `buf` outlives the use of `pw`.
    let rc = unsafe { libc::getpwnam_r(name.as_ptr(), &mut pw, buf.as_mut_ptr(), buf.len(), &mut out) };
    (rc == 0 && !out.is_null()).then_some(pw.pw_uid)
}
