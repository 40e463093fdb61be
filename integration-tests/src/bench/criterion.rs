//! Reading criterion's estimates: the in-process figures of `make bench`
//! (`cargo bench`, run by scripts/bench.sh before the driver) become rows
//! of the same report as the figures measured over the network.

use std::path::Path;

use super::{
    load::Summary,
    report::{self, Comparison, Metric, Role, Subject},
};

/// The criterion median of `group/function/param`, with its 95 %
/// confidence interval, in milliseconds; None when criterion has not run.
pub fn median(target: &Path, group: &str, function: &str, param: usize) -> Option<(f64, f64, f64)> {
    let path = target.join(format!("criterion/{group}/{function}/{param}/new/estimates.json"));
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path).ok()?).ok()?;
    let ns = |k: &str| v[k]["point_estimate"].as_f64();
    let ci = &v["median"]["confidence_interval"];
    Some((ns("median")? / 1e6, ci["lower_bound"].as_f64()? / 1e6, ci["upper_bound"].as_f64()? / 1e6))
}

/// A report row for a criterion median over `items` items per iteration.
pub fn summary(median_ms: f64, items: usize) -> Summary {
    // Criterion reports a median with a confidence interval, not tail
    // percentiles: the tail columns stay empty (zero) rather than invented.
    Summary {
        p50_ms: median_ms,
        mean_ms: median_ms,
        rate_per_s: 1000.0 / median_ms,
        items_per_s: 1000.0 / median_ms * items as f64,
        ..Summary::default()
    }
}

/// A comparison on p50 led by the criterion median `median` of `who` (over
/// `items` items per iteration), its 95 % confidence interval in the note
/// after `what`; the caller adds the rows it is compared with.
pub fn comparison(
    path: &str,
    case: String,
    who: &str,
    median: (f64, f64, f64),
    items: usize,
    what: &str,
) -> Comparison {
    let (ms, low, high) = median;
    Comparison {
        path: path.into(),
        case,
        metric: Metric::P50,
        subjects: vec![Subject { who: who.into(), role: Role::Ours, summary: summary(ms, items) }],
        note: format!(
            "{what} (95% CI {}-{} ms); tail columns are blank for criterion rows",
            report::ratio(low),
            report::ratio(high)
        ),
    }
}
