//! Readiness: whether this process should receive new traffic.
//!
//! Liveness and readiness differ: a gateway whose Kafka producer is being
//! rebuilt is alive (restarting it would not help) but must not be sent
//! requests it would answer 503. A process is ready when no dependency it
//! reports is down and it is not draining for shutdown. The gRPC health
//! service and the gateway's `/healthz` both follow this one value.

use std::{collections::BTreeMap, sync::Arc};

use tokio::sync::watch;

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

    /// Reports `dependency` down (`Some(why)`) or up again (`None`).
    pub fn set(&self, dependency: &str, problem: Option<String>) {
        let changed = self.tx.send_if_modified(|s| match problem {
            Some(why) => s.down.insert(dependency.to_string(), why.clone()).as_ref() != Some(&why),
            None => s.down.remove(dependency).is_some(),
        });
        if changed {
            let state = self.state();
            if state.is_ready() {
                tracing::info!(dependency, "ready again");
            } else {
                tracing::warn!(dependency, reasons = ?state.reasons(), "not ready");
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
