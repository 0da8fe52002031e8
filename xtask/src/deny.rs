//! The supply-chain step of `cargo xtask test`: `cargo deny check` of advisories, bans (duplicate versions are
//! warnings), licenses and sources, as configured in `deny.toml` — offline.
//!
//! cargo-deny is installed with `cargo install --locked` into the cache (once per pinned version). The RustSec
//! advisory database is a git checkout in the cache: seeded from the snapshot in `shared/rustsec-advisory-db`
//! beside the repository when there is one, else fetched by `cargo deny fetch`. Without either, the advisory
//! check is skipped and the step says so loudly; the other checks still run.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result, bail};

use crate::{run, step};
use xtask::tools;

/// The cargo-deny release installed (bump deliberately: the database directory name below depends on it).
const VERSION: &str = "0.20.2";
/// The directory cargo-deny 0.20 keeps the default advisory database in, under its `db-path`: the URL's last
/// segment and a hash of the URL.
const DB_DIR: &str = "advisory-db-3157b0e258782691";

/// Where the advisory database comes from in this run.
enum Advisories {
    /// A checkout in the cache: what it is (snapshot or fetch, and its date).
    Available(String),
    /// No database: why.
    Skipped(String),
}

pub fn check() -> Result<()> {
    step(&format!(
        "cargo deny check: advisories, bans, licenses, sources (cargo-deny {VERSION})"
    ));
    let cache = tools::cache_dir();
    let deny = install(&cache)?;
    let db_root = cache.join("advisory-dbs");
    std::fs::create_dir_all(&db_root)?;
    // deny.toml with the cached database's location added: the committed file keeps cargo-deny's default for
    // people running `cargo deny check` themselves.
    let config = cache.join("deny.toml");
    let committed = std::fs::read_to_string(tools::repo_root().join("deny.toml")).context("reading deny.toml")?;
    let db_path = format!("[advisories]\ndb-path = {:?}\n", db_root.display().to_string());
    std::fs::write(&config, committed.replacen("[advisories]\n", &db_path, 1))?;

    let advisories = database(&deny, &config, &db_root.join(DB_DIR))?;
    // cargo-deny runs offline and reads the metadata of every platform's dependencies: a build fetches only this
    // platform's, so fetch the rest of the lock file first (a no-op once they are in cargo's cache).
    run(Command::new("cargo")
        .current_dir(tools::repo_root())
        .args(["fetch", "--locked", "--quiet"]))?;
    let mut cmd = Command::new(&deny);
    cmd.args(["deny", "--workspace", "--locked", "--offline", "--config"])
        .arg(&config)
        .arg("check");
    match &advisories {
        Advisories::Available(what) => {
            eprintln!("    advisory database: {what}");
            cmd.args(["advisories", "bans", "licenses", "sources"]);
        }
        Advisories::Skipped(why) => {
            cmd.args(["bans", "licenses", "sources"]);
            eprintln!("    ADVISORIES NOT CHECKED: {why}");
        }
    }
    run(&mut cmd)?;
    if let Advisories::Skipped(why) = advisories {
        eprintln!(
            "cargo deny: bans, licenses and sources passed; advisories were SKIPPED for lack of an advisory \
             database ({why})"
        );
    }
    Ok(())
}

/// cargo-deny of the pinned version, installed into the cache on first use.
fn install(cache: &Path) -> Result<PathBuf> {
    let root = cache.join("tools").join(format!("cargo-deny-{VERSION}"));
    let bin = root.join("bin/cargo-deny");
    if !bin.exists() {
        eprintln!("    installing cargo-deny {VERSION} (cargo install --locked; first time only, a few minutes)");
        run(crate::cargo()
            .args([
                "install",
                "--locked",
                "--quiet",
                "cargo-deny",
                "--version",
                VERSION,
                "--root",
            ])
            .arg(&root))?;
    }
    Ok(bin)
}

/// The snapshot of the advisory database beside the repository, if any: `KEEPALIVE_ADVISORY_DB`, else
/// `shared/rustsec-advisory-db` next to the checkout.
fn snapshot() -> Option<PathBuf> {
    let dir = std::env::var_os("KEEPALIVE_ADVISORY_DB")
        .map(PathBuf::from)
        .or_else(|| Some(tools::repo_root().parent()?.join("shared/rustsec-advisory-db")))?;
    dir.join("crates").is_dir().then_some(dir)
}

