#!/bin/busybox sh
# /init of the measurement guest (built into the initramfs by scripts/build-guest.sh).
#
# It loads the virtio modules, finds the virtio-blk disk, and reports on the second serial
# port (ttyS1, only this script writes there, so kernel messages never interleave) between
# marker lines that crates/guestvm parses:
#   @@GUESTVM BEGIN facts ... @@GUESTVM END facts          key=value view of the disk (sysfs)
#   @@GUESTVM BEGIN cmd NAME ... @@GUESTVM END cmd NAME rc=N   one per command of the run
#   @@GUESTVM BEGIN fio ... @@GUESTVM END fio rc=N         fio's JSON output
#   @@GUESTVM BEGIN fio-log ... @@GUESTVM END fio-log      fio's stderr
#   @@GUESTVM ERROR message                                the run could not go on
#   @@GUESTVM REBOOT                                       the guest reboots; the next boot's
#                                                          sections follow
#   @@GUESTVM DONE                                         the last line of a complete run
# The per-run archive (appended by scripts/run-vm.sh) holds /job: config (shell variables),
# job.fio (optional), pre/* and post/* (shell snippets run before / after fio, in name order).
# With REBOOTS=N in the config, the guest reboots N times (QEMU resets the machine, the
# vhost-user connection stays) and runs everything again on each boot, with REBOOT_FIO_ARGS
# instead of FIO_ARGS after the first. Then the guest powers off; /init never returns (PID 1
# exiting would panic the kernel).

export PATH=/usr/sbin:/usr/bin:/sbin:/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /tmp /dev/pts /dev/shm
mount -t tmpfs tmpfs /tmp

out=/dev/ttyS1
console=/dev/ttyS0

say() { echo "guest: $*" >"$console"; }

halt_now() {
    sync
    poweroff -f
    # Not reached unless poweroff failed; never let PID 1 exit.
    while :; do sleep 60; done
}

# Sends a file (or stdin) to the results port. Opening and closing the tty per section makes
# the close wait until the UART has sent everything.
emit() {
    cat "$@" >"$out"
}

fail() {
    say "ERROR: $*"
    echo "@@GUESTVM ERROR $*" | emit
    halt_now
}

if [ ! -c "$out" ]; then
    say "no $out: results cannot be reported"
    halt_now
fi
stty -F "$out" raw -echo 2>/dev/null

for m in $(cat /lib/modules/load-order); do
    insmod "/lib/modules/$m.ko" || fail "insmod $m failed"
done

case " $(cat /proc/cmdline) " in
*" guestvm.probe "*)
    # KVM probe boot (scripts/run-vm.sh): reaching this line proves the guest runs.
    echo "@@GUESTVM PROBE-OK" | emit
    halt_now
    ;;
esac

DISK=vda
FIO_ARGS=
REBOOTS=0
REBOOT_FIO_ARGS=
[ -f /job/config ] && . /job/config

# Boots are counted in CMOS RAM, which QEMU zeroes at power-on but keeps across a machine
# reset: byte 0x7e holds the index of this boot, byte 0x7d the index + 1 of the last boot
# that got here. QEMU's PC CMOS layout and SeaBIOS use bytes up to 0x5f only.
# Prints the byte of value $1 (an octal escape built into printf's format on purpose).
# shellcheck disable=SC2059
byte() { printf "\\$(printf %03o "$1")"; }
cmos_select() { byte "$1" | dd of=/dev/port bs=1 seek=112 count=1 conv=notrunc 2>/dev/null; }
cmos_read() {
    cmos_select "$1"
    dd if=/dev/port bs=1 skip=113 count=1 2>/dev/null | od -An -tu1 | tr -d ' \n'
}
cmos_write() {
    cmos_select "$1"
    byte "$2" | dd of=/dev/port bs=1 seek=113 count=1 conv=notrunc 2>/dev/null
}
boot=0
if [ "$REBOOTS" -gt 0 ]; then
    boot=$(cmos_read 126)
    # A boot that starts twice means the machine reset without our asking (a panic).
    [ "$(cmos_read 125)" = $((boot + 1)) ] && fail "unexpected reboot during boot $boot"
    cmos_write 125 $((boot + 1))
    [ "$boot" -gt 0 ] && FIO_ARGS=$REBOOT_FIO_ARGS
