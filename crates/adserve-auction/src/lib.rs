//! The auction: ranks candidates by eCPM = bid x pCTR and charges each winner
//! the generalized second price, subject to a reserve.
//!
//! Pure and I/O-free, so the auction service (services/auction) and the
//! gateway's in-process fallback run the same code. Its limits are the
//! RunAuction contract's, defined here once.

mod auction;
pub mod wire;

pub use auction::{AuctionError, Candidate, Outcome, Winner, run_auction, sample_candidates};

pub use adserve_proto::limits::{MAX_CANDIDATES, MAX_SLOTS};
/// Reserve eCPM (micro units per mille) used when neither the request nor
/// the configuration sets one.
pub const DEFAULT_RESERVE_ECPM_MICROS: i64 = 10_000;
/// Lowest pCTR the auction prices: a model output below it is clamped up to
/// it (a zero pCTR would make the second price divide by zero).
pub const MIN_PCTR: f32 = 1e-7;

/// Whether `p` is a pCTR the auction accepts: finite, in `[MIN_PCTR, 1]`.
pub fn is_valid_pctr(p: f32) -> bool {
    p.is_finite() && (MIN_PCTR..=1.0).contains(&p)
}
