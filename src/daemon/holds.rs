//! Holds: which domains hold which images. A domain's hold starts when the libvirt hook
//! assembles its images (before QEMU starts) and ends when it is released; a held image is
//! prefetched from its profile (or its boot recorded), and the cache collector spares its
//! profile chunks. Soft state: lost on restart and re-sent by the hook at the next start.

use std::time::Duration;

use super::{Daemon, DaemonError};

impl Daemon {
    /// Checks that every image in `images` is served and listening, then records `domain`'s
    /// hold on them. Returns their export sockets.
    pub async fn assemble(&self, domain: &str, images: &[String]) -> Result<Vec<String>, DaemonError> {
        let mut sockets = Vec::with_capacity(images.len());
        for name in images {
            let img = self.image(name).ok_or_else(|| DaemonError::UnknownImage(name.clone()))?;
            let probe = tokio::time::timeout(Duration::from_secs(5), tokio::net::UnixStream::connect(&img.socket));
            if !matches!(probe.await, Ok(Ok(_))) {
                return Err(DaemonError::NotListening(name.clone()));
            }
            sockets.push(img.socket.display().to_string());
        }
        self.holds.lock().unwrap().entry(domain.to_string()).or_default().extend(images.iter().cloned());
        tracing::info!(domain, ?images, "assembled");
        // Prefetch ahead of this boot from the image's profile, or learn one from this boot.
        for name in images {
            let Some(img) = self.image(name) else { continue };
            let running = img
                .prefetch
                .lock()
                .unwrap()
                .as_ref()
                .is_some_and(|j| !j.finished.load(std::sync::atomic::Ordering::SeqCst));
            if self.profile_of(&img).is_some() {
                if !running {
                    if let Err(e) = self.start_prefetch(&img, None, None) {
                        tracing::warn!(image = %name, error = %e, "prefetch not started");
                    }
                }
            } else if self.cfg.auto_record && img.recorder.running().is_none() {
                let _ = self.start_recording(&img, Some(domain.to_string()), self.tuning.record_duration);
            }
        }
        Ok(sockets)
    }

    /// Drops every hold of `domain`.
    pub async fn release(&self, domain: &str) {
        if self.holds.lock().unwrap().remove(domain).is_some() {
            tracing::info!(domain, "released");
        }
        for r in self.retired.lock().unwrap().iter_mut() {
            r.holders.remove(domain);
        }
        self.stop_recordings_of(domain).await;
    }

    pub(super) fn holders(&self, image: &str) -> Vec<String> {
        let holds = self.holds.lock().unwrap();
        holds.iter().filter(|(_, imgs)| imgs.contains(image)).map(|(d, _)| d.clone()).collect()
    }
}
