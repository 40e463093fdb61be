//! Examples first, then the properties the auction promises (proptest).

use proptest::prelude::*;

use super::*;

fn c(ad_id: i64, bid: i64, pctr: f32) -> Candidate {
    Candidate::cpc(ad_id, ad_id * 10, bid, pctr)
}

fn one_slot(cands: &[Candidate], reserve: i64) -> Outcome {
    run_auction(cands, &Rules::new(1, reserve)).unwrap()
}

fn ids(out: &Outcome) -> Vec<i64> {
    out.winners.iter().map(|w| w.candidate.ad_id).collect()
}

#[test]
fn ranks_by_ecpm_not_by_bid() {
    // Ad 1 bids more but is clicked far less: ad 2 has the higher eCPM.
    let out = one_slot(&[c(1, 2_000_000, 0.01), c(2, 1_000_000, 0.05)], 0);
    assert_eq!(ids(&out), vec![2]);
    assert!((out.winners[0].ecpm_micros - 50_000_000).abs() <= 1);
    assert_eq!(out.winners[0].propensity, 1.0);
    assert!(!out.winners[0].explored);
}

// pCTRs in these examples are powers of two, exact in f32, so the expected
// prices are exact too.

#[test]
fn winner_pays_the_least_bid_that_keeps_the_slot() {
    // eCPMs: ad 2 = 1e6 x 1/32 x 1000 = 31.25e6, ad 1 = 2e6 x 1/128 x 1000 =
    // 15.625e6. 500_000 ties ad 1; ad 1 has the lower id and wins ties, so
    // ad 2 must pay one micro more.
    let out = one_slot(&[c(1, 2_000_000, 1.0 / 128.0), c(2, 1_000_000, 1.0 / 32.0)], 0);
    assert_eq!(ids(&out), vec![2]);
    assert_eq!(out.winners[0].price_micros, 500_001);
    // With the ids swapped the tie goes to the winner: exactly the second price.
    let out = one_slot(&[c(2, 2_000_000, 1.0 / 128.0), c(1, 1_000_000, 1.0 / 32.0)], 0);
    assert_eq!(out.winners[0].price_micros, 500_000);
}

#[test]
fn prices_are_exact_for_the_pctr_on_the_wire() {
    // 0.02 is 0.0199999995... as an f32: 250_000 x that x 1000 is just under
    // a 5e6 reserve, so the price is 250_001. The old relative tolerance
    // rounded such cases, which is what under-charged large prices.
    assert_eq!(one_slot(&[c(1, 1_000_000, 0.02)], 5_000_000).winners[0].price_micros, 250_001);
}

#[test]
fn large_prices_are_never_rounded_down() {
    // The case that the old 1e-7 relative tolerance under-charged: the exact
    // second price is 5 000 000.4, and 5 000 000 does not keep the slot.
    let out = one_slot(&[c(1, 6_000_000, 0.5), c(2, 12_500_001, 0.2)], 0);
    assert_eq!(ids(&out), vec![1]);
    let price = out.winners[0].price_micros;
    assert_eq!(price, 5_000_001);
    let again = one_slot(&[c(1, price, 0.5), c(2, 12_500_001, 0.2)], 0);
    assert_eq!(ids(&again), vec![1], "the price keeps the slot");
    let below = one_slot(&[c(1, price - 1, 0.5), c(2, 12_500_001, 0.2)], 0);
    assert_eq!(ids(&below), vec![2], "one micro less does not");
}

#[test]
fn sole_bidder_pays_the_reserve_and_zero_means_none() {
    // 5e6 / (1/32 x 1000) = 160_000
    assert_eq!(one_slot(&[c(1, 1_000_000, 1.0 / 32.0)], 5_000_000).winners[0].price_micros, 160_000);
    // A reserve of 0 is a reserve of 0, not "use a default".
    assert_eq!(one_slot(&[c(1, 1_000_000, 1.0 / 32.0)], 0).winners[0].price_micros, 0);
}

#[test]
fn a_candidates_own_floor_applies_when_higher() {
    let mut a = c(1, 1_000_000, 1.0 / 32.0);
    a.reserve_ecpm_micros = 8_000_000;
    let out = one_slot(&[a], 5_000_000);
    assert_eq!(out.winners[0].price_micros, 256_000, "8e6 / 31.25 per mille");
    a.reserve_ecpm_micros = 40_000_000; // above its own 31.25e6 eCPM
    let out = one_slot(&[a, c(2, 100_000, 0.02)], 0);
    assert_eq!(ids(&out), vec![2]);
    assert_eq!(out.eligible, 1);
}

