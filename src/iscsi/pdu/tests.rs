//! Unit tests of the PDU codec: round trips, digests, and hostile bytes (property tests).

use super::*;
use proptest::prelude::*;

fn roundtrip(p: &Pdu, d: Digests) -> Pdu {
    let wire = p.encode(d);
    assert_eq!(wire.len() % 4, 0);
    let (q, used) = Pdu::decode_prefix(&wire, d).unwrap().unwrap();
    assert_eq!(used, wire.len());
    q
}

#[test]
fn login_request_layout() {
    let r = LoginRequest {
        transit: true,
        csg: STAGE_OPERATIONAL,
        nsg: STAGE_FULL_FEATURE,
        isid: [0x80, 1, 2, 3, 4, 5],
        tsih: 0,
        itt: 7,
        cid: 0,
        cmd_sn: 1,
        exp_stat_sn: 0,
        data: b"A=B\0".to_vec(),
    };
    let w = r.to_pdu().encode(Digests::default());
    assert_eq!(&w[..8], &[0x43, 0x87, 0, 0, 0, 0, 0, 4]);
    assert_eq!(&w[8..14], &[0x80, 1, 2, 3, 4, 5]);
    assert_eq!(&w[16..20], &7u32.to_be_bytes());
    assert_eq!(&w[48..], b"A=B\0");
}

#[test]
fn padding_and_digests() {
    let mut p = Pdu::new(OP_DATA_IN);
    p.data = vec![1, 2, 3, 4, 5];
    let d = Digests { header: true, data: true };
    let w = p.encode(d);
    assert_eq!(w.len(), 48 + 4 + 8 + 4);
    assert_eq!(roundtrip(&p, d).data, p.data);
    let mut bad = w.clone();
    bad[3] ^= 1;
    assert!(matches!(Pdu::decode_prefix(&bad, d), Err(PduError::HeaderDigest { .. })));
    let mut bad = w.clone();
    bad[53] ^= 1;
    assert!(matches!(Pdu::decode_prefix(&bad, d), Err(PduError::DataDigest { .. })));
    assert_eq!(Pdu::decode_prefix(&w[..w.len() - 1], d), Ok(None));
}

/// RFC 7143 Appendix B.4: 32 bytes of zeros give CRC32C 0x8a9136aa, sent as aa 36 91 8a.
#[test]
fn crc32c_matches_the_rfc_example() {
    assert_eq!(digest_bytes(&[&[0u8; 32]]).to_le_bytes(), [0xaa, 0x36, 0x91, 0x8a]);
}

#[test]
fn hostile_lengths_are_refused() {
    let mut bhs = [0u8; 48];
    bhs[0] = OP_DATA_IN;
    bhs[5..8].copy_from_slice(&[0xff, 0xff, 0xff]);
    assert!(matches!(Frame::of(&bhs, Digests::default()), Err(PduError::TooLong(_))));
    let mut p = Pdu::new(OP_SCSI_RSP);
    p.data = vec![0, 200, 1, 2];
    assert!(matches!(TargetPdu::parse(p), Err(PduError::Malformed { .. })));
    let mut p = Pdu::new(OP_SCSI_RSP);
    p.data = vec![0];
    assert!(matches!(TargetPdu::parse(p), Err(PduError::Malformed { .. })));
    assert!(matches!(TargetPdu::parse(Pdu::new(OP_R2T)), Err(PduError::Opcode(OP_R2T))));
}

proptest! {
    #[test]
    fn decode_never_panics(buf in proptest::collection::vec(any::<u8>(), 0..600), h: bool, d: bool) {
        let digests = Digests { header: h, data: d };
        if let Ok(Some((p, used))) = Pdu::decode_prefix(&buf, digests) {
            prop_assert!(used <= buf.len());
            let _ = TargetPdu::parse(p);
        }
        let mut bhs = [0u8; 48];
        let n = buf.len().min(48);
        bhs[..n].copy_from_slice(&buf[..n]);
        let _ = Pdu::decode(&bhs, buf.get(48..).unwrap_or(&[]), digests);
    }

    #[test]
    fn encode_decode_roundtrip(
        head in proptest::array::uniform32(any::<u8>()),
        tail in proptest::array::uniform16(any::<u8>()),
        ahs_words in 0usize..4,
        data in proptest::collection::vec(any::<u8>(), 0..300),
        h: bool, d: bool,
    ) {
        let mut bhs = [0u8; 48];
        bhs[..32].copy_from_slice(&head);
        bhs[32..].copy_from_slice(&tail);
        let p = Pdu { bhs, ahs: vec![0xa5; ahs_words * 4], data };
        let digests = Digests { header: h, data: d };
        let q = roundtrip(&p, digests);
        // Lengths are rewritten by encode; everything else is kept.
        prop_assert_eq!(&q.bhs[..4], &p.bhs[..4]);
        prop_assert_eq!(&q.bhs[8..], &p.bhs[8..]);
        prop_assert_eq!(q.ahs, p.ahs);
        prop_assert_eq!(q.data, p.data);
    }

    #[test]
    fn owned_decode_agrees(buf in proptest::collection::vec(any::<u8>(), 48..400), h: bool, d: bool) {
        let digests = Digests { header: h, data: d };
        let bhs: [u8; 48] = buf[..48].try_into().unwrap();
        let rest = buf[48..].to_vec();
        prop_assert_eq!(Pdu::decode_owned(&bhs, rest.clone(), digests), Pdu::decode(&bhs, &rest, digests));
        let mut p = Pdu::new(OP_DATA_IN);
        p.data = buf[48..].to_vec();
        let wire = p.encode(digests);
        let bhs: [u8; 48] = wire[..48].try_into().unwrap();
        prop_assert_eq!(Pdu::decode_owned(&bhs, wire[48..].to_vec(), digests).unwrap().data, p.data);
    }

    #[test]
    fn scsi_command_roundtrip(lun: u64, itt: u32, len: u32, sn: u32, esn: u32, cdb: [u8; 16]) {
        let c = ScsiCommand { lun, itt, expected_len: len, cmd_sn: sn, exp_stat_sn: esn, cdb };
        let q = roundtrip(&c.to_pdu(), Digests { header: true, data: false });
        prop_assert_eq!(q.opcode(), OP_SCSI_CMD);
        prop_assert_eq!((q.u64_at(8), q.itt(), q.u32_at(20), q.u32_at(24), q.u32_at(28)), (lun, itt, len, sn, esn));
        prop_assert_eq!(&q.bhs[32..], &cdb[..]);
    }
}
