#!/usr/bin/env bash
# The benchmark, in one command: builds uringblk, the load generator and the harness in release
# mode, then runs uringblk-bench from the repository root.
#
#   bench/run.sh quick [FLAGS]   the job matrix with short runs: a few minutes
#   bench/run.sh full  [FLAGS]   longer runs plus the per-core scaling sweep
#
# FLAGS go to uringblk-bench (bench/run.sh quick --help lists them), e.g. --image /mnt/nvme/b.img
# to measure another disk, or --guest to add fio inside a VM. Writes bench/results/ and the
# results section of bench/README.md.
set -euo pipefail

repo_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo_root"

mode=${1:-quick}
case $mode in
quick | full) shift || true ;;
-h | --help) sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
*) echo "run.sh: unknown mode '$mode' (quick or full)" >&2; exit 2 ;;
esac

missing=()
for tool in fio qemu-storage-daemon taskset; do
    command -v "$tool" >/dev/null || missing+=("$tool")
done
if ((${#missing[@]})); then
    echo "run.sh: missing ${missing[*]}; on Debian 12: apt-get install fio qemu-system-common util-linux" >&2
    echo "run.sh: (or drop the targets that need them with --targets)" >&2
fi

cargo build --release -p uringblk -p uringblk-loadgen -p uringblk-bench
target_dir=$(cargo metadata --format-version 1 --no-deps | sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')
exec "${target_dir:-target}/release/uringblk-bench" "--$mode" "$@"