#[test]
fn candidates_below_reserve_do_not_win() {
    let out = run_auction(&[c(1, 1_000, 0.01), c(2, 1_000_000, 0.02)], &Rules::new(2, 1_000_000)).unwrap();
    assert_eq!(out.eligible, 1);
    assert_eq!(ids(&out), vec![2]);
    assert!(one_slot(&[c(1, 1_000, 0.01)], 1_000_000).winners.is_empty());
}

#[test]
fn multi_slot_prices_each_slot_against_the_next() {
    let cands = [c(1, 1_000_000, 0.04), c(2, 1_000_000, 0.03), c(3, 1_000_000, 0.02), c(4, 1_000_000, 0.01)];
    let out = run_auction(&cands, &Rules::new(3, 0)).unwrap();
    assert_eq!(ids(&out), vec![1, 2, 3]);
    let prices: Vec<i64> = out.winners.iter().map(|w| w.price_micros).collect();
    // 30e6/40 = 750_000 ties ad 2 and ad 1 wins ties; 20e6/30 = 666_666.67; 10e6/20 = 500_000.
    assert_eq!(prices, vec![750_000, 666_667, 500_000]);
    assert_eq!(out.winners.iter().map(|w| w.slot).collect::<Vec<_>>(), vec![0, 1, 2]);
}

#[test]
fn ties_are_broken_by_ad_id() {
    let out = one_slot(&[c(9, 1_000_000, 0.02), c(3, 1_000_000, 0.02)], 0);
    assert_eq!(ids(&out), vec![3]);
    assert_eq!(out.winners[0].price_micros, 1_000_000);
}

#[test]
fn quality_weighs_the_ecpm() {
    // Same eCPM, but ad 2's quality 2 with alpha 1 doubles its rank eCPM.
    let mut b = c(2, 1_000_000, 0.02);
    b.quality = 2.0;
    let out = one_slot(&[c(1, 1_000_000, 0.02), b], 0);
    assert_eq!(ids(&out), vec![2]);
    assert_eq!(out.winners[0].price_micros, 500_001, "needs half the bid, plus the tie");
    let neutral = Rules { quality_exponent: 0.0, ..Rules::new(1, 0) };
    assert_eq!(ids(&run_auction(&[c(1, 1_000_000, 0.02), b], &neutral).unwrap()), vec![1]);
}

#[test]
fn cpm_bids_rank_by_their_own_ecpm_and_pay_per_mille() {
    let cpm = Candidate { bid_type: BidType::Cpm, ..c(1, 30_000_000, 0.001) };
    // CPC ad 2: 1e6 x 0.02 x 1000 = 20e6 eCPM; the CPM bid is 30e6 per mille.
    let out = one_slot(&[cpm, c(2, 1_000_000, 0.02)], 0);
    assert_eq!(ids(&out), vec![1]);
    assert_eq!(out.winners[0].price_micros, 20_000_000, "per mille, ties to the lower id");
    assert_eq!(out.winners[0].ecpm_micros, 30_000_000);
}

#[test]
fn a_weighted_objective_ranks_by_it_and_prices_the_bid_that_keeps_the_slot() {
    let mut a = c(1, 1_000_000, 1.0 / 32.0); // eCPM 31.25 currency units
    let b = c(2, 1_200_000, 1.0 / 32.0); // eCPM 37.5
    a.pcvr = 0.5;
    let rules = Rules { objective: Objective::Weighted { pctr: 0.0, pcvr: 20.0, ecpm: 1.0 }, ..Rules::new(1, 0) };
    let out = run_auction(&[a, b], &rules).unwrap();
    // Scores: a = 10 + 31.25 = 41.25, b = 37.5. a keeps the slot while
    // 10 + eCPM >= 37.5 (it wins ties on its id): eCPM 27.5, a bid of 880_000.
    assert_eq!(ids(&out), vec![1]);
    assert_eq!(out.winners[0].price_micros, 880_000);
    // Ranked by eCPM alone, b wins.
    assert_eq!(ids(&one_slot(&[a, b], 0)), vec![2]);
}

