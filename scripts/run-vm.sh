#!/usr/bin/env bash
# Boots the measurement guest (scripts/build-guest.sh) with QEMU against a vhost-user-blk
# server's socket, runs one job in it and brings the results back.
#
# Usage: scripts/run-vm.sh --socket SOCK [--job FIO_JOB_FILE] [--fio-args "ARGS"]
#          [--pre NAME=SHELL]... [--cmd NAME=SHELL]... [--queues N] [--vcpus N] [--mem 512M]
#          [--timeout SECONDS] [--accel auto|tcg|kvm] [--guest-dir DIR] [--console-log FILE]
#          [--reboots N] [--reboot-fio-args "ARGS"] [--reconnect SECONDS] [--no-build]
#   --job     fio job file run in the guest (the disk is /dev/vda) with --output-format=json
#   --pre     shell snippet run in the guest before fio; --cmd: after fio (both repeatable,
#             run in the order given, each reported with its output and exit code)
#   --reboots the guest reboots N times (a machine reset: the vhost-user connection stays and
#             the device is reset and set up again), running everything again on each boot,
#             with --reboot-fio-args instead of --fio-args after the first boot
#   --reconnect QEMU reconnects to the socket this many seconds after the server went away
#             (chardev reconnect=): the guest survives a server restart
#   --accel   auto: KVM only where a short probe boot showed a stock guest runs under it
#             (cached in the guest dir), else TCG
#
# stdout: a summary (accel=tcg|kvm, status=ok|timeout|panic|qemu|guest-error|missing-output|fio,
# reason=, elapsed=SECONDS), a line "@@GUESTVM RESULTS", then what the guest reported between
# @@GUESTVM markers (see scripts/guest-init.sh). stderr: progress, and on failure the reason and the console's tail.
# Exit: 0 when the run completed; 1 on a timeout, a guest panic, a guest error, fio errors or
# missing output; 2 on bad arguments.
set -euo pipefail

script_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo_root=$(cd "$script_dir/.." && pwd)

socket='' job='' fio_args='' queues=1 vcpus=1 mem=512M timeout_s=300 accel=auto
guest_dir=$repo_root/build/guest console_log='' build=1 reboots=0 reboot_fio_args='' reconnect=0
pre_cmds=() post_cmds=()

log() { echo "run-vm: $*" >&2; }
usage() {
    echo "run-vm: $*" >&2
    echo "usage: run-vm.sh --socket SOCK [--job FILE] [--fio-args ARGS] [--pre NAME=SH]... [--cmd NAME=SH]... [--queues N] [--vcpus N] [--mem SIZE] [--timeout S] [--accel auto|tcg|kvm] [--guest-dir DIR] [--console-log FILE] [--reboots N] [--reboot-fio-args ARGS] [--reconnect S] [--no-build]" >&2
    exit 2
}
need_value() { [[ $# -ge 2 ]] || usage "$1 needs a value"; }

while [[ $# -gt 0 ]]; do
    case $1 in
    --socket) need_value "$@"; socket=$2; shift 2 ;;
    --job) need_value "$@"; job=$2; shift 2 ;;
    --fio-args) need_value "$@"; fio_args=$2; shift 2 ;;
    --pre) need_value "$@"; pre_cmds+=("$2"); shift 2 ;;
    --cmd) need_value "$@"; post_cmds+=("$2"); shift 2 ;;
    --queues) need_value "$@"; queues=$2; shift 2 ;;
    --vcpus) need_value "$@"; vcpus=$2; shift 2 ;;
    --mem) need_value "$@"; mem=$2; shift 2 ;;
    --timeout) need_value "$@"; timeout_s=$2; shift 2 ;;
    --accel) need_value "$@"; accel=$2; shift 2 ;;
    --guest-dir) need_value "$@"; guest_dir=$2; shift 2 ;;
    --console-log) need_value "$@"; console_log=$2; shift 2 ;;
    --reboots) need_value "$@"; reboots=$2; shift 2 ;;
    --reboot-fio-args) need_value "$@"; reboot_fio_args=$2; shift 2 ;;
    --reconnect) need_value "$@"; reconnect=$2; shift 2 ;;
    --no-build) build=0; shift ;;
    -h | --help) usage "help" ;;
    *) usage "unknown argument $1" ;;
    esac
done

