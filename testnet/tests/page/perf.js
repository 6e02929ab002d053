// Loaded after the status page's ui.js by testnet/tests/ui.rs: draws a fake task of 10 000 pieces
// (40 GiB at 4 MiB pieces) twenty times, as twenty refreshes would, with a layout after each, and
// writes the times into the page for the test to read.
"use strict";
(function () {
  const N = 10000;
  const marks = ".fospfh";
  const map = (round) => {
    let s = "";
    for (let i = 0; i < N; i++) s += marks[(i * 7 + round * 13 + (i >> 5)) % marks.length];
    return s;
  };
  const info = {
    source_url: "http://origin.example/big.iso?token=secret",
    from_origin: 1 << 30,
    received_from: Array.from({ length: 40 }, (_, i) => ({ peer: "12D3KooWpeer" + i, bytes: (i + 1) << 26 })),
  };
  const maps = Array.from({ length: 21 }, (_, r) => map(r));
  const t0 = performance.now();
  drawPieces("bafkfake", maps[0], info);
  void document.body.offsetHeight;
  const first = performance.now() - t0;
  const times = [];
  for (let r = 1; r < maps.length; r++) {
    const t = performance.now();
    drawPieces("bafkfake", maps[r], info);
    void document.body.offsetHeight;
    times.push(performance.now() - t);
  }
  const out = document.createElement("pre");
  out.id = "perf";
  out.dataset.first = first.toFixed(1);
  out.dataset.max = Math.max(...times).toFixed(1);
  out.dataset.mean = (times.reduce((a, b) => a + b, 0) / times.length).toFixed(1);
  out.dataset.cells = document.getElementById("grid").childElementCount;
  out.dataset.summary = document.getElementById("piece-summary").dataset.total;
  out.dataset.shown = document.getElementById("detail-url").textContent;
  document.body.append(out);
})();