#[test]
fn an_advertiser_takes_at_most_its_cap() {
    let mut cands: Vec<Candidate> = (1..=4).map(|i| Candidate { advertiser_id: 7, ..c(i, 1_000_000, 0.05) }).collect();
    cands.push(Candidate { advertiser_id: 8, ..c(5, 1_000_000, 0.01) });
    cands.push(Candidate { advertiser_id: 9, ..c(6, 1_000_000, 0.005) });
    let rules = Rules { max_per_advertiser: 2, ..Rules::new(4, 0) };
    let out = run_auction(&cands, &rules).unwrap();
    assert_eq!(ids(&out), vec![1, 2, 5, 6]);
    // Ad 2 is priced against ad 3 (available before ad 2 took the cap), not against ad 5.
    assert_eq!(out.winners[1].price_micros, 1_000_000);
    // Ad 5 against ad 6: 5e6 / 10 = 500_000.
    assert_eq!(out.winners[2].price_micros, 500_000);
    let uncapped = run_auction(&cands, &Rules::new(4, 0)).unwrap();
    assert_eq!(ids(&uncapped), vec![1, 2, 3, 4]);
}

#[test]
fn exploration_fills_its_share_with_logged_propensities() {
    let cands = sample_candidates(50);
    let (mut slots, mut explored) = (0, 0);
    for seed in 0..2000u64 {
        let rules = Rules { exploration: 0.2, seed, ..Rules::new(3, 0) };
        let out = run_auction(&cands, &rules).unwrap();
        assert_eq!(out, run_auction(&cands, &rules).unwrap(), "same seed, same outcome");
        for w in &out.winners {
            slots += 1;
            if w.explored {
                explored += 1;
                // 50 - slot candidates were available for it.
                let n = 50.0 - w.slot as f32;
                assert!((w.propensity - 0.2 / n).abs() < 1e-6, "{w:?}");
            } else {
                assert!(w.propensity > 0.8, "{w:?}");
            }
        }
    }
    let share = explored as f64 / slots as f64;
    assert!((0.17..0.23).contains(&share), "explored share {share}");
}

#[test]
fn an_explored_winner_pays_its_reserve_price() {
    let cands = sample_candidates(50);
    let w = (0..500u64)
        .flat_map(|seed| {
            run_auction(&cands, &Rules { exploration: 0.5, seed, ..Rules::new(1, 2_000_000) }).unwrap().winners
        })
        .find(|w| w.explored)
        .expect("some slot explored");
    let c = w.candidate;
    let want = (2_000_000f64 / (f64::from(c.pctr) * 1000.0)).ceil() as i64;
    assert!((w.price_micros - want).abs() <= 1, "{w:?} vs {want}");
}

#[test]
fn large_auction_matches_full_sort() {
    let cands = sample_candidates(1000);
    let out = run_auction(&cands, &Rules::new(5, 0)).unwrap();
    let mut sorted: Vec<&Candidate> = cands.iter().collect();
    let e = |c: &Candidate| c.bid_micros as f64 * f64::from(c.pctr) * 1000.0;
    sorted.sort_by(|a, b| e(b).total_cmp(&e(a)).then(a.ad_id.cmp(&b.ad_id)));
    let want: Vec<i64> = sorted.iter().take(5).map(|c| c.ad_id).collect();
    assert_eq!(ids(&out), want);
    assert_eq!(out.eligible, 1000);
}

