#!/bin/sh
# shellcheck disable=SC2317 # steps are called indirectly as "step_$s"
# The test steps run inside the guest. Expected values and the list of steps come
# from the kernel command line as e2e.NAME=VALUE (see tests/guest_e2e.rs):
#   e2e.steps    comma-separated steps: props fio discard fs ro fio_bg
#   e2e.size     disk size in bytes            e2e.queues  virtqueues (= vCPUs)
#   e2e.lbs      logical block size            e2e.ro      0 or 1
#   e2e.discard_max / e2e.wz_max  expected queue limits in bytes; "nonzero", "0" or "any"
#   e2e.fio_size per-job size (e.g. 64M)       e2e.fio_bs  bsrange (e.g. 4k-128k)
#   e2e.fio_engine libaio or io_uring          e2e.fio_job job file in /etc/fio
#   e2e.fio_rate per-job rate cap (crash.fio; 0 = none)
#   e2e.serial   expected /sys/block/vda/serial (unchecked when absent)
# Every step prints "E2E-STEP name BEGIN" and "E2E-STEP name OK|FAIL secs", so the
# host can act while a step runs (kill the backend under fio, for instance).
export PATH=/usr/sbin:/usr/bin
# busybox sh runs its own applets before searching PATH: call the util-linux and
# e2fsprogs tools by their full path where the applet differs (blkdiscard -z).
DEV=/dev/vda
SYS=/sys/block/vda

arg() { # name default
    v=$(tr ' ' '\n' </proc/cmdline | sed -n "s/^e2e\.$1=//p" | tail -n1)
    echo "${v:-$2}"
}
now() { cut -d' ' -f1 /proc/uptime; }
fail() { echo "E2E: FAIL: $*"; return 1; }
check_eq() { # what got want
    if [ "$2" = "$3" ]; then echo "E2E: ok: $1 = $2"; else fail "$1 = $2, want $3"; fi
}
check_limit() { # what got want(nonzero|0|any|number)
    case $3 in
        any) echo "E2E: ok: $1 = $2 (not checked)" ;;
        nonzero) if [ "$2" -gt 0 ]; then echo "E2E: ok: $1 = $2 (> 0)"; else fail "$1 = $2, want > 0"; fi ;;
        *) check_eq "$1" "$2" "$3" ;;
    esac
}

STEPS=$(arg steps props)
SIZE=$(arg size "")
QUEUES=$(arg queues 1)
LBS=$(arg lbs 512)
RO=$(arg ro 0)
DISCARD_MAX=$(arg discard_max any)
WZ_MAX=$(arg wz_max any)
SERIAL=$(arg serial "")
export FIO_DEV="$DEV"
FIO_SIZE=$(arg fio_size 32M)
FIO_BS=$(arg fio_bs 4k-128k)
FIO_ENGINE=$(arg fio_engine libaio)
FIO_JOB=$(arg fio_job verify)
FIO_RATE=$(arg fio_rate 0)
export FIO_SIZE FIO_BS FIO_ENGINE FIO_RATE
export FIO_JOBS="$QUEUES" FIO_CPUS="0-$((QUEUES - 1))"

i=0
while [ ! -b "$DEV" ]; do
    i=$((i + 1))
    if [ $i -gt 200 ]; then
        fail "$DEV did not appear"
        ls /sys/block
        exit 1
    fi
    sleep 0.1
done
echo "E2E-DISK uptime=$(now)"

step_props() {
    rc=0
    for f in size ro queue/logical_block_size queue/physical_block_size queue/minimum_io_size \
        queue/optimal_io_size queue/max_segments queue/max_hw_sectors_kb queue/max_segment_size \
        queue/discard_max_bytes queue/discard_granularity queue/write_zeroes_max_bytes \
        queue/write_cache queue/rotational serial; do
        [ -r "$SYS/$f" ] && echo "E2E: sysfs $f = $(cat "$SYS/$f")"
    done
    [ -n "$SIZE" ] && { check_eq size "$(blockdev --getsize64 "$DEV")" "$SIZE" || rc=1; }
    check_eq "mq queues" "$(find "$SYS/mq" -mindepth 1 -maxdepth 1 -type d | wc -l)" "$QUEUES" || rc=1
    check_eq "logical block size" "$(cat "$SYS"/queue/logical_block_size)" "$LBS" || rc=1
    check_eq "read-only (sysfs)" "$(cat "$SYS"/ro)" "$RO" || rc=1
    check_eq "read-only (blockdev --getro)" "$(blockdev --getro "$DEV")" "$RO" || rc=1
    check_limit discard_max_bytes "$(cat "$SYS"/queue/discard_max_bytes)" "$DISCARD_MAX" || rc=1
    check_limit write_zeroes_max_bytes "$(cat "$SYS"/queue/write_zeroes_max_bytes)" "$WZ_MAX" || rc=1
    [ -n "$SERIAL" ] && { check_eq serial "$(cat "$SYS"/serial)" "$SERIAL" || rc=1; }
    return "$rc"
}

