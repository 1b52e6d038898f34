#!/usr/bin/env python3
"""Side-by-side A/B runs of uringblk variants (levers on and off) against qemu-storage-daemon
and host fio, with what the kernel did during each run.

Every variant runs the same job on the same image in one session, in an order rotated per
repetition, and each run records:
  - IOPS and latency (the libblkio load generator, or fio for `host`);
  - server CPU seconds (utime + stime from /proc/PID/stat around the client run);
  - voluntary context switches of the server (wake-ups), summed over its threads;
  - io-wq workers: the largest number of `iou-wrk-*` threads seen while the run lasted;
  - the disk's average queue depth and time per I/O over the run, from /proc/diskstats
    (weighted time in queue / wall time; busy time / I/Os);
  - uringblk only: io_uring_enter calls and SQEs (its final stats), hence SQEs per enter;
  - steal: the share of the machine's CPU time the hypervisor took while the run lasted.

The steal guard (as in the harness): a run that saw more steal than --steal-limit is made
again, up to --steal-reruns times, after waiting (at most --steal-wait seconds in all) for a
2 s window under the limit. The discarded runs stay in the .jsonl with "discarded" set and are
left out of the medians; the table's header counts them.

Usage:
  bench/levers.py [--image PATH | --null | --rbd POOL/IMAGE --ceph-conf PATH] [--jobs LIST] [--reps N] [--runtime S] [--ramp S]
                  [--queues N] [--out NAME] [--steal-limit PCT] [--steal-reruns N] [--steal-wait S]
                  VARIANT...
VARIANT is NAME=ARGS for a uringblk variant (ARGS are extra server flags, may be empty),
NAME@DIR=ARGS for one whose uringblk binary is DIR/uringblk (an older build, side by side),
or `qsd` / `host`. With --rbd, `qsd-NAME=KEY=VALUE ...` is qemu-storage-daemon with those
librados options added to (a copy of) the ceph.conf. Example:
  bench/levers.py --jobs randread-4k-qd32 default= batch1=--submit-batch=1 qsd host
--null serves a 1 GiB null backend (uringblk --null, qsd's null-co) instead of the image: no
disk columns, and `host` is not available. --rbd serves an existing RBD image of the cluster
that --ceph-conf names (uringblk --rbd, qsd's rbd driver with cache.direct=on), e.g. one that
scripts/ceph-cluster.sh started; no disk columns and no `host` either.
BIN_DIR=DIR takes the default uringblk and the load generator from DIR (default target/release).

Writes bench/results/levers/NAME.jsonl (one line per run) and NAME.md (medians), and prints
the table. Build first: cargo build --release -p uringblk -p uringblk-loadgen.
This is a benchmark, not a test: it prints figures and asserts nothing about them.
"""

import argparse
import json
import os
import re
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(os.environ.get("BIN_DIR", ROOT / "target" / "release"))
NULL_SIZE = 1 << 30

JOBS = {
    "randread-4k-qd1": ("randread", "4k", 1),
    "randread-4k-qd32": ("randread", "4k", 32),
    "randwrite-4k-qd32": ("randwrite", "4k", 32),
    "randrw70-4k-qd32": ("randrw", "4k", 32),
    "read-128k-qd8": ("read", "128k", 8),
    "write-128k-qd8": ("write", "128k", 8),
}


def log(msg):
    print(f"levers: {msg}", file=sys.stderr, flush=True)


def disk_of(path):
    """The whole disk (e.g. vda) that holds `path`, for /proc/diskstats."""
    st = os.stat(path)
    major, minor = os.major(st.st_dev), os.minor(st.st_dev)
    if os.path.exists(path) and Path(path).is_block_device():
        major, minor = os.major(st.st_rdev), os.minor(st.st_rdev)
    sysdev = Path(f"/sys/dev/block/{major}:{minor}").resolve()
    # A partition's parent directory is its disk.
    if (sysdev / "partition").exists():
        sysdev = sysdev.parent
    return sysdev.name


