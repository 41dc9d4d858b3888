//! How the command-line tools find vmtd: `--socket PATH`, or `--config FILE` (vmtd's
//! configuration, whose `run_dir` holds the control socket), or the default socket.

use std::path::PathBuf;

use crate::config::Config;
use crate::daemon::control::DEFAULT_SOCKET;

/// The options every tool that talks to vmtd takes.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct VmtdArgs {
    /// vmtd's control socket [default: /run/vmthunder/control.sock, or that of --config].
    #[arg(long, global = true)]
    pub socket: Option<PathBuf>,
    /// vmtd's configuration file: the control socket is in its run_dir.
    #[arg(long, global = true, conflicts_with = "socket")]
    pub config: Option<PathBuf>,
}

impl VmtdArgs {
    /// The control socket these options name.
    pub fn control_socket(&self) -> anyhow::Result<PathBuf> {
        match (&self.socket, &self.config) {
            (Some(s), _) => Ok(s.clone()),
            (None, Some(c)) => Ok(Config::load(c)?.control_socket()),
            (None, None) => Ok(PathBuf::from(DEFAULT_SOCKET)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn socket_config_or_default() {
        let d = tempfile::tempdir().unwrap();
        let cfg = d.path().join("vmtd.toml");
        std::fs::write(&cfg, "run_dir = \"/srv/vmt/run\"\n").unwrap();
        let a = VmtdArgs { socket: None, config: Some(cfg.clone()) };
        assert_eq!(a.control_socket().unwrap(), PathBuf::from("/srv/vmt/run/control.sock"));
        assert_eq!(VmtdArgs::default().control_socket().unwrap(), PathBuf::from(DEFAULT_SOCKET));
        let s = VmtdArgs { socket: Some("/x.sock".into()), config: None };
        assert_eq!(s.control_socket().unwrap(), PathBuf::from("/x.sock"));
        std::fs::write(&cfg, "run_dir = \"relative\"\n").unwrap();
        let err = VmtdArgs { socket: None, config: Some(cfg) }.control_socket().unwrap_err().to_string();
        assert!(err.contains("run_dir"), "{err}");
    }
}