run_fio() { # job-file
    echo "E2E: fio $1: jobs=$FIO_JOBS cpus=$FIO_CPUS size=$FIO_SIZE/job bs=$FIO_BS engine=$FIO_ENGINE"
    fio --eta=never --output=/tmp/fio.out "/etc/fio/$1.fio"
    rc=$?
    cat /tmp/fio.out
    # With verify_backlog (crash.fio) fio's read numbers cover only the final verify
    # pass and mean nothing: report the writes alone there.
    dirs='read|write'
    [ "$1" = crash ] && dirs='write'
    grep -E "^ +($dirs): IOPS=" /tmp/fio.out | sed 's/^ */E2E-FIO /'
    grep -iE "^ +($dirs): bw=" /tmp/fio.out | sed 's/^ */E2E-FIO /'
    if grep -qE 'verify: bad|crc32c: verify failed|err= *[1-9]' /tmp/fio.out; then
        fail "fio reported errors"
        return 1
    fi
    [ "$rc" -eq 0 ] || fail "fio exited $rc"
}
step_fio() { run_fio "$FIO_JOB"; }

step_discard() {
    rc=0
    /usr/sbin/blkdiscard "$DEV" || { fail "blkdiscard of the whole disk"; rc=1; }
    # Write a pattern, zero part of it with BLKZEROOUT (REQ_OP_WRITE_ZEROES when the
    # device has it) and read zeros back.
    dd if=/dev/urandom of=/tmp/pat bs=1M count=4 2>/dev/null
    dd if=/tmp/pat of="$DEV" bs=1M count=4 oflag=direct 2>/dev/null || { fail "pattern write"; rc=1; }
    /usr/sbin/blkdiscard -z -o 0 -l 2097152 "$DEV" || { fail "blkdiscard -z"; rc=1; }
    dd if="$DEV" of=/tmp/back bs=1M count=4 iflag=direct 2>/dev/null
    head -c 2097152 /dev/zero >/tmp/want
    tail -c 2097152 /tmp/pat >>/tmp/want
    if cmp -s /tmp/want /tmp/back; then echo "E2E: ok: write-zeroes range reads back as zeros, rest intact"; else fail "data after blkdiscard -z"; rc=1; fi
    return "$rc"
}

step_fs() {
    mkfs.ext4 -F -q "$DEV" || { fail mkfs.ext4; return 1; }
    mount -t ext4 "$DEV" /mnt || { fail mount; return 1; }
    mkdir -p /mnt/d
    for n in 1 2 3 4 5 6 7 8; do
        dd if=/dev/urandom of=/mnt/d/f"$n" bs=1M count=2 2>/dev/null || { fail "write f$n"; return 1; }
    done
    (cd /mnt/d && sha256sum f*) >/tmp/sums
    sync
    umount /mnt || { fail umount; return 1; }
    mount -t ext4 -o ro "$DEV" /mnt || { fail "mount again"; return 1; }
    (cd /mnt/d && sha256sum -c /tmp/sums >/dev/null) || { fail "file contents after remount"; umount /mnt; return 1; }
    umount /mnt
    e2fsck -f -n "$DEV" || { fail "e2fsck found problems"; return 1; }
    echo "E2E: ok: ext4 mkfs/mount/write/sync/umount/remount/fsck"
}

step_ro() {
    rc=0
    # The host wrote "VUBLK-E2E-RO" at the start and at the last 4 KiB of the image.
    m1=$(dd if="$DEV" bs=4096 count=1 iflag=direct 2>/dev/null | head -c 12)
    last=$(($(blockdev --getsize64 "$DEV") / 4096 - 1))
    m2=$(dd if="$DEV" bs=4096 skip="$last" count=1 iflag=direct 2>/dev/null | head -c 12)
    check_eq "magic at 0" "$m1" VUBLK-E2E-RO || rc=1
    check_eq "magic at end" "$m2" VUBLK-E2E-RO || rc=1
    dd if="$DEV" of=/dev/null bs=1M iflag=direct 2>/dev/null || { fail "full read"; rc=1; }
    if dd if=/dev/zero of="$DEV" bs=4096 count=1 oflag=direct 2>/tmp/dd.err; then
        fail "dd write to a read-only disk succeeded"
        rc=1
    else
        echo "E2E: ok: dd write refused: $(tail -n1 /tmp/dd.err)"
    fi
    if fio --name=w --filename="$DEV" --rw=write --bs=4k --size=64k --direct=1 --ioengine=psync >/tmp/fio.err 2>&1; then
        fail "fio write to a read-only disk succeeded"
        rc=1
    else
        echo "E2E: ok: fio write refused: $(grep -m1 -iE 'error|denied|read-only' /tmp/fio.err)"
    fi
    if blockdev --setrw "$DEV" 2>/dev/null && dd if=/dev/zero of="$DEV" bs=4096 count=1 oflag=direct 2>/dev/null; then
        fail "write succeeded after blockdev --setrw"
        rc=1
    else
        echo "E2E: ok: still read-only after blockdev --setrw"
    fi
    return "$rc"
}

rc=0
for s in $(echo "$STEPS" | tr ',' ' '); do
    echo "E2E-STEP $s BEGIN uptime=$(now)"
    t0=$(now)
    if "step_$s"; then
        echo "E2E-STEP $s OK $(awk -v a="$t0" -v b="$(now)" 'BEGIN{printf "%.1f", b-a}')s"
    else
        echo "E2E-STEP $s FAIL $(awk -v a="$t0" -v b="$(now)" 'BEGIN{printf "%.1f", b-a}')s"
        rc=1
        break
    fi
done
exit $rc
