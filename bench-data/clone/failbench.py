#!/usr/bin/env python3
# Failover time: a verify:seq=1 guest checkpointed every 50 ms (clone --epochs), its primary
# SIGKILLed at a random moment (0-400 ms after the second epoch), N times. Per kill: ms from
# the kill to the standby's "FAILOVER" line on stderr (detection + resume), and to the
# standby's first byte of new guest output (adds the wait for the guest's next pass mark);
# each time the primary's released serial + the standby's is checked to number every pass
# once (no gap, no repeat, no X). Polls at 1 ms. Usage:
#   VMIGRATE=target/release/vmigrate python3 failbench.py [N] [GUEST] [MEM]
import json, os, random, re, signal, subprocess, sys, time
B = os.environ.get("VMIGRATE", "target/release/vmigrate")
D = os.environ.get("OUT", "/tmp/vmigrate-failbench")
N = int(sys.argv[1]) if len(sys.argv) > 1 else 20
GUEST = sys.argv[2] if len(sys.argv) > 2 else "verify:end=4M,seq=1"
MEM = sys.argv[3] if len(sys.argv) > 3 else "256M"
os.makedirs(D, exist_ok=True)
seed = int(os.environ.get("SEED", time.time()))
rng = random.Random(seed)

def read(p):
    try: return open(p, "rb").read()
    except FileNotFoundError: return b""

def info(api):
    return json.loads(subprocess.run([B, "info", "--api-socket", api, "--json"], capture_output=True, check=True).stdout)

def check(stream):
    t = stream.decode(errors="replace")
    assert "X" not in t, "X in the output"
    marks = t.lstrip("B").split(".")[1:-1]
    nums = [int(m, 16) for m in marks]
    assert all(len(m) == 4 for m in marks), "torn mark"
    for a, b in zip(nums, nums[1:]):
        assert b == (a + 1) % 65536, f"pass {b:#x} after {a:#x}"
    return len(nums)

def wait(cond, what, limit=60):
    end = time.time() + limit
    while not cond():
        if time.time() > end: raise SystemExit(f"timeout: {what}")
        time.sleep(0.001)

detect, output = [], []
for i in range(N):
    for f in os.listdir(D): os.remove(os.path.join(D, f))
    p = {k: f"{D}/{k}" for k in ["src.api", "src.serial", "src.err", "sb.api", "sb.serial", "sb.err"]}
    src = subprocess.Popen([B, "run", "--workload", GUEST, "--mem", MEM, "--serial", p["src.serial"], "--api-socket", p["src.api"]], stderr=open(p["src.err"], "w"))
    wait(lambda: read(p["src.serial"]).count(b".") >= 2, "primary marks")
    sb = subprocess.Popen([B, "run", "--incoming", "tcp:127.0.0.1:0", "--insecure", "--standby", "--serial", p["sb.serial"], "--api-socket", p["sb.api"]], stdout=subprocess.PIPE, stderr=open(p["sb.err"], "w"))
    uri = sb.stdout.readline().decode().strip().replace("vmigrate: listening on ", "")
    r = subprocess.run([B, "clone", "--api-socket", p["src.api"], "--to", uri, "--insecure", "--json", "--downtime-limit", "2000", "--epochs", "--epoch-ms", "50"], capture_output=True)
    assert r.returncode == 0, r.stderr
    wait(lambda: (info(p["src.api"]).get("checkpoints") or {}).get("epochs", 0) >= 2, "epochs")
    time.sleep(rng.uniform(0, 0.4))
    src.send_signal(signal.SIGKILL); t0 = time.time(); src.wait()
    wait(lambda: b"FAILOVER" in read(p["sb.err"]), "takeover")
    d = (time.time() - t0) * 1000
    err = read(p["sb.err"]).decode()
    replayed = int(re.search(r"\((\d+) bytes of output", err).group(1))
    wait(lambda: len(read(p["sb.serial"])) > replayed, "new output")
    o = (time.time() - t0) * 1000
    wait(lambda: read(p["sb.serial"]).count(b".") >= 5, "standby marks")
    passes = check(read(p["src.serial"]) + read(p["sb.serial"]))
    detect.append(d); output.append(o)
    print(json.dumps(dict(kill=i, detect_ms=round(d, 1), new_output_ms=round(o, 1), replayed=replayed, passes_whole=passes))); sys.stdout.flush()
    subprocess.run([B, "shutdown", "--api-socket", p["sb.api"]], capture_output=True); sb.wait()

def summary(xs):
    xs = sorted(xs); return dict(min=round(xs[0], 1), median=round(xs[len(xs) // 2], 1), max=round(xs[-1], 1))
print(json.dumps(dict(seed=seed, kills=N, guest=GUEST, mem=MEM, detect_ms=summary(detect), new_output_ms=summary(output))))
