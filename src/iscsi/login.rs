//! Login phase (RFC 7143 §6 and §13): the `key=value` text codec and the negotiation as a pure
//! state machine. The initiator feeds it Login Responses and sends the requests it returns; no
//! I/O happens here, so every branch is testable without a target.
//!
//! What is offered: AuthMethod `None` (or `CHAP,None` with credentials; one-way CHAP with MD5),
//! then in the operational stage HeaderDigest/DataDigest (`None`, or `CRC32C,None` when wanted),
//! MaxRecvDataSegmentLength, MaxBurstLength, FirstBurstLength, ImmediateData=No, InitialR2T=Yes,
//! MaxOutstandingR2T=1, DataPDUInOrder=Yes, DataSequenceInOrder=Yes, ErrorRecoveryLevel=0,
//! DefaultTime2Wait=0, DefaultTime2Retain=0, MaxConnections=1. Invariant: a session that leaves
//! this machine has ErrorRecoveryLevel 0 and digests we offered, or login fails.

use thiserror::Error;

use super::chap::{self, ChapError, Credentials};
use super::pdu::{Digests, LoginRequest, LoginResponse, Window, STAGE_FULL_FEATURE, STAGE_OPERATIONAL, STAGE_SECURITY};

/// Largest data segment we accept from the target (declared as our MaxRecvDataSegmentLength).
pub const OUR_MAX_RECV_DATA_SEGMENT: u32 = 256 << 10;
/// The MaxBurstLength we offer: the largest the protocol allows, rounded to 1 KiB.
pub const OFFERED_MAX_BURST: u32 = (1 << 24) - 1024;
/// Most keys accepted in one login exchange, and most login round trips, so a hostile target
/// cannot keep us in login forever.
const MAX_KEYS: usize = 256;
const MAX_ROUNDS: u32 = 16;
/// Most bytes of text accumulated over continued (C bit) responses.
const MAX_TEXT: usize = 64 << 10;

/// Errors of the login phase.
#[derive(Debug, Clone, Error, PartialEq, Eq)]
pub enum LoginError {
    /// The target refused the login with a status (class, detail).
    #[error("{} (status {class:#04x}/{detail:#04x})", login_status(*class, *detail))]
    Refused { class: u8, detail: u8 },
    /// The target wants CHAP and no credentials are configured.
    #[error("target requires CHAP authentication: configure chap_user and chap_secret_file")]
    NeedsChap,
    /// The target offered no authentication method we support.
    #[error("target offered AuthMethod={0:?}; supported: None, CHAP")]
    AuthMethod(String),
    #[error(transparent)]
    Chap(#[from] ChapError),
    /// A key's value is outside what we offered or what the protocol allows.
    #[error("target negotiated {key}={value:?}: {reason}")]
    Key { key: String, value: String, reason: String },
    /// The exchange broke the login rules.
    #[error("login protocol error: {0}")]
    Protocol(String),
}

fn login_status(class: u8, detail: u8) -> &'static str {
    match (class, detail) {
        (1, _) => "target moved (redirection is not supported)",
        (2, 0x01) => "authentication failed (check chap_user and the CHAP secret)",
        (2, 0x02) => "authorization failure (this initiator may not access the target)",
        (2, 0x03) => "target not found (check the IQN)",
        (2, 0x04) => "target removed",
        (2, 0x05) => "unsupported version",
        (2, 0x06) => "too many connections",
        (2, 0x07) => "missing parameter",
        (2, 0x09) => "session type not supported",
        (2, _) => "initiator error",
        (3, 0x01) => "service unavailable",
        (3, 0x02) => "target out of resources",
        (3, _) => "target error",
        _ => "unknown status",
    }
}

impl LoginError {
    /// Whether trying again later may succeed (target-side, temporary refusal).
    pub fn is_transient(&self) -> bool {
        matches!(self, LoginError::Refused { class: 3, .. })
    }
}

/// Encodes `key=value` pairs as login/text data: each pair NUL-terminated.
pub fn encode_text(pairs: &[(&str, String)]) -> Vec<u8> {
    let mut out = Vec::new();
    for (k, v) in pairs {
        out.extend_from_slice(k.as_bytes());
        out.push(b'=');
        out.extend_from_slice(v.as_bytes());
        out.push(0);
    }
    out
}

