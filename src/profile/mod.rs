//! Boot profiles: recorded from a real boot ([`recorder`]), stored and merged ([`format`]), and
//! replayed ahead of later boots ([`prefetch`]).

pub mod format;
pub mod prefetch;
pub mod recorder;

pub use format::{Profile, ProfileError};
