//! Where the Go-built binaries come from: `hack/tools.sh`, which builds them from their upstream modules and
//! caches them outside git.

use std::{
    path::PathBuf,
    process::{Command, Stdio},
    sync::OnceLock,
};

use anyhow::{Context, Result, bail};

/// The repository root.
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the repository")
        .to_path_buf()
}

/// The cache outside git shared with `hack/*.sh`: `KEEPALIVE_CACHE`, else `$XDG_CACHE_HOME/keepalive-operator`,
/// else `~/.cache/keepalive-operator`.
pub fn cache_dir() -> PathBuf {
    let var = |name| std::env::var_os(name).filter(|v| !v.is_empty());
    if let Some(dir) = var("KEEPALIVE_CACHE") {
        return PathBuf::from(dir);
    }
    let base = var("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache"));
    base.join("keepalive-operator")
}

/// Directory with etcd, kube-apiserver, kubectl and helm of the pinned versions, built on first use.
/// `KEEPALIVE_BIN_DIR` points elsewhere.
pub fn bin_dir() -> Result<PathBuf> {
    if let Some(dir) = std::env::var_os("KEEPALIVE_BIN_DIR") {
        return Ok(PathBuf::from(dir));
    }
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    if let Some(dir) = DIR.get() {
        return Ok(dir.clone());
    }
    let dir = build(&[])?;
    Ok(DIR.get_or_init(|| dir).clone())
}

/// Runs `hack/tools.sh build NAMES...` (progress on stderr) and returns the binaries' directory.
pub fn build(names: &[&str]) -> Result<PathBuf> {
    let out = Command::new(repo_root().join("hack/tools.sh"))
        .arg("build")
        .args(names)
        .stderr(Stdio::inherit())
        .output()
        .context("running hack/tools.sh")?;
    if !out.status.success() {
        bail!("hack/tools.sh build failed ({})", out.status);
    }
    let dir = String::from_utf8(out.stdout)?.trim().to_string();
    Ok(PathBuf::from(dir))
}