def diskstats(disk):
    for line in open("/proc/diskstats"):
        f = line.split()
        if f[2] == disk:
            # reads completed (3), reads merged (4), sectors read (5), ms reading (6),
            # writes (7), writes merged (8), sectors written (9), ms writing (10),
            # ms busy (12), weighted ms in queue (13)
            return {
                "ios": int(f[3]) + int(f[7]),
                "merged": int(f[4]) + int(f[8]),
                "sectors": int(f[5]) + int(f[9]),
                "io_ms": int(f[6]) + int(f[10]),
                "busy_ms": int(f[12]),
                "weighted_ms": int(f[13]),
            }
    raise SystemExit(f"levers: disk {disk} not in /proc/diskstats")


def proc_cpu_s(pid):
    f = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")


def machine_ticks():
    """(all CPU ticks, stolen ticks) of the machine so far, from /proc/stat's `cpu` line."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:9]]
    return sum(fields), fields[7]


def steal_pct(ticks0, ticks1):
    """Steal share (%) of the machine's CPU time between two machine_ticks() readings."""
    return 100 * (ticks1[1] - ticks0[1]) / max(ticks1[0] - ticks0[0], 1)


def steal_over(seconds):
    """Steal share (%) of the machine's CPU time over the next `seconds`."""
    t0 = machine_ticks()
    time.sleep(seconds)
    return steal_pct(t0, machine_ticks())


class StealGuard:
    """Makes a stolen-from run again, after the stolen stretch has passed (bounded waits)."""

    WINDOW_S = 2.0

    def __init__(self, limit, reruns, wait_s):
        self.limit, self.reruns, self.wait_left = limit, reruns, wait_s
        self.made_again, self.kept_stolen, self.waited = 0, 0, 0.0

    def stolen(self, run):
        return self.limit > 0 and run["steal_pct"] > self.limit

    def wait_out(self):
        while self.wait_left > 0:
            s = steal_over(min(self.WINDOW_S, self.wait_left))
            self.wait_left -= self.WINDOW_S
            self.waited += self.WINDOW_S
            if s <= self.limit:
                return
            log(f"steal {s:.1f} % over {self.WINDOW_S:.0f} s: waiting")

    def summary(self):
        if self.limit <= 0:
            return "Steal guard off."
        return (f"Steal guard (limit {self.limit:g} %): {self.made_again} run(s) made again, "
                f"{self.kept_stolen} kept above the limit, {self.waited:.0f} s waited.")


def proc_threads(pid):
    """{tid: voluntary context switches}, and the number of io-wq workers, of `pid` now."""
    vol, workers = {}, 0
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except FileNotFoundError:
        return vol, 0
    for t in tasks:
        try:
            comm = open(f"/proc/{pid}/task/{t}/comm").read().strip()
            status = open(f"/proc/{pid}/task/{t}/status").read()
        except (FileNotFoundError, ProcessLookupError):
            continue
        if comm.startswith("iou-wrk"):
            workers += 1
        m = re.search(r"^voluntary_ctxt_switches:\s+(\d+)", status, re.M)
        if m:
            vol[t] = int(m.group(1))
    return vol, workers


class Sampler(threading.Thread):
    """Samples the server's threads every 50 ms while a run lasts: the most io-wq workers
    seen, and each thread's latest context-switch count (uringblk's iothreads end with the
    connection, before the run's end could read them)."""

    def __init__(self, pid):
        super().__init__(daemon=True)
        self.pid, self.max_workers, self.stop = pid, 0, threading.Event()
        self.start_vol = proc_threads(pid)[0]
        self.last_vol = dict(self.start_vol)

    def sample(self):
        vol, workers = proc_threads(self.pid)
        self.max_workers = max(self.max_workers, workers)
        self.last_vol.update(vol)

    def run(self):
        while not self.stop.wait(0.05):
            self.sample()

    def wakeups(self):
        return sum(self.last_vol.values()) - sum(self.start_vol.values())


