//! Fuzzes the NBD parsers the client runs on server bytes: the greeting, option reply headers,
//! `NBD_INFO_EXPORT` data, simple and structured reply headers (selector 0-4).
//! Asserts: no panic; whatever parses re-encodes to exactly the bytes it came from.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vmthunder::nbd::proto::*;
use vmthunder_fuzz::Input;

fuzz_target!(|data: &[u8]| {
    let mut input = Input::new(data);
    match input.u8() % 5 {
        0 => {
            let b: [u8; GREETING_LEN] = input.array();
            if let Ok(flags) = parse_greeting(&b) {
                assert_ne!(flags & FLAG_FIXED_NEWSTYLE, 0);
                assert_eq!(greeting(flags), b);
            }
        }
        1 => {
            let b: [u8; OPTION_REPLY_HEADER_LEN] = input.array();
            if let Ok(h) = OptionReplyHeader::parse(&b) {
                // The server's encoder gives back the same header for data of that length.
                let payload = input.rest();
                let again = option_reply(h.option, h.reply, payload);
                let back = OptionReplyHeader::parse(again[..OPTION_REPLY_HEADER_LEN].try_into().unwrap());
                assert_eq!(back, Ok(OptionReplyHeader { len: payload.len() as u32, ..h }));
                assert_eq!(&again[OPTION_REPLY_HEADER_LEN..], payload);
                if h.len as usize == payload.len() {
                    assert_eq!(again[..OPTION_REPLY_HEADER_LEN], b);
                }
            }
        }
        2 => {
            let d = input.rest();
            if let Some((size, flags)) = parse_info_export(d) {
                assert_eq!(info_export(size, flags), d);
            }
        }
        3 => {
            let b: [u8; SIMPLE_REPLY_LEN] = input.array();
            if let Ok(r) = SimpleReply::parse(&b) {
                assert_eq!(r.encode(), b);
            }
        }
        _ => {
            let b: [u8; STRUCTURED_HEADER_LEN] = input.array();
            if let Ok(h) = StructuredHeader::parse(&b) {
                assert_eq!(h.encode(), b);
            }
        }
    }
});