[[ -n $socket ]] || usage "--socket is required"
[[ -S $socket ]] || usage "$socket is not a unix socket (is the server running?)"
[[ -z $job || -f $job ]] || usage "job file $job not found"
[[ -n $job || ${#pre_cmds[@]} -gt 0 || ${#post_cmds[@]} -gt 0 ]] || usage "nothing to run: give --job, --pre or --cmd"
[[ $queues =~ ^[1-9][0-9]*$ ]] || usage "--queues must be a positive integer"
[[ $vcpus =~ ^[1-9][0-9]*$ ]] || usage "--vcpus must be a positive integer"
[[ $reboots =~ ^[0-9]$ ]] || usage "--reboots must be 0 to 9"
[[ $reconnect =~ ^[0-9]+$ ]] || usage "--reconnect must be a number of seconds"
[[ $timeout_s =~ ^[1-9][0-9]*$ ]] || usage "--timeout must be a positive number of seconds"
[[ $mem =~ ^[1-9][0-9]*[MG]$ ]] || usage "--mem must look like 512M or 1G"
case $accel in auto | tcg | kvm) ;; *) usage "--accel must be auto, tcg or kvm" ;; esac
command -v qemu-system-x86_64 >/dev/null || { log "ERROR: qemu-system-x86_64 not found (apt-get install qemu-system-x86)"; exit 1; }

if ((build)); then
    "$script_dir/build-guest.sh" "$guest_dir" || { log "ERROR: building the guest failed"; exit 1; }
fi
for f in vmlinuz initramfs.cpio; do
    [[ -f $guest_dir/$f ]] || { log "ERROR: $guest_dir/$f missing (run scripts/build-guest.sh)"; exit 1; }
done

work=$(mktemp -d "${TMPDIR:-/tmp}/run-vm.XXXXXX")
qemu_pid=
cleanup() {
    [[ -n $qemu_pid ]] && kill -KILL "$qemu_pid" 2>/dev/null
    rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 143' TERM INT

# Boots QEMU and waits for it, at most $1 seconds. Args after the first go to QEMU.
# Sets boot_rc (124 on timeout) and boot_seconds.
boot() {
    local limit=$1 start
    shift
    start=$EPOCHREALTIME
    qemu-system-x86_64 "$@" 2>"$work/qemu.err" &
    qemu_pid=$!
    local waited=0
    while kill -0 "$qemu_pid" 2>/dev/null; do
        if ((waited >= limit * 10)); then
            kill -KILL "$qemu_pid" 2>/dev/null
            wait "$qemu_pid" 2>/dev/null || true
            qemu_pid=
            boot_rc=124
            boot_seconds=$(awk -v a="$start" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.1f", b - a }')
            return
        fi
        sleep 0.1
        waited=$((waited + 1))
    done
    boot_rc=0
    wait "$qemu_pid" || boot_rc=$?
    qemu_pid=
    boot_seconds=$(awk -v a="$start" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.1f", b - a }')
}

# Arguments shared by the probe and the real boot: the console and the results port are files.
base_args() {
    local console_file=$1 results_file=$2
    # A guest that reboots on purpose needs QEMU to reset it; otherwise a reboot (such as
    # the one after a panic, panic=-1) ends QEMU.
    ((reboots > 0)) || echo -no-reboot
    echo -nodefaults -no-user-config -display none \
        -chardev "file,id=console,path=$console_file" -serial chardev:console \
        -chardev "file,id=results,path=$results_file" -serial chardev:results \
        -kernel "$guest_dir/vmlinuz"
}

# KVM is used only if a stock guest boots under it; e.g. kvm-pvm's /dev/kvm kills a stock Debian
# kernel at once. The answer is cached per machine (host kernel, QEMU and guest).
kvm_works() {
    [[ -r /dev/kvm && -w /dev/kvm ]] || return 1
    local key cache=$guest_dir/kvm-probe
    key="$(uname -r) $(qemu-system-x86_64 --version | head -n1) $(cat "$guest_dir/stamp" 2>/dev/null)"
    if [[ -f $cache && $(head -n1 "$cache") == "$key" ]]; then
        [[ $(sed -n 2p "$cache") == yes ]]
        return
    fi
    log "probing KVM with a short boot (a QEMU abort reported below is a failed probe)"
    local verdict=no
    # shellcheck disable=SC2046 # base_args is a word list without spaces in paths we create
    boot 30 $(base_args "$work/probe-console" "$work/probe-results") -no-reboot \
        -initrd "$guest_dir/initramfs.cpio" \
        -machine q35 -accel kvm -cpu host -m 256M -smp 1 \
        -append "console=ttyS0 panic=-1 quiet guestvm.probe"
    grep -q '@@GUESTVM PROBE-OK' "$work/probe-results" 2>/dev/null && verdict=yes
    log "KVM probe: $verdict (qemu rc=$boot_rc after ${boot_seconds}s)"
    printf '%s\n%s\n' "$key" "$verdict" >"$cache"
    [[ $verdict == yes ]]
}

case $accel in
auto) if kvm_works; then accel=kvm; else accel=tcg; fi ;;
kvm) [[ -r /dev/kvm && -w /dev/kvm ]] || { log "ERROR: --accel kvm but /dev/kvm is not usable"; exit 1; } ;;
esac
if [[ $accel == kvm ]]; then
    accel_args=(-accel kvm -cpu host)
else
    # shellcheck disable=SC2054 # the commas belong to the -accel option
    accel_args=(-accel tcg,thread=multi -cpu max)
fi

# The per-run archive: the kernel unpacks concatenated cpio archives in order, so /job lands
# on top of the base initramfs without rebuilding it.
mkdir -p "$work/jobroot/job/pre" "$work/jobroot/job/post"
printf 'FIO_ARGS=%q\nREBOOTS=%d\nREBOOT_FIO_ARGS=%q\n' "$fio_args" "$reboots" \
    "${reboot_fio_args:-$fio_args}" >"$work/jobroot/job/config"
[[ -n $job ]] && cp "$job" "$work/jobroot/job/job.fio"
add_snippets() {
    local dir=$1 i=0 spec name
    shift
    for spec in "$@"; do
        name=${spec%%=*}
        [[ $spec == *=* && $name =~ ^[A-Za-z0-9_.-]+$ ]] ||
            usage "a command must look like NAME=SHELL with NAME of [A-Za-z0-9_.-]: $spec"
        printf '%s\n' "${spec#*=}" >"$work/jobroot/job/$dir/$(printf '%03d' $i)-$name"
        i=$((i + 1))
    done
}
add_snippets pre "${pre_cmds[@]}"
add_snippets post "${post_cmds[@]}"
(cd "$work/jobroot" && find . -mindepth 1 | LC_ALL=C sort | /bin/busybox cpio -o -H newc -R 0:0 >"$work/job.cpio") 2>/dev/null
cat "$guest_dir/initramfs.cpio" "$work/job.cpio" >"$work/initrd.cpio"

console_file=${console_log:-$work/console.log}
results_file=$work/results.log
: >"$console_file"
: >"$results_file"
blk_chardev="socket,id=blk,path=$socket"
if ((reconnect)); then blk_chardev+=",reconnect=$reconnect"; fi
log "booting ($accel, $vcpus vCPUs, $queues queues, $mem) on $socket"
# shellcheck disable=SC2046 # see base_args
boot "$timeout_s" $(base_args "$console_file" "$results_file") -initrd "$work/initrd.cpio" \
    -machine q35,memory-backend=mem -m "$mem" -smp "$vcpus" "${accel_args[@]}" \
    -object "memory-backend-memfd,id=mem,size=$mem,share=on" \
    -chardev "$blk_chardev" \
    -device "vhost-user-blk-pci,chardev=blk,num-queues=$queues" \
    -append "console=ttyS0 panic=-1 quiet"

status=ok reason=
# A panic first: with reboots allowed, a panicking guest may loop until the timeout.
if grep -q 'Kernel panic' "$console_file"; then
    status=panic reason=$(grep -m1 'Kernel panic' "$console_file" | tr -d '\r')
elif ((boot_rc == 124)); then
    status=timeout reason="the guest did not finish within ${timeout_s}s"
elif ((boot_rc != 0)); then
    status=qemu reason="qemu exited with status $boot_rc: $(tail -n3 "$work/qemu.err" | tr '\n' ' ')"
elif grep -q '^@@GUESTVM ERROR' "$results_file"; then
    status=guest-error reason=$(grep -m1 '^@@GUESTVM ERROR' "$results_file" | tr -d '\r')
elif ! grep -q '^@@GUESTVM DONE' "$results_file"; then
    status=missing-output reason="the guest did not report completion"
elif (($(grep -c '^@@GUESTVM REBOOT' "$results_file") != reboots)); then
    status=missing-output reason="the guest rebooted $(grep -c '^@@GUESTVM REBOOT' "$results_file") times, not $reboots"
elif [[ -n $job ]] && (($(grep -c '^@@GUESTVM END fio rc=0' "$results_file") != reboots + 1)); then
    status=fio reason="fio failed: $(grep '^@@GUESTVM END fio' "$results_file" | grep -v -m1 'rc=0' | tr -d '\r' || echo 'no fio result')"
fi

# A summary first (so a truncated guest stream cannot hide it), then the guest's stream.
echo "accel=$accel"
echo "status=$status"
echo "reason=$reason"
echo "elapsed=$boot_seconds"
echo "@@GUESTVM RESULTS"
# The results port is raw, but strip CRs in case a line discipline added them.
tr -d '\r' <"$results_file"

if [[ $status != ok ]]; then
    log "FAILED ($accel, ${boot_seconds}s): $status: $reason"
    log "qemu stderr:"
    sed 's/^/  /' "$work/qemu.err" >&2
    log "guest console (last 40 lines):"
    tail -n 40 "$console_file" | sed 's/^/  /' >&2
    exit 1
fi
log "ok ($accel, ${boot_seconds}s)"