fn git(dir: &Path) -> Command {
    let mut cmd = Command::new("git");
    cmd.arg("-C").arg(dir).args([
        "-c",
        "user.name=cargo xtask",
        "-c",
        "user.email=xtask@localhost",
        "-c",
        "commit.gpgsign=false",
        "-c",
        "core.hooksPath=/dev/null",
    ]);
    cmd
}

/// Makes sure the cache holds the advisory database at `db`, and tells where it came from.
fn database(deny: &Path, config: &Path, db: &Path) -> Result<Advisories> {
    let stamp = |dir: &Path| std::fs::read_to_string(dir.join("SNAPSHOT.txt")).ok();
    if let Some(snapshot) = snapshot() {
        // A newer snapshot replaces the cached copy of an older one.
        if db.join(".git").is_dir() && stamp(db).is_some() && stamp(db) != stamp(&snapshot) {
            std::fs::remove_dir_all(db)?;
        }
        if !db.join(".git").is_dir() {
            seed(&snapshot, db).context("copying the advisory database snapshot into the cache")?;
        }
    } else if !db.join(".git").is_dir() {
        eprintln!("    no advisory database snapshot beside the repository: cargo deny fetch db");
        let fetched = Command::new(deny)
            .args(["deny", "--locked", "--config"])
            .arg(config)
            .args(["fetch", "db"])
            .current_dir(tools::repo_root())
            .status()
            .is_ok_and(|s| s.success());
        if !fetched || !db.join(".git").is_dir() {
            return Ok(Advisories::Skipped(
                "no snapshot in shared/rustsec-advisory-db and `cargo deny fetch` failed (offline?)".into(),
            ));
        }
    }
    let date = git(db)
        .args(["log", "-1", "--format=%cs %h"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    let origin = match stamp(db) {
        Some(s) => format!("snapshot ({})", s.lines().next().unwrap_or("").trim()),
        None => "fetched".to_string(),
    };
    Ok(Advisories::Available(format!("{} [{date}], {origin}", db.display())))
}

/// Copies the snapshot (plain files) into a git checkout at `db`, as cargo-deny wants it, committed with the
/// snapshot's date.
fn seed(snapshot: &Path, db: &Path) -> Result<()> {
    eprintln!("    seeding the advisory database from {}", snapshot.display());
    let tmp = db.with_extension("tmp");
    if tmp.exists() {
        run(Command::new("chmod").arg("-R").arg("u+w").arg(&tmp))?;
        std::fs::remove_dir_all(&tmp)?;
    }
    run(Command::new("cp").arg("-R").arg(snapshot).arg(&tmp))?;
    // The snapshot is read-only; the copy must take a .git directory.
    run(Command::new("chmod").arg("-R").arg("u+w").arg(&tmp))?;
    run(git(&tmp).args(["init", "--quiet", "--initial-branch=main"]))?;
    run(git(&tmp).args(["add", "--all"]))?;
    let text = std::fs::read_to_string(snapshot.join("SNAPSHOT.txt")).unwrap_or_default();
    let mut commit = git(&tmp);
    commit.args([
        "commit",
        "--quiet",
        "--no-verify",
        "-m",
        "RustSec advisory database snapshot",
    ]);
    if let Some(date) = snapshot_date(&text) {
        commit
            .env("GIT_COMMITTER_DATE", format!("{date}T00:00:00Z"))
            .env("GIT_AUTHOR_DATE", format!("{date}T00:00:00Z"));
    }
    run(&mut commit)?;
    if db.exists() {
        std::fs::remove_dir_all(db)?;
    }
    std::fs::rename(&tmp, db)?;
    if !db.join("crates").is_dir() {
        bail!("{} has no crates/ directory", db.display());
    }
    Ok(())
}

/// The first YYYY-MM-DD in SNAPSHOT.txt ("... commit <sha> of 2026-08-21, ...").
fn snapshot_date(text: &str) -> Option<&str> {
    text.char_indices().find_map(|(i, _)| {
        let s = text.get(i..i + 10)?;
        let b = s.as_bytes();
        let digits = |r: std::ops::Range<usize>| b[r].iter().all(u8::is_ascii_digit);
        (digits(0..4) && b[4] == b'-' && digits(5..7) && b[7] == b'-' && digits(8..10)).then_some(s)
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn snapshot_date_is_the_first_iso_date() {
        let text = "Snapshot of the RustSec advisory database (CC0), commit bf5c0d2 of 2026-08-21, for offline audits.";
        assert_eq!(super::snapshot_date(text), Some("2026-08-21"));
        assert_eq!(super::snapshot_date("no date 2026-8-1"), None);
    }
}
