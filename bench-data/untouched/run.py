#!/usr/bin/env python3
"""Untouched memory costs nothing: idle guests of 1, 8 and 16 GiB migrated
between two vmigrate processes, beside QEMU migrating an idle 8 GiB guest
(the same `idle` boot sector) in the same run, over loopback TCP.

    python3 bench-data/untouched/run.py        # about two minutes (REPS=5)

Writes bench-data/untouched/results.json (every run, and medians) and
prints the medians. QEMU rows say
"not installed" when qemu-system-x86_64 is missing; nothing is made up.
"""
import json, os, shutil, socket, subprocess, sys, tempfile, time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
OUT = os.path.join(ROOT, "bench-data", "untouched", "results.json")


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return None


def wait_for(pred, what, timeout=60):
    end = time.time() + timeout
    while not pred():
        if time.time() > end:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.02)


def vmigrate_idle(vm, mem, tmp):
    d = subprocess.Popen([vm, "run", "--incoming", "tcp:127.0.0.1:0", "--insecure", "--serial", f"{tmp}/d.serial",
                          "--api-socket", f"{tmp}/d.api"], stdout=subprocess.PIPE,
                         stderr=open(f"{tmp}/d.err", "w"), text=True)
    to = d.stdout.readline().strip().removeprefix("vmigrate: listening on ")
    s = subprocess.Popen([vm, "run", "--workload", "idle", "--mem", mem, "--serial", f"{tmp}/s.serial",
                          "--api-socket", f"{tmp}/s.api"], stderr=open(f"{tmp}/s.err", "w"))
    wait_for(lambda: os.path.exists(f"{tmp}/s.api") and b"B" in open(f"{tmp}/s.serial", "rb").read(), "boot")
    src_rss = rss_kib(s.pid)
    r = json.loads(subprocess.run([vm, "send", "--api-socket", f"{tmp}/s.api", "--to", to, "--insecure", "--json"],
                                  capture_output=True, text=True).stdout)
    time.sleep(0.3)
    dst_rss_now = rss_kib(d.pid)
    subprocess.run([vm, "shutdown", "--api-socket", f"{tmp}/d.api"], capture_output=True)
    s.wait(10); d.wait(10)
    err = open(f"{tmp}/d.err").read()
    dst_rss_before = int(err.split("resident memory ")[1].split(" MiB")[0]) * 1024 if "resident memory " in err else None
    return {
        "system": "vmigrate", "guest": f"idle {mem}", "status": r["status"],
        "total_ms": r["total-time"], "downtime_ms": r["downtime"], "setup_ms": r["setup-time"],
        "bytes": r["ram"]["transferred"], "page_bytes": r["ram"]["normal-bytes"],
        "skipped_pages": r["ram"]["skipped"], "scanned_zero_pages": r["ram"]["duplicate"] - r["ram"]["skipped"],
        "src_rss_kib": src_rss, "dst_rss_before_resume_kib": dst_rss_before, "dst_rss_after_kib": dst_rss_now,
        "downtime_breakdown": r.get("downtime-breakdown"),
    }


class Qmp:
    def __init__(self, path):
        self.s = socket.socket(socket.AF_UNIX)
        wait_for(lambda: os.path.exists(path), "QMP socket")
        self.s.connect(path)
        self.f = self.s.makefile("rw")
        json.loads(self.f.readline())
        self.cmd("qmp_capabilities")

    def cmd(self, name, **args):
        self.f.write(json.dumps({"execute": name, "arguments": args}) + "\n")
        self.f.flush()
        while True:
            m = json.loads(self.f.readline())
            if "return" in m or "error" in m:
                if "error" in m:
                    raise RuntimeError(f"{name}: {m['error']}")
                return m["return"]


