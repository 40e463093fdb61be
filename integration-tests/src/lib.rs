//! Whole-stack and contract tests against the real services and infrastructure