/// Decodes login/text data into `key=value` pairs, refusing malformed or too many pairs.
pub fn decode_text(data: &[u8]) -> Result<Vec<(String, String)>, LoginError> {
    let mut out = Vec::new();
    for item in data.split(|&b| b == 0).filter(|s| !s.is_empty()) {
        let s = std::str::from_utf8(item).map_err(|_| LoginError::Protocol("key=value text is not UTF-8".into()))?;
        let (k, v) = s.split_once('=').ok_or_else(|| LoginError::Protocol(format!("{s:?} is not key=value")))?;
        if k.is_empty() || k.len() > 63 {
            return Err(LoginError::Protocol(format!("bad key {k:?}")));
        }
        out.push((k.to_string(), v.to_string()));
        if out.len() > MAX_KEYS {
            return Err(LoginError::Protocol(format!("more than {MAX_KEYS} keys")));
        }
    }
    Ok(out)
}

/// What the initiator asks for.
#[derive(Debug, Clone)]
pub struct LoginParams {
    pub initiator_name: String,
    pub target_name: String,
    pub credentials: Option<Credentials>,
    /// Digests to offer (CRC32C first); the target may still choose None.
    pub want_digests: Digests,
    pub isid: [u8; 6],
}

/// The session parameters in force after login.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Negotiated {
    pub digests: Digests,
    /// Largest data segment we may send (the target's declaration).
    pub target_max_recv: u32,
    /// Largest data segment the target may send us.
    pub our_max_recv: u32,
    /// Largest read one SCSI command may ask for.
    pub max_burst: u32,
}

/// A finished login.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Established {
    pub negotiated: Negotiated,
    pub tsih: u16,
    pub window: Window,
    pub exp_stat_sn: u32,
}

/// The next thing to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    Send(LoginRequest),
    Done(Established),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Sent the AuthMethod offer.
    AuthOffer,
    /// Sent CHAP_A, waiting for the challenge.
    ChapAlgorithm,
    /// Sent CHAP_N/CHAP_R, waiting for the verdict.
    ChapResponse,
    /// Asked to leave the security stage.
    SecurityTransit,
    /// Sent the operational keys.
    Operational,
}

/// The login state machine of one connection.
#[derive(Debug)]
pub struct Login {
    params: LoginParams,
    state: State,
    itt: u32,
    cmd_sn: u32,
    exp_stat_sn: u32,
    tsih: u16,
    rounds: u32,
    /// Text of continued responses (C bit), joined before parsing.
    partial: Vec<u8>,
    negotiated: Negotiated,
}

impl Login {
    /// Starts a login with `itt` for every request and `cmd_sn` as the session's first CmdSN.
    pub fn new(params: LoginParams, itt: u32, cmd_sn: u32) -> Login {
        Login {
            params,
            state: State::AuthOffer,
            itt,
            cmd_sn,
            exp_stat_sn: 0,
            tsih: 0,
            rounds: 0,
            partial: Vec::new(),
            negotiated: Negotiated {
                digests: Digests::default(),
                target_max_recv: 8192,
                our_max_recv: OUR_MAX_RECV_DATA_SEGMENT,
                max_burst: 262_144,
            },
        }
    }

    fn request(&self, transit: bool, csg: u8, nsg: u8, pairs: &[(&str, String)]) -> LoginRequest {
        LoginRequest {
            transit,
            csg,
            nsg,
            isid: self.params.isid,
            tsih: self.tsih,
            itt: self.itt,
            cid: 0,
            cmd_sn: self.cmd_sn,
            exp_stat_sn: self.exp_stat_sn,
            data: encode_text(pairs),
        }
    }

    /// The leading Login Request.
    pub fn start(&mut self) -> LoginRequest {
        let auth = if self.params.credentials.is_some() { "CHAP,None" } else { "None" };
        let pairs = [
            ("InitiatorName", self.params.initiator_name.clone()),
            ("SessionType", "Normal".to_string()),
            ("TargetName", self.params.target_name.clone()),
            ("AuthMethod", auth.to_string()),
        ];
        // Without credentials nothing can follow in the security stage: ask to leave it now.
        let transit = self.params.credentials.is_none();
        self.request(transit, STAGE_SECURITY, STAGE_OPERATIONAL, &pairs)
    }

