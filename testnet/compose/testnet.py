#!/usr/bin/env python3
"""The docker-compose testnet's driver (called by `testnet/run`).

Scenarios:
  up      start origin, registry, tracker, seeds and peers (shaped), wait until the swarm is joined
  bench   distribute one file to every peer three ways in one run: df, plain HTTP, BitTorrent (aria2c);
          `--methods ...,mesh` adds what the shaped links carry all-to-all (the ceiling of any swarm)
  chaos   a df distribution while a seed stops, 30 % of peers are killed and one peer is cut off
  image   every peer pulls one multi-layer image at once, through its mirror and directly
  cluster a seed cluster (--seeds 3 by default here): a file preheated from a peer then fetched by every peer
          with back-to-source off; then a fresh file with the task's first owner stopped at 0.3 T*
  down    stop and remove everything

Reports go to testnet/out/: report.json, report.md, timeline.json, cdf.png, timeline.png (bench); chaos.json/.md;
image.json/.md; cluster.json/.md.
"""

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

from prom import SCRAPE_INTERVAL_S, Prometheus
from prom import panel as prom_panel

HERE = Path(__file__).resolve().parent
TESTNET = HERE.parent
OUT = TESTNET / "out"
WWW = OUT / "www"
PROJECT = "dftestnet"
API = "127.0.0.1:7000"


def log(*a):
    print("[testnet]", *a, file=sys.stderr, flush=True)


def parse_size(s):
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([KMG]i?B?|B)?", s.strip(), re.I)
    if not m:
        raise argparse.ArgumentTypeError(f"bad size {s!r}")
    n = float(m.group(1))
    unit = (m.group(2) or "B").upper().rstrip("B").rstrip("I")
    return int(n * {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}[unit])


def parse_rate(s):
    """tc rate (e.g. 100mbit) to bytes/s; '' or 0 = unshaped."""
    if not s:
        return None
    m = re.fullmatch(r"(\d+(?:\.\d+)?)([kmg]?)(bit|bps)", s.strip().lower())
    if not m:
        raise argparse.ArgumentTypeError(f"bad rate {s!r}: use e.g. 100mbit")
    n = float(m.group(1)) * {"": 1, "k": 1e3, "m": 1e6, "g": 1e9}[m.group(2)]
    return n / 8 if m.group(3) == "bit" else n


def sh(args, check=True, capture=True, env=None, timeout=None):
    r = subprocess.run(args, capture_output=capture, text=True, env=env, timeout=timeout)
    if check and r.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed ({r.returncode}): {r.stderr.strip()}")
    return r.stdout if capture else ""


def compose_env(a):
    env = dict(os.environ)
    env.update(
        DF_TESTNET_OUT=str(OUT),
        DF_TESTNET_WWW=str(WWW),
        ORIGIN_UP=a.origin_rate or a.rate or "",
        ORIGIN_DOWN="",
        SEED_UP=a.seed_rate or a.rate or "",
        SEED_DOWN=a.seed_rate or a.rate or "",
        PEER_UP=a.peer_up or a.rate or "",
        PEER_DOWN=a.peer_down or a.rate or "",
        SEED_BOOTSTRAP="/dns4/seed/tcp/4001" if a.seeds > 1 else "",
        PEER_BOOTSTRAP="/dns4/seed/tcp/4001",
        # A TOML config every seed and peer reads (`--node-config`), copied into the shared /out.
        DF_NODE_CONFIG="/out/node.toml" if getattr(a, "node_config", None) else "",
    )
    return env


def compose(a, *args, check=True):
    cmd = ["docker-compose", "-p", PROJECT, "-f", str(HERE / "docker-compose.yml"), *args]
    return sh(cmd, check=check, env=compose_env(a))


def containers(a, service):
    ids = compose(a, "ps", "-q", service).split()
    names = []
    for i in ids:
        names.append(sh(["docker", "inspect", "-f", "{{.Name}}", i]).strip().lstrip("/"))

    def num(n):
        m = re.search(r"_(\d+)$", n)
        return int(m.group(1)) if m else 0

    return sorted(names, key=num)


def dexec(c, cmd, check=True, timeout=None):
    return sh(["docker", "exec", c, "sh", "-c", cmd], check=check, timeout=timeout)


def status(c):
    try:
        return json.loads(dexec(c, f"/usr/bin/df status --api {API}", timeout=10))
    except Exception:
        return None


def write_swarm_key():
    """A fresh swarm key (IPFS swarm.key format) for this testnet: seeds and peers read it from
    /out/swarm.key (DF_SWARM_KEY), so they form one private swarm."""
    path = OUT / "swarm.key"
    if path.exists():
        path.unlink()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write("/key/swarm/psk/1.0.0/\n/base16/\n" + os.urandom(32).hex() + "\n")


def up(a):
    OUT.mkdir(parents=True, exist_ok=True)
    write_swarm_key()
    WWW.mkdir(parents=True, exist_ok=True)
    node_config = OUT / "node.toml"
    node_config.unlink(missing_ok=True)
    if getattr(a, "node_config", None):
        shutil.copyfile(a.node_config, node_config)
    if a.seeds < 1:
        raise SystemExit("the testnet's peers join through a seed: use --seeds 1 or more")
    log(f"starting {a.seeds} seed(s), {a.peers} peers; rates: origin {a.origin_rate or a.rate or 'unshaped'}, "
        f"peers up {a.peer_up or a.rate or 'unshaped'} / down {a.peer_down or a.rate or 'unshaped'}")
    compose(a, "up", "-d", "--scale", f"seed={a.seeds}", "--scale", f"peer={a.peers}")
    members = containers(a, "seed") + containers(a, "peer")
    deadline = time.time() + 60
    pending = set(members)
    while pending and time.time() < deadline:
        for c in list(pending):
            s = status(c)
            if s and (s["connected_peers"] >= 1 or len(members) == 1):
                pending.discard(c)
        if pending:
            time.sleep(0.5)
    if pending:
        for c in pending:
            log(f"--- {c} log ---\n" + sh(["docker", "logs", "--tail", "30", c], check=False))
        raise SystemExit(f"not joined after 60 s: {sorted(pending)}")
    log("swarm joined:", ", ".join(members))


