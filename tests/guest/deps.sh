#!/usr/bin/env bash
# Install what the real-guest end-to-end tests need, on Debian 12 (bookworm), as root.
#
# Idempotent: when everything is already installed it touches nothing and does not
# run `apt-get update`. Safe to call from several tests or engineers at once
# (apt's own locks serialise concurrent installs; we wait for them).
#
# qemu-system-x86 must come from bookworm-backports: the machine has qemu-utils 10.0
# from there, and bookworm's own qemu-system-x86 7.2 would drag qemu-utils back to 7.2
# (and 7.2 lacks options the harness uses). So the suite is added if missing and the
# QEMU packages are installed with `-t bookworm-backports`.
set -euo pipefail

if [[ $(id -u) -ne 0 ]]; then
    echo "deps.sh: must run as root (apt-get install)" >&2
    exit 77
fi

export DEBIAN_FRONTEND=noninteractive
APT_OPTS=(-o DPkg::Lock::Timeout=600 -o Dpkg::Options::=--force-confold -y --no-install-recommends)

# Packages from the default suites (bookworm).
BASE_PKGS=(linux-image-amd64 busybox-static fio e2fsprogs util-linux cpio gzip xz-utils zstd kmod)
# Packages that must come from bookworm-backports.
BPO_PKGS=(qemu-system-x86)

BPO_FILE=/etc/apt/sources.list.d/bookworm-backports.sources

have_backports() {
    grep -rqsE '^[[:space:]]*(Suites:.*[[:space:]]|deb[[:space:]].*[[:space:]])bookworm-backports([[:space:]]|$)' \
        /etc/apt/sources.list /etc/apt/sources.list.d/ 2>/dev/null
}

# Write a deb822 entry for bookworm-backports that copies the URIs (and the
# snapshot comment, if any) of the entry that carries "bookworm" itself, so a
# machine pointed at a mirror or snapshot keeps using it.
add_backports() {
    local src uris="" comment="" signed="/usr/share/keyrings/debian-archive-keyring.gpg"
    for src in /etc/apt/sources.list.d/*.sources; do
        [[ -f $src ]] || continue
        # Read the stanza whose Suites line names plain "bookworm".
        local stanza
        stanza=$(awk -v RS= '/(^|\n)Suites:([^\n]*[ \t])?bookworm([ \t]|\n|$)/ {print; exit}' "$src")
        [[ -n $stanza ]] || continue
        uris=$(sed -n 's/^URIs:[[:space:]]*//p' <<<"$stanza" | head -n1)
        comment=$(grep -E '^#' <<<"$stanza" | head -n1 || true)
        local s
        s=$(sed -n 's/^Signed-By:[[:space:]]*//p' <<<"$stanza" | head -n1)
        [[ -n $s ]] && signed=$s
        break
    done
    if [[ -z $uris && -f /etc/apt/sources.list ]]; then
        uris=$(awk '$1=="deb" && $3=="bookworm" {print $2; exit}' /etc/apt/sources.list)
    fi
    [[ -n $uris ]] || uris=http://deb.debian.org/debian
    # A snapshot comment names the archive date; the backports suite lives in the same archive.
    {
        [[ -n $comment ]] && echo "$comment"
        echo "Types: deb"
        echo "URIs: $uris"
        echo "Suites: bookworm-backports"
        echo "Components: main"
        echo "Signed-By: $signed"
    } >"$BPO_FILE.tmp"
    mv "$BPO_FILE.tmp" "$BPO_FILE"
    echo "deps.sh: added $BPO_FILE (URIs: $uris)"
}

installed() { # pkg -> 0 if installed
    dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q '^install ok installed$'
}

qemu_is_backports() {
    installed qemu-system-x86 || return 1
    local v
    v=$(dpkg-query -W -f='${Version}' qemu-system-x86)
    [[ $v == *bpo12* ]]
}

missing_base=()
for p in "${BASE_PKGS[@]}"; do installed "$p" || missing_base+=("$p"); done
need_bpo=0
qemu_is_backports || need_bpo=1

if [[ ${#missing_base[@]} -eq 0 && $need_bpo -eq 0 ]]; then
    echo "deps.sh: all packages present"
    exit 0
fi

updated=0
if ! have_backports; then
    add_backports
fi
apt-get -o DPkg::Lock::Timeout=600 update -q
updated=1

if [[ ${#missing_base[@]} -gt 0 ]]; then
    echo "deps.sh: installing ${missing_base[*]}"
    apt-get install "${APT_OPTS[@]}" "${missing_base[@]}"
fi
if [[ $need_bpo -eq 1 ]]; then
    echo "deps.sh: installing ${BPO_PKGS[*]} from bookworm-backports"
    apt-get install "${APT_OPTS[@]}" -t bookworm-backports "${BPO_PKGS[@]}"
fi

# Sanity: the emulator and the storage tools must be from the same QEMU release.
qv=$(dpkg-query -W -f='${Version}' qemu-system-x86)
if installed qemu-utils; then
    uv=$(dpkg-query -W -f='${Version}' qemu-utils)
    if [[ ${qv%%+*} != "${uv%%+*}" ]]; then
        echo "deps.sh: warning: qemu-system-x86 $qv and qemu-utils $uv differ" >&2
    fi
fi
echo "deps.sh: done (apt-get update ran: $updated)"
