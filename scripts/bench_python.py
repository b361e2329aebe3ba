#!/usr/bin/env python3
"""tq's Python index side by side with faiss, one process, one machine.

1. GloVe maximum-inner-product search: recall 1@1 / 1@10 (is the exact top-1 among the first k
   results), stored bytes per vector and queries/s of tq's Index and of faiss's IndexFlatIP,
   IndexScalarQuantizer (every 4-bit type this faiss has, TurboQuant and EDEN ones included),
   IndexPQFastScan and IndexRaBitQ / IndexRaBitQFastScan, at the same bits per coordinate;
   every index is built first, then timed in interleaved rounds (best round kept).
2. Python overhead: 1 000 queries over 100 000 d = 128 vectors (4 bits, k = 10), timed through
   Python against the same search timed inside Rust (tq._tq._search_seconds).

faiss is an optional peer (`pip install faiss-cpu`), not a dependency: without it only tq's rows
and the overhead check run. The extension must be a release build (`maturin develop --release`).

Usage (scripts/bench-python.sh prepares all of it):
    python scripts/bench_python.py [--data data/glove-6b-50d.npy] [--queries 1000] [--threads N]
"""

import argparse
import os
import pathlib
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--data", default=None, help="a 2-D float32 .npy (default: data/glove-6b-50d.npy "
                   "from scripts/fetch-glove.sh, else fixtures/glove-2k.npy)")
    p.add_argument("--queries", type=int, default=1000, help="held-out queries (seeded sample)")
    p.add_argument("--limit", type=int, default=100_000,
                   help="use the first LIMIT vectors of the data (0: all)")
    p.add_argument("--bits", type=int, default=4, help="bits per coordinate (2 or 4)")
    p.add_argument("--k", type=int, default=10, help="neighbours per query")
    p.add_argument("--threads", type=int, default=None, help="threads for tq and faiss (default: all)")
    p.add_argument("--repeats", type=int, default=5,
                   help="interleaved rounds, each searching every index once (best kept)")
    p.add_argument("--allow-debug", action="store_true", help="time a debug build anyway")
    args = p.parse_args()
    if args.repeats < 1:
        p.error("--repeats must be at least 1")
    return args


args = parse_args()
if args.threads:
    # rayon reads this when its pool starts, so before tq is imported.
    os.environ["RAYON_NUM_THREADS"] = str(args.threads)

import numpy as np  # noqa: E402

import tq  # noqa: E402

try:
    import faiss  # noqa: E402
except ImportError:
    faiss = None


def best_time(fn, repeats):
    best = float("inf")
    out = None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def exact_top1(base, queries):
    truth = np.empty(len(queries), dtype=np.int64)
    for s in range(0, len(queries), 100):
        truth[s : s + 100] = (queries[s : s + 100] @ base.T).argmax(axis=1)
    return truth


def recall(I, truth, k):
    return float(np.mean([t in row[:k] for t, row in zip(truth, I)]))