def is_qsd(variant):
    return variant == "qsd" or variant.startswith("qsd-")


def qsd_ceph_conf(conf, args, tmp, variant):
    """A private copy of ceph.conf with a qsd variant's KEY=VALUE librados options."""
    if not args:
        return conf
    lines = [f"{k} = {v}" for k, _, v in (a.partition("=") for a in shlex.split(args))]
    path = os.path.join(tmp, f"{variant}.conf")
    with open(path, "w") as f:
        f.write(Path(conf).read_text() + "\n[client]\n" + "\n".join(lines) + "\n")
    return path


def start_server(variant, args, backend, socket, queues, bindir=None, tmp=None):
    """backend: ("null",), ("image", PATH) or ("rbd", POOL/IMAGE, CONF)."""
    if is_qsd(variant):
        if backend[0] == "null":
            blockdev = f"driver=null-co,node-name=disk0,size={NULL_SIZE}"
        elif backend[0] == "image":
            blockdev = (f"driver=file,node-name=disk0,filename={backend[1]},cache.direct=on,"
                        "aio=io_uring")
        else:
            pool, _, image = backend[1].partition("/")
            conf = qsd_ceph_conf(backend[2], args, tmp, variant)
            blockdev = (f"driver=rbd,node-name=disk0,pool={pool},image={image},"
                        f"conf={conf},cache.direct=on")
        cmd = [
            "qemu-storage-daemon", "--object", "iothread,id=io0", "--blockdev", blockdev,
            "--export",
            f"type=vhost-user-blk,id=exp0,node-name=disk0,addr.type=unix,addr.path={socket},"
            f"writable=on,num-queues={queues},iothread=io0",
        ]
    else:
        flags = {"null": lambda: ["--null", str(NULL_SIZE)],
                 "image": lambda: ["--image", backend[1]],
                 "rbd": lambda: ["--rbd", backend[1], "--ceph-conf", backend[2]]}[backend[0]]()
        cmd = [str(Path(bindir or BIN) / "uringblk"), "--socket", socket] + flags + [
               "--queues", str(queues), "--iothreads", "1", "--cpus", "1"] + shlex.split(args)
    out = tempfile.TemporaryFile()
    err = tempfile.TemporaryFile()
    p = subprocess.Popen(["taskset", "-c", "1"] + cmd, stdout=out, stderr=err)
    for _ in range(400):
        if os.path.exists(socket):
            break
        if p.poll() is not None:
            err.seek(0)
            raise SystemExit(f"levers: {variant} exited: {err.read().decode()[-2000:]}")
        time.sleep(0.01)
    time.sleep(0.1)
    return p, out, err


def stop_server(p, out):
    p.send_signal(signal.SIGTERM)
    try:
        p.wait(timeout=30)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait()
    out.seek(0)
    text = out.read().decode(errors="replace").strip().splitlines()
    for line in reversed(text):
        try:
            return json.loads(line)
        except ValueError:
            continue
    return None


def run_client(variant, job, image, socket, queues, runtime, ramp, completion="blocking"):
    rw, bs, qd = JOBS[job]
    if variant == "host":
        cmd = ["taskset", "-c", "0", "fio", "--name=host", f"--filename={image}",
               "--ioengine=io_uring", "--direct=1", f"--rw={rw}", f"--bs={bs}",
               f"--iodepth={qd}", f"--numjobs={queues}", "--group_reporting",
               f"--runtime={runtime}s", f"--ramp_time={ramp}s", "--time_based",
               "--output-format=json"]
        if rw == "randrw":
            cmd.append("--rwmixread=70")
        r = json.loads(subprocess.run(cmd, check=True, capture_output=True).stdout)
        j = r["jobs"][0]
        iops = j["read"]["iops"] + j["write"]["iops"]
        lat = j["read"] if j["read"]["iops"] else j["write"]
        return {"iops": iops, "p50_us": lat["clat_ns"]["percentile"]["50.000000"] / 1000}
    cmd = ["taskset", "-c", "0", str(BIN / "uringblk-loadgen"), "--socket", socket, "--rw", rw,
           "--bs", bs, "--iodepth", str(qd), "--queues", str(queues), "--runtime", f"{runtime}s",
           "--ramp", f"{ramp}s", "--cpus", "0", "--completion", completion, "--json"]
    r = json.loads(subprocess.run(cmd, check=True, capture_output=True).stdout)
    return {"iops": r["iops"], "p50_us": r["latency"]["p50_ns"] / 1000}


