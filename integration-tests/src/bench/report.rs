//! Benchmark results: every measurement belongs to a comparison (ours next
//! to its peer or floor, measured in the same run), printed as a table,
//! written as JSON and as the generated section of docs/benchmarks.md.

use std::{fmt::Write as _, path::Path};

use serde::{Deserialize, Serialize};

use super::load::{Measurement, Summary};

/// Which figure a comparison's ratio is taken on.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Metric {
    /// Median latency; ratio = ours / theirs (below 1: ours is faster).
    P50,
    /// 99th percentile latency; ratio = ours / theirs (below 1: ours is faster).
    P99,
    /// Throughput; ratio = ours / theirs (above 1: ours is faster).
    Rate,
}

impl Metric {
    fn of(self, s: &Summary) -> f64 {
        match self {
            Self::P50 => s.p50_ms,
            Self::P99 => s.p99_ms,
            Self::Rate => s.items_per_s,
        }
    }

    fn label(self) -> &'static str {
        match self {
            Self::P50 => "p50 ours/theirs",
            Self::P99 => "p99 ours/theirs",
            Self::Rate => "rate ours/theirs",
        }
    }
}

/// One system measured in a comparison.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Subject {
    /// What was measured, e.g. "adserve ranker (gRPC)" or "bare session.run".
    pub who: String,
    /// Ours, a peer (another product doing the same job) or a floor (the
    /// least work that could possibly produce the answer).
    pub role: Role,
    /// The figures.
    pub summary: Summary,
}

/// The part a subject plays in a comparison.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// adserve itself.
    Ours,
    /// Another system doing the same job.
    Peer,
    /// A lower bound: the bare operation underneath.
    Floor,
}

/// Ours next to peers and floors, on the same case in the same run.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Comparison {
    /// Path: "end-to-end", "feature-service", "ranker", "auction", "label-joiner".
    pub path: String,
    /// The case, e.g. "Score 100 rows, concurrency 8".
    pub case: String,
    /// Metric of the ratio column.
    pub metric: Metric,
    /// The first subject is ours.
    pub subjects: Vec<Subject>,
    /// Free-text notes (unequal work, caveats).
    pub note: String,
}

impl Comparison {
    /// A comparison with ours measured; add peers and floors with [`Self::with`].
    pub fn new(path: &str, case: impl Into<String>, metric: Metric, ours: &str, m: &Measurement) -> Self {
        Self {
            path: path.into(),
            case: case.into(),
            metric,
            subjects: vec![Subject { who: ours.into(), role: Role::Ours, summary: m.summary() }],
            note: String::new(),
        }
    }

    /// Adds a peer or floor.
    pub fn with(mut self, who: &str, role: Role, m: &Measurement) -> Self {
        self.subjects.push(Subject { who: who.into(), role, summary: m.summary() });
        self
    }

    /// Adds a subject from an already summarised figure (e.g. criterion's).
    pub fn with_summary(mut self, who: &str, role: Role, summary: Summary) -> Self {
        self.subjects.push(Subject { who: who.into(), role, summary });
        self
    }

    /// Sets the note.
    pub fn note(mut self, note: impl Into<String>) -> Self {
        self.note = note.into();
        self
    }

    /// Ours / theirs on the comparison's metric, for subject `i` (> 0).
    pub fn ratio(&self, i: usize) -> Option<f64> {
        let ours = self.metric.of(&self.subjects.first()?.summary);
        let theirs = self.metric.of(&self.subjects.get(i)?.summary);
        (theirs > 0.0 && ours > 0.0).then(|| ours / theirs)
    }
}

/// Where and how a run happened.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct RunInfo {
    /// The command that produced the figures.
    pub command: String,
    /// `git rev-parse --short HEAD` (+ "-dirty" when the tree had changes).
    pub commit: String,
    /// Logical CPUs.
    pub cores: usize,
    /// CPU model.
    pub cpu: String,
    /// UTC date and time.
    pub date: String,
    /// Cargo profile of the services and this driver.
    pub profile: String,
    /// quick or full.
    pub mode: String,
}