def main():
    if tq._tq._build_profile != "release" and not args.allow_debug:
        sys.exit("bench_python: tq is a debug build; run `maturin develop --release -m "
                 "crates/tq-py/Cargo.toml` first (or pass --allow-debug)")
    threads = args.threads or os.cpu_count()
    if faiss is not None:
        faiss.omp_set_num_threads(threads)
    path = pathlib.Path(args.data) if args.data else ROOT / "data" / "glove-6b-50d.npy"
    if not path.exists():
        path = ROOT / "fixtures" / "glove-2k.npy"
    x = np.ascontiguousarray(np.load(path), dtype=np.float32)
    if args.limit:
        x = x[: args.limit]
    rng = np.random.default_rng(42)
    nq = min(args.queries, len(x) // 10)
    held = rng.choice(len(x), size=nq, replace=False)
    mask = np.ones(len(x), dtype=bool)
    mask[held] = False
    base, queries = x[mask], x[held]
    n, d = base.shape
    b, k = args.bits, args.k
    print(f"data {path.name}: {n} x {d} base, {nq} queries, {b} bits/coordinate, k = {k}, "
          f"{threads} threads, tq {tq.__version__}"
          + (f", faiss {faiss.__version__}" if faiss else ", faiss not installed"))
    truth = exact_top1(base, queries)

    # Every index is built first, then timed in interleaved rounds (each round searches every
    # index once, best round kept), so a slow patch of the machine hits all of them alike.
    entries = []

    def run(name, build, search, nbytes):
        t = time.perf_counter()
        index = build()
        entries.append(dict(name=name, index=index, search=search, nbytes=nbytes(index) / n,
                            build_s=time.perf_counter() - t, best=float("inf"), out=None))

    for scale in ["norm", "unbiased"]:
        def build(scale=scale):
            index = tq.Index(d, b, metric="ip", scale=scale)
            index.add(base)
            return index
        run(f"tq Index mse {b}-bit ({scale})", build, lambda i: i.search(queries, k),
            lambda i: i.nbytes)

    if faiss is not None:
        ip = faiss.METRIC_INNER_PRODUCT

        def fbuild(make):
            def build():
                index = make()
                if not index.is_trained:
                    index.train(base)
                index.add(base)
                return index
            return build

        fsearch = lambda i: i.search(queries, k)  # noqa: E731
        fbytes = lambda i: i.sa_code_size() * i.ntotal  # noqa: E731
        run("faiss IndexFlatIP (float32)", fbuild(lambda: faiss.IndexFlatIP(d)), fsearch,
            lambda i: 4 * d * i.ntotal)
        qts = [q for q in dir(faiss.ScalarQuantizer) if q.startswith(f"QT_{b}bit")]
        for qt in sorted(qts):
            kind = getattr(faiss.ScalarQuantizer, qt)
            run(f"faiss IndexScalarQuantizer {qt}",
                fbuild(lambda kind=kind: faiss.IndexScalarQuantizer(d, kind, ip)), fsearch, fbytes)
        if (d * b) % 4 == 0:
            m = d * b // 4
            run(f"faiss IndexPQFastScan M={m} x 4 bits",
                fbuild(lambda: faiss.IndexPQFastScan(d, m, 4, ip)), fsearch, fbytes)
        for name, make in [("IndexRaBitQ", lambda: faiss.IndexRaBitQ(d, ip, b)),
                           ("IndexRaBitQFastScan", lambda: faiss.IndexRaBitQFastScan(d, ip, 32, b))]:
            try:
                run(f"faiss {name} {b}-bit", fbuild(make), fsearch, fbytes)
            except (TypeError, RuntimeError) as e:
                print(f"  ({name} skipped: {str(e).splitlines()[0][:100]})")

    for _ in range(args.repeats):
        for e in entries:
            # Indexes slower than a second per search are timed once: their rank is not close.
            if e.get("failed") or (e["out"] is not None and e["best"] > 1.0):
                continue
            try:
                secs, e["out"] = best_time(lambda: e["search"](e["index"]), 1)
            except (TypeError, RuntimeError) as err:
                e["failed"] = True
                print(f"  ({e['name']} search failed: {str(err).splitlines()[0][:100]})")
                continue
            e["best"] = min(e["best"], secs)
    rows = []
    for e in entries:
        if e.get("failed"):
            continue
        D, I = e["out"]
        rows.append((e["name"], e["nbytes"], recall(I, truth, 1), recall(I, truth, 10),
                     nq / e["best"], e["build_s"]))
        print(f"  {e['name']}: recall 1@1 {rows[-1][2]:.3f}, {rows[-1][4]:,.0f} queries/s", flush=True)

    print(f"\n| index | bytes/vector | recall 1@1 | recall 1@10 | queries/s | build s |")
    print("|---|---|---|---|---|---|")
    for name, bpv, r1, r10, qps, bs in rows:
        print(f"| {name} | {bpv:.1f} | {r1:.3f} | {r10:.3f} | {qps:,.0f} | {bs:.2f} |")

    # Python overhead: the same search through Python and inside Rust.
    rng = np.random.default_rng(7)
    xs = rng.standard_normal((100_000, 128)).astype(np.float32)
    qs = rng.standard_normal((1000, 128)).astype(np.float32)
    index = tq.Index(128, 4)
    index.add(xs)
    # Interleaved, best of each: machine noise (tens of percent on a VM) hits both alike.
    reps = max(args.repeats, 7)
    py_s = rust_s = float("inf")
    for _ in range(reps):
        py_s = min(py_s, best_time(lambda: index.search(qs, 10), 1)[0])
        rust_s = min(rust_s, tq._tq._search_seconds(index, qs, 10, 1))
    print(f"\nPython overhead: 1000 queries x 100000 x d=128, 4 bits, k=10: Python {py_s * 1e3:.1f} ms, "
          f"Rust {rust_s * 1e3:.1f} ms (best of {reps}): x{py_s / rust_s:.3f}")


if __name__ == "__main__":
    main()