def down(a):
    compose(a, "down", "-v", "--remove-orphans", "-t", "5", check=False)


def make_file(size):
    WWW.mkdir(parents=True, exist_ok=True)
    path = WWW / "file.bin"
    if path.exists() and path.stat().st_size == size:
        h = hashlib.sha256(path.read_bytes()).hexdigest()
        return path, h
    h = hashlib.sha256()
    with open(path, "wb") as f:
        left = size
        while left:
            chunk = os.urandom(min(left, 1 << 20))
            f.write(chunk)
            h.update(chunk)
            left -= len(chunk)
    return path, h.hexdigest()


def origin_body_bytes(tag):
    """Body bytes nginx sent for requests whose URL contains `tag`."""
    total = 0
    p = OUT / "origin-access.log"
    if not p.exists():
        return 0
    for line in p.read_text(errors="replace").splitlines():
        if tag in line:
            parts = line.rsplit('"', 2)[0].split()
            try:
                total += int(parts[-1])
            except (ValueError, IndexError):
                pass
    return total


def tx_bytes(c):
    return int(dexec(c, "cat /sys/class/net/eth0/statistics/tx_bytes").strip())


def uptime():
    with open("/proc/uptime") as f:
        return float(f.read().split()[0])


# Printed by a peer's command the moment its download ends, before it hashes the output: the
# kernel's uptime, which containers share with the host, so hashing is not timed.
DONE = "echo DF_DONE $(cut -d' ' -f1 /proc/uptime)"


def cpu_seconds(names):
    """CPU seconds each container has used so far (cgroup v1 cpuacct or v2 cpu.stat, read on the
    host); containers whose cgroup is not found are left out."""
    out = {}
    for c in names:
        cid = sh(["docker", "inspect", "-f", "{{.Id}}", c], check=False).strip()
        for path, scale in ((f"/sys/fs/cgroup/cpuacct/docker/{cid}/cpuacct.usage", 1e-9),
                            (f"/sys/fs/cgroup/system.slice/docker-{cid}.scope/cpu.stat", 1e-6),
                            (f"/sys/fs/cgroup/docker/{cid}/cpu.stat", 1e-6)):
            try:
                text = Path(path).read_text()
            except OSError:
                continue
            if path.endswith("cpu.stat"):
                usage = next((int(line.split()[1]) for line in text.splitlines()
                              if line.startswith("usage_usec ")), None)
            else:
                usage = int(text.strip())
            if usage is not None:
                out[c] = usage * scale
            break
    return out


def host_cpu():
    """(busy, total) jiffies of the whole machine and its context switches so far, from /proc/stat."""
    with open("/proc/stat") as f:
        lines = f.read().splitlines()
    vals = [int(v) for v in lines[0].split()[1:]]
    idle = vals[3] + (vals[4] if len(vals) > 4 else 0)
    ctxt = next((int(line.split()[1]) for line in lines if line.startswith("ctxt ")), 0)
    return sum(vals) - idle, sum(vals), ctxt, time.time()


def cpu_use(before, after, host0, host1, names):
    """What a method cost in CPU: seconds per role and the machine's busy share while it ran."""
    used = {c: after[c] - before[c] for c in names if c in before and c in after}
    roles = {}
    for c, s in used.items():
        role = next((r for r in ("seed", "peer", "origin", "tracker", "registry") if f"_{r}_" in c), "other")
        roles[role] = round(roles.get(role, 0.0) + s, 2)
    busy, total = host1[0] - host0[0], host1[1] - host0[1]
    # Context switches per second: a wake-up per received segment shows here before it shows as time.
    secs = host1[3] - host0[3]
    return {"cpu_s_by_role": roles, "host_busy": round(busy / total, 3) if total else None,
            "host_ctxt_per_s": round((host1[2] - host0[2]) / secs) if secs > 0 else None}


def done_at(out):
    for line in out.splitlines():
        if line.startswith("DF_DONE "):
            try:
                return float(line.split()[1])
            except (ValueError, IndexError):
                return None
    return None


def run_parallel(peers, make_cmd, timeout):
    """Runs make_cmd(peer) in every peer at once; returns {peer: (seconds, ok, stdout)}. A command
    that prints a DONE line is timed to it (the download alone); else to its exit."""
    res = {}
    start = time.time()
    up0 = uptime()

    def one(c):
        try:
            out = dexec(c, make_cmd(c), timeout=timeout)
            done = done_at(out)
            took = done - up0 if done is not None else time.time() - start
            res[c] = (took, True, out)
        except Exception as e:  # noqa: BLE001 - reported in the result
            res[c] = (time.time() - start, False, str(e))

    ts = [threading.Thread(target=one, args=(c,)) for c in peers]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    return start, res


