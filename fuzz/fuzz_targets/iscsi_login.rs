//! Fuzzes the iSCSI login phase against a hostile target: the `key=value` text codec
//! (selector 0), CHAP binary values (1), and the login state machine fed a sequence of Login
//! Responses made from the input (2), with or without CHAP credentials and digests wanted.
//! Asserts: no panic; decoded text re-encodes to text that decodes to the same pairs; CHAP
//! values stay within their size limits; every request the machine sends encodes as a PDU and
//! carries valid text; a login ends within `MAX_ROUNDS` responses, and a finished login has only
//! digests we offered and block sizes within the protocol's ranges.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vmthunder::iscsi::chap::{self, Credentials};
use vmthunder::iscsi::login::*;
use vmthunder::iscsi::pdu::{Digests, LoginResponse, Window};
use vmthunder_fuzz::Input;

const ITT: u32 = 0x1234;

fuzz_target!(|data: &[u8]| {
    let mut input = Input::new(data);
    match input.u8() % 3 {
        0 => {
            if let Ok(pairs) = decode_text(input.rest()) {
                let borrowed: Vec<(&str, String)> = pairs.iter().map(|(k, v)| (k.as_str(), v.clone())).collect();
                assert_eq!(decode_text(&encode_text(&borrowed)), Ok(pairs));
            }
        }
        1 => {
            if let Ok(s) = std::str::from_utf8(input.rest()) {
                if let Ok(v) = chap::decode_binary(s) {
                    assert!(!v.is_empty() && v.len() <= 4096);
                }
            }
        }
        _ => login(&mut input),
    }
});

fn login(input: &mut Input) {
    let setup = input.u8();
    let want = Digests { header: setup & 1 != 0, data: setup & 2 != 0 };
    let params = LoginParams {
        initiator_name: "iqn.2024-01.org.vmthunder:fuzz".into(),
        target_name: "iqn.2024-01.org.vmthunder:target".into(),
        credentials: (setup & 4 != 0).then(|| Credentials::new("user", "secret")),
        want_digests: want,
        isid: [0x80, 0, 0, 0, 0, 1],
    };
    let mut l = Login::new(params, ITT, 1);
    check_request(&l.start());
    for _ in 0..64 {
        let flags = input.u8();
        let status = input.u8();
        let itt = input.u8();
        let r = LoginResponse {
            transit: flags & 0x80 != 0,
            cont: flags & 0x40 != 0,
            csg: (flags >> 2) & 3,
            nsg: flags & 3,
            // Mostly valid, so the fuzzer spends its time on the text.
            version_active: if flags & 0x20 != 0 { input.u8() } else { 0 },
            tsih: input.u16(),
            itt: if itt == 0 { ITT } else { u32::from(itt) },
            window: Window { stat_sn: input.u32(), exp_cmd_sn: 1, max_cmd_sn: 1 },
            status_class: if status & 0x80 != 0 { status & 3 } else { 0 },
            status_detail: status & 0x7f,
            data: {
                let n = input.u16() as usize;
                input.bytes(n).to_vec()
            },
        };
        match l.on_response(r) {
            Ok(Step::Send(req)) => check_request(&req),
            Ok(Step::Done(e)) => {
                let n = e.negotiated;
                assert!(!n.digests.header || want.header);
                assert!(!n.digests.data || want.data);
                assert!((512..(1 << 24)).contains(&n.target_max_recv));
                assert!((512..=OFFERED_MAX_BURST).contains(&n.max_burst));
                assert_eq!(n.our_max_recv, OUR_MAX_RECV_DATA_SEGMENT);
                return;
            }
            Err(e) => {
                let _ = (e.to_string(), e.is_transient());
                return;
            }
        }
    }
    panic!("login went on for 64 responses");
}

fn check_request(req: &vmthunder::iscsi::pdu::LoginRequest) {
    decode_text(&req.data).expect("our own login text decodes");
    let _ = req.to_pdu().encode(Digests::default());
}