    fn operational(&mut self) -> LoginRequest {
        self.state = State::Operational;
        let digest = |on: bool| if on { "CRC32C,None" } else { "None" }.to_string();
        let pairs = [
            ("HeaderDigest", digest(self.params.want_digests.header)),
            ("DataDigest", digest(self.params.want_digests.data)),
            ("MaxRecvDataSegmentLength", OUR_MAX_RECV_DATA_SEGMENT.to_string()),
            ("MaxBurstLength", OFFERED_MAX_BURST.to_string()),
            ("FirstBurstLength", "262144".to_string()),
            ("ImmediateData", "No".to_string()),
            ("InitialR2T", "Yes".to_string()),
            ("MaxOutstandingR2T", "1".to_string()),
            ("DataPDUInOrder", "Yes".to_string()),
            ("DataSequenceInOrder", "Yes".to_string()),
            ("ErrorRecoveryLevel", "0".to_string()),
            ("DefaultTime2Wait", "0".to_string()),
            ("DefaultTime2Retain", "0".to_string()),
            ("MaxConnections", "1".to_string()),
        ];
        self.request(true, STAGE_OPERATIONAL, STAGE_FULL_FEATURE, &pairs)
    }

    /// Feeds one Login Response; returns the next request or the established session.
    pub fn on_response(&mut self, r: LoginResponse) -> Result<Step, LoginError> {
        self.rounds += 1;
        if self.rounds > MAX_ROUNDS {
            return Err(LoginError::Protocol(format!("no agreement after {MAX_ROUNDS} round trips")));
        }
        if r.status_class == 2 && r.status_detail == 1 && self.params.credentials.is_none() {
            // Offered AuthMethod=None only, and the target wants more.
            return Err(LoginError::NeedsChap);
        }
        if r.status_class != 0 {
            return Err(LoginError::Refused { class: r.status_class, detail: r.status_detail });
        }
        if r.itt != self.itt {
            return Err(LoginError::Protocol(format!("response for ITT {:#x}, expected {:#x}", r.itt, self.itt)));
        }
        if r.version_active != 0 {
            return Err(LoginError::Protocol(format!("unsupported version {}", r.version_active)));
        }
        self.tsih = r.tsih;
        self.exp_stat_sn = r.window.stat_sn.wrapping_add(1);
        let stage = if self.state == State::Operational { STAGE_OPERATIONAL } else { STAGE_SECURITY };
        if r.csg != stage {
            return Err(LoginError::Protocol(format!("target answered in stage {}, expected {stage}", r.csg)));
        }
        if self.partial.len() + r.data.len() > MAX_TEXT {
            return Err(LoginError::Protocol("login text too long".into()));
        }
        self.partial.extend_from_slice(&r.data);
        if r.cont {
            if r.transit {
                return Err(LoginError::Protocol("C and T bits both set".into()));
            }
            // More text follows: acknowledge with an empty request in the same stage.
            return Ok(Step::Send(self.request(false, stage, stage + 1, &[])));
        }
        let keys = decode_text(&std::mem::take(&mut self.partial))?;
        let get = |k: &str| keys.iter().find(|(key, _)| key == k).map(|(_, v)| v.as_str());
        match self.state {
            State::AuthOffer => match get("AuthMethod") {
                Some("None") => self.leave_security(&r),
                Some("CHAP") => {
                    if self.params.credentials.is_none() {
                        return Err(LoginError::NeedsChap);
                    }
                    self.state = State::ChapAlgorithm;
                    let req = self.request(
                        false,
                        STAGE_SECURITY,
                        STAGE_OPERATIONAL,
                        &[("CHAP_A", chap::CHAP_MD5.to_string())],
                    );
                    Ok(Step::Send(req))
                }
                Some(other) => Err(LoginError::AuthMethod(other.to_string())),
                // A target that skips the key accepted the only method we offered, if only one.
                None if self.params.credentials.is_none() => self.leave_security(&r),
                None => Err(LoginError::Protocol("target did not choose an AuthMethod".into())),
            },
            State::ChapAlgorithm => {
                let creds = self.params.credentials.clone().ok_or(LoginError::NeedsChap)?;
                if get("CHAP_A") != Some("5") {
                    return Err(ChapError::Bad(format!(
                        "target chose algorithm {:?}, only MD5 (5) is supported",
                        get("CHAP_A")
                    ))
                    .into());
                }
                let id: u8 = get("CHAP_I")
                    .and_then(|v| v.parse().ok())
                    .ok_or_else(|| ChapError::Bad(format!("bad CHAP_I {:?}", get("CHAP_I"))))?;
                let challenge = chap::decode_binary(get("CHAP_C").ok_or_else(|| ChapError::Bad("no CHAP_C".into()))?)?;
                self.state = State::ChapResponse;
                let pairs = [("CHAP_N", creds.user.clone()), ("CHAP_R", chap::response(id, &creds, &challenge))];
                Ok(Step::Send(self.request(true, STAGE_SECURITY, STAGE_OPERATIONAL, &pairs)))
            }
            State::ChapResponse | State::SecurityTransit => self.leave_security(&r),
            State::Operational => {
                self.apply_operational(&keys)?;
                if r.transit {
                    if r.nsg != STAGE_FULL_FEATURE {
                        return Err(LoginError::Protocol(format!("target moved to stage {}", r.nsg)));
                    }
                    return Ok(Step::Done(Established {
                        negotiated: self.negotiated,
                        tsih: self.tsih,
                        window: r.window,
                        exp_stat_sn: self.exp_stat_sn,
                    }));
                }
                Ok(Step::Send(self.request(true, STAGE_OPERATIONAL, STAGE_FULL_FEATURE, &[])))
            }
        }
    }