def one_run(variant, args, job, opts, disk, bindir=None):
    socket = os.path.join(opts.tmp, f"{variant}.sock")
    if os.path.exists(socket):
        os.unlink(socket)
    server = out = None
    if variant != "host":
        server, out, _err = start_server(variant, args, opts.backend, socket, opts.queues,
                                         bindir, opts.tmp)
    no_disk = {"ios": 0, "merged": 0, "sectors": 0, "io_ms": 0, "busy_ms": 0, "weighted_ms": 0}
    d0 = diskstats(disk) if disk else no_disk
    ticks0 = machine_ticks()
    t0 = time.monotonic()
    cpu0 = proc_cpu_s(server.pid) if server else 0.0
    sampler = Sampler(server.pid) if server else None
    if sampler:
        sampler.start()
    res = run_client(variant, job, opts.image, socket, opts.queues, opts.runtime, opts.ramp,
                     opts.completion)
    wall = time.monotonic() - t0
    ticks1 = machine_ticks()
    d1 = diskstats(disk) if disk else no_disk
    ios = d1["ios"] - d0["ios"]
    res.update({
        "variant": variant, "args": args, "job": job, "queues": opts.queues,
        # Share of the machine's CPU time the hypervisor gave to others (slows every target).
        "steal_pct": steal_pct(ticks0, ticks1),
        "disk_queue_depth": (d1["weighted_ms"] - d0["weighted_ms"]) / (wall * 1000),
        # Time each I/O spent in the disk's queue and device, on average.
        "disk_us_per_io": 1000 * (d1["io_ms"] - d0["io_ms"]) / max(ios, 1),
        # Share of the wall time with no I/O at the disk at all.
        "disk_idle_pct": 100 * (1 - (d1["busy_ms"] - d0["busy_ms"]) / (wall * 1000)),
        # Size of what reached the device, and how many submitted bios the block layer
        # merged into each (the elevator merges what waits in its queue).
        "disk_kib_per_io": (d1["sectors"] - d0["sectors"]) / 2 / max(ios, 1),
        "disk_merges_per_io": (d1["merged"] - d0["merged"]) / max(ios, 1),
    })
    if not disk:
        for k in ("disk_queue_depth", "disk_us_per_io", "disk_idle_pct", "disk_kib_per_io",
                  "disk_merges_per_io"):
            del res[k]
    if server:
        sampler.stop.set()
        sampler.join()
        sampler.sample()
        requests = res["iops"] * (opts.runtime + opts.ramp)
        res["server_cpu_s"] = proc_cpu_s(server.pid) - cpu0
        res["wakeups_per_req"] = sampler.wakeups() / max(requests, 1)
        res["iowq_workers"] = sampler.max_workers
        stats = stop_server(server, out)
        if stats and "queues" in stats:
            enters = sum(t.get("enters", 0) for t in stats.get("iothreads", []))
            sqes = sum(t.get("sqes", 0) for t in stats.get("iothreads", []))
            if enters:
                res["sqes_per_enter"] = sqes / enters
            res["naps"] = sum(t.get("naps", 0) for t in stats.get("iothreads", []))
    return res


def median(rows, key):
    vals = [r[key] for r in rows if key in r]
    return statistics.median(vals) if vals else None


def fmt(v, spec):
    return "n/a" if v is None else format(v, spec)


