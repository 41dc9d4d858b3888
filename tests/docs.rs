//! The docs stay true: every configuration key the code accepts is documented in the README's
//! "Configuration" tables, and every key documented there exists in the code.

use std::collections::BTreeSet;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

/// The keys of `struct NAME` in `source`: its `pub` fields, under their serde names.
fn struct_keys(source: &str, name: &str) -> Vec<String> {
    let start = source.find(&format!("pub struct {name} {{")).unwrap_or_else(|| panic!("no struct {name}"));
    let body = &source[start..];
    let body = &body[..body.find("\n}").expect("struct ends")];
    let mut keys = Vec::new();
    let mut rename: Option<String> = None;
    for line in body.lines().skip(1) {
        let line = line.trim();
        if line.starts_with("#[serde(") {
            if let Some(r) = line.split("rename = \"").nth(1) {
                rename = Some(r[..r.find('"').unwrap()].to_string());
            }
        } else if let Some(field) = line.strip_prefix("pub ") {
            let field = &field[..field.find(':').expect("a field")];
            keys.push(rename.take().unwrap_or_else(|| field.to_string()));
        }
    }
    keys
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(format!("{ROOT}/{rel}")).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

#[test]
fn every_configuration_key_is_documented_and_every_documented_key_exists() {
    let mut code = BTreeSet::new();
    for (file, structs) in [
        ("src/config.rs", &["Config", "ImageConfig"][..]),
        ("src/config/nbd.rs", &["NbdConfig"][..]),
        ("src/config/p2p.rs", &["P2pConfig"][..]),
        ("src/config/cache.rs", &["CacheConfig"][..]),
    ] {
        let source = read(file);
        for s in structs {
            let keys = struct_keys(&source, s);
            assert!(!keys.is_empty(), "{s} has no keys?");
            code.extend(keys);
        }
    }
    // Tables are documented by their own sections, not as rows.
    for table in ["nbd", "p2p", "cache", "image"] {
        assert!(code.remove(table), "{table} is a table of the configuration");
    }

    let readme = read("README.md");
    let start = readme.find("\n## Configuration\n").expect("README has a Configuration section");
    let section = &readme[start + 1..];
    let section = &section[..section[3..].find("\n## ").map_or(section.len(), |i| i + 3)];
    let documented: BTreeSet<String> = section
        .lines()
        .filter_map(|l| l.strip_prefix("| `"))
        .filter_map(|l| l.split_once('`'))
        .map(|(key, _)| key.to_string())
        // Rows of other tables there (origin URL forms) are not keys.
        .filter(|key| key.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_'))
        .collect();

    let undocumented: Vec<&String> = code.difference(&documented).collect();
    let unknown: Vec<&String> = documented.difference(&code).collect();
    assert!(undocumented.is_empty(), "keys in the code but not in the README's Configuration tables: {undocumented:?}");
    assert!(unknown.is_empty(), "keys in the README's Configuration tables that the code does not have: {unknown:?}");
}

/// `docs/cli.md` is what the programs say about themselves now (`scripts/gen-docs` rewrites
/// it: this test with `VMTHUNDER_BLESS=1`).
#[test]
fn the_cli_reference_matches_the_programs() {
    let dir = tempfile::tempdir().unwrap();
    for (p, exe) in [
        ("vmtd", env!("CARGO_BIN_EXE_vmtd")),
        ("vmt", env!("CARGO_BIN_EXE_vmt")),
        ("vmt-profile", env!("CARGO_BIN_EXE_vmt-profile")),
        ("vmt-prefetch", env!("CARGO_BIN_EXE_vmt-prefetch")),
        ("vmt-tracker", env!("CARGO_BIN_EXE_vmt-tracker")),
    ] {
        let out = std::process::Command::new(exe).env(vmthunder::cli::docs::ENV, dir.path()).output().unwrap();
        assert!(out.status.success(), "{p}: {}", String::from_utf8_lossy(&out.stderr));
        assert!(dir.path().join("man").join(format!("{p}.1")).exists(), "{p}: no man page");
        assert!(dir.path().join("completions/bash").join(format!("{p}.bash")).exists(), "{p}: no completion");
    }
    let now = vmthunder::cli::docs::reference(dir.path()).unwrap();
    let path = format!("{ROOT}/docs/cli.md");
    if std::env::var_os("VMTHUNDER_BLESS").is_some() {
        std::fs::write(&path, &now).unwrap();
    }
    let committed = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(committed == now, "docs/cli.md is stale: run scripts/gen-docs");
}
