//! Load drivers: closed loop (N workers back to back) and open loop (constant
//! arrival rate, latency from the *scheduled* send time, so a stalled server
//! cannot hide behind a generator that politely waits for it).
//!
//! Every call ends in exactly one [`Outcome`]; errors and degraded answers
//! are counted next to the latency histogram, never dropped from it.

use std::{
    future::Future,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use hdrhistogram::Histogram;
use serde::Serialize;

/// How one call ended.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// A full answer.
    Ok,
    /// An answer that says part of the pipeline degraded.
    Degraded,
    /// No usable answer (error status, timeout, malformed body).
    Error(String),
}

/// Latency distribution and counts of one load run.
#[derive(Debug, Clone)]
pub struct Measurement {
    /// Latencies in microseconds, of every call that ended (errors included:
    /// a timeout is the slowest answer there is).
    pub hist: Histogram<u64>,
    /// Calls with a full answer.
    pub ok: u64,
    /// Calls with a degraded answer.
    pub degraded: u64,
    /// Calls without a usable answer.
    pub errors: u64,
    /// Up to three distinct error messages, for the report.
    pub error_samples: Vec<String>,
    /// Wall time of the measured window.
    pub elapsed: Duration,
    /// Offered rate (open loop), calls per second.
    pub offered_rate: Option<f64>,
    /// Work items per call (rows, ads, events), for per-item rates.
    pub items_per_call: u64,
}

impl Measurement {
    /// Empty, for calls of `items_per_call` items each.
    pub fn new(items_per_call: u64) -> Self {
        Self {
            hist: Histogram::new_with_bounds(1, 120_000_000, 3).expect("static histogram bounds are valid"),
            ok: 0,
            degraded: 0,
            errors: 0,
            error_samples: Vec::new(),
            elapsed: Duration::ZERO,
            offered_rate: None,
            items_per_call,
        }
    }

    /// One call that ended with `outcome` after `latency`.
    pub fn record(&mut self, outcome: Outcome, latency: Duration) {
        let us = (latency.as_micros() as u64).clamp(1, 120_000_000);
        let _ = self.hist.record(us);
        match outcome {
            Outcome::Ok => self.ok += 1,
            Outcome::Degraded => self.degraded += 1,
            Outcome::Error(e) => {
                self.errors += 1;
                if self.error_samples.len() < 3 && !self.error_samples.contains(&e) {
                    self.error_samples.push(e);
                }
            }
        }
    }

    /// Calls that ended, whatever the outcome.
    pub fn calls(&self) -> u64 {
        self.ok + self.degraded + self.errors
    }

    /// Answered calls (full or degraded) per second.
    pub fn rate(&self) -> f64 {
        let secs = self.elapsed.as_secs_f64();
        if secs > 0.0 { (self.ok + self.degraded) as f64 / secs } else { 0.0 }
    }

    /// Latency at quantile `q` in milliseconds.
    pub fn ms(&self, q: f64) -> f64 {
        self.hist.value_at_quantile(q) as f64 / 1000.0
    }

    /// A serialisable summary.
    pub fn summary(&self) -> Summary {
        Summary {
            p50_ms: self.ms(0.5),
            p99_ms: self.ms(0.99),
            p999_ms: self.ms(0.999),
            max_ms: self.hist.max() as f64 / 1000.0,
            mean_ms: self.hist.mean() / 1000.0,
            rate_per_s: self.rate(),
            items_per_s: self.rate() * self.items_per_call as f64,
            offered_rate_per_s: self.offered_rate,
            ok: self.ok,
            degraded: self.degraded,
            errors: self.errors,
            error_samples: self.error_samples.clone(),
            seconds: self.elapsed.as_secs_f64(),
        }
    }
}

/// What a run reports.
#[derive(Debug, Clone, Default, Serialize, serde::Deserialize, PartialEq)]
pub struct Summary {
    /// Median latency.
    pub p50_ms: f64,
    /// 99th percentile.
    pub p99_ms: f64,
    /// 99.9th percentile.
    pub p999_ms: f64,
    /// Slowest call.
    pub max_ms: f64,
    /// Mean.
    pub mean_ms: f64,
    /// Answered calls per second.
    pub rate_per_s: f64,
    /// Work items (rows, ads, events) per second.
    pub items_per_s: f64,
    /// Offered rate of an open-loop run.
    pub offered_rate_per_s: Option<f64>,
    /// Full answers.
    pub ok: u64,
    /// Degraded answers.
    pub degraded: u64,
    /// Errors and timeouts.
    pub errors: u64,
    /// Distinct error messages (at most three).
    pub error_samples: Vec<String>,
    /// Measured window.
    pub seconds: f64,
}

