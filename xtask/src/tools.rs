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

/// Runs `hack/tools.sh build NAMES...` for the newest listed Kubernetes version (progress on stderr) and returns the
/// binaries' directory.
pub fn build(names: &[&str]) -> Result<PathBuf> {
    build_version(None, names)
}

/// Runs `hack/tools.sh build NAMES...` for one of the Kubernetes versions of `hack/versions.env` (`None`: the
/// newest) and returns the directory of that version's binaries (with etcd and helm).
pub fn build_version(version: Option<&str>, names: &[&str]) -> Result<PathBuf> {
    let mut cmd = Command::new(repo_root().join("hack/tools.sh"));
    cmd.arg("build").args(names).stderr(Stdio::inherit());
    if let Some(version) = version {
        cmd.env("KUBE_VERSION", version);
    } else {
        cmd.env_remove("KUBE_VERSION");
    }
    let out = cmd.output().context("running hack/tools.sh")?;
    if !out.status.success() {
        bail!("hack/tools.sh build failed ({})", out.status);
    }
    let dir = String::from_utf8(out.stdout)?.trim().to_string();
    Ok(PathBuf::from(dir))
}

/// The Kubernetes versions the project is tested on, newest first: `KUBE_VERSIONS` of `hack/versions.env`, the
/// single source of the test matrix.
pub fn kube_versions() -> Result<Vec<String>> {
    let path = repo_root().join("hack/versions.env");
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    parse_kube_versions(&text).with_context(|| format!("{}: no KUBE_VERSIONS=\"v1.X.Y ...\" line", path.display()))
}

fn parse_kube_versions(env: &str) -> Option<Vec<String>> {
    let value = env.lines().find_map(|l| l.trim().strip_prefix("KUBE_VERSIONS="))?;
    let versions: Vec<String> = value.trim_matches('"').split_whitespace().map(str::to_string).collect();
    let valid = |v: &String| {
        let mut parts = v.strip_prefix('v').unwrap_or("").split('.');
        parts.clone().count() == 3 && parts.all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))
    };
    (!versions.is_empty() && versions.iter().all(valid)).then_some(versions)
}

#[cfg(test)]
mod tests {
    use super::parse_kube_versions;

    #[test]
    fn kube_versions_come_from_one_line_newest_first() {
        let env = "# comment\nKUBE_VERSIONS=\"v1.37.2 v1.36.3  v1.30.14\"\nETCD_VERSION=v3.5.35\n";
        assert_eq!(parse_kube_versions(env).unwrap(), ["v1.37.2", "v1.36.3", "v1.30.14"]);
        assert_eq!(parse_kube_versions("KUBE_VERSIONS=\"\"\n"), None);
        assert_eq!(parse_kube_versions("KUBE_VERSIONS=\"v1.37 latest\"\n"), None);
        assert_eq!(parse_kube_versions("ETCD_VERSION=v3.5.35\n"), None);
    }
}