/// A whole run.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Report {
    /// Where and how.
    pub run: RunInfo,
    /// Every comparison, in run order.
    pub comparisons: Vec<Comparison>,
    /// Per-hop breakdowns and other tables that are not comparisons.
    pub breakdowns: Vec<Breakdown>,
}

/// A named table of per-part figures (e.g. the gateway's per-hop latencies).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Breakdown {
    /// Title.
    pub title: String,
    /// Column headers.
    pub columns: Vec<String>,
    /// Rows of cells.
    pub rows: Vec<Vec<String>>,
}

/// Milliseconds with three significant digits (criterion's medians of a
/// 1-candidate auction are ~0.0001 ms; a fixed number of decimals hides them).
fn ms(v: f64) -> String {
    if v == 0.0 {
        "—".into()
    } else if v >= 100.0 {
        format!("{v:.0}")
    } else {
        let decimals = (2 - v.abs().log10().floor() as i32).max(0) as usize;
        format!("{v:.decimals$}")
    }
}

/// A ratio: two decimals, or three significant digits below 0.1.
pub fn ratio(x: f64) -> String {
    if x >= 0.1 { format!("{x:.2}") } else { ms(x) }
}

fn rate(v: f64) -> String {
    if v >= 100.0 { format!("{v:.0}") } else { format!("{v:.1}") }
}

impl Report {
    /// Markdown: one table per path, then the breakdowns.
    pub fn markdown(&self) -> String {
        let r = &self.run;
        let mut out = String::new();
        let _ = writeln!(
            out,
            "Run: `{}` at commit `{}` on {} cores ({}), {} UTC, `{}` profile, {} mode.\n",
            r.command, r.commit, r.cores, r.cpu, r.date, r.profile, r.mode
        );
        let mut paths: Vec<&str> = Vec::new();
        for c in &self.comparisons {
            if !paths.contains(&c.path.as_str()) {
                paths.push(&c.path);
            }
        }
        for path in paths {
            let _ = writeln!(out, "#### {path}\n");
            let _ = writeln!(
                out,
                "| case | subject | p50 ms | p99 ms | p99.9 ms | rate/s | items/s | errors | degraded | ratio |"
            );
            let _ = writeln!(out, "|---|---|---:|---:|---:|---:|---:|---:|---:|---|");
            for c in self.comparisons.iter().filter(|c| c.path == path) {
                for (i, s) in c.subjects.iter().enumerate() {
                    let ratio = if i == 0 {
                        String::new()
                    } else {
                        c.ratio(i)
                            .map(|x| format!("{} = {}", c.metric.label(), ratio(x)))
                            .unwrap_or_else(|| "n/a".into())
                    };
                    let who = match s.role {
                        Role::Ours => format!("**{}**", s.who),
                        Role::Peer => format!("{} (peer)", s.who),
                        Role::Floor => format!("{} (floor)", s.who),
                    };
                    let x = &s.summary;
                    let offered = x.offered_rate_per_s.map(|o| format!(" of {o:.0}")).unwrap_or_default();
                    let _ = writeln!(
                        out,
                        "| {} | {who} | {} | {} | {} | {}{offered} | {} | {} | {} | {ratio} |",
                        if i == 0 { c.case.as_str() } else { "" },
                        ms(x.p50_ms),
                        ms(x.p99_ms),
                        ms(x.p999_ms),
                        rate(x.rate_per_s),
                        rate(x.items_per_s),
                        x.errors,
                        x.degraded,
                    );
                }
            }
            let notes: Vec<String> = self
                .comparisons
                .iter()
                .filter(|c| c.path == path && !c.note.is_empty())
                .map(|c| format!("- {}: {}", c.case, c.note))
                .collect();
            if !notes.is_empty() {
                let _ = writeln!(out, "\n{}", notes.join("\n"));
            }
            out.push('\n');
        }
        for b in &self.breakdowns {
            let _ = writeln!(out, "#### {}\n", b.title);
            let _ = writeln!(out, "| {} |", b.columns.join(" | "));
            let _ = writeln!(out, "|{}", "---|".repeat(b.columns.len()));
            for row in &b.rows {
                let _ = writeln!(out, "| {} |", row.join(" | "));
            }
            out.push('\n');
        }
        out
    }

