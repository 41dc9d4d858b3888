//! An iSCSI session's shared state: the commands in flight by ITT and the sequence numbers
//! (CmdSN window, ExpStatSN) in RFC 1982 serial arithmetic, guarded together so that the
//! sender and the receive task always see one consistent window. A dead session answers
//! every waiting command.

use std::collections::HashMap;
use std::sync::Mutex;

use tokio::sync::{oneshot, Notify};

use super::IscsiError;
use crate::iscsi::pdu::Window;

pub(super) type Reply = Result<Vec<u8>, IscsiError>;

/// A command sent and not yet complete.
pub(super) struct Task {
    pub(super) buf: Vec<u8>,
    /// Bytes received so far; Data-In must arrive in order (DataPDUInOrder=Yes).
    pub(super) received: usize,
    pub(super) next_data_sn: u32,
    pub(super) waiter: Option<oneshot::Sender<Reply>>,
}

/// Sequence numbers and commands of a session, guarded together.
pub(super) struct State {
    pub(super) dead: Option<String>,
    pub(super) cmd_sn: u32,
    pub(super) exp_cmd_sn: u32,
    pub(super) max_cmd_sn: u32,
    pub(super) exp_stat_sn: u32,
    pub(super) tasks: HashMap<u32, Task>,
    pub(super) logout: Option<(u32, oneshot::Sender<()>)>,
}

/// True when `a` comes after `b` in serial number arithmetic (RFC 1982, 32 bits).
fn serial_gt(a: u32, b: u32) -> bool {
    a != b && a.wrapping_sub(b) < 1 << 31
}

impl State {
    pub(super) fn window_open(&self) -> bool {
        !serial_gt(self.cmd_sn, self.max_cmd_sn)
    }

    /// Applies the window of a target PDU; `stat` when it carries a valid StatSN.
    pub(super) fn update(&mut self, w: &Window, stat: bool) {
        // MaxCmdSN = ExpCmdSN - 1 is a closed window; anything further behind is invalid.
        if !serial_gt(w.exp_cmd_sn, w.max_cmd_sn.wrapping_add(1)) {
            if serial_gt(w.exp_cmd_sn, self.exp_cmd_sn) {
                self.exp_cmd_sn = w.exp_cmd_sn;
            }
            if serial_gt(w.max_cmd_sn, self.max_cmd_sn) {
                self.max_cmd_sn = w.max_cmd_sn;
            }
        }
        if stat && serial_gt(w.stat_sn.wrapping_add(1), self.exp_stat_sn) {
            self.exp_stat_sn = w.stat_sn.wrapping_add(1);
        }
    }
}

pub(super) struct Shared {
    pub(super) state: Mutex<State>,
    /// Woken when the window moves or the connection dies.
    pub(super) changed: Notify,
}

impl Shared {
    pub(super) fn kill(&self, reason: &str) {
        let tasks = {
            let mut st = self.state.lock().unwrap();
            if st.dead.is_none() {
                st.dead = Some(reason.to_string());
            }
            st.logout = None;
            std::mem::take(&mut st.tasks)
        };
        for (_, t) in tasks {
            if let Some(w) = t.waiter {
                let _ = w.send(Err(IscsiError::Lost(reason.to_string())));
            }
        }
        self.changed.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serial_arithmetic() {
        assert!(serial_gt(2, 1));
        assert!(serial_gt(0, u32::MAX));
        assert!(!serial_gt(1, 1));
        assert!(!serial_gt(u32::MAX, 0));
    }

    #[test]
    fn window_rules() {
        let mut st = State {
            dead: None,
            cmd_sn: 10,
            exp_cmd_sn: 10,
            max_cmd_sn: 9,
            exp_stat_sn: 0,
            tasks: HashMap::new(),
            logout: None,
        };
        assert!(!st.window_open(), "MaxCmdSN = ExpCmdSN - 1 is closed");
        st.update(&Window { stat_sn: 4, exp_cmd_sn: 10, max_cmd_sn: 12 }, true);
        assert!(st.window_open());
        assert_eq!(st.exp_stat_sn, 5);
        // An invalid window (MaxCmdSN far behind ExpCmdSN) and a stale one are ignored.
        st.update(&Window { stat_sn: 1, exp_cmd_sn: 10, max_cmd_sn: 5 }, true);
        st.update(&Window { stat_sn: 1, exp_cmd_sn: 9, max_cmd_sn: 11 }, true);
        assert_eq!((st.exp_cmd_sn, st.max_cmd_sn, st.exp_stat_sn), (10, 12, 5));
    }
}
