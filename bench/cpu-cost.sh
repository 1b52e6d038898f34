#!/usr/bin/env bash
# CPU cost per request, counted in instructions rather than seconds: each target runs under
# `valgrind --tool=callgrind` twice, with a short and a long load from the libblkio load
# generator (4k random read, QD32, 1 queue); the difference in instructions divided by the
# difference in requests is the cost of one request, free of start-up and shutdown costs.
# Repeatable to well under 1% on the same binaries (timings are not).
#
# Usage: bench/cpu-cost.sh [SHORT_S LONG_S [IODEPTH]]     (default 2 6 32)
# NO_POLL=1 turns busy-polling off in both servers (uringblk --poll-us 0, qsd's iothread
# poll-max-ns=0): at QD1 a polling server's count includes the spinning between requests,
# which depends on wall time rather than on work; without it the count is the work alone.
# BIN_DIR=DIR takes uringblk and the load generator from DIR instead of building them (to
# compare two builds side by side).
# Writes bench/results/cpu-cost.json (cpu-cost-qdN.json for another depth) and prints a table.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
short=${1:-2} long=${2:-6} depth=${3:-32}
command -v valgrind >/dev/null || { echo "cpu-cost: valgrind missing (apt-get install valgrind)" >&2; exit 1; }
command -v qemu-storage-daemon >/dev/null || { echo "cpu-cost: qemu-storage-daemon missing" >&2; exit 1; }
bin=${BIN_DIR:-target/release}
[[ -n ${BIN_DIR:-} ]] || cargo build --release -q -p uringblk -p uringblk-loadgen
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# run TARGET SECONDS -> prints "instructions requests"
run() {
    local target=$1 secs=$2 sock=$work/$1.sock out=$work/$1-$2.cg
    rm -f "$sock" "$out"*
    case $target in
    uringblk-null)
        taskset -c 1 valgrind --tool=callgrind --callgrind-out-file="$out" \
            "$bin/uringblk" --socket "$sock" --null 1G ${NO_POLL:+--poll-us 0} >/dev/null 2>"$work/server.log" & ;;
    qsd-null)
        taskset -c 1 valgrind --tool=callgrind --callgrind-out-file="$out" \
            qemu-storage-daemon --blockdev driver=null-co,node-name=n,size=1073741824 \
            --object iothread,id=io0${NO_POLL:+,poll-max-ns=0} \
            --export type=vhost-user-blk,id=e,node-name=n,addr.type=unix,addr.path="$sock",writable=on,iothread=io0 \
            >/dev/null 2>"$work/server.log" & ;;
    esac
    local pid=$!
    for _ in $(seq 300); do [[ -S $sock ]] && break; sleep 0.1; done
    [[ -S $sock ]] || { echo "cpu-cost: $target did not start" >&2; cat "$work/server.log" >&2; exit 1; }
    taskset -c 0 "$bin/uringblk-loadgen" --socket "$sock" --rw randread --bs 4k --iodepth "$depth" \
        --runtime "${secs}s" --json >"$work/lg.json" 2>/dev/null
    kill -TERM "$pid"
    # A server that ignores SIGTERM under valgrind (seen once with qsd) is killed: then it
    # wrote no profile, and the caller runs it again.
    for _ in $(seq 200); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    if kill -0 "$pid" 2>/dev/null; then
        echo "cpu-cost: $target did not stop within 20 s of SIGTERM; killed" >&2
        kill -KILL "$pid"; wait "$pid" || true
        return 1
    fi
    wait "$pid" || true
    local ir reqs
    ir=$(grep -E '^(summary|totals):' "$out"* | head -n1 | awk '{print $2}')
    reqs=$(python3 -c "import json; print(json.load(open('$work/lg.json'))['reads'])")
    echo "$ir $reqs"
}

results=()
for target in uringblk-null qsd-null; do
    ir1='' ir2=''
    for _ in 1 2 3; do [[ -n $ir1 ]] || read -r ir1 n1 < <(run "$target" "$short" || true); done
    for _ in 1 2 3; do [[ -n $ir2 ]] || read -r ir2 n2 < <(run "$target" "$long" || true); done
    [[ -n $ir1 && -n $ir2 ]] || { echo "cpu-cost: $target: no profile after 3 tries" >&2; exit 1; }
    per=$(python3 -c "print(round(($ir2 - $ir1) / max($n2 - $n1, 1)))")
    echo "$target: $per instructions/request ($n1 and $n2 requests)" >&2
    results+=("{\"target\": \"$target\", \"instructions_per_request\": $per, \"requests\": [$n1, $n2], \"instructions\": [$ir1, $ir2]}")
done
mkdir -p bench/results
out=bench/results/cpu-cost.json
[[ $depth == 32 ]] || out=bench/results/cpu-cost-qd$depth.json
[[ -z ${NO_POLL:-} ]] || out=${out%.json}-nopoll.json
{ echo "{\"date\": \"$(date -u +%FT%TZ)\", \"job\": \"randread 4k qd$depth 1 queue${NO_POLL:+, polling off}\", \"results\": ["
  (IFS=,; echo "${results[*]}")
  echo "]}"; } > "$out"
cat "$out"