def per_cpu_s(rs):
    """Median IOPS per server CPU-second of runs `rs` (None without CPU figures)."""
    vals = [r["iops"] * (r["runtime"] + r["ramp"]) / r["server_cpu_s"] for r in rs
            if r.get("server_cpu_s")]
    return statistics.median(vals) if vals else None


def table(rows, variants, jobs):
    disk = any("disk_queue_depth" in r for r in rows)
    head = ("| job | variant | IOPS | vs qsd | p50 µs | server CPU-s | cores busy | IOPS/CPU-s "
            "| per CPU-s vs qsd | SQEs/enter | wake-ups/req | io-wq workers | steal % |")
    rule = "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    if disk:
        head += " disk QD | disk µs/IO | disk idle % | disk KiB/IO | merges/IO |"
        rule += "---:|---:|---:|---:|---:|"
    lines = [head, rule]
    for job in jobs:
        qsd_rows = [r for r in rows if r["job"] == job and r["variant"] == "qsd"]
        qsd, qsd_per_cpu = median(qsd_rows, "iops"), per_cpu_s(qsd_rows)
        for name, _ in variants:
            rs = [r for r in rows if r["job"] == job and r["variant"] == name]
            if not rs:
                continue
            iops, cpu = median(rs, "iops"), median(rs, "server_cpu_s")
            per_cpu = per_cpu_s(rs)
            busy = statistics.median([r["server_cpu_s"] / (r["runtime"] + r["ramp"]) for r in rs
                                      if r.get("server_cpu_s") is not None]) if cpu else None
            lo, hi = min(r["iops"] for r in rs), max(r["iops"] for r in rs)
            line = (
                f"| {job} | {name} | {iops / 1000:.1f}k [{lo / 1000:.1f}–{hi / 1000:.1f}] | "
                f"{fmt(iops / qsd if qsd else None, '.2f')}× | {fmt(median(rs, 'p50_us'), '.1f')} | "
                f"{fmt(cpu, '.2f')} | {fmt(busy, '.2f')} | "
                f"{fmt(per_cpu and per_cpu / 1000, '.0f')}k | "
                f"{fmt(per_cpu / qsd_per_cpu if per_cpu and qsd_per_cpu else None, '.2f')}× | "
                f"{fmt(median(rs, 'sqes_per_enter'), '.1f')} | "
                f"{fmt(median(rs, 'wakeups_per_req'), '.3f')} | "
                f"{fmt(median(rs, 'iowq_workers'), '.0f')} | "
                f"{fmt(median(rs, 'steal_pct'), '.1f')} |")
            if disk:
                line += (
                    f" {fmt(median(rs, 'disk_queue_depth'), '.1f')} | "
                    f"{fmt(median(rs, 'disk_us_per_io'), '.0f')} | "
                    f"{fmt(median(rs, 'disk_idle_pct'), '.1f')} | "
                    f"{fmt(median(rs, 'disk_kib_per_io'), '.0f')} | "
                    f"{fmt(median(rs, 'disk_merges_per_io'), '.2f')} |")
            lines.append(line)
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--image", default=str(ROOT / "bench" / "work" / "bench.img"))
    ap.add_argument("--jobs", default="randread-4k-qd32")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--runtime", type=float, default=5)
    ap.add_argument("--ramp", type=float, default=1)
    ap.add_argument("--queues", type=int, default=1)
    ap.add_argument("--completion", choices=["blocking", "poll"], default="blocking",
                    help="how the load generator waits for completions (host fio: always blocking)")
    ap.add_argument("--null", action="store_true", help="a null backend instead of the image")
    ap.add_argument("--rbd", metavar="POOL/IMAGE", help="an RBD image instead of the file")
    ap.add_argument("--ceph-conf", help="the cluster's ceph.conf, for --rbd")
    ap.add_argument("--out", default="levers")
    ap.add_argument("--steal-limit", type=float, default=5.0, metavar="PCT",
                    help="make a run again when it saw more steal than this (0: off)")
    ap.add_argument("--steal-reruns", type=int, default=2, metavar="N",
                    help="at most this many times per run")
    ap.add_argument("--steal-wait", type=float, default=120.0, metavar="S",
                    help="seconds to wait in all for stolen stretches to pass")
    ap.add_argument("variants", nargs="+")
    opts = ap.parse_args()
    jobs = opts.jobs.split(",")
    for j in jobs:
        if j not in JOBS:
            raise SystemExit(f"levers: unknown job {j}; known: {', '.join(JOBS)}")
    variants, bindirs = [], {}
    for v in opts.variants:
        name, _, args = v.partition("=")
        name, _, bindir = name.partition("@")
        variants.append((name, args))
        if bindir:
            bindirs[name] = bindir
    if opts.null and opts.rbd:
        raise SystemExit("levers: --null or --rbd, not both")
    if opts.rbd and not opts.ceph_conf:
        raise SystemExit("levers: --rbd needs --ceph-conf")
    if opts.null or opts.rbd:
        if any(n == "host" for n, _ in variants):
            raise SystemExit("levers: `host` needs the file backend")
        disk = None
        opts.backend = ("null",) if opts.null else ("rbd", opts.rbd, opts.ceph_conf)
    else:
        if not os.path.exists(opts.image):
            raise SystemExit(f"levers: {opts.image} missing: run bench/run.sh quick once (it "
                             "makes and fills the image) or give --image")
        disk = disk_of(opts.image)
        opts.backend = ("image", opts.image)
    outdir = ROOT / "bench" / "results" / "levers"
    outdir.mkdir(parents=True, exist_ok=True)
    rows = []
    guard = StealGuard(opts.steal_limit, opts.steal_reruns, opts.steal_wait)
    with tempfile.TemporaryDirectory() as tmp, open(outdir / f"{opts.out}.jsonl", "w") as raw:
        opts.tmp = tmp
        total = opts.reps * len(jobs) * len(variants)
        n = 0
        for rep in range(opts.reps):
            for job in jobs:
                order = variants[rep % len(variants):] + variants[:rep % len(variants)]
                for name, args in order:
                    n += 1
                    for attempt in range(guard.reruns + 1):
                        r = one_run(name, args, job, opts, disk, bindirs.get(name))
                        r["rep"], r["runtime"], r["ramp"] = rep, opts.runtime, opts.ramp
                        r["completion"] = opts.completion
                        again = guard.stolen(r) and attempt < guard.reruns
                        if again:
                            r["discarded"] = f"steal {r['steal_pct']:.1f} %"
                        elif guard.stolen(r):
                            guard.kept_stolen += 1
                        raw.write(json.dumps(r) + "\n")
                        raw.flush()
                        log(f"[{n}/{total}] {job} {name}: {r['iops'] / 1000:.1f}k IOPS, "
                            f"steal {r['steal_pct']:.1f} %" + (": made again" if again else ""))
                        if not again:
                            rows.append(r)
                            break
                        guard.made_again += 1
                        guard.wait_out()
    md = table(rows, variants, jobs)
    backend = ("null backend (1 GiB)" if opts.null else f"RBD image {opts.rbd}" if opts.rbd
               else f"image {opts.image} on {disk}")
    head = (f"{opts.reps} × {opts.runtime} s per point after a {opts.ramp} s ramp, "
            f"{opts.queues} queue(s), {backend}; server on CPU 1, client "
            f"on CPU 0; medians [min–max]. Variants: "
            + "; ".join(f"`{n}` = `{a or '(defaults)'}`"
                        + (f" (binary {bindirs[n]})" if n in bindirs else "")
                        for n, a in variants if n != "host" and (n != "qsd" or a))
            + ". " + guard.summary())
    (outdir / f"{opts.out}.md").write_text(head + "\n\n" + md + "\n")
    print(head + "\n\n" + md)


if __name__ == "__main__":
    main()
