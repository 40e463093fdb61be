//! The auction: ranks candidates by quality-weighted eCPM (or a weighted
//! objective) and charges each winner the least bid that kept its slot,
//! subject to reserves, advertiser caps and an exploration share; and budget
//! pacing, which decides which campaigns may bid at all.
//!
//! Pure and I/O-free, so the auction service (services/auction) and the
//! gateway's in-process fallback run the same code. Its limits are the
//! RunAuction contract's, defined here once.

mod auction;
pub mod pacing;
pub mod wire;

pub use auction::{
    AuctionError, BidType, Candidate, MAX_QUALITY, MAX_QUALITY_EXPONENT, Objective, Outcome, Rules, Winner,
    run_auction, sample_candidates,
};

pub use adserve_proto::limits::{MAX_CANDIDATES, MAX_SLOTS};
/// Request-wide reserve eCPM (micro units per mille) of the gateway's
/// default configuration. The gateway sends its reserve with every auction;
/// the auction applies what it is sent (0 is a reserve of 0).
pub const DEFAULT_RESERVE_ECPM_MICROS: i64 = 10_000;
/// Lowest pCTR the auction prices: a model output below it is clamped up to
/// it (a zero pCTR would make the second price divide by zero).
pub const MIN_PCTR: f32 = 1e-7;

/// Whether `p` is a pCTR the auction accepts: finite, in `[MIN_PCTR, 1]`.
pub fn is_valid_pctr(p: f32) -> bool {
    p.is_finite() && (MIN_PCTR..=1.0).contains(&p)
}
