//! Fuzzes the control socket codec (`daemon::control`): whole frames as vmtd or `vmt` read them
//! (selector 0), and JSON payloads under a correct checksum, as requests (1) and as responses
//! (2), so the JSON decoding of every request and response type is reached.
//! Asserts: no panic; an accepted header announces at most `MAX_FRAME` bytes; a decoded message
//! re-encodes to a frame that decodes to the same value; the images of `image_add` requests are
//! validated without panic; `vmt top` renders any response without panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use serde::{de::DeserializeOwned, Serialize};
use vmthunder::daemon::control::*;
use vmthunder_fuzz::Input;

fuzz_target!(|data: &[u8]| {
    let mut input = Input::new(data);
    match input.u8() % 3 {
        0 => {
            let h: [u8; HEADER_LEN] = input.array();
            let payload = input.rest();
            if let Ok((len, crc)) = decode_header(&h) {
                assert!(len <= MAX_FRAME);
                if len as usize == payload.len() {
                    payload_as::<Request>(payload, crc);
                    payload_as::<Response>(payload, crc);
                }
            }
        }
        1 => {
            let payload = input.rest();
            payload_as::<Request>(payload, crc32c::crc32c(payload));
        }
        _ => {
            let payload = input.rest();
            payload_as::<Response>(payload, crc32c::crc32c(payload));
        }
    }
});

trait Checked: Serialize + DeserializeOwned + PartialEq + std::fmt::Debug {
    fn check(&self) {}
}

impl Checked for Request {
    fn check(&self) {
        if let Request::ImageAdd { image } = self {
            let _ = image.validate();
        }
    }
}

impl Checked for Response {
    fn check(&self) {
        // `vmt top` renders whatever a daemon answers.
        let _ = vmthunder::cli::top::frame(self, Some(self), std::time::Duration::from_secs(1));
        let _ = vmthunder::cli::top::frame(self, None, std::time::Duration::ZERO);
    }
}

fn payload_as<T: Checked>(payload: &[u8], crc: u32) {
    let Ok(msg) = decode_payload::<T>(payload, crc) else { return };
    msg.check();
    let frame = encode(&msg);
    let (len, crc) = decode_header(frame[..HEADER_LEN].try_into().unwrap()).expect("own header");
    assert_eq!(len as usize, frame.len() - HEADER_LEN);
    let back: T = decode_payload(&frame[HEADER_LEN..], crc).expect("own frame decodes");
    assert_eq!(back, msg);
}