/// Runs `concurrency` workers calling back to back for `duration` after a
/// `warmup` whose calls are not recorded. Each call is bounded by `timeout`.
pub async fn closed_loop<F, Fut>(
    concurrency: usize,
    warmup: Duration,
    duration: Duration,
    timeout: Duration,
    items_per_call: u64,
    call: F,
) -> Measurement
where
    F: Fn(u64) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Outcome> + Send + 'static,
{
    let call = Arc::new(call);
    let recording = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(AtomicBool::new(false));
    let mut workers = Vec::with_capacity(concurrency);
    for w in 0..concurrency {
        let (call, recording, stop) = (call.clone(), recording.clone(), stop.clone());
        workers.push(tokio::spawn(async move {
            let mut m = Measurement::new(items_per_call);
            let mut i = w as u64;
            while !stop.load(Ordering::Relaxed) {
                let started = Instant::now();
                let outcome = match tokio::time::timeout(timeout, call(i)).await {
                    Ok(o) => o,
                    Err(_) => Outcome::Error(format!("no answer within {} ms", timeout.as_millis())),
                };
                if recording.load(Ordering::Relaxed) && !stop.load(Ordering::Relaxed) {
                    m.record(outcome, started.elapsed());
                }
                i += concurrency as u64;
            }
            m
        }));
    }
    tokio::time::sleep(warmup).await;
    recording.store(true, Ordering::Relaxed);
    let started = Instant::now();
    tokio::time::sleep(duration).await;
    stop.store(true, Ordering::Relaxed);
    let elapsed = started.elapsed();
    let mut total = Measurement::new(items_per_call);
    for w in workers {
        // A worker ends within one call timeout of `stop`.
        if let Ok(m) = w.await {
            merge(&mut total, m);
        }
    }
    total.elapsed = elapsed;
    total
}

/// Offers `rate` calls per second for `duration` (open loop). Latency is
/// measured from each call's scheduled start. Calls are bounded by `timeout`,
/// and at most `max_in_flight` run at once: a call that cannot start because
/// of that cap is recorded as an error at its full timeout, not skipped.
pub async fn open_loop<F, Fut>(
    rate: f64,
    duration: Duration,
    timeout: Duration,
    max_in_flight: usize,
    items_per_call: u64,
    call: F,
) -> Measurement
where
    F: Fn(u64) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Outcome> + Send + 'static,
{
    let call = Arc::new(call);
    let total = (rate * duration.as_secs_f64()).round() as u64;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(Outcome, Duration)>();
    let in_flight = Arc::new(tokio::sync::Semaphore::new(max_in_flight));
    let start = tokio::time::Instant::now() + Duration::from_millis(20);
    let mut m = Measurement::new(items_per_call);
    m.offered_rate = Some(rate);
    for i in 0..total {
        let at = start + Duration::from_secs_f64(i as f64 / rate);
        tokio::time::sleep_until(at).await;
        let Ok(permit) = in_flight.clone().try_acquire_owned() else {
            m.record(Outcome::Error(format!("generator: {max_in_flight} calls already in flight")), timeout);
            continue;
        };
        let (call, tx) = (call.clone(), tx.clone());
        tokio::spawn(async move {
            let outcome = match tokio::time::timeout_at(at + timeout, call(i)).await {
                Ok(o) => o,
                Err(_) => Outcome::Error(format!("no answer within {} ms", timeout.as_millis())),
            };
            let _ = tx.send((outcome, at.elapsed()));
            drop(permit);
        });
    }
    drop(tx);
    // Every spawned call ends by its own deadline, so this drains in bounded time.
    while let Some((outcome, latency)) = rx.recv().await {
        m.record(outcome, latency);
    }
    m.elapsed = start.elapsed().max(duration);
    m
}

impl Measurement {
    /// This window and `next` (another window of the same calls, measured
    /// after it) as one: their calls and latencies over both windows' time.
    pub fn then(mut self, next: Measurement) -> Measurement {
        let elapsed = self.elapsed + next.elapsed;
        merge(&mut self, next);
        self.elapsed = elapsed;
        self
    }
}

fn merge(into: &mut Measurement, m: Measurement) {
    let _ = into.hist.add(&m.hist);
    into.ok += m.ok;
    into.degraded += m.degraded;
    into.errors += m.errors;
    for e in m.error_samples {
        if into.error_samples.len() < 3 && !into.error_samples.contains(&e) {
            into.error_samples.push(e);
        }
    }
}

/// Runs a blocking call back to back on `threads` OS threads (the bare
/// baselines: no async runtime, no network), like [`closed_loop`].
pub fn threads_loop<S, F>(
    threads: usize,
    warmup: Duration,
    duration: Duration,
    items_per_call: u64,
    make_state: impl Fn() -> S,
    call: F,
) -> Measurement
where
    S: Send + 'static,
    F: Fn(&mut S) -> Outcome + Send + Sync + 'static,
{
    let call = Arc::new(call);
    let recording = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(AtomicBool::new(false));
    let handles: Vec<_> = (0..threads)
        .map(|_| {
            let mut state = make_state();
            let (call, recording, stop) = (call.clone(), recording.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut m = Measurement::new(items_per_call);
                while !stop.load(Ordering::Relaxed) {
                    let started = Instant::now();
                    let outcome = call(&mut state);
                    if recording.load(Ordering::Relaxed) && !stop.load(Ordering::Relaxed) {
                        m.record(outcome, started.elapsed());
                    }
                }
                m
            })
        })
        .collect();
    std::thread::sleep(warmup);
    recording.store(true, Ordering::Relaxed);
    let started = Instant::now();
    std::thread::sleep(duration);
    stop.store(true, Ordering::Relaxed);
    let elapsed = started.elapsed();
    let mut total = Measurement::new(items_per_call);
    for h in handles {
        if let Ok(m) = h.join() {
            merge(&mut total, m);
        }
    }
    total.elapsed = elapsed;
    total
}