    fn leave_security(&mut self, r: &LoginResponse) -> Result<Step, LoginError> {
        if r.transit {
            if r.nsg != STAGE_OPERATIONAL {
                // Skipping the operational stage leaves every key at its default: fine for us
                // only if the defaults hold, which ErrorRecoveryLevel=0 and no digests do.
                return Err(LoginError::Protocol(format!("target moved from security to stage {}", r.nsg)));
            }
            return Ok(Step::Send(self.operational()));
        }
        self.state = State::SecurityTransit;
        Ok(Step::Send(self.request(true, STAGE_SECURITY, STAGE_OPERATIONAL, &[])))
    }

    fn apply_operational(&mut self, keys: &[(String, String)]) -> Result<(), LoginError> {
        for (k, v) in keys {
            let bad = |reason: &str| LoginError::Key { key: k.clone(), value: v.clone(), reason: reason.into() };
            let number = || v.parse::<u32>().map_err(|_| bad("not a number"));
            match k.as_str() {
                "HeaderDigest" | "DataDigest" => {
                    let offered = if k == "HeaderDigest" {
                        self.params.want_digests.header
                    } else {
                        self.params.want_digests.data
                    };
                    let on = match v.as_str() {
                        "None" => false,
                        "CRC32C" if offered => true,
                        _ => return Err(bad("not one of the values offered")),
                    };
                    if k == "HeaderDigest" {
                        self.negotiated.digests.header = on;
                    } else {
                        self.negotiated.digests.data = on;
                    }
                }
                "MaxRecvDataSegmentLength" => {
                    let n = number()?;
                    if !(512..=(1 << 24) - 1).contains(&n) {
                        return Err(bad("outside 512..2^24-1"));
                    }
                    self.negotiated.target_max_recv = n;
                }
                "MaxBurstLength" => {
                    let n = number()?;
                    if !(512..=OFFERED_MAX_BURST).contains(&n) {
                        return Err(bad("outside 512..the offered value"));
                    }
                    self.negotiated.max_burst = n;
                }
                "ErrorRecoveryLevel" if v != "0" => return Err(bad("only level 0 is supported")),
                "MaxConnections" if v != "1" => return Err(bad("one connection per session")),
                _ => {}
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(creds: bool) -> LoginParams {
        LoginParams {
            initiator_name: "iqn.i".into(),
            target_name: "iqn.t".into(),
            credentials: creds.then(|| Credentials::new("u", "secret")),
            want_digests: Digests { header: true, data: false },
            isid: [0x80, 0, 0, 0, 0, 1],
        }
    }

    fn rsp(transit: bool, csg: u8, nsg: u8, text: &str) -> LoginResponse {
        LoginResponse {
            transit,
            cont: false,
            csg,
            nsg,
            version_active: 0,
            tsih: 5,
            itt: 1,
            window: Window { stat_sn: 10, exp_cmd_sn: 1, max_cmd_sn: 32 },
            status_class: 0,
            status_detail: 0,
            data: text.replace(' ', "\0").into_bytes(),
        }
    }

    fn keys(req: &LoginRequest) -> Vec<(String, String)> {
        decode_text(&req.data).unwrap()
    }

    #[test]
    fn none_then_operational_then_done() {
        let mut l = Login::new(params(false), 1, 1);
        let first = l.start();
        assert!(first.transit && first.csg == 0 && first.nsg == 1);
        assert!(keys(&first).contains(&("AuthMethod".into(), "None".into())));
        let Step::Send(op) = l.on_response(rsp(true, 0, 1, "AuthMethod=None")).unwrap() else { panic!() };
        assert_eq!((op.csg, op.nsg, op.exp_stat_sn), (1, 3, 11));
        assert!(keys(&op).contains(&("HeaderDigest".into(), "CRC32C,None".into())));
        let done = l
            .on_response(rsp(true, 1, 3, "HeaderDigest=CRC32C DataDigest=None MaxBurstLength=1048576 MaxRecvDataSegmentLength=65536 ErrorRecoveryLevel=0"))
            .unwrap();
        let Step::Done(e) = done else { panic!("{done:?}") };
        assert_eq!(e.negotiated.max_burst, 1 << 20);
        assert_eq!(e.negotiated.digests, Digests { header: true, data: false });
        assert_eq!(e.tsih, 5);
    }

    #[test]
    fn chap_exchange() {
        let mut l = Login::new(params(true), 1, 1);
        let first = l.start();
        assert!(!first.transit);
        let Step::Send(a) = l.on_response(rsp(false, 0, 1, "AuthMethod=CHAP")).unwrap() else { panic!() };
        assert_eq!(keys(&a), vec![("CHAP_A".into(), "5".into())]);
        let Step::Send(r) = l.on_response(rsp(false, 0, 1, "CHAP_A=5 CHAP_I=7 CHAP_C=0x0102")).unwrap() else {
            panic!()
        };
        let k = keys(&r);
        assert_eq!(k[0], ("CHAP_N".into(), "u".into()));
        assert_eq!(k[1].1, chap::response(7, &Credentials::new("u", "secret"), &[1, 2]));
        assert!(r.transit);
        let Step::Send(op) = l.on_response(rsp(true, 0, 1, "")).unwrap() else { panic!() };
        assert_eq!(op.csg, 1);
    }

    #[test]
    fn refusals_are_clear() {
        let mut l = Login::new(params(false), 1, 1);
        l.start();
        assert_eq!(l.on_response(rsp(false, 0, 1, "AuthMethod=CHAP")), Err(LoginError::NeedsChap));
        let mut l = Login::new(params(true), 1, 1);
        l.start();
        let mut r = rsp(false, 0, 1, "");
        (r.status_class, r.status_detail) = (2, 1);
        let e = l.on_response(r).unwrap_err();
        assert!(e.to_string().contains("authentication failed"), "{e}");
        let mut l = Login::new(params(false), 1, 1);
        l.start();
        l.on_response(rsp(true, 0, 1, "AuthMethod=None")).unwrap();
        assert!(matches!(l.on_response(rsp(true, 1, 3, "ErrorRecoveryLevel=2")), Err(LoginError::Key { .. })));
        let mut l = Login::new(params(false), 1, 1);
        l.start();
        l.on_response(rsp(true, 0, 1, "AuthMethod=None")).unwrap();
        assert!(matches!(l.on_response(rsp(true, 1, 3, "DataDigest=CRC32C")), Err(LoginError::Key { .. })));
    }

    #[test]
    fn text_codec() {
        let t = encode_text(&[("A", "1".into()), ("B", "x=y".into())]);
        assert_eq!(decode_text(&t).unwrap(), vec![("A".into(), "1".into()), ("B".into(), "x=y".into())]);
        assert!(decode_text(b"novalue\0").is_err());
        assert!(decode_text(&[0xff, b'=', 0]).is_err());
    }
}
