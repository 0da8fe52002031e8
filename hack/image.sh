#!/usr/bin/env bash
# Builds the keepalive-operator image into an OCI archive, without a container engine:
#
#   1. the binary, statically linked (x86_64-unknown-linux-gnu, RUSTFLAGS=-C target-feature=+crt-static), in a
#      target directory of its own so it never waits on the workspace's cargo lock;
#   2. checks that it is static and runs `--version`;
#   3. the image from ./Containerfile with buildah (vfs storage and chroot isolation: no daemon, no overlay
#      mounts, works inside a container), pushed to an OCI archive.
#
#   hack/image.sh [build]   build what changed and print the archive's path on stdout (progress on stderr)
#   hack/image.sh path      print the archive's path
#
# Cached: cargo rebuilds only what changed; the image is rebuilt only when the binary, the Containerfile or
# this script changed (a key next to the archive). The image is reproducible: layer and config timestamps come
# from the last commit (SOURCE_DATE_EPOCH overrides), so the same inputs give the same digest.
#
# Environment:
#   KEEPALIVE_CACHE          cache root (default ~/.cache/keepalive-operator)
#   KEEPALIVE_IMAGE_PROFILE  cargo profile of the binary: release (default; what ships) or dev (quicker to
#                            build, for tests; archive keepalive-operator-dev.oci.tar)
#   KEEPALIVE_IMAGE_NAME     image name inside the archive (default keepalive-operator:<binary's version>)
#   KEEPALIVE_IMAGE_OUT      archive path (default <cache>/images/keepalive-operator.oci.tar)
#
# Needs buildah and clang (Debian packages `buildah` and `clang`); when one is missing and this runs as root with
# apt-get, it is installed.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/.." && pwd)"
cache="${KEEPALIVE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/keepalive-operator}"
images="$cache/images"
profile="${KEEPALIVE_IMAGE_PROFILE:-release}"
target=x86_64-unknown-linux-gnu
target_dir="$cache/target-static"
# Bump when the steps below change in a way the key does not see.
IMAGE_REV=1

say() { printf '[image] %s\n' "$*" >&2; }
die() { printf '[image] error: %s\n' "$*" >&2; exit 1; }

case "$profile" in
  release) profile_dir=release suffix="" ;;
  # For tests: builds in half the time of release; no debuginfo, symbols stripped.
  dev) profile_dir=debug suffix=-dev; export CARGO_PROFILE_DEV_DEBUG=0 CARGO_PROFILE_DEV_STRIP=symbols ;;
  *) die "KEEPALIVE_IMAGE_PROFILE must be release or dev, not '$profile'" ;;
esac
out="${KEEPALIVE_IMAGE_OUT:-$images/keepalive-operator$suffix.oci.tar}"

case "${1:-build}" in
  path) echo "$out"; exit 0 ;;
  build) ;;
  *) die "usage: hack/image.sh [build|path]" ;;
esac

mkdir -p "$images"
# One build at a time (tests of several processes may ask at once).
exec 9>"$images/.lock"
if ! flock -n 9; then
  say "another image build is running; waiting for it"
  flock 9
fi