def summarize(res, want, origin_bytes):
    times = sorted(t for t, ok, _ in res.values() if ok)
    hashes_ok = all(ok and want in out for _, ok, out in res.values())
    p50 = times[len(times) // 2] if times else None
    return {
        "ok": hashes_ok and len(times) == len(res),
        "times_s": [round(res[c][0], 3) for c in sorted(res)],
        "p50_s": round(p50, 3) if p50 is not None else None,
        "max_s": round(times[-1], 3) if times else None,
        "origin_bytes": origin_bytes,
        "failed": sorted(c for c, (_, ok, out) in res.items() if not (ok and want in out)),
        "errors": {c: out.strip()[-500:] for c, (_, ok, out) in res.items() if not ok},
    }


def t_star(a, size, n):
    us = parse_rate(a.origin_rate or a.rate)
    up_ = parse_rate(a.peer_up or a.rate)
    dn = parse_rate(a.peer_down or a.rate)
    terms = []
    if us:
        terms.append(size / us)
    if dn:
        terms.append(size / dn)
    if us and up_:
        terms.append(n * size / (us + n * up_))
    return max(terms) if terms else None


def goodput_t_star(a, peer, size, ts, run_id):
    """T* at the rate one TCP transfer really reaches on the shaped links (headers and tbf's
    accounting take a share of the nominal rate): one peer fetches up to 16 MiB of the file from
    the origin, timed from its first byte. Returns (goodput-T* in s, goodput in bit/s)."""
    n = min(size, 16 << 20)
    out = dexec(peer, f"curl -s -o /dev/null -r 0-{n - 1} -w '%{{size_download}} %{{time_starttransfer}} "
                      f"%{{time_total}}' 'http://origin/file.bin?goodput={run_id}'", timeout=120)
    got, first, total = out.split()
    secs = float(total) - float(first)
    if int(got) != n or secs <= 0:
        raise RuntimeError(f"goodput probe fetched {got} of {n} bytes in {secs} s")
    bps = 8 * n / secs
    nominal = min(r for r in (parse_rate(a.origin_rate or a.rate), parse_rate(a.peer_down or a.rate)) if r)
    # parse_rate gives bytes per second; never report a goodput above the nominal rate.
    eff = min(1.0, bps / 8 / nominal)
    return ts / eff, bps


# df's output beside its store (/data/df is the node's data directory): on one filesystem, as on a
# host with one disk, where `df get -o` makes the output a hard link to the node's content file
# instead of writing every byte again. /tmp is another mount here (a link across mounts fails).
DF_OUT = "/data/df.out"


def df_get_all(peers, url, timeout):
    """`df get` of `url` on every peer at once, each printing the sha256 of what it wrote."""
    return run_parallel(
        peers,
        lambda c: f"/usr/bin/df get '{url}' -o {DF_OUT} --api {API} --no-progress --timeout {timeout}s "
                  f"&& {DONE} && sha256sum {DF_OUT} && rm -f {DF_OUT}",
        timeout + 30,
    )


def method_df(a, peers, run_id, want):
    start, res = df_get_all(peers, f"http://origin/file.bin?df={run_id}", a.timeout)
    return start, summarize(res, want, origin_body_bytes(f"df={run_id}"))


def method_http(a, peers, run_id, want):
    url = f"http://origin/file.bin?http={run_id}"
    start, res = run_parallel(
        peers,
        lambda c: f"curl -sSf -o /tmp/http.out '{url}' && {DONE} && sha256sum /tmp/http.out && rm -f /tmp/http.out",
        a.timeout + 30,
    )
    return start, summarize(res, want, origin_body_bytes(f"http={run_id}"))


MESH_PORT = 8080
# "[8]" so that pkill -f does not match the shell running it.
MESH_KILL = "pkill -f 'httpd -p [8]080'"


def method_mesh(a, peers, size):
    """What the shaped network carries when every peer downloads at once from the others: each
    peer serves size/k bytes of random data over plain HTTP (busybox httpd) and fetches that from
    each of the next k peers at once (k = min(4, peers - 1)). No origin, no hashing, no P2P logic:
    the ceiling a swarm can reach on these links and this machine."""
    n = len(peers)
    k = min(4, n - 1)
    if k < 1:
        raise SystemExit("the mesh baseline needs at least 2 peers")
    part = size // k
    want = f"MESH_BYTES {part * k}"

    def serve(c):
        dexec(c, f"{MESH_KILL}; rm -rf /tmp/mesh; mkdir -p /tmp/mesh && "
                 f"head -c {part} /dev/urandom > /tmp/mesh/part && "
                 f"busybox httpd -p {MESH_PORT} -h /tmp/mesh", check=True)

    ts = [threading.Thread(target=serve, args=(c,)) for c in peers]
    for t in ts:
        t.start()
    for t in ts:
        t.join()

    def fetch(c):
        i = peers.index(c)
        gets = " ".join(f"curl -sSf -o /tmp/mesh.{j} http://{peers[(i + j) % n]}:{MESH_PORT}/part &"
                        for j in range(1, k + 1))
        return (f"rm -f /tmp/mesh.*; {gets} wait; {DONE}; echo MESH_BYTES $(cat /tmp/mesh.* | wc -c); "
                f"rm -f /tmp/mesh.*")

    try:
        start, res = run_parallel(peers, fetch, a.timeout + 30)
    finally:
        for c in peers:
            dexec(c, f"{MESH_KILL}; rm -rf /tmp/mesh", check=False)
    return start, summarize(res, want, 0)


def method_bittorrent(a, peers, run_id, want, origin):
    torrent = WWW / "file.torrent"
    torrent.unlink(missing_ok=True)
    # 1 MiB pieces (mktorrent -l 20), like df's piece size for files of this order.
    sh(["mktorrent", "-a", "http://tracker:6969/announce", "-l", "20", "-o", str(torrent), str(WWW / "file.bin")])
    # Whitelist the torrent on the tracker (Debian's opentracker only serves listed info hashes).
    (OUT / "tracker-whitelist").write_text(info_hash(torrent.read_bytes()) + "\n")
    for t in containers(a, "tracker"):
        sh(["docker", "kill", "-s", "HUP", t], check=False)
    common = ("--enable-dht=false --bt-enable-lpd=false --enable-peer-exchange=true --file-allocation=none "
              "--summary-interval=0 --console-log-level=warn --bt-max-peers=64 --seed-ratio=0.0 "
              "--bt-tracker-interval=5 --bt-request-peer-speed-limit=0")
    dexec(origin, "pkill aria2c; true", check=False)
    before = tx_bytes(origin)
    dexec(origin, f"aria2c {common} --dir=/www --bt-seed-unverified=true --check-integrity=false "
                  f"--listen-port=6881 /www/file.torrent > /tmp/aria2-seed.log 2>&1 &")
    time.sleep(1)
    for c in peers:
        dexec(c, "pkill aria2c; rm -rf /tmp/bt; mkdir -p /tmp/bt; true", check=False)
    # Each peer downloads (aria2c exits when the file is complete and verified: that moment is its
    # completion time), then keeps seeding in the background, as BitTorrent users do.
    opts = f"{common} --dir=/tmp/bt --listen-port=6881 /out/www/file.torrent"
    start, res = run_parallel(
        peers,
        lambda c: f"aria2c {opts} --seed-time=0 > /tmp/aria2.log 2>&1 && {DONE} && "
                  f"(aria2c {opts} --bt-seed-unverified=true > /tmp/aria2-seed.log 2>&1 &) && "
                  f"sha256sum /tmp/bt/file.bin",
        a.timeout,
    )
    for c in peers:
        dexec(c, "pkill aria2c; rm -rf /tmp/bt; true", check=False)
    dexec(origin, "pkill aria2c; true", check=False)
    sent = tx_bytes(origin) - before
    s = summarize(res, want, sent)
    s["origin_bytes_note"] = "seeder's eth0 tx_bytes (wire bytes, headers included)"
    return start, s


def info_hash(torrent):
    """SHA-1 of the bencoded `info` dictionary, hex."""
    def skip(b, i):
        c = b[i:i + 1]
        if c == b"i":
            return b.index(b"e", i) + 1
        if c in (b"l", b"d"):
            i += 1
            while b[i:i + 1] != b"e":
                i = skip(b, i)
            return i + 1
        colon = b.index(b":", i)
        return colon + 1 + int(b[i:colon])

    i = 1  # inside the top-level dictionary
    while torrent[i:i + 1] != b"e":
        key_end = skip(torrent, i)
        key = torrent[torrent.index(b":", i) + 1:key_end]
        val_end = skip(torrent, key_end)
        if key == b"info":
            return hashlib.sha1(torrent[key_end:val_end]).hexdigest()
        i = val_end
    raise ValueError("torrent without info")


def peer_ids(members):
    ids = {}
    for c in members:
        s = status(c)
        if s:
            ids[s["peer_id"]] = c
    return ids


PIECE_RE = re.compile(r"^(\S+)\s+DEBUG\s+(?:task\{[^}]*\}:\s+)?df_piece:.*?index=(\d+).*?from=(\S+)")


def piece_timeline(members, since):
    """Per container: [(t, index, source container or 'origin')] from the df_piece log lines."""
    ids = peer_ids(members)
    out = {}
    for c in members:
        logs = subprocess.run(["docker", "logs", "--since", str(int(since) - 1), c],
                              capture_output=True, text=True)
        rows = []
        for line in (logs.stdout + "\n" + logs.stderr).splitlines():
            line = re.sub(r"\x1b\[[0-9;]*m", "", line)
            m = PIECE_RE.search(line)
            if not m:
                continue
            ts = m.group(1)
            try:
                from datetime import datetime
                t = datetime.fromisoformat(ts.replace("Z", "+00:00")).timestamp() - since
            except ValueError:
                continue
            src = m.group(3).strip('"')
            rows.append((t, int(m.group(2)), ids.get(src, "origin" if src == "origin" else src[:12])))
        out[c] = rows
    return out


def plots(report, timeline, peers):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib missing (pip install matplotlib): no PNG plots")
        return []
    made = []
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, m in report["methods"].items():
        ts = sorted(t for t in m["times_s"] if t is not None)
        if not ts:
            continue
        ys = [(i + 1) / len(ts) for i in range(len(ts))]
        ax.step(ts, ys, where="post", label=name)
    if report.get("t_star_s"):
        ax.axvline(report["t_star_s"], color="k", ls="--", lw=1, label="T*")
    ax.set_xlabel("completion time (s)")
    ax.set_ylabel("fraction of peers done")
    ax.set_title(f"{report['peers']} peers, {report['size_bytes'] / 2**20:.0f} MiB")
    ax.legend()
    fig.tight_layout()
    fig.savefig(OUT / "cdf.png", dpi=110)
    made.append("cdf.png")
    plt.close(fig)

    if timeline:
        fig, ax = plt.subplots(figsize=(9, 0.45 * len(timeline) + 1.5))
        names = list(timeline)
        kinds = {}
        for row, c in enumerate(names):
            for t, _idx, src in timeline[c]:
                kind = "origin" if src == "origin" else ("seed" if "_seed_" in src else "peer")
                kinds.setdefault(kind, ([], []))
                kinds[kind][0].append(t)
                kinds[kind][1].append(row)
        colors = {"origin": "tab:red", "seed": "tab:orange", "peer": "tab:blue"}
        for kind, (xs, ys) in kinds.items():
            ax.scatter(xs, ys, s=4, c=colors.get(kind, "gray"), label=f"from {kind}")
        ax.set_yticks(range(len(names)))
        ax.set_yticklabels([n.replace(f"{PROJECT}_", "") for n in names])
        ax.set_xlabel("time since start (s)")
        ax.set_title("df: when each piece arrived, and from whom")
        ax.legend(loc="lower right")
        fig.tight_layout()
        fig.savefig(OUT / "timeline.png", dpi=110)
        made.append("timeline.png")
        plt.close(fig)
    return made


def bench(a):
    size = a.size
    path, want = make_file(size)
    up(a)
    peers = containers(a, "peer")
    seeds = containers(a, "seed")
    origin = containers(a, "origin")[0]
    run_id = str(int(time.time()))
    n = len(peers)
    ts = t_star(a, size, n)
    report = {"peers": n, "seeds": len(seeds), "size_bytes": size, "t_star_s": round(ts, 3) if ts else None,
              "rates": {"origin_up": a.origin_rate or a.rate, "peer_up": a.peer_up or a.rate,
                        "peer_down": a.peer_down or a.rate, "seed": a.seed_rate or a.rate},
              "methods": {}}
    if ts:
        try:
            gts, bps = goodput_t_star(a, peers[0], size, ts, run_id)
            report["goodput_t_star_s"], report["goodput_mbit_s"] = round(gts, 3), round(bps / 1e6, 1)
            log(f"T* = {ts:.2f} s; one TCP transfer reaches {bps / 1e6:.1f} Mbit/s: goodput-T* = {gts:.2f} s")
        except Exception as e:
            log(f"goodput probe failed: {e}")
    timeline = {}
    everyone = seeds + peers + [origin]
    # A real Prometheus scrapes every seed and peer while the methods run.
    prom = Prometheus(OUT, seeds + peers, log)
    df_window = None
    try:
        for m in a.methods.split(","):
            log(f"method {m}: {n} peers fetch {size / 2**20:.0f} MiB at once")
            cpu0, host0 = cpu_seconds(everyone), host_cpu()
            if m == "df":
                start, r = method_df(a, peers, run_id, want)
                # The window the metrics panel shows (one more scrape after the last download).
                time.sleep(SCRAPE_INTERVAL_S * 1.5)
                df_window = (start - SCRAPE_INTERVAL_S, time.time(), start)
                timeline = piece_timeline(seeds + peers, start)
                # How many copies of the file the seeds' uplinks carried (pieces peers got from a seed).
                pieces = 1 + max((i for c in peers for _t, i, _s in timeline.get(c, [])), default=-1)
                from_seed = sum(1 for c in peers for _t, _i, src in timeline.get(c, []) if "_seed_" in src)
                if pieces:
                    r["seed_copies"] = round(from_seed / pieces, 3)
                # When the last byte left the origin: what the peers' tail is measured from.
                fetched = [t for c in seeds + peers for t, _i, src in timeline.get(c, []) if src == "origin"]
                if fetched:
                    r["origin_done_s"] = round(max(fetched), 3)
                    # Start-up: the seed's first piece from the origin, and each peer's first piece.
                    r["origin_first_s"] = round(min(fetched), 3)
                    firsts = sorted(min(t for t, _i, _s in timeline[c]) for c in peers if timeline.get(c))
                    if firsts:
                        r["peer_first_piece_s"] = [round(firsts[0], 3), round(firsts[len(firsts) // 2], 3),
                                                   round(firsts[-1], 3)]
            elif m == "http":
                start, r = method_http(a, peers, run_id, want)
            elif m == "mesh":
                start, r = method_mesh(a, peers, size)
            elif m == "bittorrent":
                start, r = method_bittorrent(a, peers, run_id, want, origin)
            else:
                raise SystemExit(f"unknown method {m}")
            r.update(cpu_use(cpu0, cpu_seconds(everyone), host0, host_cpu(), everyone))
            report["methods"][m] = r
            log(f"  ok={r['ok']} p50={r['p50_s']} max={r['max_s']} origin_bytes={r['origin_bytes']} "
                f"cpu={r['cpu_s_by_role']} host_busy={r['host_busy']} ctxt/s={r['host_ctxt_per_s']}")
    finally:
        if prom.proc and df_window:
            try:
                report["prometheus"] = prom_panel(prom, *df_window, OUT,
                                                  f"df, {n} peers, {size / 2**20:.0f} MiB", log)
            except Exception as e:
                log(f"prometheus queries failed: {e}")
                report["prometheus"] = {"error": str(e)}
        prom.stop()
    if timeline:
        (OUT / "timeline.json").write_text(json.dumps(timeline) + "\n")
    report["plots"] = plots(report, timeline, peers)
    (OUT / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (OUT / "report.md").write_text(report_md(report))
    print(report_md(report))
    if not a.keep:
        down(a)
    bad = [m for m, r in report["methods"].items() if not r["ok"]]
    if bad:
        raise SystemExit(f"methods with wrong or missing outputs: {bad}")


def report_md(r):
    ts = r["t_star_s"]
    gts = r.get("goodput_t_star_s")
    goodput = (f" Goodput-T* = {gts} s: T* at the {r['goodput_mbit_s']} Mbit/s one TCP transfer from the "
               f"origin to a peer reached on these links." if gts else "")
    lines = [f"# testnet bench: {r['peers']} peers, {r['seeds']} seed(s), {r['size_bytes'] / 2**20:.0f} MiB",
             "",
             f"Rates: {r['rates']}. T* = {ts if ts else 'n/a (unshaped)'} s.{goodput}",
             "",
             "| method | ok | p50 (s) | max (s) | p50 / T* | max / T* | p50 / goodput-T* | max / goodput-T* "
             "| origin bytes / S | CPU s (seeds, peers) | host busy | context switches / s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, m in r["methods"].items():
        cpu = m.get("cpu_s_by_role", {})

        def ratio(x, base=ts):
            return f"{x / base:.2f}" if (base and x is not None) else "n/a"
        lines.append(f"| {name} | {m['ok']} | {m['p50_s']} | {m['max_s']} | {ratio(m['p50_s'])} | "
                     f"{ratio(m['max_s'])} | {ratio(m['p50_s'], gts)} | {ratio(m['max_s'], gts)} | "
                     f"{m['origin_bytes'] / r['size_bytes']:.3f} | "
                     f"{cpu.get('seed', 'n/a')}, {cpu.get('peer', 'n/a')} | {m.get('host_busy', 'n/a')} | "
                     f"{m.get('host_ctxt_per_s', 'n/a')} |")
    lines.append("")
    df = r["methods"].get("df", {})
    if "seed_copies" in df:
        lines.append(f"df: the seeds' uplinks sent {df['seed_copies']} x S (pieces peers got from a seed).")
    if "origin_first_s" in df:
        first = df.get("peer_first_piece_s") or ["?"] * 3
        lines.append(f"df start-up: the origin's first piece was stored at {df['origin_first_s']} s; the peers' "
                     f"first pieces came at {first[0]} / {first[1]} / {first[2]} s (min / p50 / max).")
    if "origin_done_s" in df:
        lines.append(f"df: the origin's last piece was stored at {df['origin_done_s']} s; the last peer "
                     f"finished {df['max_s'] - df['origin_done_s']:.2f} s later.")
    lines.append("Times run from the common start to the end of each peer's download; hashing the "
                 "output (to check it) is not timed. CPU s: CPU seconds the containers of each role "
                 "used while the method ran (hashing the outputs included); host busy: the machine's "
                 "non-idle share of all its cores meanwhile; context switches / s: the whole machine's, "
                 "meanwhile (each wake-up of a process or thread counts).")
    if "bittorrent" in r["methods"]:
        lines.append("BitTorrent's origin bytes are the seeder's wire bytes (TCP/IP headers included).")
    for p in r.get("plots", []):
        lines.append(f"![{p}]({p})")
    prom = r.get("prometheus")
    if prom and "error" not in prom:
        src = prom.get("received_bytes_by_source", {})
        total = sum(src.values()) or 1
        lines += ["", "## df as the testnet's Prometheus saw it", "",
                  f"Scraped every {SCRAPE_INTERVAL_S} s from each seed's and peer's `--metrics-listen`; "
                  "`df_received_bytes_total` by source over the run: "
                  + ", ".join(f"{k} {v / 2**20:.1f} MiB ({v / total:.0%})" for k, v in sorted(src.items()))
                  + ". Series per panel: " + ", ".join(f"{k} {v}" for k, v in prom.get("series", {}).items()) + "."]
        if prom.get("plot"):
            lines.append(f"![{prom['plot']}]({prom['plot']})")
    elif prom:
        lines += ["", f"Prometheus: {prom['error']}"]
    return "\n".join(lines) + "\n"


def chaos(a):
    size = a.size
    _, want = make_file(size)
    up(a)
    peers = containers(a, "peer")
    seeds = containers(a, "seed")
    run_id = f"chaos{int(time.time())}"
    ts = t_star(a, size, len(peers)) or 10.0
    killed = peers[: max(1, round(0.3 * len(peers)))] if len(peers) > 2 else []
    cut = peers[len(killed)] if len(peers) > len(killed) else None
    events = []
    net = f"{PROJECT}_dfnet"

    def faults():
        time.sleep(0.3 * ts)
        if seeds:
            sh(["docker", "stop", "-t", "1", seeds[0]], check=False)
            events.append((round(time.time() - start_box[0], 2), f"stopped seed {seeds[0]}"))
        for c in killed:
            sh(["docker", "kill", c], check=False)
            events.append((round(time.time() - start_box[0], 2), f"killed {c}"))
        if cut:
            sh(["docker", "network", "disconnect", net, cut], check=False)
            events.append((round(time.time() - start_box[0], 2), f"disconnected {cut}"))
            time.sleep(max(3.0, 0.3 * ts))
            sh(["docker", "network", "connect", "--alias", "peer", net, cut], check=False)
            # The interface comes back without its qdiscs: shape it again.
            sh(["docker", "exec", cut, "sh", "-c",
                f"UP={a.peer_up or a.rate or ''} DOWN={a.peer_down or a.rate or ''} /testnet/entry.sh true"],
               check=False)
            events.append((round(time.time() - start_box[0], 2), f"reconnected {cut}"))

    start_box = [time.time()]
    th = threading.Thread(target=faults)
    url = f"http://origin/file.bin?{run_id}"
    th.start()
    start, res = df_get_all(peers, url, a.timeout)
    th.join()
    survivors = [c for c in peers if c not in killed]
    rows = []
    for c in peers:
        t, ok, out = res[c]
        rows.append({"peer": c, "killed": c in killed, "cut_off": c == cut, "finished": ok and want in out,
                     "time_s": round(t, 2)})
    rep = {"peers": len(peers), "size_bytes": size, "t_star_s": round(ts, 2), "events": events, "downloads": rows,
           "survivors_all_correct": all(r["finished"] for r in rows if r["peer"] in survivors),
           "origin_bytes": origin_body_bytes(run_id)}
    (OUT / "chaos.json").write_text(json.dumps(rep, indent=2) + "\n")
    md = [f"# chaos: {len(peers)} peers, {size / 2**20:.0f} MiB", "", "Events (s after start):", ""]
    md += [f"- {t}: {e}" for t, e in events]
    md += ["", "| peer | fault | finished with correct bytes | time (s) |", "|---|---|---|---|"]
    for r in rows:
        fault = "killed" if r["killed"] else ("cut off" if r["cut_off"] else "")
        md.append(f"| {r['peer']} | {fault} | {r['finished']} | {r['time_s']} |")
    md += ["", f"origin bytes / S: {rep['origin_bytes'] / size:.3f}"]
    (OUT / "chaos.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    if not a.keep:
        down(a)
    if not rep["survivors_all_correct"]:
        raise SystemExit("a surviving peer did not finish with correct bytes")


def api_json(c, path):
    """GET path on a member's local API (TCP on loopback: no token), as JSON; None on failure."""
    try:
        return json.loads(dexec(c, f"curl -sf http://{API}{path}", timeout=10))
    except Exception:  # noqa: BLE001 - a stopped member answers nothing
        return None


def cluster(a):
    """Preheat, then a failover bench: which seed fetched and served what, origin bytes, times."""
    if a.seeds < 2:
        raise SystemExit("cluster: use --seeds 2 or more")
    size = a.size
    _, want = make_file(size)
    up(a)
    peers, seeds = containers(a, "peer"), containers(a, "seed")
    ids = peer_ids(seeds + peers)
    ts = t_star(a, size, len(peers)) or 10.0
    run_id = str(int(time.time()))
    # Every member ranks the seeds it is connected to: wait until each is connected to every seed
    # (to the others, for a seed), so that all rank alike.
    deadline = time.time() + 90
    while time.time() < deadline:
        counts = {c: (status(c) or {}).get("connected_seeds", 0) for c in seeds + peers}
        if all(n >= len(seeds) - (c in seeds) for c, n in counts.items()):
            break
        time.sleep(1)
    else:
        log(f"not every member is connected to every seed: {counts}")
    rep_mesh = counts
    rep = {"peers": len(peers), "seeds": len(seeds), "size_bytes": size, "t_star_s": round(ts, 3),
           "rates": {"origin_up": a.origin_rate or a.rate, "peer": a.rate, "seed": a.seed_rate or a.rate},
           "connected_seeds": rep_mesh}

    # 1. Preheat from a peer, then every peer fetches with back-to-source off.
    pre_url = f"http://origin/file.bin?pre={run_id}"
    t0 = time.time()
    job = json.loads(dexec(peers[0], f"/usr/bin/df preheat '{pre_url}' --api {API}"))
    dexec(peers[0], f"/usr/bin/df preheat --job {job['id']} --wait --api {API}", check=False,
          timeout=a.timeout)
    job = json.loads(dexec(peers[0], f"/usr/bin/df preheat --job {job['id']} --api {API}"))
    task = job["tasks"][0] if job["tasks"] else {}
    rep["preheat"] = {
        "state": job["state"], "error": job.get("error"), "seconds": round(time.time() - t0, 2),
        "origin_bytes": origin_body_bytes(f"pre={run_id}"),
        "owner": ids.get(task.get("owner", ""), task.get("owner")),
        "hosts": {ids.get(h["peer"], h["peer"][:12]): h["state"] for h in task.get("hosts", [])},
    }
    log(f"preheat: {rep['preheat']}")
    before = origin_body_bytes(f"pre={run_id}")
    start, res = run_parallel(
        peers,
        lambda c: f"/usr/bin/df get '{pre_url}' -o {DF_OUT} --api {API} --no-progress "
                  f"--disable-back-to-source --timeout {a.timeout}s && {DONE} && sha256sum {DF_OUT} "
                  f"&& rm -f {DF_OUT}",
        a.timeout + 30)
    rep["after_preheat"] = summarize(res, want, origin_body_bytes(f"pre={run_id}") - before)
    log(f"after preheat: p50={rep['after_preheat']['p50_s']} max={rep['after_preheat']['max_s']} "
        f"origin_bytes={rep['after_preheat']['origin_bytes']}")

    # 2. A fresh file; its first owner (the seed fetching the origin) is stopped at 0.3 T*.
    url = f"http://origin/file.bin?fo={run_id}"
    events = []
    box = {}

    def stop_first_owner():
        t_kill = box["start"] + 0.3 * ts
        owner = None
        while owner is None and time.time() < t_kill + 30:
            for s in seeds:
                tasks = api_json(s, "/v1/tasks") or []
                if any(t.get("producing") and f"fo={run_id}" in (t.get("source_url") or "") for t in tasks):
                    owner = s
                    break
            else:
                time.sleep(0.2)
        if owner is None:
            events.append((round(time.time() - box["start"], 2), "no seed was seen fetching the origin"))
            return
        time.sleep(max(0.0, t_kill - time.time()))
        sh(["docker", "stop", "-t", "1", owner], check=False)
        events.append((round(time.time() - box["start"], 2), f"stopped the first owner {owner}"))
        box["owner"] = owner

    box["start"] = time.time()
    th = threading.Thread(target=stop_first_owner)
    th.start()
    start, res = df_get_all(peers, url, a.timeout)
    th.join()
    fo = summarize(res, want, origin_body_bytes(f"fo={run_id}"))
    served = {}
    for p in peers:
        for t in api_json(p, "/v1/tasks") or []:
            if f"fo={run_id}" in (t.get("source_url") or ""):
                for s in t.get("received_from", []):
                    who = ids.get(s["peer"], s["peer"][:12])
                    served[who] = served.get(who, 0) + s["bytes"]
    fetched = {}
    for s in seeds:
        if s == box.get("owner"):
            continue
        for t in api_json(s, "/v1/tasks") or []:
            if f"fo={run_id}" in (t.get("source_url") or ""):
                fetched[s] = {"from_origin": t.get("from_origin", 0), "from_peers": t.get("from_peers", 0),
                              "state": t.get("state")}
    fo.update(events=events, first_owner=box.get("owner"), served_to_peers=served,
              surviving_seeds=fetched)
    rep["failover"] = fo
    (OUT / "cluster.json").write_text(json.dumps(rep, indent=2) + "\n")
    md = cluster_md(rep)
    (OUT / "cluster.md").write_text(md)
    print(md)
    if not a.keep:
        down(a)
    if not (rep["preheat"]["state"] == "succeeded" and rep["after_preheat"]["ok"] and fo["ok"]):
        raise SystemExit("cluster: a phase failed (see cluster.md)")


def cluster_md(r):
    ts, size = r["t_star_s"], r["size_bytes"]
    pre, after, fo = r["preheat"], r["after_preheat"], r["failover"]

    def ratio(x):
        return f"{x / ts:.2f}" if (ts and x is not None) else "n/a"
    lines = [f"# cluster: {r['seeds']} seeds, {r['peers']} peers, {size / 2**20:.0f} MiB", "",
             f"Rates: {r['rates']}. T* = {ts} s.", "",
             f"Preheat from a peer (scope seed): {pre['state']} in {pre['seconds']} s, origin bytes / S "
             f"{pre['origin_bytes'] / size:.3f}; first owner {pre['owner']}; hosts {pre['hosts']}"
             + (f"; error: {pre['error']}" if pre.get("error") else "") + ".", "",
             "| phase | ok | p50 (s) | max (s) | p50 / T* | max / T* | origin bytes / S |",
             "|---|---|---|---|---|---|---|"]
    for name, m in (("every peer gets the preheated file, back-to-source off", after),
                    ("a fresh file, first owner stopped at 0.3 T*", fo)):
        lines.append(f"| {name} | {m['ok']} | {m['p50_s']} | {m['max_s']} | {ratio(m['p50_s'])} | "
                     f"{ratio(m['max_s'])} | {m['origin_bytes'] / size:.3f} |")
    lines += ["", "Failover events (s after start): "
              + ("; ".join(f"{t}: {e}" for t, e in fo.get("events", [])) or "none") + ".", "",
              "Bytes the peers received, by source (fresh file): "
              + ", ".join(f"{k} {v / 2**20:.1f} MiB" for k, v in sorted(fo["served_to_peers"].items(),
                                                                       key=lambda kv: -kv[1])) + ".", "",
              "Surviving seeds' copies: "
              + ", ".join(f"{k}: {v['state']}, {v['from_origin'] / 2**20:.1f} MiB from origin, "
                          f"{v['from_peers'] / 2**20:.1f} MiB from the swarm"
                          for k, v in sorted(fo["surviving_seeds"].items())) + "."]
    if fo.get("failed"):
        lines += ["", f"Failed: {fo['failed']} {fo.get('errors')}"]
    return "\n".join(lines) + "\n"


def main():
    p = argparse.ArgumentParser(prog="testnet/run", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("scenario", choices=["up", "bench", "chaos", "image", "cluster", "down"])
    p.add_argument("--peers", type=int, default=8)
    p.add_argument("--seeds", type=int, default=None, help="default 1 (cluster: 3)")
    p.add_argument("--size", type=parse_size, default=parse_size("256MiB"))
    p.add_argument("--rate", default="100mbit", help="every link's rate (tc tbf), '' = unshaped")
    p.add_argument("--origin-rate", default=None, help="origin and registry uplink (default --rate)")
    p.add_argument("--seed-rate", default=None, help="seeds' links (default --rate)")
    p.add_argument("--peer-up", default=None, help="peers' uplink (default --rate)")
    p.add_argument("--peer-down", default=None, help="peers' downlink (default --rate)")
    p.add_argument("--methods", default="df,http,bittorrent")
    p.add_argument("--timeout", type=int, default=1800, help="per-download timeout, seconds")
    p.add_argument("--keep", action="store_true", help="leave the testnet running afterwards")
    p.add_argument("--node-config", default=None, metavar="FILE",
                   help="a df config file (TOML) for every seed and peer, e.g. to try [download] limits")
    p.add_argument("--image-layers", default="64,32,16,4", help="image scenario: layer sizes in MiB")
    a = p.parse_args()
    if a.seeds is None:
        a.seeds = 3 if a.scenario == "cluster" else 1
    for r in (a.rate, a.origin_rate, a.seed_rate, a.peer_up, a.peer_down):
        parse_rate(r)
    OUT.mkdir(parents=True, exist_ok=True)
    if a.scenario == "up":
        up(a)
    elif a.scenario == "down":
        down(a)
    elif a.scenario == "bench":
        bench(a)
    elif a.scenario == "chaos":
        chaos(a)
    elif a.scenario == "image":
        image(a)
    elif a.scenario == "cluster":
        cluster(a)


def registry_blob_bytes(registry):
    """Blob body bytes the registry sent, by client kind ('df' for the swarm, 'direct' otherwise)."""
    logs = subprocess.run(["docker", "logs", registry], capture_output=True, text=True)
    out = {"df": 0, "direct": 0}
    for line in (logs.stdout + logs.stderr).splitlines():
        m = re.search(r'"GET (/v2/\S+/blobs/sha256:[0-9a-f]+) HTTP/[\d.]+" 2\d\d (\d+) "[^"]*" "([^"]*)"', line)
        if m:
            out["df" if m.group(3).startswith("df/") else "direct"] += int(m.group(2))
    return out


def build_image(work, registry_ip, layers_mib):
    """Builds a multi-layer image with umoci and pushes it with skopeo; returns its blob bytes."""
    for tool in ("umoci", "skopeo"):
        if not shutil.which(tool):
            raise SystemExit(f"{tool} missing: apt-get install umoci skopeo")
    layout = work / "layout"
    bundle = work / "bundle"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    img = f"{layout}:v1"
    sh(["umoci", "init", "--layout", str(layout)])
    sh(["umoci", "new", "--image", img])
    sh(["umoci", "unpack", "--image", img, str(bundle)])
    for i, mib in enumerate(layers_mib):
        with open(bundle / "rootfs" / f"layer{i}.bin", "wb") as f:
            f.write(os.urandom(mib << 20))
        sh(["umoci", "repack", "--refresh-bundle", "--image", img, str(bundle)])
    sh(["skopeo", "copy", "--dest-tls-verify=false", f"oci:{img}",
        f"docker://{registry_ip}:5000/bench/app:v1"])
    index = json.loads((layout / "index.json").read_text())
    digest = index["manifests"][0]["digest"]
    manifest = json.loads((layout / "blobs" / "sha256" / digest.split(":")[1]).read_text())
    return manifest["config"]["size"] + sum(l["size"] for l in manifest["layers"])


def image(a):
    up(a)
    peers = containers(a, "peer")
    registry = containers(a, "registry")[0]
    ip = sh(["docker", "inspect", "-f", "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}",
             registry]).strip()
    layers = [int(x) for x in a.image_layers.split(",")]
    size = build_image(OUT / "image-build", ip, layers)
    log(f"image: {len(layers)} layers, {size / 2**20:.1f} MiB of blobs; {len(peers)} peers pull it at once")
    rep = {"peers": len(peers), "image_blob_bytes": size, "layers_mib": layers,
           "registry_rate": a.origin_rate or a.rate, "methods": {}}
    for name, base in (("df", "http://127.0.0.1:5001"), ("direct", "http://registry:5000")):
        before = registry_blob_bytes(registry)
        _, res = run_parallel(peers, lambda c: f"/testnet/pull.sh {base} bench/app v1", a.timeout)
        after = registry_blob_bytes(registry)
        sent = sum(after.values()) - sum(before.values())
        r = summarize(res, "pulled bench/app:v1", sent)
        r["registry_bytes_per_image"] = round(sent / size, 3)
        rep["methods"][name] = r
        log(f"  {name}: ok={r['ok']} p50={r['p50_s']} max={r['max_s']} registry/image={r['registry_bytes_per_image']}")
    d, x = rep["methods"]["df"], rep["methods"]["direct"]
    md = [f"# image pull: {len(peers)} peers, {len(layers)} layers, {size / 2**20:.1f} MiB of blobs, "
          f"registry uplink {rep['registry_rate'] or 'unshaped'}", "",
          "| method | ok | p50 (s) | all done (s) | registry blob bytes / image |", "|---|---|---|---|---|"]
    for name, r in rep["methods"].items():
        md.append(f"| {name} | {r['ok']} | {r['p50_s']} | {r['max_s']} | {r['registry_bytes_per_image']} |")
    if d["max_s"] and x["max_s"]:
        md += ["", f"df / direct, all done: {d['max_s'] / x['max_s']:.2f}"]
    (OUT / "image.json").write_text(json.dumps(rep, indent=2) + "\n")
    (OUT / "image.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    if not a.keep:
        down(a)
    if not (d["ok"] and x["ok"]):
        raise SystemExit("some pulls failed")


if __name__ == "__main__":
    main()
