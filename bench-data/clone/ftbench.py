#!/usr/bin/env python3
# Live clone + checkpoint epochs of 1 GiB guests at 25/50/100 ms: clone time, bytes,
# downtime; epoch pause p50/p99/max (the primary's hdrhistogram), MB per epoch; guest
# speed (pass marks per second) with epochs on relative to the same guest just before the
# clone. Usage: VMIGRATE=path/to/release/vmigrate python3 ftbench.py "verify hotset:wss=64M"
import subprocess, time, json, os, sys
B=os.environ.get("VMIGRATE", "target/release/vmigrate")
D=os.environ.get("OUT", "/tmp/vmigrate-ftbench")
os.makedirs(D, exist_ok=True)
def marks(path): 
    try: return open(path,'rb').read().count(b'.')
    except FileNotFoundError: return 0
def rate(path, secs):
    a=marks(path); t=time.time(); time.sleep(secs); return (marks(path)-a)/(time.time()-t)
def j(*args):
    return json.loads(subprocess.run([B,*args,"--json"],capture_output=True,check=True).stdout)
res=[]
for wl in sys.argv[1].split():
  for ep in [25,50,100]:
    tag=f"{wl.replace(':','_').replace('=','_')}-{ep}"
    for f in os.listdir(D):
        if f.startswith(tag): os.remove(os.path.join(D,f))
    src=subprocess.Popen([B,"run","--workload",wl,"--mem","1G","--serial",f"{D}/{tag}-src.serial","--api-socket",f"{D}/{tag}-src.api"],stderr=open(f"{D}/{tag}-src.err","w"))
    time.sleep(3)
    off=rate(f"{D}/{tag}-src.serial",5)
    dst=subprocess.Popen([B,"run","--incoming","tcp:127.0.0.1:0","--insecure","--standby","--serial",f"{D}/{tag}-dst.serial","--api-socket",f"{D}/{tag}-dst.api"],stdout=subprocess.PIPE,stderr=open(f"{D}/{tag}-dst.err","w"))
    uri=dst.stdout.readline().decode().strip().replace("vmigrate: listening on ","")
    pol = "qemu" if wl.startswith("verify") else "xen"
    r=subprocess.run([B,"clone","--api-socket",f"{D}/{tag}-src.api","--to",uri,"--insecure","--json","--policy",pol,"--epochs","--epoch-ms",str(ep)],capture_output=True)
    rep=json.loads(r.stdout)
    time.sleep(1)
    on=rate(f"{D}/{tag}-src.serial",5)
    st=j("info","--api-socket",f"{D}/{tag}-src.api")
    c=st["checkpoints"]
    sb=j("info","--api-socket",f"{D}/{tag}-dst.api")
    x=open(f"{D}/{tag}-src.serial",'rb').read().count(b'X')
    line=dict(workload=wl, epoch_ms=ep, clone_ms=round(rep["total-time"]), clone_bytes=rep["ram"]["transferred"], clone_downtime=round(rep["downtime"],1),
              passes_off=round(off,2), passes_on=round(on,2), speed=round(on/off,3) if off else None,
              epochs=c["epochs"], p50=c["pause"]["p50"], p99=c["pause"]["p99"], max=c["pause"]["max"], mb_per_epoch=round(c["bytes"]/max(c["epochs"],1)/1e6,2), ended=c["ended"], standby_epochs=sb["checkpoints"]["epochs"], standby_serial=sb["serial-bytes"], X=x)
    print(json.dumps(line)); sys.stdout.flush()
    subprocess.run([B,"shutdown","--api-socket",f"{D}/{tag}-src.api"],capture_output=True)
    subprocess.run([B,"shutdown","--api-socket",f"{D}/{tag}-dst.api"],capture_output=True)
    src.wait(); dst.wait()
