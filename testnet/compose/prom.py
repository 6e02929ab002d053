"""A real Prometheus (Debian's `prometheus`, run on the host) scraping every seed and peer of the
compose testnet on its `--metrics-listen` port, and the report panel drawn from its queries."""

import json
import shutil
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

METRICS_PORT = 9464
SCRAPE_INTERVAL_S = 2

# What the report's panel plots: (title, PromQL, legend label, y unit divisor, y label).
PANELS = [
    ("received by role", 'sum by (role) (rate(df_received_bytes_total[6s]))', "role", 2**20, "MiB/s"),
    ("received by source", 'sum by (source) (rate(df_received_bytes_total[6s]))', "source", 2**20, "MiB/s"),
    ("uploaded by role", 'sum by (role) (rate(df_uploaded_bytes_total[6s]))', "role", 2**20, "MiB/s"),
    ("piece requests in flight", 'sum by (role) (df_piece_requests_in_flight)', "role", 1, "requests"),
    # Requests a source answered busy (its upload slots full): asked again elsewhere, a round trip lost.
    ("piece requests answered busy", 'sum by (role) (rate(df_piece_requests_busy_total[6s]))', "role", 1,
     "requests/s"),
]
# Bytes by source over the whole run, for the report's table.
TOTALS = 'sum by (source) (df_received_bytes_total)'
# Which members exported bytes by source (each should, with a series per source).
PER_MEMBER = 'count by (member) (df_received_bytes_total)'


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def container_ip(name):
    out = subprocess.run(["docker", "inspect", "-f", "{{range .NetworkSettings.Networks}}{{.IPAddress}} {{end}}", name],
                         capture_output=True, text=True, check=True).stdout.split()
    return out[0]


class Prometheus:
    """Started with the seeds and peers to scrape; `stop()` ends it. Its TSDB lives in `out/`."""

    def __init__(self, out: Path, members, log):
        self.binary = shutil.which("prometheus")
        self.log = log
        self.proc = None
        if not self.binary:
            log("no prometheus binary (apt-get install prometheus): no metrics panel")
            return
        self.dir = out / "prometheus"
        shutil.rmtree(self.dir, ignore_errors=True)
        (self.dir / "data").mkdir(parents=True)
        targets = []
        for c in members:
            role = "seed" if "_seed_" in c else "peer"
            targets.append({"targets": [f"{container_ip(c)}:{METRICS_PORT}"],
                            "labels": {"role": role, "member": c.split("_", 1)[-1]}})
        (self.dir / "targets.json").write_text(json.dumps(targets, indent=1))
        (self.dir / "prometheus.yml").write_text(
            "global:\n"
            f"  scrape_interval: {SCRAPE_INTERVAL_S}s\n"
            f"  scrape_timeout: {SCRAPE_INTERVAL_S}s\n"
            "scrape_configs:\n"
            "  - job_name: df\n"
            "    file_sd_configs:\n"
            f"      - files: ['{self.dir / 'targets.json'}']\n")
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.logfile = open(self.dir / "prometheus.log", "w")
        self.proc = subprocess.Popen(
            [self.binary, f"--config.file={self.dir / 'prometheus.yml'}",
             f"--storage.tsdb.path={self.dir / 'data'}", f"--web.listen-address=127.0.0.1:{self.port}",
             "--storage.tsdb.retention.time=1d"],
            stdout=self.logfile, stderr=subprocess.STDOUT)
        self.expected = len(targets)
        self.wait_up()

    def api(self, path, **params):
        q = urllib.parse.urlencode(params)
        with urllib.request.urlopen(f"{self.url}/api/v1/{path}?{q}", timeout=10) as r:
            body = json.load(r)
        if body.get("status") != "success":
            raise RuntimeError(f"prometheus {path}: {body}")
        return body["data"]

    def wait_up(self, timeout=30):
        """Until every target was scraped once and is up."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            try:
                up = self.api("query", query="up == 1")
                if len(up["result"]) >= self.expected:
                    self.log(f"prometheus on {self.url}: {self.expected} targets up")
                    return
            except Exception:
                pass
            time.sleep(0.5)
        raise SystemExit(f"prometheus: not all {self.expected} targets up after {timeout} s "
                         f"(see {self.dir / 'prometheus.log'})")

    def series(self, start, end, query, t0):
        """Range query over [start, end]; returns {label values: [(t - t0, value)]}."""
        data = self.api("query_range", query=query, start=f"{start:.3f}", end=f"{end:.3f}",
                        step=f"{SCRAPE_INTERVAL_S}")
        out = {}
        for s in data["result"]:
            key = tuple(s["metric"].values()) or ("all",)
            out[" ".join(key)] = [(float(t) - t0, float(v)) for t, v in s["values"]]
        return out

    def totals(self, at):
        data = self.api("query", query=TOTALS, time=f"{at:.3f}")
        return {s["metric"].get("source", "?"): float(s["value"][1]) for s in data["result"]}

    def members_with_series(self, at):
        """Each member's number of df_received_bytes_total series (one per source)."""
        data = self.api("query", query=PER_MEMBER, time=f"{at:.3f}")
        return {s["metric"].get("member", "?"): int(float(s["value"][1])) for s in data["result"]}

    def stop(self):
        if self.proc:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
            self.logfile.close()
            self.proc = None


def panel(prom, start, end, t0, out: Path, title, log):
    """Draws PANELS from `prom` over [start, end] (times shown from t0) into out/metrics.png;
    returns the report's data: the number of non-empty series per panel and the bytes by source."""
    result = {"series": {}, "received_bytes_by_source": prom.totals(end),
              "members": prom.members_with_series(end), "targets": prom.expected}
    plotted = []
    for name, q, _label, div, unit in PANELS:
        s = prom.series(start, end, q, t0)
        result["series"][name] = len([k for k, v in s.items() if v])
        plotted.append((name, s, div, unit))
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib missing: no metrics plot")
        return result
    fig, axes = plt.subplots(len(plotted), 1, figsize=(8, 2.4 * len(plotted)), sharex=True)
    for ax, (name, s, div, unit) in zip(axes, plotted):
        for key, pts in sorted(s.items()):
            if pts:
                ax.plot([t for t, _ in pts], [v / div for _, v in pts], label=key)
        ax.set_title(name, fontsize=9)
        ax.set_ylabel(unit)
        if s:
            ax.legend(fontsize=7, loc="upper right")
    axes[-1].set_xlabel("time since the df method started (s)")
    fig.suptitle(title + " (from the testnet's Prometheus)", fontsize=10)
    fig.tight_layout()
    fig.savefig(out / "metrics.png", dpi=100)
    plt.close(fig)
    result["plot"] = "metrics.png"
    return result
