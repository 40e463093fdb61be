//! Reads histograms from a service's Prometheus `/metrics` so a benchmark can
//! report where the time went (the gateway's per-hop histogram) for exactly
//! the window it measured: scrape before, scrape after, subtract.

use std::collections::BTreeMap;

/// Cumulative bucket counts of one histogram series: `le -> count`.
pub type Buckets = Vec<(f64, f64)>;

/// Every series of histogram `name`, keyed by the value of `label`.
pub fn histogram(text: &str, name: &str, label: &str) -> BTreeMap<String, Buckets> {
    let prefix = format!("{name}_bucket{{");
    let mut out: BTreeMap<String, Buckets> = BTreeMap::new();
    for line in text.lines() {
        let Some(rest) = line.strip_prefix(&prefix) else { continue };
        let Some((labels, value)) = rest.rsplit_once("} ") else { continue };
        let Ok(count) = value.trim().parse::<f64>() else { continue };
        let mut key = String::new();
        let mut le = None;
        for pair in labels.split(',') {
            let Some((k, v)) = pair.split_once('=') else { continue };
            let v = v.trim_matches('"');
            if k == label {
                key = v.to_string();
            } else if k == "le" {
                le = if v == "+Inf" { Some(f64::INFINITY) } else { v.parse().ok() };
            }
        }
        if let Some(le) = le {
            out.entry(key).or_default().push((le, count));
        }
    }
    for b in out.values_mut() {
        b.sort_by(|a, b| a.0.total_cmp(&b.0));
    }
    out
}

/// `after - before`, bucket by bucket (series absent before count from zero).
pub fn delta(before: &BTreeMap<String, Buckets>, after: &BTreeMap<String, Buckets>) -> BTreeMap<String, Buckets> {
    after
        .iter()
        .map(|(k, a)| {
            let b = before.get(k);
            let d = a
                .iter()
                .map(|(le, n)| {
                    let prev = b.and_then(|b| b.iter().find(|(l, _)| l == le)).map_or(0.0, |(_, n)| *n);
                    (*le, n - prev)
                })
                .collect();
            (k.clone(), d)
        })
        .collect()
}

/// Observations in a cumulative bucket list.
pub fn count(b: &Buckets) -> f64 {
    b.last().map_or(0.0, |(_, n)| *n)
}

/// Quantile `q` estimated from cumulative buckets, interpolating linearly
/// inside the bucket (as PromQL's histogram_quantile does). Seconds.
pub fn quantile(b: &Buckets, q: f64) -> Option<f64> {
    let total = count(b);
    if total <= 0.0 {
        return None;
    }
    let rank = q * total;
    let mut prev = (0.0, 0.0);
    for &(le, n) in b {
        if n >= rank {
            if le.is_infinite() {
                return Some(prev.0);
            }
            let width = n - prev.1;
            let frac = if width > 0.0 { (rank - prev.1) / width } else { 0.0 };
            return Some(prev.0 + (le - prev.0) * frac);
        }
        prev = (le, n);
    }
    Some(prev.0)
}

/// Sum of every sample of counter or gauge `name` whose line holds each of
/// `labels` (e.g. `outcome="counted"`); 0 when none does.
pub fn counter(text: &str, name: &str, labels: &[&str]) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(name) && labels.iter().all(|x| l.contains(x)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .fold(0.0, |a, b| a + b)
}

/// Fetches `url` (a `/metrics` endpoint) as text.
pub async fn scrape(url: &str) -> anyhow::Result<String> {
    Ok(crate::http_client().get(url).send().await?.error_for_status()?.text().await?)
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = r#"# TYPE adserve_gateway_hop_seconds histogram
adserve_gateway_hop_seconds_bucket{hop="ranker",le="0.001"} 10
adserve_gateway_hop_seconds_bucket{hop="ranker",le="0.002"} 90
adserve_gateway_hop_seconds_bucket{hop="ranker",le="+Inf"} 100
adserve_gateway_hop_seconds_sum{hop="ranker"} 0.15
adserve_gateway_hop_seconds_count{hop="ranker"} 100
adserve_gateway_hop_seconds_bucket{hop="catalog",le="0.001"} 5
adserve_gateway_hop_seconds_bucket{hop="catalog",le="+Inf"} 5
"#;

    #[test]
    fn parses_series_and_interpolates_quantiles() {
        let h = histogram(TEXT, "adserve_gateway_hop_seconds", "hop");
        assert_eq!(h.len(), 2);
        let r = &h["ranker"];
        assert_eq!(count(r), 100.0);
        // Rank 50 lies in (0.001, 0.002]: 10 below, 80 inside -> 0.001 + 0.001 * 40/80.
        assert!((quantile(r, 0.5).unwrap() - 0.0015).abs() < 1e-9);
        // Rank 99 lies in the +Inf bucket: the estimate is its lower bound.
        assert_eq!(quantile(r, 0.99).unwrap(), 0.002);
    }

    #[test]
    fn delta_covers_only_the_window() {
        let before = histogram(TEXT, "adserve_gateway_hop_seconds", "hop");
        let after_text = TEXT.replace("} 100\n", "} 110\n").replace("le=\"0.002\"} 90", "le=\"0.002\"} 100");
        let after = histogram(&after_text, "adserve_gateway_hop_seconds", "hop");
        let d = delta(&before, &after);
        assert_eq!(count(&d["ranker"]), 10.0);
        assert_eq!(count(&d["catalog"]), 0.0);
        assert!(quantile(&d["catalog"], 0.5).is_none());
    }
}
