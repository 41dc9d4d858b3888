//! Fuzzes the configuration parser (`Config::from_toml`, TOML into the config type with all its
//! checks) (selector 0) and the value parsers behind it: sizes, durations, image names and origin
//! URLs (1).
//! Asserts: no panic; an accepted config has valid tunings and images, and serializes to TOML
//! that is accepted again and serializes the same; a parsed size formats to text that parses
//! back to it.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vmthunder::config::{format_size, parse_duration, parse_size, validate_name, Config};
use vmthunder::fetch::origin::OriginUrl;
use vmthunder_fuzz::seeds::CLUSTER_KEY;
use vmthunder_fuzz::Input;

fuzz_target!(|data: &[u8]| {
    static KEY: std::sync::Once = std::sync::Once::new();
    KEY.call_once(write_key);
    let mut input = Input::new(data);
    let sel = input.u8();
    let Ok(text) = std::str::from_utf8(input.rest()) else { return };
    if sel.is_multiple_of(2) {
        if names_other_key(text) {
            return;
        }
        let Ok(cfg) = Config::from_toml(text) else { return };
        cfg.tuning().expect("validated config has tunings");
        for img in &cfg.images {
            img.validate().expect("validated config has valid images");
        }
        let out = toml::to_string(&cfg).expect("config serializes");
        let again = Config::from_toml(&out).unwrap_or_else(|e| panic!("own output refused: {e}\n{out}"));
        assert_eq!(toml::to_string(&again).unwrap(), out);
    } else {
        if let Ok(n) = parse_size(text) {
            assert_eq!(parse_size(&format_size(n)), Ok(n));
        }
        let _ = parse_duration(text);
        let _ = validate_name(text);
        if let Ok(o) = OriginUrl::parse(text) {
            let _ = format!("{o:?}");
        }
    }
});

/// The `[p2p]` cluster key file is read when the config is checked: give it one to read.
fn write_key() {
    use std::os::unix::fs::PermissionsExt;
    let path = std::path::Path::new(CLUSTER_KEY);
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, "fuzzing-cluster-key-0123456789\n").unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).unwrap();
}

/// Whether `text` names a cluster key file other than ours: such configs are skipped, so the
/// fuzzer never makes the parser open a path it made up (a device or a FIFO could block).
fn names_other_key(text: &str) -> bool {
    // Without a backslash no key can be spelled with escapes: the cheap test is then exact.
    if !text.contains("cluster_key_file") && !text.contains('\\') {
        return false;
    }
    let Ok(v) = text.parse::<toml::Table>() else { return false };
    v.get("p2p").and_then(|p| p.get("cluster_key_file")).is_some_and(|k| k.as_str() != Some(CLUSTER_KEY))
}
