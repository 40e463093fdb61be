//! `run_auction` over 1, 100 and 1000 candidates (3 slots), next to the
//! naive baseline it replaces: scoring and fully sorting every candidate by
//! eCPM, then pricing each slot against the next. A third row runs the
//! production rules (advertiser cap 2, 5% exploration) to show what they
//! cost. Run with `make bench-auction` (or `cargo bench -p adserve-auction`);
//! `adserve-bench` reads the medians from criterion's estimates.

use adserve_auction::{Candidate, Rules, run_auction, sample_candidates};
use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};

/// Slots per auction: the target is 1000 candidates, 3 slots.
const SLOTS: usize = 3;
const RESERVE: i64 = 10_000;

/// The naive auction: every eCPM computed, everything sorted, each slot
/// priced at the next eCPM over its pCTR, rounded up.
fn full_sort(c: &[Candidate], slots: usize, reserve: i64) -> Vec<(i64, i64)> {
    let reserve = reserve as f64;
    let ecpm = |c: &Candidate| c.bid_micros as f64 * f64::from(c.pctr) * 1000.0;
    let mut ranked: Vec<(f64, &Candidate)> = c.iter().map(|c| (ecpm(c), c)).filter(|(e, _)| *e >= reserve).collect();
    ranked.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.ad_id.cmp(&b.1.ad_id)));
    (0..slots.min(ranked.len()))
        .map(|k| {
            let next = ranked.get(k + 1).map_or(reserve, |(e, _)| e.max(reserve));
            let c = ranked[k].1;
            (c.ad_id, ((next / (f64::from(c.pctr) * 1000.0)).ceil() as i64).min(c.bid_micros))
        })
        .collect()
}

fn bench(c: &mut Criterion) {
    let mut group = c.benchmark_group("auction");
    let plain = Rules::new(SLOTS, RESERVE);
    let production = Rules { max_per_advertiser: 2, exploration: 0.05, seed: 7, ..plain };
    for n in [1usize, 100, 1000] {
        let cands = sample_candidates(n);
        // Same winners, or the comparison means nothing.
        let ours: Vec<i64> =
            run_auction(&cands, &plain).expect("valid input").winners.iter().map(|w| w.candidate.ad_id).collect();
        let naive: Vec<i64> = full_sort(&cands, SLOTS, RESERVE).iter().map(|w| w.0).collect();
        assert_eq!(ours, naive, "run_auction and the full-sort baseline disagree at {n} candidates");
        group.bench_with_input(BenchmarkId::new("run_auction", n), &cands, |b, cands| {
            b.iter(|| run_auction(std::hint::black_box(cands), &plain).expect("valid input"))
        });
        group.bench_with_input(BenchmarkId::new("full_sort", n), &cands, |b, cands| {
            b.iter(|| full_sort(std::hint::black_box(cands), SLOTS, RESERVE))
        });
        group.bench_with_input(BenchmarkId::new("run_auction_capped_exploring", n), &cands, |b, cands| {
            b.iter(|| run_auction(std::hint::black_box(cands), &production).expect("valid input"))
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
