//! Fuzzes the NBD parsers the server runs on client bytes: option headers, `OPT_INFO`/`OPT_GO`
//! data and transmission requests, alone (selector 0-2) and as a whole option phase (3).
//! Asserts: no panic; whatever parses re-encodes to exactly the bytes it came from.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vmthunder::nbd::proto::*;
use vmthunder_fuzz::Input;

fuzz_target!(|data: &[u8]| {
    let mut input = Input::new(data);
    match input.u8() % 4 {
        0 => {
            let b: [u8; OPTION_HEADER_LEN] = input.array();
            if let Ok(h) = OptionHeader::parse(&b) {
                assert_eq!(h.encode(), b);
            }
        }
        1 => info_request(input.rest()),
        2 => {
            let b: [u8; REQUEST_LEN] = input.array();
            if let Ok(r) = Request::parse(&b) {
                assert_eq!(r.encode(), b);
            }
        }
        _ => {
            // The option phase as the server reads it: header, then its data when within the
            // limit, until the input runs out or a header is refused.
            while let Ok(h) = OptionHeader::parse(&input.array()) {
                if h.len > MAX_OPTION_LEN {
                    break;
                }
                let opt = input.bytes(h.len as usize);
                match h.option {
                    OPT_INFO | OPT_GO => info_request(opt),
                    OPT_EXPORT_NAME => {
                        let _ = std::str::from_utf8(opt);
                    }
                    OPT_ABORT => break,
                    _ => {}
                }
            }
        }
    }
});

fn info_request(data: &[u8]) {
    if let Ok(r) = InfoRequest::parse(data) {
        assert_eq!(r.encode(), data);
        assert_eq!(InfoRequest::parse(&r.encode()), Ok(r));
    }
}
