#!/usr/bin/env bash
# Build (or reuse) the test guest: an uncompressed ELF kernel for PVH boot and an
# initramfs with busybox, fio, e2fsprogs, the virtio/ext4 modules and the test init.
#
# Everything comes from Debian packages installed by deps.sh. The result is cached
# under $VUBLK_GUEST_CACHE (default /var/tmp/vublk-guest), in a folder keyed by the
# kernel and package versions and by the contents of the guest files in this
# folder, so a rebuild happens only when one of them changes.
#
# Prints the guest folder (holding vmlinux, initramfs.cpio.gz, kver) on stdout.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
cache_root=${VUBLK_GUEST_CACHE:-/var/tmp/vublk-guest}

log() { echo "build-guest: $*" >&2; }
die() { log "error: $*"; exit 1; }

pkgver() { dpkg-query -W -f='${Version}' "$1" 2>/dev/null || die "package $1 is not installed (run tests/guest/deps.sh)"; }

# The kernel that linux-image-amd64 currently points at.
kpkg=$(dpkg-query -W -f='${Depends}' linux-image-amd64 | grep -o 'linux-image-[^ ,]*' | head -n1) ||
    die "linux-image-amd64 is not installed (run tests/guest/deps.sh)"
kver=${kpkg#linux-image-}
vmlinuz=/boot/vmlinuz-$kver
moddir=/lib/modules/$kver
[[ -r $vmlinuz && -d $moddir ]] || die "$vmlinuz or $moddir missing"

guest_files=("$here/build-guest.sh" "$here/init" "$here/guest-test.sh" "$here"/fio/*.fio)
key=$(
    {
        echo "$kver $(pkgver "$kpkg")"
        for p in busybox-static fio e2fsprogs util-linux libc6; do echo "$p $(pkgver "$p")"; done
        cat "${guest_files[@]}"
    } | sha256sum | cut -c1-16
)
out=$cache_root/$key
if [[ -f $out/.complete ]]; then
    touch "$out" # last use, for the pruning below
    log "cached: $out"
    echo "$out"
    exit 0
fi

mkdir -p "$cache_root"
exec 9>"$cache_root/.lock"
flock 9
if [[ -f $out/.complete ]]; then # built by a concurrent caller while we waited
    echo "$out"
    exit 0
fi
t0=$(date +%s.%N)
work=$(mktemp -d "$cache_root/.build.XXXXXX")
trap 'rm -rf "$work"' EXIT

# --- kernel: bzImage -> vmlinux (ELF) -------------------------------------------
# A bzImage is real-mode setup sectors followed by the protected-mode part, whose
# compressed payload (the ELF vmlinux, stripped) is located by the boot protocol
# header: setup_sects at 0x1f1, payload_offset at 0x248 and payload_length at 0x24c
# (boot protocol >= 2.08). QEMU boots that ELF through its PVH note.
le32() { od -An -t u4 -j "$2" -N 4 "$1" | tr -d ' '; }
u8() { od -An -t u1 -j "$2" -N 1 "$1" | tr -d ' '; }
[[ $(dd if="$vmlinuz" bs=1 skip=514 count=4 status=none) == HdrS ]] || die "$vmlinuz is not a bzImage"
setup_sects=$(u8 "$vmlinuz" $((0x1f1)))
((setup_sects == 0)) && setup_sects=4
poff=$(($(le32 "$vmlinuz" $((0x248))) + (setup_sects + 1) * 512))
plen=$(le32 "$vmlinuz" $((0x24c)))
magic=$(od -An -t x1 -j "$poff" -N 6 "$vmlinuz" | tr -d ' ')
case $magic in
    fd377a585a00) dec=(xz -dc) ;;
    1f8b*) dec=(gzip -dc) ;;
    28b52ffd*) dec=(zstd -dcq) ;;
    5d0000*) dec=(xz -dc --format=lzma) ;;
    *) die "unknown kernel payload compression (magic $magic)" ;;
esac
# The payload may carry a trailing size word; xz/zstd/gzip stop at the stream end
# and only warn about trailing garbage, so accept that.
dd if="$vmlinuz" iflag=skip_bytes,count_bytes skip="$poff" count="$plen" status=none of="$work/payload"
"${dec[@]}" <"$work/payload" >"$work/vmlinux" 2>/dev/null || true
rm -f "$work/payload"
[[ $(od -An -t x1 -N 4 "$work/vmlinux" | tr -d ' ') == 7f454c46 ]] || die "extracted kernel is not an ELF file"

# --- initramfs -------------------------------------------------------------------
root=$work/root
mkdir -p "$root"/usr/{bin,sbin,lib,lib64} "$root"/{dev,proc,sys,tmp,mnt,etc,run}
ln -s usr/bin "$root/bin"
ln -s usr/sbin "$root/sbin"
ln -s usr/lib "$root/lib"
ln -s usr/lib64 "$root/lib64"

# Copy a file to the same path in the guest (resolving symlinks on the way).
copy_in() {
    local f=$1 dst real
    real=$(readlink -f "$f")
    dst=$root$(realpath -s "$f")
    # Paths under /lib, /bin... land in usr/ through the symlinks above.
    mkdir -p "$(dirname "$dst")"
    [[ -e $dst ]] || cp "$real" "$dst"
}
# Copy an executable and every shared library it loads.
copy_bin() {
    local b=$1 lib
    copy_in "$b"
    while read -r lib; do
        [[ -n $lib ]] && copy_in "$lib"
    done < <(ldd "$b" 2>/dev/null | awk '/=> \// {print $3} /^[[:space:]]*\/[^ ]*ld-linux/ {print $1}')
}

cp /bin/busybox "$root/usr/bin/busybox"
for applet in $("$root/usr/bin/busybox" --list); do
    [[ -e $root/usr/bin/$applet ]] || ln -s busybox "$root/usr/bin/$applet"
done
# Real tools (found first in the guest's PATH, /usr/sbin before /usr/bin).
for b in /usr/bin/fio /sbin/mke2fs /sbin/e2fsck /sbin/blkdiscard /sbin/blockdev; do
    copy_bin "$b"
done
ln -sf mke2fs "$root/usr/sbin/mkfs.ext4"
ln -sf e2fsck "$root/usr/sbin/fsck.ext4"
[[ -f /etc/mke2fs.conf ]] && cp /etc/mke2fs.conf "$root/etc/"

# Modules, with their dependencies from modules.dep, in load order.
declare -A seen=()
order=()
add_mod() { # path relative to $moddir
    local m=$1 line deps d
    [[ -n ${seen[$m]:-} ]] && return 0
    seen[$m]=1
    line=$(grep -m1 "^$m:" "$moddir/modules.dep") || die "module $m not in modules.dep"
    deps=${line#*:}
    # modules.dep lists dependencies so that the last must be loaded first.
    for d in $(echo "$deps" | tr ' ' '\n' | tac); do add_mod "$d"; done
    order+=("$m")
}
for name in virtio_pci virtio_blk crc32c_generic crc32c-intel ext4; do
    path=$(modinfo -k "$kver" -n "$name" 2>/dev/null) || continue # crc32c-intel may be built in
    [[ $path == /* ]] || continue                                 # "(builtin)"
    add_mod "${path#"$moddir"/}"
done
mkdir -p "$root/usr/lib/modules"
for m in "${order[@]}"; do
    mkdir -p "$root/usr/lib/modules/$(dirname "$m")"
    cp "$moddir/$m" "$root/usr/lib/modules/$m"
    echo "/lib/modules/$m" >>"$root/etc/modules.load"
done

install -m 0755 "$here/init" "$root/init"
install -m 0755 "$here/guest-test.sh" "$root/usr/bin/guest-test"
mkdir -p "$root/etc/fio"
cp "$here"/fio/*.fio "$root/etc/fio/"
echo "$kver" >"$root/etc/kver"

(cd "$root" && find . -print0 | LC_ALL=C sort -z | cpio --null -o -H newc --quiet --reproducible) |
    gzip -1 >"$work/initramfs.cpio.gz"

mkdir -p "$out.tmp"
mv "$work/vmlinux" "$work/initramfs.cpio.gz" "$out.tmp/"
echo "$kver" >"$out.tmp/kver"
touch "$out.tmp/.complete"
rm -rf "$out"
mv "$out.tmp" "$out"
# Drop guests that no caller has used for two weeks (older package versions).
find "$cache_root" -mindepth 1 -maxdepth 1 -type d -name '[0-9a-f]*' ! -name "$key" -mtime +14 \
    -exec rm -rf {} + 2>/dev/null || true
t1=$(date +%s.%N)
log "built $out in $(awk -v a="$t0" -v b="$t1" 'BEGIN{printf "%.1f", b-a}')s ($(du -sh "$out/initramfs.cpio.gz" | cut -f1) initramfs, kernel $kver)"
echo "$out"
