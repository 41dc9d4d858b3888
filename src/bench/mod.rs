//! Measurement tools: request traces of an export ([`trace`]: recorded by vmtd with
//! `vmt trace start/stop`, stored as CSV) and their replay against any NBD server ([`replay`]),
//! so a recorded boot can be played by many nodes at once on a test network.

pub mod image;
pub mod replay;
pub mod trace;