/// Sends an HTTP request whose answer is JSON: the body of a 2xx answer, or
/// the [`Outcome::Error`] to record (transport failure, other status, a body
/// that is not JSON), naming the status and what came back.
pub async fn json_answer(request: reqwest::RequestBuilder) -> Result<serde_json::Value, Outcome> {
    let resp = request.send().await.map_err(|e| Outcome::Error(e.to_string()))?;
    json_answer_of(resp).await
}

/// [`json_answer`] of a response already received.
pub async fn json_answer_of(resp: reqwest::Response) -> Result<serde_json::Value, Outcome> {
    let status = resp.status();
    match resp.json::<serde_json::Value>().await {
        Ok(v) if status.is_success() => Ok(v),
        Ok(v) => Err(Outcome::Error(format!("HTTP {status}: {}", v.to_string().chars().take(200).collect::<String>()))),
        Err(e) => Err(Outcome::Error(format!("HTTP {status}: {e}"))),
    }
}

/// Refuses any target that is not on this machine's loopback interface: the
/// generator is a load tool, and must never be pointed at someone else.
pub fn ensure_loopback(url: &str) -> anyhow::Result<()> {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let authority = rest.split('/').next().unwrap_or_default();
    let host = match authority.rsplit_once(':') {
        Some((h, p)) if p.chars().all(|c| c.is_ascii_digit()) => h,
        _ => authority,
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let loopback = host == "localhost" || host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback());
    anyhow::ensure!(loopback, "refusing to load {url}: the benchmark only targets loopback addresses");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_loopback_targets_are_accepted() {
        for ok in ["http://127.0.0.1:8080/v1/ads", "http://localhost:50051", "http://[::1]:1", "127.0.0.2:9092"] {
            assert!(ensure_loopback(ok).is_ok(), "{ok}");
        }
        for bad in ["http://10.0.0.1:8080", "https://example.com/v1/ads", "http://[2001:db8::1]:80", "192.168.1.1:9092"]
        {
            assert!(ensure_loopback(bad).is_err(), "{bad}");
        }
    }

    #[tokio::test]
    async fn open_loop_counts_errors_and_timeouts_instead_of_dropping_them() {
        let m = open_loop(200.0, Duration::from_millis(250), Duration::from_millis(50), 1000, 1, |i| async move {
            match i % 3 {
                0 => Outcome::Ok,
                1 => Outcome::Error("boom".into()),
                _ => {
                    tokio::time::sleep(Duration::from_secs(5)).await;
                    Outcome::Ok
                }
            }
        })
        .await;
        assert_eq!(m.calls(), 50, "every scheduled call is accounted for");
        assert_eq!(m.ok, 17);
        assert_eq!(m.errors, 33);
        assert!(m.error_samples.iter().any(|e| e.contains("no answer within 50 ms")), "{:?}", m.error_samples);
        // The timed-out calls are in the histogram at (at least) their deadline.
        assert!(m.hist.max() >= 50_000);
    }

    #[tokio::test]
    async fn open_loop_measures_from_the_scheduled_time() {
        // One slot at a time: each call holds the only permit-free path for
        // 30 ms, so later calls queue behind it and their latency must include
        // the wait, not just their own service time.
        let lock = Arc::new(tokio::sync::Mutex::new(()));
        let m = open_loop(100.0, Duration::from_millis(200), Duration::from_secs(5), 1000, 1, move |_| {
            let lock = lock.clone();
            async move {
                let _g = lock.lock().await;
                tokio::time::sleep(Duration::from_millis(30)).await;
                Outcome::Ok
            }
        })
        .await;
        assert_eq!(m.ok, 20);
        // 20 calls of 30 ms arriving every 10 ms: the last waits ~19 x 20 ms.
        assert!(m.hist.max() >= 300_000, "max {} us", m.hist.max());
    }

    #[tokio::test]
    async fn the_in_flight_cap_is_reported_as_errors() {
        let m = open_loop(100.0, Duration::from_millis(100), Duration::from_millis(500), 2, 1, |_| async {
            tokio::time::sleep(Duration::from_millis(200)).await;
            Outcome::Ok
        })
        .await;
        assert_eq!(m.calls(), 10);
        assert_eq!(m.ok, 2);
        assert!(m.error_samples.iter().any(|e| e.contains("already in flight")));
    }
}
