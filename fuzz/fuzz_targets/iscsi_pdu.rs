//! Fuzzes the iSCSI PDU codec (`iscsi::pdu`) on target bytes: framing with each combination of
//! header and data digests (selector bits 0-1), then typing of the PDU as the initiator does
//! (`TargetPdu::parse`). Selector bit 2 recomputes the digests over the mutated bytes first, so
//! the fuzzer gets past them.
//! Asserts: no panic; a PDU never takes more bytes than given nor announces a data segment over
//! `MAX_DATA_SEGMENT`; the copying and the owning decoders agree; a decoded PDU re-encodes to
//! bytes that decode to the same PDU.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vmthunder::iscsi::pdu::*;
use vmthunder_fuzz::Input;

fuzz_target!(|data: &[u8]| {
    let mut input = Input::new(data);
    let sel = input.u8();
    let digests = Digests { header: sel & 1 != 0, data: sel & 2 != 0 };
    let buf = input.rest();
    let buf = if sel & 4 != 0 { redigest(buf, digests) } else { buf.to_vec() };
    let mut at = 0;
    // A stream of PDUs, as the initiator's reader takes them off the connection.
    while let Ok(Some((p, used))) = Pdu::decode_prefix(&buf[at..], digests) {
        assert!(used >= BHS_LEN && used <= buf.len() - at);
        assert!(p.data.len() <= MAX_DATA_SEGMENT);
        let bhs: [u8; BHS_LEN] = buf[at..at + BHS_LEN].try_into().unwrap();
        let rest = &buf[at + BHS_LEN..at + used];
        assert_eq!(Pdu::decode_owned(&bhs, rest.to_vec(), digests).as_ref(), Ok(&p));
        let wire = p.encode(digests);
        assert_eq!(wire.len(), used);
        assert_eq!(Pdu::decode_prefix(&wire, digests), Ok(Some((p.clone(), used))));
        match TargetPdu::parse(p) {
            Ok(TargetPdu::ScsiResponse(r)) => assert!(r.sense.len() < used),
            Ok(_) => {}
            Err(e) => {
                let _ = e.to_string();
            }
        }
        at += used;
    }
    if let Some(bhs) = buf.get(..BHS_LEN) {
        let _ = Pdu::decode(bhs.try_into().unwrap(), &buf[BHS_LEN..], digests);
    }
});

/// `buf` with its header and data digests replaced by the right ones, when its BHS announces
/// lengths that fit in it.
fn redigest(buf: &[u8], digests: Digests) -> Vec<u8> {
    let mut out = buf.to_vec();
    let Some(bhs) = buf.get(..BHS_LEN) else { return out };
    let Ok(f) = Frame::of(bhs.try_into().unwrap(), digests) else { return out };
    if buf.len() < BHS_LEN + f.rest_len {
        return out;
    }
    let mut at = BHS_LEN + f.ahs_len;
    if digests.header {
        out[at..at + 4].copy_from_slice(&crc32c::crc32c(&buf[..at]).to_le_bytes());
        at += 4;
    }
    if f.data_len > 0 && digests.data {
        let padded = f.data_len.div_ceil(4) * 4;
        let crc = crc32c::crc32c(&buf[at..at + padded]);
        out[at + padded..at + padded + 4].copy_from_slice(&crc.to_le_bytes());
    }
    out
}
