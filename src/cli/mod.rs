//! Subcommands of the `vmt` tool that are big enough to live in the library: the binary parses
//! and dispatches, these talk to vmtd and print.

pub mod cache;
pub mod docs;
pub mod logging;
pub mod progress;
pub mod top;
pub mod vmtd;
