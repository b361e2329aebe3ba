#!/usr/bin/env python3
"""Cross-check tq's GloVe search numbers against faiss on the same split (run by hand).

faiss is not a dependency of tq; this script only reproduces the comparison in docs/SCALES.md:

    python3 -m venv /tmp/fvenv && /tmp/fvenv/bin/pip install faiss-cpu numpy
    scripts/fetch-glove.sh
    /tmp/fvenv/bin/python scripts/faiss_crosscheck.py          # writes data/glove-20k-base.npy, data/glove-1k-queries.npy
    cargo run --release -p tq-bench -- vectors --input data/glove-20k-base.npy --queries data/glove-1k-queries.npy --bits 2,4 --scale unbiased

Recall 1@k: the fraction of queries whose exact maximum-inner-product neighbour is among the k
results. Bits per vector are faiss's stored code size.
"""
import sys
import time

import faiss
import numpy as np

glove = np.load("data/glove-6b-50d.npy")
base = np.ascontiguousarray(glove[:20000], dtype=np.float32)
queries = np.ascontiguousarray(glove[20000:21000], dtype=np.float32)
np.save("data/glove-20k-base.npy", base)
np.save("data/glove-1k-queries.npy", queries)
truth = np.argmax(queries @ base.T, axis=1)

bits = [int(b) for b in (sys.argv[1:] or ["2", "4"])]
print(f"faiss {faiss.__version__}, GloVe 6B 50d, {len(base)} base, {len(queries)} queries, max inner product")
print(f"{'index':>12} {'bits/vec':>9} {'R@1':>6} {'R@4':>6} {'R@16':>6} {'index s':>8}")
for b in bits:
    specs = [f"SQtqmse{b}", f"SQtq{b}", f"SQ{b}", f"EDEN{b}", f"RaBitQ{b}"]
    # PQ with 8-bit sub-codes at b bits per coordinate needs d·b/8 sub-spaces dividing d.
    m = base.shape[1] * b // 8
    if m > 0 and base.shape[1] % m == 0 and base.shape[1] * b % 8 == 0:
        specs.append(f"PQ{m}x8")
    for spec in specs:
        try:
            index = faiss.index_factory(base.shape[1], spec, faiss.METRIC_INNER_PRODUCT)
        except RuntimeError as e:
            print(f"{spec:>12} unavailable: {str(e).splitlines()[0][:60]}")
            continue
        t = time.time()
        index.train(base)
        index.add(base)
        took = time.time() - t
        _, found = index.search(queries, 16)
        rec = [np.mean([truth[i] in found[i, :k] for i in range(len(queries))]) for k in (1, 4, 16)]
        print(f"{spec:>12} {8 * index.sa_code_size():>9} {rec[0]:>6.3f} {rec[1]:>6.3f} {rec[2]:>6.3f} {took:>8.3f}")