#[test]
fn bad_input_names_the_field() {
    let r = Rules::new(1, 0);
    let err = |cands: &[Candidate], rules: &Rules| run_auction(cands, rules).unwrap_err().to_string();
    assert_eq!(run_auction(&[], &r).unwrap_err(), AuctionError::NoCandidates);
    assert!(AuctionError::NoCandidates.to_string().starts_with("candidates"));
    let many = sample_candidates(MAX_CANDIDATES + 1);
    assert_eq!(run_auction(&many, &r).unwrap_err(), AuctionError::TooManyCandidates(MAX_CANDIDATES + 1));
    assert!(err(&[c(1, 1, 0.1)], &Rules::new(0, 0)).starts_with("slots"));
    assert!(err(&[c(1, 1, 0.1)], &Rules::new(11, 0)).starts_with("slots"));
    assert!(err(&[c(1, 1, 0.1)], &Rules::new(1, -1)).starts_with("reserve_ecpm_micros"));
    assert!(err(&[c(1, 1, 0.1)], &Rules { exploration: 1.0, ..r }).starts_with("exploration_share"));
    assert!(err(&[c(1, 1, 0.1)], &Rules { quality_exponent: f64::NAN, ..r }).starts_with("quality_exponent"));
    let zero_ecpm = Rules { objective: Objective::Weighted { pctr: 1.0, pcvr: 0.0, ecpm: 0.0 }, ..r };
    assert!(err(&[c(1, 1, 0.1)], &zero_ecpm).starts_with("objective.ecpm_weight"));
    assert_eq!(err(&[c(1, 0, 0.1)], &r), "candidates[0].bid_cpc_micros: must be > 0, got 0");
    assert!(err(&[c(1, -5, 0.1)], &r).starts_with("candidates[0].bid_cpc_micros"));
    let cpm = Candidate { bid_type: BidType::Cpm, ..c(1, 0, 0.1) };
    assert!(err(&[cpm], &r).starts_with("candidates[0].bid_cpm_micros"));
    assert!(err(&[c(1, 1, f32::NAN)], &r).starts_with("candidates[0].pctr"));
    assert!(err(&[c(1, 1, 0.1), c(2, 1, MIN_PCTR / 2.0)], &r).starts_with("candidates[1].pctr"));
    assert!(err(&[c(1, 1, 1.5)], &r).starts_with("candidates[0].pctr"));
    assert!(err(&[Candidate { pcvr: f32::INFINITY, ..c(1, 1, 0.1) }], &r).starts_with("candidates[0].pcvr"));
    assert!(err(&[Candidate { quality: 0.0, ..c(1, 1, 0.1) }], &r).starts_with("candidates[0].quality"));
    assert!(
        err(&[Candidate { reserve_ecpm_micros: -1, ..c(1, 1, 0.1) }], &r).starts_with("candidates[0].reserve_ecpm")
    );
    let e = run_auction(&[c(1, 1, 0.1), c(3, 1, 0.1), c(1, 2, 0.1)], &r).unwrap_err();
    assert_eq!(e, AuctionError::RepeatedAd { index: 2, ad_id: 1 });
}

// ---- properties ------------------------------------------------------------

/// Candidates with unique ids, bids up to 100 currency units per click (so
/// prices reach tens of millions of micros), pCTRs across the valid range,
/// a few advertisers (so caps bind), some CPM bids and some quality.
fn candidates(max: usize) -> impl Strategy<Value = Vec<Candidate>> {
    prop::collection::vec(
        (
            1i64..100_000_000,
            prop_oneof![Just(MIN_PCTR), 1e-4f32..1.0, Just(1.0f32)],
            0i64..4,
            prop_oneof![4 => Just(BidType::Cpc), 1 => Just(BidType::Cpm)],
            prop_oneof![3 => Just(1.0f32), 1 => 0.1f32..10.0],
            prop_oneof![3 => Just(0i64), 1 => 0i64..50_000_000],
        ),
        1..max,
    )
    .prop_map(|v| {
        v.into_iter()
            .enumerate()
            .map(|(i, (bid, pctr, adv, bid_type, quality, floor))| Candidate {
                ad_id: (i as i64) * 7 + 3,
                campaign_id: i as i64 / 2,
                advertiser_id: adv,
                bid_type,
                bid_micros: bid,
                pctr,
                pcvr: 0.0,
                quality,
                reserve_ecpm_micros: floor,
            })
            .collect()
    })
}

fn rules() -> impl Strategy<Value = Rules> {
    (1usize..=4, prop_oneof![Just(0i64), 0i64..20_000_000], prop_oneof![Just(1.0f64), 0.0f64..2.0], 0usize..3).prop_map(
        |(slots, reserve, alpha, cap)| Rules {
            quality_exponent: alpha,
            max_per_advertiser: cap,
            ..Rules::new(slots, reserve)
        },
    )
}

fn with_bid(cands: &[Candidate], ad_id: i64, bid: i64) -> Vec<Candidate> {
    cands.iter().map(|c| if c.ad_id == ad_id { Candidate { bid_micros: bid, ..*c } } else { *c }).collect()
}