ensure_buildah() {
  command -v buildah >/dev/null && return
  if [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null; then
    say "installing buildah (apt-get)"
    DEBIAN_FRONTEND=noninteractive apt-get update -q >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends buildah >&2
  fi
  command -v buildah >/dev/null || die "buildah is not installed (Debian: apt-get install buildah)"
}

# The agent's BPF program is compiled by build.rs with clang (CLANG names another compiler).
ensure_clang() {
  command -v "${CLANG:-clang}" >/dev/null && return
  if [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null; then
    say "installing clang (apt-get)"
    DEBIAN_FRONTEND=noninteractive apt-get update -q >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends clang >&2
  fi
  command -v "${CLANG:-clang}" >/dev/null || die "clang is not installed (Debian: apt-get install clang)"
}

# --- 1. the static binary ----------------------------------------------------------------------------------------
command -v cargo >/dev/null || die "cargo is not installed"
ensure_clang
if ! rustup target list --installed 2>/dev/null | grep -x "$target" >/dev/null; then
  [[ $(rustc -vV | sed -n 's/^host: //p') == "$target" ]] || die "the Rust target $target is not installed"
fi
# Variables cargo sets for what it runs (e.g. when a test calls this script) would make build scripts that watch
# them (ring's CARGO_MANIFEST_DIR) rebuild every time the caller changes.
while read -r var; do unset "$var"; done < <(compgen -e | grep -E '^(CARGO_(MANIFEST_|PKG_|CRATE_|BIN_|PRIMARY_PACKAGE|TARGET_TMPDIR|ENCODED_RUSTFLAGS|RUSTC_WRAPPER)|OUT_DIR$)' || true)
say "building the static binary ($profile profile, target $target, in $target_dir)"
start=$SECONDS
(
  cd "$root"
  # --target keeps RUSTFLAGS off build scripts and proc macros, which must stay dynamic host binaries.
  CARGO_TARGET_DIR="$target_dir" RUSTFLAGS="-C target-feature=+crt-static" \
    cargo build --locked --profile "$profile" --target "$target" --bin keepalive-operator >&2
)
bin="$target_dir/$target/$profile_dir/keepalive-operator"
[[ -x $bin ]] || die "cargo did not produce $bin"
say "binary ready after $((SECONDS - start)) s: $bin ($(du -h "$bin" | cut -f1))"

# --- 2. static, and it runs ----------------------------------------------------------------------------------------
if command -v file >/dev/null; then
  kind="$(file -b "$bin")"
  [[ $kind == *"statically linked"* || $kind == *"static-pie linked"* ]] || die "not a static binary: $kind"
elif command -v ldd >/dev/null; then
  ldd "$bin" >/dev/null 2>&1 && die "not a static binary: $(ldd "$bin" 2>&1 | sed -n 1,3p)"
fi
# An empty environment, as in the image.
reported="$(env -i "$bin" --version)" || die "$bin --version failed"
[[ $reported =~ ^keepalive-operator\ ([0-9][^ ]*)$ ]] || die "$bin --version printed '$reported'"
version="${BASH_REMATCH[1]}"
say "static, and runs: $reported"

# --- 3. the image ----------------------------------------------------------------------------------------------------
name="${KEEPALIVE_IMAGE_NAME:-keepalive-operator:$version}"
key="$( (sha256sum "$bin" "$root/Containerfile" "$here/image.sh" | cut -d' ' -f1; echo "$name $IMAGE_REV") \
  | sha256sum | cut -c1-32)"
if [[ -f $out && -f $out.key && $(cat "$out.key") == "$key" ]]; then
  say "image up to date: $out ($(du -h "$out" | cut -f1))"
  echo "$out"
  exit 0
fi

ensure_buildah
store="$cache/buildah"
mkdir -p "$store/root" "$store/run"
policy="$store/policy.json"
# FROM scratch pulls nothing; an explicit policy spares depending on /etc/containers/policy.json.
[[ -f $policy ]] || printf '{"default":[{"type":"insecureAcceptAnything"}]}\n' >"$policy"
buildah_() {
  buildah --root "$store/root" --runroot "$store/run" --storage-driver vfs "$@"
}
epoch="${SOURCE_DATE_EPOCH:-$(git -C "$root" log -1 --format=%ct 2>/dev/null || echo 0)}"
context="$(mktemp -d "$images/context.XXXXXX")"
tmp_out="$out.tmp.$$"
trap 'rm -rf "$context" "$tmp_out"' EXIT
cp "$bin" "$context/keepalive-operator"
local_ref="localhost/keepalive-operator:build-$$"
say "building the image $name with buildah (vfs, chroot isolation)"
start=$SECONDS
buildah_ build --quiet --isolation chroot --signature-policy "$policy" --timestamp "$epoch" \
  --build-arg "VERSION=$version" -f "$root/Containerfile" -t "$local_ref" "$context" >/dev/null
buildah_ push --quiet --signature-policy "$policy" "$local_ref" "oci-archive:$tmp_out:$name" >&2
buildah_ rmi --force "$local_ref" >/dev/null 2>&1 || true
mv -f "$tmp_out" "$out"
echo "$key" >"$out.key"
say "image ready after $((SECONDS - start)) s: $out ($(du -h "$out" | cut -f1)), name $name"
echo "$out"