    /// A plain-text table for the terminal.
    pub fn text(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "{:<16} {:<34} {:<40} {:>9} {:>9} {:>9} {:>10} {:>6} {:>6}  ratio",
            "path", "case", "subject", "p50 ms", "p99 ms", "p999 ms", "items/s", "err", "degr"
        );
        for c in &self.comparisons {
            for (i, s) in c.subjects.iter().enumerate() {
                let x = &s.summary;
                let ratio =
                    if i == 0 { String::new() } else { c.ratio(i).map(|r| format!("{r:.2}")).unwrap_or_default() };
                let _ = writeln!(
                    out,
                    "{:<16} {:<34} {:<40} {:>9} {:>9} {:>9} {:>10} {:>6} {:>6}  {ratio}",
                    if i == 0 { c.path.as_str() } else { "" },
                    if i == 0 { truncate(&c.case, 34) } else { String::new() },
                    truncate(&s.who, 40),
                    ms(x.p50_ms),
                    ms(x.p99_ms),
                    ms(x.p999_ms),
                    rate(x.items_per_s),
                    x.errors,
                    x.degraded
                );
            }
        }
        for b in &self.breakdowns {
            let _ = writeln!(out, "\n{}\n  {}", b.title, b.columns.join(" | "));
            for row in &b.rows {
                let _ = writeln!(out, "  {}", row.join(" | "));
            }
        }
        out
    }
}

fn truncate(s: &str, n: usize) -> String {
    if s.chars().count() <= n { s.to_string() } else { s.chars().take(n - 1).chain(['…']).collect() }
}

/// Marker lines around the generated section of docs/benchmarks.md.
pub const BEGIN: &str = "<!-- BEGIN GENERATED BY adserve-bench: do not edit by hand -->";
/// See [`BEGIN`].
pub const END: &str = "<!-- END GENERATED BY adserve-bench -->";

/// Replaces the generated section of `doc` (between [`BEGIN`] and [`END`])
/// with `section`; appends the markers when the file has none.
pub fn splice(doc: &str, section: &str) -> String {
    let body = format!("{BEGIN}\n\n{section}\n{END}");
    match (doc.find(BEGIN), doc.find(END)) {
        (Some(b), Some(e)) if e > b => format!("{}{}{}", &doc[..b], body, &doc[e + END.len()..]),
        _ => format!("{}\n\n{body}\n", doc.trim_end()),
    }
}

/// Writes the JSON report to `json` and splices the markdown into `doc`.
pub fn write(report: &Report, json: &Path, doc: Option<&Path>) -> anyhow::Result<()> {
    if let Some(dir) = json.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(json, serde_json::to_string_pretty(report)?)?;
    if let Some(doc) = doc {
        let current = std::fs::read_to_string(doc).unwrap_or_default();
        std::fs::write(doc, splice(&current, &report.markdown()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn figures_keep_three_significant_digits() {
        assert_eq!(ms(0.000123), "0.000123");
        assert_eq!(ms(0.0241), "0.0241");
        assert_eq!(ms(1.234), "1.23");
        assert_eq!(ms(52.96), "53.0");
        assert_eq!(ms(262.0), "262");
        assert_eq!(ms(0.0), "—");
    }

    #[test]
    fn splice_replaces_only_the_generated_section() {
        let doc = format!("# Title\n\nhand-written\n\n{BEGIN}\nold\n{END}\n\nafter\n");
        let out = splice(&doc, "new");
        assert!(out.contains("hand-written") && out.contains("after") && out.contains("new"));
        assert!(!out.contains("old"));
        assert_eq!(splice(&out, "new"), out, "idempotent");
        let appended = splice("# Only a title\n", "x");
        assert!(appended.starts_with("# Only a title") && appended.contains(BEGIN) && appended.contains(END));
    }
}
