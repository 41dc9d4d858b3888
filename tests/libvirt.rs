//! `virsh start` through vmthunder, against the real libvirtd + QEMU (TCG) that scripts/test
//! starts, with the hook and binaries it installs, and the tiny guest of scripts/build-guest.
//! The guest checksums its disk (or writes / reads a marker, or reads it in a loop) on the
//! serial console and powers off.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use common::*;

/// A guest's allowance, in the CPU time its emulator spends (a TCG guest starved of the host's
/// CPU by a loaded machine makes as much progress in more wall time) ...
const BOOT_LIMIT: Duration = Duration::from_secs(240);
/// ... and in wall time, however starved (a guest hung on its disk spends no CPU).
const BOOT_WALL_LIMIT: Duration = Duration::from_secs(600);

struct Guest {
    kernel: PathBuf,
    initrd: PathBuf,
    disk: PathBuf,
    sha256: String,
}

fn guest() -> Guest {
    let dir = PathBuf::from(std::env::var("VMT_GUEST_DIR").unwrap_or_else(|_| "/var/cache/vmthunder/guest".into()));
    let sha = std::fs::read_to_string(dir.join("disk.sha256"))
        .unwrap_or_else(|_| panic!("no test guest in {}: run scripts/build-guest (scripts/test does)", dir.display()));
    Guest {
        kernel: dir.join("vmlinuz"),
        initrd: dir.join("initrd.img"),
        disk: dir.join("disk.raw"),
        sha256: sha.split_whitespace().next().unwrap().to_string(),
    }
}

fn virsh(args: &[&str]) -> Output {
    run(Command::new("timeout").arg("120").arg("virsh").args(["-q", "-c", "qemu:///system"]).args(args))
}

fn require_libvirt() {
    let v = virsh(&["version"]);
    assert!(v.status.success(), "libvirtd is not running: run the tests through scripts/test");
    assert!(
        Path::new("/etc/libvirt/hooks/qemu.d/vmthunder").exists(),
        "the vmthunder hook is not installed: run the tests through scripts/test"
    );
}

fn unique(prefix: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    format!("vmt-{prefix}-{}-{}", std::process::id(), N.fetch_add(1, Ordering::SeqCst))
}

/// A libvirt environment: a vmtd serving the guest disk as image `guest` and a pool of
/// overlays, both private to this test. QEMU (user libvirt-qemu) must reach the sockets.
struct Node {
    env: Env,
    vmtd: Proc,
    cfg: PathBuf,
    pool: String,
    guest: Guest,
}

impl Node {
    fn new() -> Node {
        Node::serving(guest())
    }

