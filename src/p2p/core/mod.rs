//! The relay's sans-IO core: every decision the peer-to-peer relay makes, as pure state machines
//! that take events and `now` and return answers. None of them does I/O or reads a clock.
//!
//! ```text
//!   vmtd (tokio: sockets, tasks, Instant::now())      vmt sim (virtual clock, simulated flows)
//!            │                                                  │
//!            └──────────────┬───────────────────────────────────┘
//!                           ▼  the very same types
//!   select::Selector   source choice, have-maps and their deltas, requests in flight,
//!                      Busy/NotHave costs, backoff, bans, relay trees (p2p::select)
//!   PieceRead          one piece: ask, record the answer, ask again, or the origin
//!   tree               the relay trees' keys: classes, interior-disjoint groups, heap places
//!   Membership         each image's View from tracker answers (window, per address)
//!   Roster             the tracker's table (TTL, bounds, tree places, ring successors)
//!   Federation         trackers sharing the load: partitions joined through their merged tops
//!   UploadBudget       upload admission: reply bytes, session share, queue → reply or Busy
//!   plan_runs          (fetch::flight) how missing chunks become upstream runs
//!   prefetch_runs      (profile::prefetch) the order and runs of a profile's prefetch
//! ```
//!
//! A bug the simulator finds in one of these is a bug in the daemon: `vmt sim` holds no second
//! copy of any of them (it models links, CPU and guests, nothing else).

pub mod federation;
pub mod membership;
pub mod piece;
pub mod roster;
pub mod tree;
pub mod upload;

pub use federation::Federation;
pub use membership::{Membership, View};
pub use piece::PieceRead;
pub use roster::{Answer, Ask, Roster};
pub use upload::UploadBudget;