fn slot_of(out: &Outcome, ad_id: i64) -> Option<u32> {
    out.winners.iter().find(|w| w.candidate.ad_id == ad_id).map(|w| w.slot)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn price_is_within_reserve_and_bid(cands in candidates(40), rules in rules()) {
        let out = run_auction(&cands, &rules).unwrap();
        for w in &out.winners {
            let c = &w.candidate;
            prop_assert!(w.price_micros <= c.bid_micros, "{w:?}");
            let qf = quality_factor_fn(rules.quality_exponent)(c.quality, rules.quality_exponent);
            let reserve = c.reserve_ecpm_micros.max(rules.reserve_ecpm_micros) as f64;
            prop_assert!(ecpm_at(c, w.price_micros, qf) >= reserve, "{w:?} under reserve {reserve}");
        }
    }

    #[test]
    fn no_ad_wins_twice_and_caps_hold(cands in candidates(40), rules in rules()) {
        let out = run_auction(&cands, &rules).unwrap();
        let mut seen: Vec<i64> = ids(&out);
        seen.sort_unstable();
        seen.dedup();
        prop_assert_eq!(seen.len(), out.winners.len());
        prop_assert!(out.winners.len() <= rules.slots);
        if rules.max_per_advertiser > 0 {
            for w in &out.winners {
                let n = out.winners.iter().filter(|o| o.candidate.advertiser_id == w.candidate.advertiser_id).count();
                prop_assert!(n <= rules.max_per_advertiser);
            }
        }
        for (k, w) in out.winners.iter().enumerate() {
            prop_assert_eq!(w.slot as usize, k);
        }
    }

    #[test]
    fn the_price_keeps_the_slot_and_one_micro_less_does_not(cands in candidates(30), rules in rules()) {
        let out = run_auction(&cands, &rules).unwrap();
        for w in &out.winners {
            let id = w.candidate.ad_id;
            let again = run_auction(&with_bid(&cands, id, w.price_micros.max(1)), &rules).unwrap();
            prop_assert_eq!(slot_of(&again, id), Some(w.slot), "bidding its price {} keeps slot", w.price_micros);
            if w.price_micros > 1 {
                let less = run_auction(&with_bid(&cands, id, w.price_micros - 1), &rules).unwrap();
                prop_assert!(
                    slot_of(&less, id).is_none_or(|s| s > w.slot),
                    "bidding {} (one micro under its price) must lose slot {}", w.price_micros - 1, w.slot
                );
            }
        }
    }

    #[test]
    fn a_single_slot_winner_does_not_set_its_own_price(cands in candidates(30), rules in rules(), raise in 1i64..1_000_000_000) {
        let rules = Rules { slots: 1, ..rules };
        let out = run_auction(&cands, &rules).unwrap();
        if let Some(w) = out.winners.first() {
            let id = w.candidate.ad_id;
            let higher = run_auction(&with_bid(&cands, id, w.candidate.bid_micros.saturating_add(raise)), &rules).unwrap();
            prop_assert_eq!(ids(&higher), vec![id]);
            prop_assert_eq!(higher.winners[0].price_micros, w.price_micros);
            // Any bid between its price and its bid changes nothing either.
            let lower_bid = w.price_micros.max(1) + (w.candidate.bid_micros - w.price_micros.max(1)) / 2;
            let lower = run_auction(&with_bid(&cands, id, lower_bid), &rules).unwrap();
            prop_assert_eq!(lower.winners[0].price_micros, w.price_micros);
        }
    }

    #[test]
    fn raising_a_bid_never_lowers_a_rank(cands in candidates(30), rules in rules(), pick in any::<prop::sample::Index>(), raise in 1i64..100_000_000) {
        let out = run_auction(&cands, &rules).unwrap();
        let target = cands[pick.index(cands.len())];
        let before = slot_of(&out, target.ad_id);
        let after = slot_of(&run_auction(&with_bid(&cands, target.ad_id, target.bid_micros + raise), &rules).unwrap(), target.ad_id);
        if let Some(b) = before {
            prop_assert!(after.is_some_and(|a| a <= b), "slot {b} became {after:?}");
        }
    }

    #[test]
    fn a_fixed_seed_gives_a_fixed_outcome(cands in candidates(40), rules in rules(), seed in any::<u64>(), share in 0.0f64..0.9) {
        let rules = Rules { exploration: share, seed, ..rules };
        let a = run_auction(&cands, &rules).unwrap();
        let mut shuffled = cands.clone();
        shuffled.reverse();
        let b = run_auction(&shuffled, &rules).unwrap();
        prop_assert_eq!(&a, &b, "input order must not matter");
        for w in &a.winners {
            prop_assert!(w.propensity > 0.0 && w.propensity <= 1.0);
        }
    }

    #[test]
    fn garbage_never_panics(
        bids in prop::collection::vec(any::<i64>(), 1..20),
        pctrs in prop::collection::vec(any::<f32>(), 1..20),
        slots in any::<usize>(),
        reserve in any::<i64>(),
    ) {
        let cands: Vec<Candidate> = bids.iter().zip(&pctrs).enumerate().map(|(i, (b, p))| c(i as i64 % 7, *b, *p)).collect();
        if cands.is_empty() { return Ok(()); }
        let _ = run_auction(&cands, &Rules::new(slots, reserve));
    }
}
