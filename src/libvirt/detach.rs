//! Detach a running VM from vmtd: a block pull copies every backing block into the VM's own
//! overlay and removes the NBD backing from the chain, so the guest no longer needs vmtd or
//! the network. Uses the libvirt API (blocking); never called from the hook.

use std::ffi::CString;
use std::time::{Duration, Instant};

use thiserror::Error;

use super::{domain, SYSTEM_URI};

/// Errors detaching a disk.
#[derive(Debug, Error)]
pub enum DetachError {
    #[error("libvirt: {0}")]
    Libvirt(String),
    #[error("domain {0} is not running")]
    NotRunning(String),
    #[error("block pull of {disk} did not finish within {secs}s")]
    Timeout { disk: String, secs: u64 },
    #[error("disk {0} still reads from vmthunder after the pull")]
    StillBacked(String),
}

/// Pulls every backing block of `disk` of running domain `name` into its top image. Calls
/// `progress(done, total)` while the job runs. Returns whether the domain still has other
/// vmthunder disks.
pub fn block_pull(
    name: &str,
    disk: &str,
    limit: Duration,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<bool, DetachError> {
    let lv = |e: virt::error::Error| DetachError::Libvirt(e.to_string());
    virt::error::clear_error_callback();
    let conn = virt::connect::Connect::open(Some(SYSTEM_URI)).map_err(lv)?;
    let dom = conn.lookup_domain_by_name(name).map_err(lv)?;
    if !dom.is_active().map_err(lv)? {
        return Err(DetachError::NotRunning(name.into()));
    }
    let cdisk = CString::new(disk).map_err(|_| DetachError::Libvirt("disk name has a NUL byte".into()))?;
    // SAFETY: `dom` is alive for the call and `cdisk` is a valid C string.
    if unsafe { virt::sys::virDomainBlockPull(dom.as_ptr(), cdisk.as_ptr(), 0, 0) } < 0 {
        return Err(lv(virt::error::Error::last_error()));
    }
    let start = Instant::now();
    loop {
        let mut info = virt::sys::virDomainBlockJobInfo { type_: 0, bandwidth: 0, cur: 0, end: 0 };
        // SAFETY: as above; `info` is a valid out-pointer.
        let rc = unsafe { virt::sys::virDomainGetBlockJobInfo(dom.as_ptr(), cdisk.as_ptr(), &mut info, 0) };
        match rc {
            0 => break, // no job left: the pull finished
            1 => progress(info.cur, info.end),
            _ => return Err(lv(virt::error::Error::last_error())),
        }
        if start.elapsed() > limit {
            // Leave no job behind: the domain stays on its NBD backing, unchanged.
            // SAFETY: as above.
            unsafe { virt::sys::virDomainBlockJobAbort(dom.as_ptr(), cdisk.as_ptr(), 0) };
            return Err(DetachError::Timeout { disk: disk.into(), secs: limit.as_secs() });
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let xml = dom.xml_desc(0).map_err(lv)?;
    let any_dir = |_: &std::path::Path| true;
    let left = domain::parse(&xml, &any_dir).map_err(|e| DetachError::Libvirt(e.to_string()))?;
    if left.disks.iter().any(|d| d.target == disk) {
        return Err(DetachError::StillBacked(disk.into()));
    }
    Ok(!left.disks.is_empty())
}
