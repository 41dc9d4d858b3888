//! libvirt integration: the qemu hook's decisions ([`hook`], over [`domain`] XML parsing,
//! [`qcow2`] backing chains and [`storage`] pool files), the
//! storage pool and per-VM overlay volumes ([`pool`]), and detaching a running VM from vmtd
//! ([`detach`]). Everything that calls the libvirt API blocks: callers keep it off the async
//! runtime. The hook never calls the libvirt API (libvirtd would deadlock waiting on itself).

pub mod detach;
pub mod domain;
pub mod hook;
pub mod pool;
pub mod qcow2;
pub mod storage;

/// Escapes text for an XML attribute or element.
pub fn xml_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            c => out.push(c),
        }
    }
    out
}

/// The libvirt connection URI for the system QEMU driver.
pub const SYSTEM_URI: &str = "qemu:///system";
