//! Live migration of a running vmthunder VM between two libvirt hosts on this machine
//! (scripts/migrate-hosts: each host a network and mount namespace with its own libvirtd and
//! vmtd serving the same image), with `virsh migrate --live --copy-storage-inc`.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use common::*;

const HOSTS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/migrate-hosts");

/// The two hosts, taken down on drop (also when the test fails).
struct Hosts {
    dir: PathBuf,
}

impl Hosts {
    fn up(dir: &Path, image: &Path) -> Hosts {
        let hosts = Hosts { dir: dir.to_path_buf() };
        let out = run(Command::new(HOSTS).arg("up").arg(dir).arg(image));
        assert!(out.status.success(), "migrate-hosts up: {}", String::from_utf8_lossy(&out.stderr));
        hosts
    }

    fn exec(&self, host: &str, args: &[&str]) -> Output {
        run(Command::new(HOSTS).arg("exec").arg(&self.dir).arg(host).args(args))
    }

    fn uri(&self, host: &str) -> String {
        let out = run(Command::new(HOSTS).arg("uri").arg(&self.dir).arg(host));
        String::from_utf8(out.stdout).unwrap().trim().to_string()
    }

    fn virsh(&self, host: &str, args: &[&str]) -> Output {
        run(Command::new("virsh").arg("-q").arg("-c").arg(self.uri(host)).args(args))
    }

    /// `vmt status --json` of the host's vmtd, for image `guest`.
    fn guest(&self, host: &str) -> serde_json::Value {
        let out = self.exec(host, &["vmt", "status", "--json"]);
        assert!(out.status.success(), "vmt status on {host}: {}", String::from_utf8_lossy(&out.stderr));
        let all: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        all.as_array().unwrap().iter().find(|i| i["name"] == "guest").unwrap().clone()
    }
}

impl Drop for Hosts {
    fn drop(&mut self) {
        let _ = Command::new(HOSTS).arg("down").arg(&self.dir).status();
    }
}

#[test]
fn a_running_vm_live_migrates_to_a_node_whose_vmtd_serves_the_same_image() {
    let guest = PathBuf::from(std::env::var("VMT_GUEST_DIR").unwrap_or_else(|_| "/var/cache/vmthunder/guest".into()));
    let sha = std::fs::read_to_string(guest.join("disk.sha256")).expect("the test guest (scripts/build-guest)");
    let sha = sha.split_whitespace().next().unwrap().to_string();
    let env = Env::new();
    std::fs::set_permissions(env.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let dir = env.path("hosts");
    std::fs::create_dir(&dir).unwrap();
    let hosts = Hosts::up(&dir, &guest.join("disk.raw"));

    // The same pool and overlay on both nodes; the domain's disk names the overlay's file.
    let mut disk = String::new();
    for h in ["A", "B"] {
        let out =
            hosts.exec(h, &["vmt", "pool", "define", "--name", "migpool", "--path", "/var/lib/vmthunder/migpool"]);
        assert!(out.status.success(), "pool define on {h}: {}", String::from_utf8_lossy(&out.stderr));
        let out =
            hosts.exec(h, &["vmt", "vol", "create", "--image", "guest", "--pool", "migpool", "--file", "vm.qcow2"]);
        assert!(out.status.success(), "vol create on {h}: {}", String::from_utf8_lossy(&out.stderr));
        disk = String::from_utf8(out.stdout).unwrap();
    }
    assert!(disk.contains("<disk type='file'"), "{disk}");
    let name = format!("vmt-mig-{}", std::process::id());
    // The hosts' libvirtds label the kernel and initrd they boot; the machine's own libvirtd may
    // be running other domains from the shared copies (another test run), and labelling a file
    // in use by another daemon's domain fails. So this test boots copies of its own.
    let boot = env.path("boot");
    std::fs::create_dir(&boot).unwrap();
    for f in ["vmlinuz", "initrd.img"] {
        std::fs::copy(guest.join(f), boot.join(f)).unwrap();
    }
    let console = env.path("console");
    let xml = format!(
        "<domain type='qemu'><name>{name}</name><memory unit='MiB'>256</memory><vcpu>1</vcpu>
  <os><type arch='x86_64' machine='q35'>hvm</type><kernel>{kernel}</kernel><initrd>{initrd}</initrd>
    <cmdline>console=ttyS0 panic=-1 vmt.mode=readloop vmt.loops=100000</cmdline></os>
  <features><acpi/></features>
  <on_poweroff>destroy</on_poweroff><on_reboot>destroy</on_reboot><on_crash>destroy</on_crash>
  <devices>{disk}
    <serial type='file'><source path='{console}' append='on'/><target port='0'/></serial>
    <memballoon model='none'/></devices></domain>",
        kernel = boot.join("vmlinuz").display(),
        initrd = boot.join("initrd.img").display(),
        console = console.display()
    );
    let xml_path = env.path("domain.xml");
    std::fs::write(&xml_path, xml).unwrap();
    let out = hosts.virsh("A", &["define", xml_path.to_str().unwrap()]);
    assert!(out.status.success(), "define: {}", String::from_utf8_lossy(&out.stderr));
    let out = hosts.virsh("A", &["start", &name]);
    assert!(out.status.success(), "start: {}", String::from_utf8_lossy(&out.stderr));
    let read_console = || std::fs::read_to_string(&console).unwrap_or_default();
    wait_until("the guest's first full read on A", Duration::from_secs(240), || read_console().contains("VMT-LOOP 1 "));
    assert_eq!(hosts.guest("A")["holds"], serde_json::json!([name]));
    assert_eq!(hosts.guest("B")["bytes_served"], 0);

    // The guest keeps reading its disk while it moves.
    let t0 = Instant::now();
    let out = run(Command::new("virsh").arg("-c").arg(hosts.uri("A")).args([
        "migrate",
        "--live",
        "--copy-storage-inc",
        &name,
        &hosts.uri("B"),
        "--migrateuri",
        "tcp://10.213.0.2",
    ]));
    assert!(out.status.success(), "migrate: {}", String::from_utf8_lossy(&out.stderr));
    eprintln!("migrated in {:?}", t0.elapsed());
    let state = |h: &str| String::from_utf8_lossy(&hosts.virsh(h, &["domstate", &name]).stdout).trim().to_string();
    assert_ne!(state("A"), "running", "the source still runs the domain");
    // The guest reads until the test ends it, so the move never races its last read: wait for
    // two more whole reads, the second entirely on B.
    let moved_at = last_loop(&read_console());
    wait_until("two full reads on B", Duration::from_secs(300), || finished_loop(&read_console(), moved_at + 2));
    let c = read_console();
    let loops = finished_loops(&c);
    assert!(loops.len() >= 3, "{c}");
    assert!(loops.iter().all(|l| l.ends_with(&sha)), "wrong data across the migration:\n{c}");
    assert!(!c.contains("I/O error"), "{c}");

    // B's vmtd served the reads after the move and assembled at `migrate begin`; A let go.
    let b = hosts.guest("B");
    assert!(b["bytes_served"].as_u64().unwrap() > 0, "{b}");
    let log = std::fs::read_to_string(dir.join("B/vmtd.log")).unwrap();
    assert!(log.contains("assembled") && log.contains(&name), "B's vmtd never assembled for the domain");
    assert_eq!(hosts.guest("A")["holds"], serde_json::json!([]), "the source's hold is released");
}
