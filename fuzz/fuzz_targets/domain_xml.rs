//! Fuzzes the domain XML scan of the libvirt hook (`libvirt::domain::parse` and `hook::plan`):
//! arbitrary text (selector 0), and a domain built from fuzzed names with `xml_escape` (1).
//! Asserts: no panic; every disk found names a valid image under a run directory, once; the
//! hook's plan assembles what was found; a domain built with escaped names parses back to those
//! names and to its one vmthunder disk.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use vmthunder::config::validate_name;
use vmthunder::libvirt::domain::{parse, DomainDisks, DomainXmlError, VmtDisk};
use vmthunder::libvirt::hook::{plan, Plan};
use vmthunder::libvirt::xml_escape;
use vmthunder_fuzz::Input;

fn is_run_dir(p: &Path) -> bool {
    p == Path::new("/run/vmthunder") || p == Path::new("/run/vmt2")
}

fuzz_target!(|data: &[u8]| {
    let mut input = Input::new(data);
    if input.u8().is_multiple_of(2) {
        let xml = String::from_utf8_lossy(input.rest());
        scan(&xml);
    } else {
        built(&mut input);
    }
});

fn scan(xml: &str) {
    if let Ok(d) = parse(xml, &is_run_dir) {
        check(xml, &d);
    }
}

fn check(xml: &str, d: &DomainDisks) {
    assert!(!d.name.is_empty() && d.name.trim() == d.name);
    for (i, disk) in d.disks.iter().enumerate() {
        assert_eq!(validate_name(&disk.image), Ok(()));
        assert!(is_run_dir(&disk.run_dir));
        assert!(!d.disks[..i].contains(disk));
    }
    if d.disks.is_empty() {
        return;
    }
    // The hook's plan parses again: only worth its time when there is something to plan.
    // Candidates (file, block, volume disks) are found nothing in: the fuzzer reads no files.
    let probe = |_: &vmthunder::libvirt::domain::Candidate| Ok(None);
    match plan("prepare", "begin", || xml.to_string(), &is_run_dir, &probe).expect("parsed once, plans") {
        Plan::Assemble { domain, by_run_dir } => {
            assert_eq!(domain, d.name);
            let n: usize = by_run_dir.values().map(Vec::len).sum();
            assert!(n >= 1 && n <= d.disks.len());
        }
        other => panic!("{other:?} for a domain with vmthunder disks"),
    }
}

/// A fuzzed string without the characters XML cannot carry (even escaped) or normalizes.
fn text(input: &mut Input) -> String {
    let n = usize::from(input.u8() % 80);
    String::from_utf8_lossy(input.bytes(n))
        .chars()
        .filter(|&c| !c.is_control() && c != '\u{fffe}' && c != '\u{ffff}')
        .collect()
}

fn built(input: &mut Input) {
    let name = text(input);
    let image = text(input);
    let dev = text(input);
    let run_dir = if input.u8() & 1 == 0 { "/run/vmthunder" } else { "/run/vmt2" };
    let xml = format!(
        "<domain type='kvm'><name>{}</name><devices><disk type='network' device='disk'>\
         <source protocol='nbd' name='{}'><host transport='unix' socket='{}'/></source>\
         <target dev='{}' bus='virtio'/></disk></devices></domain>",
        xml_escape(&name),
        xml_escape(&image),
        xml_escape(&format!("{run_dir}/exports/{image}.sock")),
        xml_escape(&dev),
    );
    let got = parse(&xml, &is_run_dir);
    if let Ok(d) = &got {
        check(&xml, d);
    }
    if name.trim().is_empty() {
        assert_eq!(got, Err(DomainXmlError::NoName));
        return;
    }
    if validate_name(&image).is_ok() {
        let d = got.expect("a well-formed domain parses");
        assert_eq!(d.name, name.trim());
        assert_eq!(d.disks, vec![VmtDisk { target: dev, image, run_dir: run_dir.into() }]);
    }
}
