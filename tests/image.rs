//! The container image, built as a user builds it (`hack/image.sh`: static binary, then buildah from the
//! Containerfile into an OCI archive), then taken apart as a runtime would: index, manifest and config by
//! digest, the single layer unpacked into an empty root. The binary in it is static and runs there: `--version`,
//! and, chrooted into that root as the image's user, the offline `apply` and `crd` commands.
//!
//! The test builds with `KEEPALIVE_IMAGE_PROFILE=dev` unless that variable says `release` (what ships; about
//! twice the build time): the Containerfile and the build path are the same.

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use serde_json::Value;

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// Runs hack/image.sh (progress on this terminal's stderr) and returns the archive's path.
fn build_image() -> PathBuf {
    let profile = std::env::var("KEEPALIVE_IMAGE_PROFILE").unwrap_or_else(|_| "dev".to_string());
    let out = Command::new(repo().join("hack/image.sh"))
        .arg("build")
        .env("KEEPALIVE_IMAGE_PROFILE", &profile)
        .env_remove("CARGO_TARGET_DIR")
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .stderr(Stdio::inherit())
        .output()
        .expect("running hack/image.sh");
    assert!(out.status.success(), "hack/image.sh failed ({})", out.status);
    let path = PathBuf::from(String::from_utf8(out.stdout).unwrap().trim());
    assert!(path.is_file(), "{}", path.display());
    path
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Reads a blob by digest, checking that its content has that digest.
fn blob(dir: &Path, digest: &str) -> PathBuf {
    let hex = digest.strip_prefix("sha256:").expect("sha256 digest");
    let path = dir.join("blobs/sha256").join(hex);
    let sum = run(Command::new("sha256sum").arg(&path));
    assert_eq!(
        sum.split_whitespace().next(),
        Some(hex),
        "blob {digest} has another digest"
    );
    path
}

fn json(path: &Path) -> Value {
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

/// Whether an ELF64 little-endian executable needs no dynamic loader and no shared library: no PT_INTERP
/// segment, and no DT_NEEDED entry in its dynamic section (a static-pie has one, for its own relocations).
fn is_static_elf(bytes: &[u8]) -> bool {
    assert_eq!(&bytes[..4], b"\x7fELF", "not an ELF file");
    assert_eq!(bytes[4], 2, "not ELF64");
    let u16_at = |o: usize| u16::from_le_bytes(bytes[o..o + 2].try_into().unwrap()) as usize;
    let u64_at = |o: usize| u64::from_le_bytes(bytes[o..o + 8].try_into().unwrap()) as usize;
    let (phoff, phentsize, phnum) = (u64_at(0x20), u16_at(0x36), u16_at(0x38));
    for i in 0..phnum {
        let ph = phoff + i * phentsize;
        let p_type = u32::from_le_bytes(bytes[ph..ph + 4].try_into().unwrap());
        const PT_DYNAMIC: u32 = 2;
        const PT_INTERP: u32 = 3;
        match p_type {
            PT_INTERP => return false,
            PT_DYNAMIC => {
                let (offset, size) = (u64_at(ph + 8), u64_at(ph + 32));
                for entry in (offset..offset + size).step_by(16) {
                    const DT_NULL: usize = 0;
                    const DT_NEEDED: usize = 1;
                    match u64_at(entry) {
                        DT_NULL => break,
                        DT_NEEDED => return false,
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    true
}

#[test]
fn the_image_runs_the_static_binary_as_non_root() {
    let archive = build_image();
    let scratch = ScratchDir::new("image-test");
    let dir = scratch.0.clone();
    run(Command::new("tar").arg("-xf").arg(&archive).arg("-C").arg(&dir));

    // index.json -> manifest -> config and layers, every blob checked against its digest.
    assert_eq!(json(&dir.join("oci-layout"))["imageLayoutVersion"], "1.0.0");
    let index = json(&dir.join("index.json"));
    let manifests = index["manifests"].as_array().unwrap();
    assert_eq!(manifests.len(), 1, "{index}");
    assert_eq!(
        manifests[0]["annotations"]["org.opencontainers.image.ref.name"],
        format!("keepalive-operator:{}", env!("CARGO_PKG_VERSION"))
    );
    let manifest = json(&blob(&dir, manifests[0]["digest"].as_str().unwrap()));
    assert_eq!(manifest["mediaType"], "application/vnd.oci.image.manifest.v1+json");
    let config = json(&blob(&dir, manifest["config"]["digest"].as_str().unwrap()));
    assert_eq!(config["os"], "linux");
    assert_eq!(config["architecture"], "amd64");
    let c = &config["config"];
    assert_eq!(c["User"], "65532:65532", "non-root user: {c}");
    assert_eq!(
        c["Entrypoint"],
        serde_json::json!(["/usr/local/bin/keepalive-operator"])
    );
    assert_eq!(
        c["Labels"]["org.opencontainers.image.version"],
        env!("CARGO_PKG_VERSION")
    );

    // FROM scratch: one layer, holding the binary and nothing else.
    let layers = manifest["layers"].as_array().unwrap();
    assert_eq!(layers.len(), 1, "{manifest}");
    assert_eq!(layers[0]["mediaType"], "application/vnd.oci.image.layer.v1.tar+gzip");
    let layer = blob(&dir, layers[0]["digest"].as_str().unwrap());
    let listing = run(Command::new("tar").arg("-tvzf").arg(&layer));
    let files: Vec<&str> = listing
        .lines()
        .filter(|l| !l.starts_with('d'))
        .map(|l| l.split_whitespace().last().unwrap())
        .collect();
    assert_eq!(files, ["usr/local/bin/keepalive-operator"], "{listing}");
    let binary_line = listing.lines().find(|l| l.ends_with("keepalive-operator")).unwrap();
    assert!(binary_line.starts_with("-r-xr-xr-x"), "{binary_line}");
    let rootfs = dir.join("rootfs");
    std::fs::create_dir_all(&rootfs).unwrap();
    run(Command::new("tar").arg("-xzf").arg(&layer).arg("-C").arg(&rootfs));
    let binary = rootfs.join("usr/local/bin/keepalive-operator");
    let size = std::fs::metadata(&binary).unwrap().len();
    eprintln!(
        "image: archive {:.1} MiB, binary {:.1} MiB",
        std::fs::metadata(&archive).unwrap().len() as f64 / 1048576.0,
        size as f64 / 1048576.0
    );

    // Static, and it runs with an empty environment.
    assert!(
        is_static_elf(&std::fs::read(&binary).unwrap()),
        "the binary is dynamically linked"
    );
    let version = run(Command::new(&binary).arg("--version").env_clear());
    assert_eq!(
        version.trim(),
        format!("keepalive-operator {}", env!("CARGO_PKG_VERSION"))
    );

    // In the image's root, with nothing but the binary, as the image's user: the offline commands work.
    // SAFETY: geteuid(2) has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("not root: skipping the chroot run");
        return;
    }
    std::fs::copy(repo().join("examples/aws-nlb.yaml"), rootfs.join("policy.yaml")).unwrap();
    // Found through this process's PATH: the command itself runs with an empty environment.
    let chroot = std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())
        .map(|d| d.join("chroot"))
        .find(|p| p.is_file())
        .expect("chroot (coreutils) in PATH");
    let in_image = |args: &[&str], stdin: &str| {
        let mut child = Command::new(&chroot)
            .arg("--userspec=65532:65532")
            .arg(&rootfs)
            .arg("/usr/local/bin/keepalive-operator")
            .args(args)
            .env_clear()
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        use std::io::Write;
        child.stdin.take().unwrap().write_all(stdin.as_bytes()).unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "{args:?} in the image: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        (
            String::from_utf8(out.stdout).unwrap(),
            String::from_utf8(out.stderr).unwrap(),
        )
    };
    let (crd, _) = in_image(&["crd"], "");
    assert_eq!(
        crd,
        std::fs::read_to_string(repo().join("crds/keepalivepolicies.keepalive.dev.yaml")).unwrap()
    );
    let pod = "apiVersion: v1\nkind: Pod\nmetadata: {name: web, labels: {keepalive.dev/lb: aws-nlb}}\n\
               spec: {containers: [{name: app, image: app}]}\n";
    let (mutated, report) = in_image(&["apply", "-p", "/policy.yaml", "-r", "-"], pod);
    assert!(mutated.contains("net.ipv4.tcp_keepalive_time"), "{mutated}");
    assert!(report.contains("aws-nlb"), "{report}");
}

/// A fresh directory under the target's temporary directory, removed on drop (a failed run's stays until the
/// next run).
struct ScratchDir(PathBuf);

impl ScratchDir {
    fn new(name: &str) -> ScratchDir {
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(name);
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        ScratchDir(dir)
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}
