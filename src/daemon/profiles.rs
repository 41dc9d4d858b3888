//! The daemon's side of boot profiles: recordings started and stopped (by hand, by timer, by the
//! hook), profiles merged and saved to `profile_dir`, loaded at start and whenever a file there
//! changes (a malformed file is logged and ignored, the previous profile kept), and prefetch
//! jobs started from them.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use super::control::ProfileInfo;
use super::{Daemon, DaemonError, Image};
use crate::fsutil;
use crate::profile::{prefetch, Profile};

/// Profiles by image digest (hex).
pub type ProfileMap = HashMap<String, Arc<Profile>>;

impl Daemon {
    fn profile_path(&self, img: &Image) -> PathBuf {
        self.cfg.profile_dir.join(Profile::file_name(&img.manifest.root()))
    }

    pub(super) fn profile_of(&self, img: &Image) -> Option<Arc<Profile>> {
        self.profiles.read().unwrap().get(&img.manifest.root().to_hex()).cloned()
    }

    /// Starts recording `img`; stops by itself after `duration`.
    pub fn start_recording(
        &self,
        img: &Arc<Image>,
        domain: Option<String>,
        duration: Duration,
    ) -> Result<(), DaemonError> {
        let id = img
            .recorder
            .start(domain.clone())
            .ok_or_else(|| DaemonError::Profile(format!("image {} is already being recorded", img.name)))?;
        tracing::info!(image = %img.name, ?domain, ?duration, "recording boot profile");
        // Weak: a timer must not keep a closed image (and its cache's lock) alive.
        let (me, img) = (self.weak.clone(), Arc::downgrade(img));
        tokio::spawn(async move {
            tokio::time::sleep(duration).await;
            let Some(img) = img.upgrade() else { return };
            if let (Some(me), Some(rec)) = (me.upgrade(), img.recorder.stop(Some(id))) {
                if let Err(e) = me.save_recording(&img, &rec.touches).await {
                    tracing::error!(image = %img.name, error = %e, "saving the recorded profile failed");
                }
            }
        });
        Ok(())
    }

    /// Stops `img`'s recording and merges it into its profile.
    pub async fn stop_recording(&self, img: &Image) -> Result<Arc<Profile>, DaemonError> {
        let rec = img
            .recorder
            .stop(None)
            .ok_or_else(|| DaemonError::Profile(format!("image {} is not being recorded", img.name)))?;
        self.save_recording(img, &rec.touches).await
    }

    /// Stops recordings that `domain` started (its boot is over).
    pub(super) async fn stop_recordings_of(&self, domain: &str) {
        let mut images: Vec<Arc<Image>> = self.images.read().unwrap().values().cloned().collect();
        images.extend(self.retired.lock().unwrap().iter().map(|r| r.image.clone()));
        for img in images {
            if img.recorder.running() == Some(Some(domain.to_string())) {
                if let Err(e) = self.stop_recording(&img).await {
                    tracing::error!(image = %img.name, error = %e, "saving the recorded profile failed");
                }
            }
        }
    }

    /// Merges a recording into the image's profile and saves it, off the runtime's threads
    /// (the file is written and synced).
    async fn save_recording(&self, img: &Image, touches: &[(u32, u32)]) -> Result<Arc<Profile>, DaemonError> {
        let boot = Profile::from_touches(img.manifest.root(), &img.manifest.geometry(), touches);
        if boot.entries.is_empty() {
            return Err(DaemonError::Profile(format!("recording of {} saw no reads; profile unchanged", img.name)));
        }
        let (old, age_out, path) = (self.profile_of(img), self.cfg.profile_age_out, self.profile_path(img));
        let file = path.clone();
        let merged = tokio::task::spawn_blocking(move || {
            let merged = match old {
                Some(old) => old.merge(&boot, age_out).map_err(|e| DaemonError::Profile(e.to_string()))?,
                None => boot,
            };
            fsutil::write_atomic(&file, &merged.encode(), 0o644).map_err(|source| DaemonError::Io {
                what: "writing profile",
                path: file.display().to_string(),
                source,
            })?;
            Ok::<_, DaemonError>(merged)
        })
        .await
        .map_err(|e| DaemonError::Profile(format!("saving the profile of {}: {e}", img.name)))??;
        let merged = Arc::new(merged);
        self.profiles.write().unwrap().insert(img.manifest.root().to_hex(), merged.clone());
        tracing::info!(image = %img.name, boots = merged.boots, chunks = merged.entries.len(), path = %path.display(), "profile saved");
        Ok(merged)
    }