def qemu_idle(vm, mem, tmp):
    qemu = shutil.which("qemu-system-x86_64")
    if not qemu:
        return {"system": "qemu", "guest": f"idle {mem}", "status": "qemu not installed"}
    img = f"{tmp}/idle.img"
    subprocess.run([vm, "workload", "export", "idle", "--mem", mem, "--out", img], check=True, capture_output=True)
    with socket.socket() as p:
        p.bind(("127.0.0.1", 0))
        port = p.getsockname()[1]
    common = ["-accel", "kvm", "-m", mem, "-display", "none", "-nodefaults",
              "-drive", f"format=raw,file={img},if=ide"]
    d = subprocess.Popen([qemu, *common, "-serial", f"file:{tmp}/qd.serial", "-qmp", f"unix:{tmp}/qd.qmp,server,nowait",
                          "-incoming", f"tcp:127.0.0.1:{port}"], stderr=open(f"{tmp}/qemu.err", "a"))
    s = subprocess.Popen([qemu, *common, "-serial", f"file:{tmp}/qs.serial", "-qmp", f"unix:{tmp}/qs.qmp,server,nowait"],
                         stderr=open(f"{tmp}/qemu.err", "a"))
    try:
        wait_for(lambda: os.path.exists(f"{tmp}/qs.serial") and b"B" in open(f"{tmp}/qs.serial", "rb").read(),
                 "QEMU guest boot", timeout=120)
        src_rss = rss_kib(s.pid)
        qs = Qmp(f"{tmp}/qs.qmp")
        Qmp(f"{tmp}/qd.qmp")
        qs.cmd("migrate-set-parameters", **{"max-bandwidth": 0})  # unlimited, as vmigrate
        qs.cmd("migrate", uri=f"tcp:127.0.0.1:{port}")
        while True:
            st = qs.cmd("query-migrate")
            if st.get("status") in ("completed", "failed", "cancelled"):
                break
            time.sleep(0.01)
        time.sleep(0.3)
        return {
            "system": "qemu " + subprocess.run([qemu, "--version"], capture_output=True, text=True).stdout.split()[3],
            "guest": f"idle {mem}", "status": st["status"], "total_ms": st.get("total-time"),
            "downtime_ms": st.get("downtime"), "setup_ms": st.get("setup-time"),
            "bytes": st["ram"]["transferred"], "page_bytes": st["ram"]["normal-bytes"],
            "skipped_pages": None, "scanned_zero_pages": st["ram"]["duplicate"],
            "src_rss_kib": src_rss, "dst_rss_before_resume_kib": None, "dst_rss_after_kib": rss_kib(d.pid),
        }
    finally:
        for p in (s, d):
            p.kill(); p.wait()


def median(xs):
    xs = sorted(x for x in xs if x is not None)
    if not xs:
        return None
    n = len(xs)
    return xs[n // 2] if n % 2 else (xs[n // 2 - 1] + xs[n // 2]) / 2


def main():
    reps = int(os.environ.get("REPS", "5"))
    vm = os.path.join(ROOT, "target", "release", "vmigrate")
    subprocess.run(["cargo", "build", "--release", "--locked", "-p", "migrate-cli", "--bin", "vmigrate"],
                   cwd=ROOT, check=True, capture_output=True)
    runs = []
    # Interleaved repetitions: every system and size sees the same machine load.
    for rep in range(reps):
        for mem in ["1G", "8G", "16G"]:
            with tempfile.TemporaryDirectory() as tmp:
                runs.append({"rep": rep, **vmigrate_idle(vm, mem, tmp)})
        with tempfile.TemporaryDirectory() as tmp:
            runs.append({"rep": rep, **qemu_idle(vm, "8G", tmp)})
    keys = ["total_ms", "downtime_ms", "setup_ms", "bytes", "page_bytes", "skipped_pages",
            "scanned_zero_pages", "src_rss_kib", "dst_rss_before_resume_kib", "dst_rss_after_kib"]
    summary = []
    for system, guest in dict.fromkeys((r["system"], r["guest"]) for r in runs):
        group = [r for r in runs if r["system"] == system and r["guest"] == guest]
        row = {"system": system, "guest": guest, "runs": len(group),
               "completed": sum(r["status"] == "completed" for r in group)}
        if "total_ms" not in group[0]:
            row["status"] = group[0]["status"]
        else:
            for k in keys:
                row[k] = median([r.get(k) for r in group])
            row["downtime_ms_max"] = max(r["downtime_ms"] for r in group)
        summary.append(row)
    json.dump({"note": f"medians over {reps} interleaved repetitions, one machine, one run",
               "summary": summary, "runs": runs}, open(OUT, "w"), indent=1)
    print(f"medians over {reps} repetitions")
    print(f"{'system':12} {'guest':10} {'done':>5} {'total ms':>9} {'down ms':>8} {'down max':>8} {'sent KiB':>9} "
          f"{'skipped':>9} {'scanned0':>9} {'src RSS MiB':>11} {'dst RSS MiB':>11}")
    for r in summary:
        if "total_ms" not in r:
            print(f"{r['system']:12} {r['guest']:10} {r['status']}")
            continue
        dst = r["dst_rss_before_resume_kib"] or r["dst_rss_after_kib"]
        skipped = int(r["skipped_pages"]) if r["skipped_pages"] is not None else "-"
        print(f"{r['system']:12} {r['guest']:10} {r['completed']:>2}/{r['runs']:<2} {r['total_ms']:9.1f} "
              f"{r['downtime_ms']:8.2f} {r['downtime_ms_max']:8.2f} {int(r['bytes']) // 1024:9} {skipped:>9} "
              f"{int(r['scanned_zero_pages']):9} {r['src_rss_kib'] / 1024:11.1f} {dst / 1024:11.1f}")


if __name__ == "__main__":
    sys.exit(main())
