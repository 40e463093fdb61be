//! Readiness: whether this process should receive new traffic.
//!
//! Liveness and readiness differ: a gateway whose Kafka producer is being
//! rebuilt is alive (restarting it would not help) but must not be sent
//! requests it would answer 503. A process is ready when no dependency it
//! reports is down and it is not draining for shutdown. The gRPC health
//! service and every `/healthz` (the gateway's HTTP listener, each service's
//! metrics listener) follow this one value.

use std::{collections::BTreeMap, sync::Arc};

use tokio::sync::watch;

/// The reason [`Readiness::starting`] holds until [`Readiness::started`].
const STARTING: &str = "start";

/// The current readiness, with reasons.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct State {
    /// Shutdown has begun: the process finishes what it has and takes nothing new.
    pub draining: bool,
    /// Dependencies reported down, with why.
    pub down: BTreeMap<String, String>,
}

impl State {
    /// Ready for new traffic.
    pub fn is_ready(&self) -> bool {
        !self.draining && self.down.is_empty()
    }

    /// Why the process is not ready (empty when it is).
    pub fn reasons(&self) -> Vec<String> {
        let mut out: Vec<String> = self.down.iter().map(|(dep, why)| format!("{dep}: {why}")).collect();
        if self.draining {
            out.push("draining for shutdown".into());
        }
        out
    }
}

/// A cloneable handle on the process's readiness.
#[derive(Debug, Clone)]
pub struct Readiness {
    tx: Arc<watch::Sender<State>>,
}

impl Default for Readiness {
    fn default() -> Self {
        Self::new()
    }
}

impl Readiness {
    /// Ready, with nothing down.
    pub fn new() -> Self {
        let (tx, _) = watch::channel(State::default());
        let r = Self { tx: Arc::new(tx) };
        r.publish_metric();
        r
    }

    /// Not ready until [`Readiness::started`]: what a process is from the
    /// moment its metrics listener answers `/healthz` until it serves.
    pub fn starting() -> Self {
        let r = Self::new();
        r.tx.send_modify(|s| {
            s.down.insert(STARTING.to_string(), "not serving yet".to_string());
        });
        r.publish_metric();
        r
    }

    /// The process serves: clears what [`Readiness::starting`] set (other
    /// reasons stay).
    pub fn started(&self) {
        self.set(STARTING, None);
    }

    /// Reports `dependency` down (`Some(why)`) or up again (`None`).
    pub fn set(&self, dependency: &str, problem: Option<String>) {
        let up = problem.is_none();
        let changed = self.tx.send_if_modified(|s| match problem {
            Some(why) => s.down.insert(dependency.to_string(), why.clone()).as_ref() != Some(&why),
            None => s.down.remove(dependency).is_some(),
        });
        if changed {
            let state = self.state();
            match (up, state.is_ready()) {
                (true, true) => tracing::info!(dependency, "ready"),
                (true, false) => tracing::info!(dependency, reasons = ?state.reasons(), "up; still not ready"),
                (false, _) => tracing::warn!(dependency, reasons = ?state.reasons(), "not ready"),
            }
            self.publish_metric();
        }
    }

    /// Starts draining: not ready from now on.
    pub fn drain(&self) {
        if self.tx.send_if_modified(|s| !std::mem::replace(&mut s.draining, true)) {
            self.publish_metric();
        }
    }

    /// The current state.
    pub fn state(&self) -> State {
        self.tx.borrow().clone()
    }

    /// Ready for new traffic.
    pub fn is_ready(&self) -> bool {
        self.tx.borrow().is_ready()
    }

    /// A receiver that sees every change.
    pub fn subscribe(&self) -> watch::Receiver<State> {
        self.tx.subscribe()
    }

    /// The answer to `GET /healthz` (the gateway's HTTP listener and every
    /// service's metrics listener): 200 `ok` when ready; 503 with
    /// `{"status":"not_ready","reasons":[...]}` otherwise.
    pub fn healthz(&self) -> axum::response::Response {
        use axum::response::IntoResponse as _;
        let s = self.state();
        if s.is_ready() {
            "ok".into_response()
        } else {
            let body = serde_json::json!({ "status": "not_ready", "reasons": s.reasons() });
            (axum::http::StatusCode::SERVICE_UNAVAILABLE, axum::Json(body)).into_response()
        }
    }

    fn publish_metric(&self) {
        metrics::gauge!("adserve_ready").set(if self.is_ready() { 1.0 } else { 0.0 });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_down_dependency_or_draining_makes_the_process_unready() {
        let r = Readiness::new();
        assert!(r.is_ready());
        r.set("kafka", Some("producer fenced".into()));
        assert!(!r.is_ready());
        assert_eq!(r.state().reasons(), vec!["kafka: producer fenced".to_string()]);
        r.set("kafka", None);
        assert!(r.is_ready());
        r.drain();
        assert!(!r.is_ready());
        assert_eq!(r.state().reasons(), vec!["draining for shutdown".to_string()]);
    }

    #[test]
    fn a_starting_process_is_unready_until_it_serves_and_keeps_other_reasons() {
        let r = Readiness::starting();
        assert!(!r.is_ready());
        assert_eq!(r.state().reasons(), vec!["start: not serving yet".to_string()]);
        r.set("model", Some("loading".into()));
        r.started();
        assert!(!r.is_ready(), "the model is still loading");
        r.set("model", None);
        assert!(r.is_ready());
    }

    #[tokio::test]
    async fn healthz_answers_ok_or_503_with_the_reasons() {
        let r = Readiness::new();
        let ok = r.healthz();
        assert_eq!(ok.status(), 200);
        let body = axum::body::to_bytes(ok.into_body(), 1 << 16).await.unwrap();
        assert_eq!(&body[..], b"ok");
        r.set("model", Some("loading".into()));
        let not = r.healthz();
        assert_eq!(not.status(), 503);
        let body = axum::body::to_bytes(not.into_body(), 1 << 16).await.unwrap();
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v, serde_json::json!({"status": "not_ready", "reasons": ["model: loading"]}));
    }

    #[tokio::test]
    async fn subscribers_see_changes_once() {
        let r = Readiness::new();
        let mut rx = r.subscribe();
        r.set("kafka", Some("x".into()));
        rx.changed().await.unwrap();
        assert!(!rx.borrow_and_update().is_ready());
        r.set("kafka", Some("x".into())); // same problem: no change
        assert!(!rx.has_changed().unwrap());
    }
}