    /// Starts prefetching `img` from `profile` (its own when `None`), replacing a running job.
    pub fn start_prefetch(
        &self,
        img: &Arc<Image>,
        profile: Option<Arc<Profile>>,
        rate: Option<u64>,
    ) -> Result<(), DaemonError> {
        let profile = match profile.or_else(|| self.profile_of(img)) {
            Some(p) => p,
            None => return Err(DaemonError::Profile(format!("image {} has no profile", img.name))),
        };
        let g = img.manifest.geometry();
        if profile.root != img.manifest.root()
            || profile.image_size != g.image_size()
            || profile.chunk_size != g.chunk_size().bytes()
        {
            return Err(DaemonError::Profile(format!(
                "profile is for image {}, not {} ({})",
                profile.root,
                img.name,
                img.manifest.root()
            )));
        }
        let job = Arc::new(prefetch::Job::default());
        if let Some(old) = img.prefetch.lock().unwrap().replace(job.clone()) {
            old.cancel();
        }
        tracing::info!(image = %img.name, chunks = profile.entries.len(), ?rate, "prefetching from profile");
        // A prefetch reads the image as its guest will: the node takes its parents to push to it.
        if let Some(s) = &img.swarm {
            s.activate();
        }
        let rate = rate.or(self.tuning.prefetch_rate);
        tokio::spawn(prefetch::run(
            img.fetcher.clone(),
            img.store.clone(),
            profile,
            rate,
            self.cfg.prefetch_concurrency,
            job,
        ));
        Ok(())
    }

    /// Loads every profile in `profile_dir`.
    pub(super) fn load_profiles(&self) {
        let Ok(dir) = std::fs::read_dir(&self.cfg.profile_dir) else { return };
        for entry in dir.flatten() {
            self.load_profile(&entry.path());
        }
    }

    /// Loads (or reloads) one profile file; a bad one is logged and the previous one kept.
    pub(super) fn load_profile(&self, path: &Path) {
        let Some(name) = path.file_name().and_then(|n| n.to_str()) else { return };
        let Some(digest) = name.strip_suffix(".profile").filter(|_| !name.starts_with('.')) else { return };
        let loaded = std::fs::read(path).map_err(|e| e.to_string()).and_then(|bytes| {
            if bytes.len() > crate::profile::format::MAX_PROFILE_BYTES {
                return Err(format!("{} bytes is too large", bytes.len()));
            }
            Profile::decode(&bytes).map_err(|e| e.to_string())
        });
        match loaded {
            Ok(p) if p.root.to_hex() == digest => {
                tracing::info!(path = %path.display(), boots = p.boots, chunks = p.entries.len(), "profile loaded");
                self.profiles.write().unwrap().insert(digest.to_string(), Arc::new(p));
            }
            Ok(p) => {
                self.profiles_rejected.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                tracing::warn!(path = %path.display(), root = %p.root, "profile ignored: its name is not its image digest")
            }
            Err(e) => {
                self.profiles_rejected.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                tracing::warn!(path = %path.display(), error = %e, "profile ignored; keeping the previous one")
            }
        }
    }

    pub(super) fn profile_list(&self) -> Vec<ProfileInfo> {
        let images: Vec<Arc<Image>> = self.images.read().unwrap().values().cloned().collect();
        let mut out: Vec<ProfileInfo> = self
            .profiles
            .read()
            .unwrap()
            .iter()
            .map(|(digest, p)| ProfileInfo {
                digest: digest.clone(),
                image: images.iter().find(|i| i.manifest.root().to_hex() == *digest).map(|i| i.name.clone()),
                boots: p.boots,
                chunks: p.entries.len() as u64,
                bytes: p.bytes(),
                path: self.cfg.profile_dir.join(format!("{digest}.profile")).display().to_string(),
            })
            .collect();
        out.sort_by(|a, b| a.digest.cmp(&b.digest));
        out
    }

    /// Watches `profile_dir` so profiles copied in by configuration management load at once.
    pub(super) fn watch_profiles(self: &Arc<Self>) -> Result<notify::RecommendedWatcher, notify::Error> {
        use notify::Watcher;
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<PathBuf>();
        let mut watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
            if let Ok(ev) = res {
                if matches!(ev.kind, notify::EventKind::Create(_) | notify::EventKind::Modify(_)) {
                    for p in ev.paths {
                        let _ = tx.send(p);
                    }
                }
            }
        })?;
        watcher.watch(&self.cfg.profile_dir, notify::RecursiveMode::NonRecursive)?;
        let me = Arc::downgrade(self);
        tokio::spawn(async move {
            while let Some(path) = rx.recv().await {
                let Some(me) = me.upgrade() else { return };
                if path.exists() {
                    me.load_profile(&path);
                }
            }
        });
        Ok(watcher)
    }
}
