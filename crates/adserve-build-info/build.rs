//! Records the git commit and cargo profile of this build as compile-time
//! environment (`ADSERVE_GIT_SHA`, `ADSERVE_BUILD_PROFILE`). The input that
//! overrides the commit is `ADSTACK_GIT_SHA` (a build knob, not service
//! config: services refuse unknown `ADSERVE_*` variables at start).
//!
//! Only this small crate reruns when the commit changes; the services depend
//! on it directly, the shared crates do not, so a commit recompiles the five
//! service crates and nothing below them.

use std::{path::PathBuf, process::Command};

fn git(args: &[&str]) -> Option<String> {
    let out = Command::new("git").args(args).current_dir(env!("CARGO_MANIFEST_DIR")).output().ok()?;
    out.status.success().then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

fn main() {
    // Outside a git checkout (a source tarball, a Docker build without .git)
    // the commit is "unknown"; ADSTACK_GIT_SHA in the build environment wins.
    println!("cargo:rerun-if-env-changed=ADSTACK_GIT_SHA");
    // The commit only: no "-dirty" mark, which would need a rerun on every
    // edit (and `git status` rewrites the index, which would rerun this on
    // every build). scripts/start.sh compares binaries, not commits.
    let sha = std::env::var("ADSTACK_GIT_SHA")
        .ok()
        .filter(|s| !s.is_empty())
        .or_else(|| git(&["rev-parse", "--short=12", "HEAD"]));
    println!("cargo:rustc-env=ADSERVE_GIT_SHA={}", sha.as_deref().unwrap_or("unknown"));
    let profile = std::env::var("PROFILE").unwrap_or_else(|_| "unknown".into());
    println!("cargo:rustc-env=ADSERVE_BUILD_PROFILE={profile}");
    // Rerun when HEAD moves: HEAD itself, the branch's ref, packed refs.
    // Only files that exist (cargo treats a missing one as always changed).
    println!("cargo:rerun-if-changed=build.rs");
    if let Some(dir) = git(&["rev-parse", "--absolute-git-dir"]).map(PathBuf::from) {
        let head_ref = git(&["symbolic-ref", "-q", "HEAD"]);
        let files = ["HEAD".to_string(), "packed-refs".to_string()].into_iter().chain(head_ref);
        for path in files.map(|f| dir.join(f)).filter(|p| p.is_file()) {
            println!("cargo:rerun-if-changed={}", path.display());
        }
    }
}
