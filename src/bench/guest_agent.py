# The guest side of `bench matrix`'s guest targets (src/bench/guest.rs): run as the guest lab's
# script (tests/lab/README.md), with PORT and TARGETS set above this text by the runner. It
# attaches each target's volume (a vhost-user-blk disk is already there; an NVMe/TCP target is
# connected with nvme-cli at the host's 10.0.2.2), connects to the runner at 10.0.2.2:PORT (the
# host's 127.0.0.1), says which block device each target is, then runs every fio command line
# the runner sends, one JSON line each way, until it says exit:
#   guest -> host  {"ready": true, "devices": {"<target index>": "/dev/vda"}, "kernel": "..."}
#                  {"ready": false, "error": "..."}
#   host -> guest  {"args": [...], "timeout": SECONDS}    guest -> host  {"status": N,
#                  "stdout": "...", "stderr": "..."} or {"error": "..."}
#   host -> guest  {"exit": true}                          (NVMe/TCP disconnected, then exit 0)
import glob
import json
import os
import re
import socket
import stat
import subprocess
import sys
import time

HOST = "10.0.2.2"


def wait_for(what, secs):
    """what() until it returns something true, for up to secs seconds."""
    end = time.time() + secs
    while True:
        found = what()
        if found or time.time() > end:
            return found
        time.sleep(0.2)


def is_block(path):
    try:
        return stat.S_ISBLK(os.stat(path).st_mode)
    except OSError:
        return False


def read(path):
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def nvme_device(nqn, nsid):
    """The block device of namespace nsid of subsystem nqn (multipath head or plain disk)."""
    for b in sorted(glob.glob("/sys/block/nvme*")):
        name = os.path.basename(b)
        if not re.fullmatch(r"nvme\d+n\d+", name):
            continue
        if read(b + "/device/subsysnqn") == nqn and read(b + "/nsid") == str(nsid):
            dev = "/dev/" + name
            if is_block(dev):
                return dev
    return None


def attach(targets):
    """Every target's block device, or raises RuntimeError naming the target."""
    devices, connected = {}, []
    for t in targets:
        if t["kind"] == "vhost":
            dev = "/dev/vd" + chr(ord("a") + t["disk"])
            if not wait_for(lambda: is_block(dev), 60):
                raise RuntimeError("target %s: no %s (vhost-user-blk disk %d)"
                                   % (t["name"], dev, t["disk"]))
        else:
            key = (t["port"], t["nqn"])
            if key not in connected:
                r = subprocess.run(["nvme", "connect", "-t", "tcp", "-a", HOST,
                                    "-s", str(t["port"]), "-n", t["nqn"]],
                                   capture_output=True, text=True)
                if r.returncode != 0:
                    raise RuntimeError("target %s: nvme connect to %s:%d %s failed: %s"
                                       % (t["name"], HOST, t["port"], t["nqn"],
                                          (r.stderr or r.stdout).strip()))
                connected.append(key)
            dev = wait_for(lambda: nvme_device(t["nqn"], t["ns"]), 60)
            if not dev:
                raise RuntimeError("target %s: no block device for namespace %d of %s"
                                   % (t["name"], t["ns"], t["nqn"]))
        devices[str(t["index"])] = dev
    return devices, connected


def fio(cmd):
    try:
        r = subprocess.run(["fio"] + cmd["args"], capture_output=True, text=True,
                           timeout=cmd["timeout"])
    except subprocess.TimeoutExpired:
        return {"error": "fio timed out after %d s in the guest" % cmd["timeout"]}
    except OSError as e:
        return {"error": "cannot run fio in the guest: %s" % e}
    return {"status": r.returncode, "stdout": r.stdout, "stderr": r.stderr}


def main():
    sock = None
    for _ in range(100):
        try:
            sock = socket.create_connection((HOST, PORT), timeout=10)
            break
        except OSError as e:
            err = e
            time.sleep(0.5)
    if sock is None:
        print("bench agent: cannot reach the runner at %s:%d: %s" % (HOST, PORT, err))
        return 1
    sock.settimeout(None)
    f = sock.makefile("rw", encoding="utf-8", newline="\n")

    def send(obj):
        f.write(json.dumps(obj) + "\n")
        f.flush()

    try:
        devices, connected = attach(TARGETS)
    except RuntimeError as e:
        send({"ready": False, "error": str(e)})
        return 1
    send({"ready": True, "devices": devices, "kernel": os.uname().release})
    for line in f:
        cmd = json.loads(line)
        if cmd.get("exit"):
            break
        send(fio(cmd))
    for _port, nqn in connected:
        subprocess.run(["nvme", "disconnect", "-n", nqn], capture_output=True)
    return 0


sys.exit(main())
