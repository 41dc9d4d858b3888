//! The docs stay true: every configuration key the code accepts is documented in the operator's
//! guide's "Configuration" tables and in the packaged default configuration, and every key
//! documented there exists in the code; every link between the Markdown documents resolves; the
//! CLI reference is what the programs say.

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

/// Every key of the configuration structs (tables excluded).
fn code_keys() -> BTreeSet<String> {
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
    code
}

#[test]
fn every_configuration_key_is_documented_and_every_documented_key_exists() {
    let code = code_keys();
    let readme = read("docs/operator-guide.md");
    let start = readme.find("\n## Configuration\n").expect("the guide has a Configuration section");
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
    assert!(undocumented.is_empty(), "keys in the code but not in the guide's Configuration tables: {undocumented:?}");
    assert!(unknown.is_empty(), "keys in the guide's Configuration tables that the code does not have: {unknown:?}");
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

/// The packaged `/etc/vmthunder/vmtd.toml` names every key (commented out, with its default or
/// an example) and, as shipped, is a valid configuration that serves no image.
#[test]
fn the_packaged_configuration_names_every_key_and_loads() {
    let text = read("packaging/vmtd.toml");
    let missing: Vec<String> =
        code_keys().into_iter().filter(|k| !text.lines().any(|l| l.starts_with(&format!("# {k} = ")))).collect();
    assert!(missing.is_empty(), "keys not in packaging/vmtd.toml: {missing:?}");
    let cfg = vmthunder::config::Config::from_toml(&text).expect("the shipped file loads");
    assert!(cfg.images.is_empty());
}

/// GitHub's anchor of a heading: lower case, spaces to hyphens, other punctuation dropped.
fn anchor(heading: &str) -> String {
    heading
        .trim()
        .to_lowercase()
        .chars()
        .filter_map(|c| match c {
            ' ' => Some('-'),
            c if c.is_alphanumeric() || c == '-' || c == '_' => Some(c),
            _ => None,
        })
        .collect()
}

/// Every relative link between the project's Markdown documents points at a file that exists
/// and, with a `#fragment`, at a heading of that file.
#[test]
fn links_between_documents_resolve() {
    let docs = [
        "README.md",
        "DESIGN.md",
        "FORMAT.md",
        "BENCHMARKS.md",
        "FUZZING.md",
        "docs/operator-guide.md",
        "docs/testing.md",
        "docs/benchmarking.md",
        "profiles/README.md",
    ];
    let mut broken = Vec::new();
    for doc in docs {
        let text = read(doc);
        let dir = std::path::Path::new(doc).parent().unwrap();
        let mut rest = text.as_str();
        while let Some(i) = rest.find("](") {
            rest = &rest[i + 2..];
            let Some(end) = rest.find(')') else { break };
            let target = &rest[..end];
            if target.contains("://") || target.starts_with("mailto:") || target.contains(' ') {
                continue;
            }
            let (file, frag) = target.split_once('#').map_or((target, None), |(f, a)| (f, Some(a)));
            let path = if file.is_empty() { std::path::PathBuf::from(doc) } else { dir.join(file) };
            let Ok(body) = std::fs::read_to_string(format!("{ROOT}/{}", path.display())) else {
                broken.push(format!("{doc}: {target} (no such file)"));
                continue;
            };
            if let Some(frag) = frag {
                let found = body
                    .lines()
                    .filter_map(|l| l.trim_start_matches('#').strip_prefix(' ').filter(|_| l.starts_with('#')))
                    .any(|h| anchor(h) == frag);
                if !found {
                    broken.push(format!("{doc}: {target} (no such heading)"));
                }
            }
        }
    }
    assert!(broken.is_empty(), "broken links:\n{}", broken.join("\n"));
}
