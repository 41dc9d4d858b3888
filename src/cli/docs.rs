//! Reference documents generated from the programs' own argument definitions (clap), so they
//! cannot drift from the code: man pages (clap_mangen), shell completions (clap_complete) and
//! the Markdown CLI reference in `docs/cli.md`. Every binary calls [`generate_if_asked`] first:
//! with `VMTHUNDER_GEN_DOCS=DIR` set it writes its documents under DIR and exits.
//! `scripts/gen-docs` runs them all; the Debian package ships the results.

use std::fmt::Write as _;
use std::path::Path;

use clap::CommandFactory;

/// The environment variable naming the output directory.
pub const ENV: &str = "VMTHUNDER_GEN_DOCS";

/// Writes `name`'s documents and exits when [`ENV`] is set; otherwise returns at once.
pub fn generate_if_asked<A: CommandFactory>(name: &'static str) {
    let Some(dir) = std::env::var_os(ENV) else { return };
    match generate(A::command().name(name).bin_name(name), Path::new(&dir)) {
        Ok(()) => std::process::exit(0),
        Err(e) => {
            eprintln!("{name}: generating documents in {}: {e}", Path::new(&dir).display());
            std::process::exit(1);
        }
    }
}

/// Man pages in `dir/man` (one per command and subcommand, section 1),
/// completions in `dir/completions/{bash,zsh,fish}` and the reference in `dir/cli/NAME.md`.
pub fn generate(mut cmd: clap::Command, dir: &Path) -> std::io::Result<()> {
    let name = cmd.get_name().to_string();
    // `help` subcommands only repeat the pages of the others.
    cmd = without_help(cmd);
    for sub in ["man", "completions/bash", "completions/zsh", "completions/fish", "cli"] {
        std::fs::create_dir_all(dir.join(sub))?;
    }
    cmd.build();
    clap_mangen::generate_to(cmd.clone(), dir.join("man"))?;
    for (shell, sub) in
        [(clap_complete::Shell::Bash, "bash"), (clap_complete::Shell::Zsh, "zsh"), (clap_complete::Shell::Fish, "fish")]
    {
        clap_complete::generate_to(shell, &mut cmd, &name, dir.join("completions").join(sub))?;
    }
    std::fs::write(dir.join("cli").join(format!("{name}.md")), markdown(&mut cmd))
}

fn without_help(cmd: clap::Command) -> clap::Command {
    cmd.disable_help_subcommand(true).mut_subcommands(without_help)
}

/// The programs, in the order of the CLI reference.
pub const PROGRAMS: [&str; 5] = ["vmtd", "vmt", "vmt-profile", "vmt-prefetch", "vmt-tracker"];

/// `docs/cli.md` from the documents generated under `dir`.
pub fn reference(dir: &Path) -> std::io::Result<String> {
    let mut out = String::from(
        "# Command-line reference\n\nGenerated from the programs' own argument definitions by \
         `scripts/gen-docs`; `man PROGRAM` shows the same. Do not edit by hand: a test compares \
         this file with the programs.\n\n",
    );
    for p in PROGRAMS {
        out += &std::fs::read_to_string(dir.join("cli").join(format!("{p}.md")))?;
    }
    Ok(out)
}

/// The long help of `cmd` and of every subcommand, depth first, as Markdown sections.
pub fn markdown(cmd: &mut clap::Command) -> String {
    let mut out = String::new();
    section(cmd, cmd.get_name().to_string(), 2, &mut out);
    out
}

fn section(cmd: &mut clap::Command, path: String, level: usize, out: &mut String) {
    let _ = writeln!(out, "{} `{path}`\n\n```text\n{}```\n", "#".repeat(level), cmd.render_long_help());
    let subs: Vec<String> =
        cmd.get_subcommands().filter(|s| s.get_name() != "help").map(|s| s.get_name().to_string()).collect();
    for s in subs {
        if let Some(sub) = cmd.find_subcommand_mut(&s) {
            section(sub, format!("{path} {s}"), (level + 1).min(6), out);
        }
    }
}
