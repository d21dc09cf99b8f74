#!/usr/bin/env bash
# Boot a QEMU guest whose disk is served by vublk over vhost-user-blk.
#
# This is exactly the command line the end-to-end tests (tests/guest_e2e.rs) run;
# they set the variables below. Start vublk first, for example:
#   vublk --socket /run/vublk.sock --disk disk.img --num-queues 2
# then:
#   VUBLK_SOCKET=/run/vublk.sock KERNEL=vmlinux INITRD=initrd.img \
#   APPEND="console=ttyS0 root=/dev/vda rw" NUM_QUEUES=2 examples/qemu.sh
# or boot a disk image of your own and add vublk's disk as the second disk:
#   VUBLK_SOCKET=/run/vublk.sock examples/qemu.sh -drive file=os.qcow2,if=virtio
#
# Variables:
#   VUBLK_SOCKET  vublk's socket (required)
#   NUM_QUEUES    virtqueues of the disk (default 1); the guest gets this many vCPUs
#                 too, since Linux creates at most one virtio-blk queue per vCPU
#   QUEUE_SIZE    descriptors per virtqueue (default 256, vublk's default --queue-size;
#                 keep the two equal: vublk advertises seg_max = its queue size - 2,
#                 and QEMU's own default is 128)
#   SMP           vCPUs (default NUM_QUEUES)
#   MEM           guest RAM (default 1G). vhost-user needs guest RAM that the backend
#                 can map: a memfd shared memory backend (share=on)
#   MEM_PATH      a hugetlbfs mount: back guest RAM with huge pages there instead
#                 (memory-backend-file,mem-path=...,share=on)
#   KERNEL INITRD APPEND  direct kernel boot (optional). KERNEL may be an
#                 uncompressed ELF vmlinux, which QEMU boots through PVH (fast)
#   ACCEL         kvm, tcg or auto (default): kvm when /dev/kvm is usable and the
#                 host is not a PVM nested setup (/sys/module/kvm_pvm), whose kvm
#                 runs only PVM-enabled guest kernels; otherwise multi-threaded TCG
#   SERIAL        where the serial console goes (default stdio; e.g. file:guest.log)
#   QEMU          the emulator binary (default qemu-system-x86_64)
# Any arguments are appended to the QEMU command line.
set -euo pipefail

: "${VUBLK_SOCKET:?set VUBLK_SOCKET to the socket vublk listens on}"
NUM_QUEUES=${NUM_QUEUES:-1}
QUEUE_SIZE=${QUEUE_SIZE:-256}
SMP=${SMP:-$NUM_QUEUES}
MEM=${MEM:-1G}
ACCEL=${ACCEL:-auto}
SERIAL=${SERIAL:-stdio}
QEMU=${QEMU:-qemu-system-x86_64}

if [[ $ACCEL == auto ]]; then
    if [[ -r /dev/kvm && -w /dev/kvm && ! -e /sys/module/kvm_pvm ]]; then
        ACCEL=kvm
    else
        ACCEL=tcg
    fi
fi
case $ACCEL in
    kvm) accel=(-accel kvm -cpu host) ;;
    tcg) accel=(-accel "tcg,thread=multi" -cpu max) ;;
    *) echo "qemu.sh: ACCEL must be kvm, tcg or auto" >&2; exit 2 ;;
esac

if [[ -n ${MEM_PATH:-} ]]; then
    membackend="memory-backend-file,id=mem,size=$MEM,mem-path=$MEM_PATH,share=on"
else
    membackend="memory-backend-memfd,id=mem,size=$MEM,share=on"
fi

boot=()
[[ -n ${KERNEL:-} ]] && boot+=(-kernel "$KERNEL")
[[ -n ${INITRD:-} ]] && boot+=(-initrd "$INITRD")
[[ -n ${APPEND:-} ]] && boot+=(-append "$APPEND")

exec "$QEMU" \
    -name vublk-guest \
    -machine q35 "${accel[@]}" \
    -smp "$SMP" \
    -m "$MEM" \
    -object "$membackend" \
    -numa node,memdev=mem \
    -nodefaults -no-user-config -display none -no-reboot \
    -serial "$SERIAL" \
    "${boot[@]}" \
    -chardev socket,id=vublk0,path="$VUBLK_SOCKET",reconnect-ms=1000 \
    -device vhost-user-blk-pci,chardev=vublk0,num-queues="$NUM_QUEUES",queue-size="$QUEUE_SIZE" \
    "$@"
