//! Fuzzes the parsers of SCSI answers from an iSCSI target (`iscsi::scsi`): READ CAPACITY(16)
//! (selector 0), INQUIRY (1), REPORT LUNS (2), and status with sense data (3); and the LUN
//! encoding (4).
//! Asserts: no panic; an accepted capacity has a power-of-two block size of 512 B..1 MiB and a
//! byte size that fits in 64 bits; REPORT LUNS yields no more LUNs than the bytes hold, each
//! within the 14-bit flat space; GOOD status is the only success; LUNs survive encode/decode.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vmthunder::iscsi::scsi::*;
use vmthunder_fuzz::Input;

fuzz_target!(|data: &[u8]| {
    let mut input = Input::new(data);
    match input.u8() % 5 {
        0 => {
            if let Ok(c) = parse_read_capacity_16(input.rest()) {
                assert!(c.block_size.0.is_power_of_two() && (512..=1 << 20).contains(&c.block_size.0));
                assert!(c.blocks >= 1 && c.bytes().is_some());
            }
        }
        1 => {
            if let Ok(i) = parse_inquiry(input.rest()) {
                assert!(i.device_type < 32);
            }
        }
        2 => {
            let d = input.rest();
            if let Ok(luns) = parse_report_luns(d) {
                assert!(luns.len() <= (d.len() - 8) / 8);
                assert!(luns.iter().all(|&l| l < 0x4000));
            }
        }
        3 => {
            let status = input.u8();
            let sense = input.rest();
            match check_status(status, sense) {
                Ok(()) => assert_eq!(status, STATUS_GOOD),
                Err(e) => {
                    assert_ne!(status, STATUS_GOOD);
                    let _ = (e.to_string(), e.is_transient());
                }
            }
        }
        _ => {
            let lun = input.u16();
            if lun < 0x4000 {
                assert_eq!(decode_lun(encode_lun(lun)), u64::from(lun));
            }
            let lba = Lba(u64::from(input.u32()) << 32 | u64::from(input.u32()));
            let blocks = input.u32();
            let cdb = read_16(lba, blocks);
            assert_eq!(u64::from_be_bytes(cdb[2..10].try_into().unwrap()), lba.0);
            assert_eq!(u32::from_be_bytes(cdb[10..14].try_into().unwrap()), blocks);
        }
    }
});
