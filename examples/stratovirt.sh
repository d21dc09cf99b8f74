#!/usr/bin/env bash
# Boot a StratoVirt standard VM (q35, UEFI) with a vublk disk as vhost-user-blk-pci.
#
# StratoVirt supports vhost-user-blk-pci on standard VMs only (not microvm). Guest
# memory must be shareable with vublk: -machine ...,mem-share=on (optionally backed
# by hugepages with -mem-path). This example is not run by the tests (StratoVirt is
# not packaged for Debian); the QEMU example (qemu.sh) is.
#
# Start vublk first, e.g.:
#   vublk --socket /run/vublk.sock --disk data.img --num-queues 2
# then:
#   VUBLK_SOCKET=/run/vublk.sock KERNEL=std-vmlinuz ROOTFS=openEuler.img examples/stratovirt.sh
#
# Variables:
#   VUBLK_SOCKET  vublk's socket (required)
#   KERNEL        guest kernel (PE or bzImage), ROOTFS  raw root disk image (required)
#   NUM_QUEUES    virtqueues of the vublk disk (default 1); SMP defaults to it
#   MEM           guest RAM (default 1G)
#   HUGEPAGES     a hugetlbfs mount to back guest RAM (optional, e.g. /dev/hugepages)
#   OVMF_CODE OVMF_VARS  UEFI firmware (Debian's ovmf package paths by default)
#   APPEND        kernel command line
#   STRATOVIRT    the binary (default stratovirt)
# Any arguments are appended.
set -euo pipefail

: "${VUBLK_SOCKET:?set VUBLK_SOCKET to the socket vublk listens on}"
: "${KERNEL:?set KERNEL to the guest kernel}"
: "${ROOTFS:?set ROOTFS to the root disk image}"
NUM_QUEUES=${NUM_QUEUES:-1}
SMP=${SMP:-$NUM_QUEUES}
MEM=${MEM:-1G}
OVMF_CODE=${OVMF_CODE:-/usr/share/OVMF/OVMF_CODE_4M.fd}
OVMF_VARS=${OVMF_VARS:-/usr/share/OVMF/OVMF_VARS_4M.fd}
APPEND=${APPEND:-console=ttyS0 reboot=k panic=1 root=/dev/vda rw}
STRATOVIRT=${STRATOVIRT:-stratovirt}

mem=()
[[ -n ${HUGEPAGES:-} ]] && mem=(-mem-path "$HUGEPAGES")

# The firmware's variable store is written by the VM: give it a private copy.
vars=$(mktemp --suffix=.fd)
cp "$OVMF_VARS" "$vars"
trap 'rm -f "$vars"' EXIT

"$STRATOVIRT" \
    -machine q35,mem-share=on \
    -smp "$SMP" \
    -m "$MEM" \
    "${mem[@]}" \
    -kernel "$KERNEL" \
    -append "$APPEND" \
    -drive file="$OVMF_CODE",if=pflash,unit=0,readonly=true \
    -drive file="$vars",if=pflash,unit=1 \
    -drive file="$ROOTFS",id=rootfs,readonly=off,direct=off \
    -device virtio-blk-pci,drive=rootfs,id=blk0,bus=pcie.0,addr=0x2,bootindex=0 \
    -chardev socket,id=vublk0,path="$VUBLK_SOCKET" \
    -device vhost-user-blk-pci,id=blk1,chardev=vublk0,bus=pcie.0,addr=0x3,num-queues="$NUM_QUEUES" \
    -serial stdio \
    "$@"