    /// A node whose vmtd serves `guest.disk` as image `guest`.
    fn serving(guest: Guest) -> Node {
        require_libvirt();
        let env = Env::new();
        std::fs::set_permissions(env.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let cfg = env.config("", &file_image("guest", &guest.disk, ""));
        let vmtd = start_vmtd(&env, &cfg);
        let pool = unique("pool");
        let pool_dir = env.path("pool");
        let out =
            run(Command::new(VMT).args(["pool", "define", "--name", &pool, "--path", pool_dir.to_str().unwrap()]));
        assert!(out.status.success(), "pool define: {}", String::from_utf8_lossy(&out.stderr));
        Node { env, vmtd, cfg, pool, guest }
    }

    fn vmt(&self, args: &[&str]) -> Output {
        run(Command::new(VMT).arg("--socket").arg(self.env.control_sock()).args(args))
    }

    /// Creates an overlay volume and returns the `<disk>` XML printed for it.
    fn volume(&self, vol: &str) -> String {
        let out = self.vmt(&["vol", "create", "--image", "guest", "--pool", &self.pool, vol]);
        assert!(out.status.success(), "vol create: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap()
    }

    fn domain(&self, disk_xml: &str, cmdline: &str) -> Domain {
        Domain::define(&self.env, &self.guest, disk_xml, &format!("console=ttyS0 panic=-1 {cmdline}"), 256, 1)
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = virsh(&["pool-destroy", &self.pool]);
        let _ = virsh(&["pool-undefine", &self.pool]);
    }
}

struct Domain {
    name: String,
    console: PathBuf,
}

impl Domain {
    fn define(env: &Env, guest: &Guest, disk_xml: &str, cmdline: &str, mib: u32, cpus: u32) -> Domain {
        let name = unique("vm");
        let console = env.path(&format!("{name}.console"));
        let xml = format!(
            "<domain type='qemu'>
  <name>{name}</name>
  <memory unit='MiB'>{mib}</memory>
  <vcpu>{cpus}</vcpu>
  <os><type arch='x86_64' machine='q35'>hvm</type>
    <kernel>{kernel}</kernel><initrd>{initrd}</initrd>
    <cmdline>{cmdline}</cmdline></os>
  <features><acpi/></features>
  <on_poweroff>destroy</on_poweroff><on_reboot>destroy</on_reboot><on_crash>destroy</on_crash>
  <devices>
    {disk_xml}
    <serial type='file'><source path='{console}'/><target port='0'/></serial>
    <memballoon model='none'/>
  </devices>
</domain>",
            kernel = guest.kernel.display(),
            initrd = guest.initrd.display(),
            console = console.display()
        );
        let path = env.path(&format!("{name}.xml"));
        std::fs::write(&path, xml).unwrap();
        let out = virsh(&["define", path.to_str().unwrap()]);
        assert!(out.status.success(), "define: {}", String::from_utf8_lossy(&out.stderr));
        Domain { name, console }
    }

    fn start(&self) -> Output {
        let _ = std::fs::remove_file(&self.console);
        virsh(&["start", &self.name])
    }

    fn console(&self) -> String {
        std::fs::read_to_string(&self.console).unwrap_or_default()
    }

    /// CPU time the domain's emulator has used since it started; `None` once it is off.
    fn cpu_time(&self) -> Option<Duration> {
        let out = virsh(&["domstats", "--cpu-total", &self.name]);
        let stats = String::from_utf8_lossy(&out.stdout);
        let ns = stats.lines().find_map(|l| l.trim().strip_prefix("cpu.time=")?.parse::<u64>().ok());
        ns.map(Duration::from_nanos)
    }

    fn is_off(&self) -> bool {
        String::from_utf8_lossy(&virsh(&["domstate", &self.name]).stdout).contains("shut off")
    }

    /// Waits until the console shows `marker`; panics with the console on error.
    fn wait_for(&self, marker: &str) -> String {
        self.wait_guest(marker, |c| c.contains(marker))
    }

    /// Waits until `done` holds of the console; panics with the console on error, when the
    /// domain stops, or once the guest has spent [`BOOT_LIMIT`] of CPU (or [`BOOT_WALL_LIMIT`]
    /// of wall time) without it.
    fn wait_guest(&self, what: &str, done: impl Fn(&str) -> bool) -> String {
        let (start, cpu0) = (Instant::now(), self.cpu_time().unwrap_or_default());
        loop {
            let c = self.console();
            if done(&c) {
                return c;
            }
            assert!(!c.contains("VMT-ERROR"), "guest {} failed:\n{c}", self.name);
            // No figure (a loaded machine may make `virsh` fail or time out): no CPU spent.
            let cpu = self.cpu_time().map_or(Duration::ZERO, |t| t.saturating_sub(cpu0));
            if self.is_off() {
                // What it printed last may have reached the console just now.
                let c = self.console();
                assert!(done(&c), "guest {} stopped before {what}:\n{c}", self.name);
                return c;
            }
            assert!(
                cpu < BOOT_LIMIT && start.elapsed() < BOOT_WALL_LIMIT,
                "guest {} never got to {what} ({cpu:?} of CPU, {:?}):\n{c}",
                self.name,
                start.elapsed()
            );
            std::thread::sleep(Duration::from_millis(500));
        }
    }

    fn wait_shutoff(&self) {
        // The guest powers off on its own once done; a starved TCG guest may take a while.
        wait_until("domain shut off", BOOT_WALL_LIMIT, || self.is_off());
    }

    /// Starts the domain and waits for a clean power-off; returns the console.
    fn boot(&self) -> String {
        let out = self.start();
        assert!(out.status.success(), "start {}: {}", self.name, String::from_utf8_lossy(&out.stderr));
        let c = self.wait_for("VMT-DONE");
        self.wait_shutoff();
        c
    }
}

impl Drop for Domain {
    fn drop(&mut self) {
        let _ = virsh(&["destroy", &self.name]);
        let _ = virsh(&["undefine", &self.name]);
    }
}

fn node_image_size(node: &Node) -> u64 {
    std::fs::metadata(&node.guest.disk).unwrap().len()
}

fn console_value(console: &str, key: &str) -> Option<String> {
    console.lines().find_map(|l| l.trim().strip_prefix(key).map(|v| v.trim().to_string()))
}

#[test]
fn virsh_start_boots_vms_through_vmthunder_and_keeps_their_writes() {
    let node = Node::new();
    let disk1 = node.volume("vm1.qcow2");
    assert!(disk1.contains("<reconnect delay="), "{disk1}");
    let vm1 = node.domain(&disk1, "vmt.mode=checksum");
    let c = vm1.boot();
    assert_eq!(console_value(&c, "VMT-SHA256").as_deref(), Some(node.guest.sha256.as_str()), "{c}");
    let s1 = status(&node.env, "guest");
    assert!(s1.chunks_fetched > 0 && s1.bytes_from_origin > 0, "{s1:?}");
    assert!(s1.holds.is_empty(), "hold released when the domain stopped: {s1:?}");

    // A second VM of the same image on this node: nothing more from the origin.
    let vm2 = node.domain(&node.volume("vm2.qcow2"), "vmt.mode=checksum");
    let c = vm2.boot();
    assert_eq!(console_value(&c, "VMT-SHA256").as_deref(), Some(node.guest.sha256.as_str()));
    let s2 = status(&node.env, "guest");
    assert_eq!(s2.bytes_from_origin, s1.bytes_from_origin, "second VM took bytes from the origin");
    assert!(s2.bytes_served - s1.bytes_served >= node_image_size(&node), "the second VM read its whole disk");
    assert_eq!(s2.reads_waited, s1.reads_waited, "no read of the second VM waited for a fetch");

    // Writes land in the VM's own overlay and survive a restart of the domain.
    let disk3 = node.volume("vm3.qcow2");
    let marker = format!("m{}", std::process::id());
    let writer = node.domain(&disk3, &format!("vmt.mode=write vmt.marker={marker}"));
    assert!(writer.boot().contains(&format!("VMT-WROTE {marker}")));
    drop(writer);
    let reader = node.domain(&disk3, "vmt.mode=readmarker");
    let c = reader.boot();
    assert_eq!(console_value(&c, "VMT-MARKER").as_deref(), Some(marker.as_str()), "{c}");
    // ...and only there: the base image and the other VMs are untouched.
    let c = vm1.boot();
    assert_eq!(console_value(&c, "VMT-SHA256").as_deref(), Some(node.guest.sha256.as_str()));
}

#[test]
fn hook_fails_start_at_once_when_vmtd_is_down_and_leaves_other_domains_alone() {
    let mut node = Node::new();
    let vm = node.domain(&node.volume("down.qcow2"), "vmt.mode=checksum");
    assert_eq!(node.vmtd.terminate(), Some(0));
    let t0 = Instant::now();
    let out = vm.start();
    let took = t0.elapsed();
    assert!(!out.status.success(), "start must fail while vmtd is down");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("vmthunder") && err.contains("is vmtd running?"), "{err}");
    assert!(took < Duration::from_secs(20), "hook took {took:?}");

    // A domain with no vmthunder disk starts as usual (the hook does not contact vmtd).
    let plain = node.env.path("plain.raw");
    std::fs::copy(&node.guest.disk, &plain).unwrap();
    let disk = format!(
        "<disk type='file' device='disk'><driver name='qemu' type='raw'/><source file='{}'/><target dev='vda' bus='virtio'/></disk>",
        plain.display()
    );
    let other = node.domain(&disk, "vmt.mode=checksum");
    let c = other.boot();
    assert_eq!(console_value(&c, "VMT-SHA256").as_deref(), Some(node.guest.sha256.as_str()));

    // Unknown image: a clear reason, nothing started.
    node.vmtd = start_vmtd(&node.env, &node.cfg);
    let bogus =
        node.volume("bogus.qcow2").replace("guest.sock", "nosuch.sock").replace("name='guest'", "name='nosuch'");
    let vm = node.domain(&bogus, "vmt.mode=checksum");
    let out = vm.start();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no image named nosuch"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn hostile_volume_names_are_refused() {
    let node = Node::new();
    for bad in ["../escape.qcow2", "a b.qcow2", "x'y.qcow2", "$(touch /tmp/pwned)"] {
        let out = node.vmt(&["vol", "create", "--image", "guest", "--pool", &node.pool, bad]);
        assert!(!out.status.success(), "{bad} accepted");
        assert!(String::from_utf8_lossy(&out.stderr).contains("not a valid image name"), "{bad}");
    }
    assert!(!node.env.path("escape.qcow2").exists() && !Path::new("/tmp/pwned").exists());
    assert_eq!(std::fs::read_dir(node.env.path("pool")).unwrap().count(), 0, "nothing written to the pool");
    let out = node.vmt(&["vol", "create", "--image", "nosuch", "--pool", &node.pool, "v.qcow2"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("no image named nosuch"));
}

#[test]
fn vmtd_restart_during_guest_reads_is_invisible_to_the_guest() {
    let mut node = Node::new();
    let vm = node.domain(&node.volume("restart.qcow2"), "vmt.mode=readloop vmt.loops=4");
    assert!(vm.start().status.success());
    vm.wait_for("VMT-LOOP 1 ");
    // Restart vmtd while the guest keeps reading (kill -9: no clean shutdown either).
    node.vmtd.kill9();
    node.vmtd = start_vmtd(&node.env, &node.cfg);
    let c = vm.wait_for("VMT-DONE");
    vm.wait_shutoff();
    let loops = finished_loops(&c);
    assert_eq!(loops.len(), 4, "{c}");
    for l in loops {
        assert!(l.ends_with(&node.guest.sha256), "wrong data after restart: {l}\n{c}");
    }
    assert!(!c.contains("I/O error"), "{c}");
}

#[test]
fn detached_vm_keeps_running_without_vmtd() {
    let mut node = Node::new();
    let vm = node.domain(&node.volume("detach.qcow2"), "vmt.mode=readloop vmt.loops=3");
    assert!(vm.start().status.success());
    vm.wait_for("VMT-LOOP 1 ");
    assert!(!status(&node.env, "guest").holds.is_empty(), "running domain holds the image");
    let out = node.vmt(&["detach", &vm.name, "--disk", "vda"]);
    assert!(out.status.success(), "detach: {}", String::from_utf8_lossy(&out.stderr));
    assert!(status(&node.env, "guest").holds.is_empty(), "detach dropped the hold");
    let xml = String::from_utf8_lossy(&virsh(&["dumpxml", &vm.name]).stdout).to_string();
    assert!(!xml.contains("protocol='nbd'"), "backing chain still names the export:\n{xml}");
    assert_eq!(node.vmtd.terminate(), Some(0));
    let c = vm.wait_for("VMT-DONE");
    vm.wait_shutoff();
    let loops = finished_loops(&c);
    assert_eq!(loops.len(), 3, "{c}");
    assert!(loops.iter().all(|l| l.ends_with(&node.guest.sha256)), "{c}");
}

/// The real Debian guest of scripts/build-debian-guest (systemd, first boot) boots through a
/// vmthunder volume and reads only a small part of its image.
#[test]
fn debian_guest_boots_through_vmthunder_reading_only_what_it_needs() {
    let dir = PathBuf::from(std::env::var("VMT_DEBIAN_DIR").unwrap_or_else(|_| "/var/cache/vmthunder/debian".into()));
    let sha = std::fs::read_to_string(dir.join("debian.sha256")).unwrap_or_else(|_| {
        panic!("no Debian guest in {}: run scripts/build-debian-guest (scripts/test does)", dir.display())
    });
    let debian = Guest {
        kernel: dir.join("vmlinuz"),
        initrd: dir.join("initrd.img"),
        disk: dir.join("debian.raw"),
        sha256: sha.split_whitespace().next().unwrap().to_string(),
    };
    let node = Node::serving(debian);
    let disk = node.volume("debian.qcow2");
    let vm = Domain::define(&node.env, &node.guest, &disk, "root=/dev/vda ro console=ttyS0", 1024, 2);
    assert!(vm.start().status.success());
    let c = vm.wait_for("VMT-BOOTED");
    vm.wait_shutoff();
    let s = status(&node.env, "guest");
    assert!(s.bytes_from_origin > 0, "{s:?}");
    assert!(s.bytes_from_origin * 4 < s.image_size, "a boot should fetch a small part of the image: {s:?}\n{c}");
    // The base image is untouched by the guest's writes (they went to its overlay).
    let out = run(Command::new("sha256sum").arg(&node.guest.disk));
    assert!(String::from_utf8_lossy(&out.stdout).starts_with(&node.guest.sha256));

    // The first boot of an image without a profile was recorded (hook: prepare → release).
    let s = status(&node.env, "guest");
    let chunks = s.profile_chunks.expect("the first boot left a profile");
    assert!(chunks > 0 && chunks <= s.chunks_present, "{s:?}");
    let show = run(Command::new(env!("CARGO_BIN_EXE_vmt-profile"))
        .arg("--socket")
        .arg(node.env.control_sock())
        .args(["show", "guest"]));
    let show = String::from_utf8_lossy(&show.stdout).to_string();
    assert!(show.contains(&format!("working set   {chunks} chunks")), "{show}");
    eprintln!("Debian boot profile:\n{show}");
}

/// The disk written as a new user would write it: a pool volume without `<backingStore>`, or
/// the overlay file itself. The hook finds the export through the qcow2 header; vmtd holds the
/// image while the domain runs and records its first boot; with vmtd stopped, the start fails
/// at once with the hook's reason.
#[test]
fn volume_and_file_disks_without_backing_store_boot_through_vmthunder() {
    for form in ["volume", "file"] {
        let mut node = Node::new();
        let vol = format!("{form}.qcow2");
        node.volume(&vol);
        let xml = match form {
            "volume" => format!(
                "<disk type='volume' device='disk'><driver name='qemu' type='qcow2'/><source pool='{}' volume='{vol}'/><target dev='vda' bus='virtio'/></disk>",
                node.pool
            ),
            _ => format!(
                "<disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='{}'/><target dev='vda' bus='virtio'/></disk>",
                node.env.path("pool").join(&vol).display()
            ),
        };
        let vm = node.domain(&xml, "vmt.mode=readloop vmt.loops=2");
        let out = vm.start();
        assert!(out.status.success(), "{form}: start: {}", String::from_utf8_lossy(&out.stderr));
        vm.wait_for("VMT-LOOP 1 ");
        let s = status(&node.env, "guest");
        assert_eq!(s.holds, std::slice::from_ref(&vm.name), "{form}: the running domain holds the image");
        assert_eq!(s.recording.as_deref(), Some(vm.name.as_str()), "{form}: its first boot is recorded");
        let c = vm.wait_for("VMT-DONE");
        vm.wait_shutoff();
        let loops = finished_loops(&c);
        assert_eq!(loops.len(), 2, "{form}: {c}");
        assert!(loops.iter().all(|l| l.ends_with(&node.guest.sha256)), "{form}: {c}");
        let s = status(&node.env, "guest");
        assert!(s.holds.is_empty() && s.profile_chunks.is_some_and(|n| n > 0), "{form}: {s:?}");

        assert_eq!(node.vmtd.terminate(), Some(0));
        let t0 = Instant::now();
        let out = vm.start();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{form}: started without vmtd");
        assert!(err.contains("vmthunder") && err.contains("is vmtd running?"), "{form}: {err}");
        assert!(t0.elapsed() < Duration::from_secs(20), "{form}: the hook took {:?}", t0.elapsed());
    }
}

/// A file disk whose backing chain loops, or whose header names a backing file longer than
/// qcow2 allows: the start fails at once with the hook's reason.
#[test]
fn hostile_backing_chains_fail_the_start_with_a_reason() {
    let node = Node::new();
    let (a, b) = (node.env.path("pool/loop-a.qcow2"), node.env.path("pool/loop-b.qcow2"));
    for (me, other) in [(&a, &b), (&b, &a)] {
        let out = run(Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2", "-u", "-F", "qcow2", "-b"])
            .arg(other)
            .arg(me)
            .arg("64M"));
        assert!(out.status.success(), "{out:?}");
    }
    let huge = node.env.path("pool/huge.qcow2");
    std::fs::copy(&a, &huge).unwrap();
    std::os::unix::fs::FileExt::write_all_at(
        &std::fs::OpenOptions::new().write(true).open(&huge).unwrap(),
        &(1u32 << 30).to_be_bytes(),
        16,
    )
    .unwrap();
    for (file, why) in [(&a, "loops"), (&huge, "backing file name of")] {
        let xml = format!(
            "<disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='{}'/><target dev='vda' bus='virtio'/></disk>",
            file.display()
        );
        let vm = node.domain(&xml, "vmt.mode=checksum");
        let t0 = Instant::now();
        let out = vm.start();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{why}: started");
        assert!(err.contains("vmthunder") && err.contains(why), "{why}: {err}");
        assert!(t0.elapsed() < Duration::from_secs(20), "{why}: took {:?}", t0.elapsed());
    }
}

/// `virsh save` and `virsh restore` of a running vmthunder VM: the hook assembles at `restore
/// begin`, before QEMU starts (with vmtd down the restore fails with its reason), and the
/// restored guest goes on reading the right data.
#[test]
fn save_and_restore_keep_reading_through_vmthunder() {
    let mut node = Node::new();
    // Reads its disk until the test ends it: saving can never come too late.
    let vm = node.domain(&node.volume("saved.qcow2"), "vmt.mode=readloop vmt.loops=100000");
    assert!(vm.start().status.success());
    vm.wait_for("VMT-LOOP 1 ");
    let image = node.env.path("saved.state");
    let out = virsh(&["save", &vm.name, image.to_str().unwrap()]);
    assert!(out.status.success(), "save: {}", String::from_utf8_lossy(&out.stderr));
    let saved_at = last_loop(&vm.console());
    assert!(status(&node.env, "guest").holds.is_empty(), "the saved domain released its hold");

    assert_eq!(node.vmtd.terminate(), Some(0));
    let out = virsh(&["restore", image.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("vmthunder") && err.contains("is vmtd running?"), "{err}");

    node.vmtd = start_vmtd(&node.env, &node.cfg);
    let out = virsh(&["restore", image.to_str().unwrap()]);
    assert!(out.status.success(), "restore: {}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(status(&node.env, "guest").holds, std::slice::from_ref(&vm.name), "restore assembled");
    // Two more whole reads after the one that was running at the save: one at least entirely
    // after the restore.
    vm.wait_guest("two full reads after the restore", |c| finished_loop(c, saved_at + 2));
    let c = vm.console();
    let loops = finished_loops(&c);
    assert!(!loops.is_empty(), "{c}");
    assert!(loops.iter().all(|l| l.ends_with(&node.guest.sha256)), "wrong data after restore:\n{c}");
    assert!(!c.contains("I/O error"), "{c}");
}