fi

dev=/dev/$DISK
sysdir=/sys/block/$DISK
i=0
while [ ! -b "$dev" ] || [ ! -d "$sysdir" ]; do
    i=$((i + 1))
    [ $i -gt 200 ] && fail "no disk $dev after 20 s"
    sleep 0.1
done

read_attr() { cat "$1" 2>/dev/null || echo "unreadable"; }

{
    echo "@@GUESTVM BEGIN facts"
    echo "disk=$DISK"
    echo "boot=$boot"
    echo "kernel=$(uname -r)"
    echo "vcpus=$(nproc)"
    echo "uptime_at_facts=$(cut -d' ' -f1 /proc/uptime)"
    echo "size_sectors=$(read_attr $sysdir/size)"
    echo "size_bytes=$(blockdev --getsize64 "$dev" 2>/dev/null || echo unreadable)"
    echo "ro=$(read_attr $sysdir/ro)"
    # Reading the serial makes virtio_blk send a GET_ID request.
    echo "serial=$(read_attr $sysdir/serial)"
    echo "hw_queues=$(ls -d $sysdir/mq/*/ 2>/dev/null | wc -l)"
    for a in logical_block_size physical_block_size minimum_io_size optimal_io_size \
        discard_granularity discard_max_bytes discard_max_hw_bytes max_discard_segments \
        write_zeroes_max_bytes max_segments max_segment_size max_hw_sectors_kb max_sectors_kb \
        write_cache rotational nr_requests; do
        echo "$a=$(read_attr $sysdir/queue/$a)"
    done
    echo "@@GUESTVM END facts"
} >/tmp/facts
emit /tmp/facts

# Runs every snippet of a /job subfolder, each between markers with its exit code.
run_snippets() {
    for f in /job/"$1"/*; do
        [ -f "$f" ] || continue
        name=${f##*/}
        say "running $1/$name"
        # guest-env.sh makes the real blkdiscard win over busybox's applet of that name.
        sh -c '. /lib/guest-env.sh; . "$0"' "$f" >/tmp/cmd.out 2>&1 </dev/null
        rc=$?
        {
            echo "@@GUESTVM BEGIN cmd $name"
            cat /tmp/cmd.out
            # Output without a final newline must not swallow the end marker.
            [ -s /tmp/cmd.out ] && [ "$(tail -c1 /tmp/cmd.out | od -An -c | tr -d ' ')" != '\n' ] && echo
            echo "@@GUESTVM END cmd $name rc=$rc"
        } | emit
    done
}

run_snippets pre

if [ -f /job/job.fio ]; then
    say "running fio $FIO_ARGS"
    # shellcheck disable=SC2086 # FIO_ARGS is a word list on purpose
    fio --output-format=json --output=/tmp/fio.json $FIO_ARGS /job/job.fio >/tmp/fio.log 2>&1
    rc=$?
    {
        echo "@@GUESTVM BEGIN fio"
        cat /tmp/fio.json 2>/dev/null
        echo
        echo "@@GUESTVM END fio rc=$rc"
        echo "@@GUESTVM BEGIN fio-log"
        cat /tmp/fio.log
        echo
        echo "@@GUESTVM END fio-log"
    } | emit
fi

run_snippets post

if [ "$boot" -lt "$REBOOTS" ]; then
    cmos_write 126 $((boot + 1))
    echo "@@GUESTVM REBOOT" | emit
    say "rebooting"
    sync
    reboot -f
    while :; do sleep 60; done
fi

echo "@@GUESTVM DONE" | emit
say "done"
halt_now
