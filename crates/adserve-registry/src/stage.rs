//! Model stages and the transitions between them.

use serde::{Deserialize, Serialize};

/// Where a model version is in its life.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[serde(rename_all = "lowercase")]
pub enum Stage {
    /// Registered, serving nothing.
    Candidate,
    /// Scores the same requests as production, off the critical path; its
    /// scores are logged for comparison, never served.
    Shadow,
    /// Serves a deterministic share of users (`canary_share`).
    Canary,
    /// Serves everyone else. At most one per model name.
    Production,
    /// Served once, or never will; can be rolled back to or re-qualified.
    Retired,
}

impl Stage {
    /// Every stage, in life order.
    pub const ALL: [Stage; 5] = [Stage::Candidate, Stage::Shadow, Stage::Canary, Stage::Production, Stage::Retired];

    /// The name stored in the registry and accepted by `adservectl`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Candidate => "candidate",
            Self::Shadow => "shadow",
            Self::Canary => "canary",
            Self::Production => "production",
            Self::Retired => "retired",
        }
    }

    /// Parses a stored or typed stage name.
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|st| st.as_str() == s)
    }

    /// Whether `promote` may move a version from `self` to `to`. Production
    /// is left only by promoting another version (it is retired in the same
    /// transaction) or by a rollback, never directly: a model name always
    /// keeps a production version once it has one.
    pub fn check_promotion(self, to: Stage) -> Result<(), String> {
        use Stage::*;
        let allowed: &[Stage] = match self {
            Candidate => &[Shadow, Canary, Production, Retired],
            Shadow => &[Canary, Production, Retired],
            Canary => &[Production, Retired],
            Production => &[],
            Retired => &[Candidate],
        };
        if allowed.contains(&to) {
            return Ok(());
        }
        let why = match (self, to) {
            (a, b) if a == b => format!("it is already {}", a.as_str()),
            (Production, Retired) => {
                "retiring production would leave nothing to serve: promote another version (the current one is \
                 retired with it) or roll back"
                    .into()
            }
            (Production, _) => "production moves only by promoting another version or by a rollback".into(),
            (Retired, _) => "a retired version goes back to candidate first (or `rollback` restores the previous \
                             production)"
                .into(),
            (a, b) => format!(
                "{} -> {} is not a forward step (allowed from {}: {})",
                a.as_str(),
                b.as_str(),
                a.as_str(),
                allowed.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(", ")
            ),
        };
        Err(why)
    }
}

impl std::fmt::Display for Stage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Stage {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
            .ok_or_else(|| format!("unknown stage {s:?}; one of {}", Self::ALL.map(|s| s.as_str()).join(", ")))
    }
}

#[cfg(test)]
mod tests {
    use super::{Stage::*, *};

    #[test]
    fn forward_steps_are_allowed_and_the_rest_refused_with_a_reason() {
        for (from, to) in [
            (Candidate, Shadow),
            (Candidate, Canary),
            (Candidate, Production),
            (Shadow, Canary),
            (Canary, Production),
            (Canary, Retired),
            (Retired, Candidate),
        ] {
            assert!(from.check_promotion(to).is_ok(), "{from} -> {to}");
        }
        for (from, to, why) in [
            (Production, Retired, "leave nothing to serve"),
            (Production, Canary, "only by promoting another"),
            (Retired, Production, "back to candidate first"),
            (Canary, Shadow, "not a forward step"),
            (Canary, Canary, "already canary"),
        ] {
            let err = from.check_promotion(to).unwrap_err();
            assert!(err.contains(why), "{from} -> {to}: {err}");
        }
    }

    #[test]
    fn names_round_trip() {
        for s in Stage::ALL {
            assert_eq!(s.as_str().parse::<Stage>(), Ok(s));
        }
        assert!("prod".parse::<Stage>().unwrap_err().contains("one of candidate"));
    }
}
