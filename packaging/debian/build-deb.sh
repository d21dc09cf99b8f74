#!/usr/bin/env bash
# Builds vublk_VERSION_ARCH.deb with dpkg-deb from a staging directory:
# binaries, systemd units, example config, man pages and shell completions
# (generated from the clap definitions by `vublk gen-assets`).
#
#   packaging/debian/build-deb.sh [--bin-dir DIR] [--out DIR] [--fast]
#
# --bin-dir: where vublk and vublk-tier are (default: build them with
#            `cargo build --release --locked` and use target/release).
# --out:     where the .deb goes (default: target/debian).
# --fast:    no compression (for tests).
#
# (`cargo deb` works too, from the [package.metadata.deb] in Cargo.toml, after
# `target/release/vublk gen-assets target/assets`; installing cargo-deb took
# about 4 minutes here, so the test suite uses this script.)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
bin_dir="" out="$root/target/debian" compress=(-Zxz)
while [[ $# -gt 0 ]]; do
    case "$1" in
        --bin-dir) bin_dir="$2"; shift 2 ;;
        --out) out="$2"; shift 2 ;;
        --fast) compress=(-Znone); shift ;;
        *) echo "usage: $0 [--bin-dir DIR] [--out DIR] [--fast]" >&2; exit 2 ;;
    esac
done
if [[ -z "$bin_dir" ]]; then
    (cd "$root" && cargo build --release --locked --bins)
    bin_dir="${CARGO_TARGET_DIR:-$root/target}/release"
fi
version="$(sed -n 's/^version = "\(.*\)"/\1/p' "$root/Cargo.toml" | head -1)"
arch="$(dpkg --print-architecture)"
stage="$(mktemp -d)"
trap 'rm -rf "$stage"' EXIT

install -d "$stage/DEBIAN" "$stage/usr/bin" "$stage/lib/systemd/system" \
    "$stage/usr/share/doc/vublk/examples" "$stage/usr/share/man/man1" \
    "$stage/usr/share/bash-completion/completions" "$stage/usr/share/zsh/vendor-completions" \
    "$stage/usr/share/fish/vendor_completions.d" "$stage/etc/vublk" "$stage/var/lib/vublk"
for b in vublk vublk-tier; do
    install -m 0755 "$bin_dir/$b" "$stage/usr/bin/$b"
    strip --strip-unneeded "$stage/usr/bin/$b" 2>/dev/null || true
done
install -m 0644 "$root"/packaging/systemd/vublk@.service "$root"/packaging/systemd/vublk@.socket \
    "$root"/packaging/systemd/vublk-tier@.service "$stage/lib/systemd/system/"
install -m 0644 "$root/packaging/vublk.toml.example" "$stage/usr/share/doc/vublk/examples/"
assets="$stage/assets"
"$stage/usr/bin/vublk" gen-assets "$assets" >/dev/null
for m in "$assets"/man/*.1; do gzip -9n -c "$m" > "$stage/usr/share/man/man1/$(basename "$m").gz"; done
install -m 0644 "$assets/completions/vublk.bash" "$stage/usr/share/bash-completion/completions/vublk"
install -m 0644 "$assets/completions/_vublk" "$stage/usr/share/zsh/vendor-completions/_vublk"
install -m 0644 "$assets/completions/vublk.fish" "$stage/usr/share/fish/vendor_completions.d/vublk.fish"
rm -rf "$assets"
cat > "$stage/usr/share/doc/vublk/copyright" <<COPY
Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/
Upstream-Name: vublk
License: Apache-2.0
 On Debian systems the full text is in /usr/share/common-licenses/Apache-2.0.
COPY
size="$(du -sk --exclude=DEBIAN "$stage" | cut -f1)"
cat > "$stage/DEBIAN/control" <<CTRL
Package: vublk
Version: $version
Architecture: $arch
Maintainer: vublk developers <vublk@example.invalid>
Installed-Size: $size
Depends: libc6 (>= 2.31)
Recommends: systemd
Section: admin
Priority: optional
Homepage: https://example.invalid/vublk
Description: vhost-user-blk backend daemon
 vublk serves a raw image or block device to QEMU, cloud-hypervisor or
 StratoVirt guests over vhost-user, with one io_uring thread per virtqueue,
 live stats (vublk stat/top, Prometheus), QoS limits, I/O suspension and a
 seccomp sandbox. Includes vublk-tier, the guest memory tiering sidecar.
CTRL
cat > "$stage/DEBIAN/postinst" <<'POST'
#!/bin/sh
set -e
if [ "$1" = configure ] && [ -d /run/systemd/system ]; then
    systemctl daemon-reload >/dev/null 2>&1 || true
fi
POST
cat > "$stage/DEBIAN/postrm" <<'POST'
#!/bin/sh
set -e
if [ -d /run/systemd/system ]; then
    systemctl daemon-reload >/dev/null 2>&1 || true
fi
POST
chmod 0755 "$stage/DEBIAN/postinst" "$stage/DEBIAN/postrm"
mkdir -p "$out"
deb="$out/vublk_${version}_${arch}.deb"
dpkg-deb --root-owner-group "${compress[@]}" --build "$stage" "$deb" >/dev/null
echo "$deb"
