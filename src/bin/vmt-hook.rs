//! `vmt-hook`: libvirt's qemu hook for vmthunder, run by `hooks/qemu.d/vmthunder` as
//! `vmt-hook NAME OP SUBOP EXTRA` with the domain XML on stdin. Exits 0 when there is nothing
//! to do; exits 1 with a one-line reason on stderr to fail a domain start.

use std::io::Read;
use std::path::PathBuf;

use vmthunder::config::{Config, DEFAULT_CONFIG};
use vmthunder::libvirt::{domain, hook, storage};

/// Domain XML larger than this is refused rather than read without bound.
const MAX_XML: u64 = 16 << 20;
/// Longest time reading the domain XML and looking into its disks may take.
const PROBE_DEADLINE: std::time::Duration = std::time::Duration::from_secs(10);

fn main() {
    std::process::exit(match run() {
        Ok(()) => 0,
        Err(msg) => {
            eprintln!("vmthunder: {msg}");
            1
        }
    });
}

fn run() -> Result<(), String> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (op, sub_op) = match args.as_slice() {
        [_name, op, sub_op, ..] => (op.as_str(), sub_op.as_str()),
        _ => return Err("usage: vmt-hook DOMAIN OPERATION SUB-OPERATION [EXTRA] < domain.xml".into()),
    };
    // The configured run_dir counts even while vmtd is down, so the failure is explained.
    let config = std::env::var_os("VMT_CONFIG").map(PathBuf::from).unwrap_or_else(|| DEFAULT_CONFIG.into());
    let run_dir = match Config::load(&config) {
        Ok(c) => c.run_dir,
        Err(_) => Config::from_toml("").map(|c| c.run_dir).map_err(|e| e.to_string())?,
    };
    let mut xml_err = None;
    let read_xml = || {
        let mut s = String::new();
        if let Err(e) = std::io::stdin().take(MAX_XML).read_to_string(&mut s) {
            xml_err = Some(e.to_string());
        }
        s
    };
    let check = hook::run_dir_check(run_dir);
    let pool_dirs: Vec<&std::path::Path> = storage::POOL_DIRS.iter().map(std::path::Path::new).collect();
    let probe = |c: &domain::Candidate| hook::probe_disk(c, &pool_dirs, &check);
    // Looking into disks reads files libvirt names, maybe on a network filesystem: libvirtd
    // waits on the hook, so a filesystem that stops answering fails the start with a reason
    // instead of hanging it (a read stuck in the kernel can still delay the exit itself).
    let (probing, watchdog) = std::sync::mpsc::channel::<()>();
    std::thread::spawn(move || {
        if watchdog.recv_timeout(PROBE_DEADLINE) == Err(std::sync::mpsc::RecvTimeoutError::Timeout) {
            eprintln!(
                "vmthunder: looking into the domain's disks took over {PROBE_DEADLINE:?}: a filesystem not answering?"
            );
            std::process::exit(1);
        }
    });
    let plan = hook::plan(op, sub_op, read_xml, &check, &probe).map_err(|e| e.to_string());
    drop(probing);
    let plan = plan?;
    if let Some(e) = xml_err {
        return Err(format!("reading the domain XML: {e}"));
    }
    if plan == hook::Plan::Nothing {
        return Ok(());
    }
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(|e| e.to_string())?;
    rt.block_on(hook::execute(plan)).map_err(|e| e.to_string())
}
