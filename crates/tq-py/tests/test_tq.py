"""Tests of the tq Python package: files shared with the Rust crates, search recall on GloVe,
errors, and KV attention against a numpy reference. Run by scripts/test.sh (pytest)."""

import pathlib
import threading

import numpy as np
import pytest

import tq

ROOT = pathlib.Path(__file__).resolve().parents[3]
FIXTURES = ROOT / "fixtures"


def gaussian(n, d, seed):
    return np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)


# ---------------------------------------------------------------- files shared with Rust


@pytest.mark.parametrize(
    "path", sorted((FIXTURES / "fuzz" / "batch").glob("*.safetensors")), ids=lambda p: p.stem
)
def test_files_written_by_the_rust_crates_load_and_round_trip(path, tmp_path):
    codes = tq.load(path)
    x = codes.dequantize()
    assert x.shape == (len(codes), codes.dim) and x.dtype == np.float32
    assert np.isfinite(x).all()
    out = tmp_path / "again.tq"
    codes.save(out)
    again = tq.load(out)
    assert again.kind == codes.kind and len(again) == len(codes)
    assert again.nbytes == codes.nbytes
    np.testing.assert_array_equal(again.dequantize(), x)
    if len(codes):
        q = gaussian(3, codes.dim, 1)
        np.testing.assert_array_equal(again.scores(q), codes.scores(q))


def test_same_seed_same_codes_and_fortran_order_and_float64_agree(tmp_path):
    x = gaussian(300, 64, 2)
    a = tq.Quantizer(64, 3, seed=7).quantize(x)
    b = tq.Quantizer(64, 3, seed=7).quantize(np.asfortranarray(x.astype(np.float64)))
    np.testing.assert_array_equal(a.dequantize(), b.dequantize())
    a.save(tmp_path / "a.tq")
    b.save(tmp_path / "b.tq")
    assert (tmp_path / "a.tq").read_bytes() == (tmp_path / "b.tq").read_bytes()
    c = tq.Quantizer(64, 3, seed=8).quantize(x)
    assert not np.array_equal(a.dequantize(), c.dequantize())


def test_quantizer_reports_its_bytes_and_distortion_matches_the_paper():
    d, n = 128, 4000
    x = gaussian(n, d, 3)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    # The Lloyd-Max distortions the paper rounds to 0.36, 0.117, 0.03, 0.009.
    for bits, paper in [(1, 0.3634), (2, 0.1175), (3, 0.03454), (4, 0.009497)]:
        q = tq.Quantizer(d, bits)
        codes = q.quantize(x)
        assert q.bytes_per_vector == d * bits // 8 + 4
        assert codes.nbytes == n * q.bytes_per_vector
        mse = float(np.mean(np.sum((codes.dequantize() - x) ** 2, axis=1)))
        # 4000 vectors put the mean within about 1% (the per-vector spread is ~1/sqrt(d)).
        assert abs(mse - paper) / paper < 0.05, (bits, mse)


def test_prod_scores_are_unbiased():
    d, n = 128, 2000
    x = gaussian(n, d, 4)
    q = gaussian(1, d, 5)
    est = tq.Quantizer(d, 3, kind="prod").quantize(x).scores(q)[0]
    exact = x @ q[0]
    err = est - exact
    # Mean error over 2000 independent estimates: within 4 standard errors of zero.
    assert abs(err.mean()) < 4 * err.std() / np.sqrt(n)


# ---------------------------------------------------------------- index


def glove():
    x = np.load(FIXTURES / "glove-2k.npy")
    return x[:1900], x[1900:]


@pytest.mark.parametrize("metric", ["ip", "l2"])
def test_index_recall_on_glove(metric):
    base, queries = glove()
    index = tq.Index(base.shape[1], 4, metric=metric)
    index.add(base[:1000])
    index.add(base[1000:])
    assert index.ntotal == len(base) == len(index)
    D, I = index.search(queries, 10)
    assert D.shape == I.shape == (len(queries), 10)
    assert D.dtype == np.float32 and I.dtype == np.int64
    if metric == "ip":
        exact = queries @ base.T
        truth = exact.argmax(axis=1)
        assert (np.diff(D, axis=1) <= 0).all()
    else:
        exact = ((queries[:, None, :] - base[None, :, :]) ** 2).sum(-1)
        truth = exact.argmin(axis=1)
        assert (np.diff(D, axis=1) >= 0).all()
    r1 = float(np.mean(I[:, 0] == truth))
    r10 = float(np.mean([t in row for t, row in zip(truth, I)]))
    # tq-bench search measures 4-bit TurboQuant on GloVe at about 0.8 recall 1@1 and 1.0 at 1@10;
    # 100 queries: the bounds sit several binomial standard deviations (~0.04) below.
    assert r1 >= 0.6, r1
    assert r10 >= 0.9, r10


def test_index_write_read_reset_and_empty_slots(tmp_path):
    base, queries = glove()
    index = tq.Index(base.shape[1], 3, metric="l2", seed=3)
    index.add(base)
    path = tmp_path / "glove.tqi"
    index.write(path)
    back = tq.read_index(str(path))
    assert back.metric == "l2" and back.ntotal == index.ntotal and back.nbytes == index.nbytes
    for a, b in zip(index.search(queries, 5), back.search(queries, 5)):
        np.testing.assert_array_equal(a, b)
    # An index file is a batch file too; a batch file is not an index.
    assert len(tq.load(path)) == len(base)
    codes_path = tmp_path / "codes.tq"
    tq.Quantizer(base.shape[1], 3).quantize(base).save(codes_path)
    with pytest.raises(ValueError, match="not an index"):
        tq.read_index(codes_path)
    index.reset()
    assert index.ntotal == 0
    index.add(base[:2])
    D, I = index.search(queries[:1], 4)
    assert list(I[0, 2:]) == [-1, -1]
    assert D[0, 2] == np.finfo(np.float32).max


def test_codes_top_k_matches_scores():
    x = gaussian(500, 64, 6)
    q = gaussian(8, 64, 7)
    codes = tq.Quantizer(64, 2).quantize(x)
    S = codes.scores(q)
    D, I = codes.top_k(q, 5)
    assert S.shape == (8, 500)
    # top_k re-scores its candidates with exact tables; the fast scores agree to u8 rounding.
    for qi in range(8):
        np.testing.assert_allclose(S[qi, I[qi]], D[qi], rtol=0.02, atol=0.05)


def test_search_releases_the_gil():
    base = gaussian(20000, 64, 8)
    index = tq.Index(64, 4)
    index.add(base)
    q = gaussian(200, 64, 9)
    expected = index.search(q, 3)
    results = []

    def work():
        results.append(index.search(q, 3))

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 4
    for D, I in results:
        np.testing.assert_array_equal(I, expected[1])


# ---------------------------------------------------------------- errors


def test_bad_input_raises_python_errors(tmp_path):
    q = tq.Quantizer(16, 4)
    with pytest.raises(TypeError, match="float32 or float64"):
        q.quantize(np.zeros((3, 16), dtype=np.int64))
    with pytest.raises(TypeError, match="numpy array"):
        q.quantize([[0.0] * 16])
    with pytest.raises(ValueError, match=r"shape \(n, 16\)"):
        q.quantize(np.zeros((3, 15), dtype=np.float32))
    with pytest.raises(ValueError, match=r"shape \(n, 16\)"):
        q.quantize(np.zeros(16, dtype=np.float32))
    with pytest.raises(ValueError, match="not contiguous"):
        q.quantize(np.zeros((6, 32), dtype=np.float32)[::2, ::2])
    bad = np.ones((2, 16), dtype=np.float32)
    bad[1, 3] = np.nan
    with pytest.raises(ValueError, match="non-finite"):
        q.quantize(bad)
    with pytest.raises(ValueError, match="non-finite"):
        q.quantize(np.full((1, 16), 1e300))
    with pytest.raises(ValueError):
        tq.Quantizer(16, 9)
    with pytest.raises(ValueError, match="kind"):
        tq.Quantizer(16, 4, kind="pq")
    with pytest.raises(ValueError, match="metric"):
        tq.Index(16, 4, metric="cosine")
    with pytest.raises(OverflowError):
        tq.Quantizer(-1, 4)
    with pytest.raises(OSError):
        tq.load(tmp_path / "missing.tq")
    junk = tmp_path / "junk.tq"
    junk.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{\"a\":1}")
    with pytest.raises(ValueError, match="invalid saved batch"):
        tq.load(junk)
    index = tq.Index(16, 4)
    index.add(np.ones((4, 16), dtype=np.float32))
    with pytest.raises(ValueError):
        index.add(bad)
    assert index.ntotal == 4, "a refused add appends nothing"
    with pytest.raises(ValueError, match="non-finite"):
        index.search(bad, 1)


# ---------------------------------------------------------------- KV cache


def attention(q, k, v):
    s = q @ k.T / np.sqrt(q.shape[-1])
    p = np.exp(s - s.max(axis=-1, keepdims=True))
    p /= p.sum(axis=-1, keepdims=True)
    return p @ v


def test_kv_attention_with_everything_in_the_window_is_exact():
    d, n = 64, 40
    k, v, q = gaussian(n, d, 10), gaussian(n, d, 11), gaussian(3, d, 12)
    cache = tq.KVCache(d, window=n, window_precision="f32")
    cache.append(k, v)
    np.testing.assert_allclose(cache.attend(q), attention(q, k, v), rtol=1e-4, atol=1e-5)
    # The default's f16 rows: exactly the attention over the tokens rounded to f16.
    half = tq.KVCache(d, window=n)
    half.append(k, v)
    r16 = lambda x: x.astype(np.float16).astype(np.float32)  # noqa: E731
    np.testing.assert_allclose(half.attend(q), attention(q, r16(k), r16(v)), rtol=1e-4, atol=1e-5)


def test_kv_attention_on_codes_is_close_to_numpy():
    d, n = 64, 512
    rng = np.random.default_rng(13)
    # Keys with a few large channels, as real keys have.
    k = rng.standard_normal((n, d)).astype(np.float32)
    k[:, :4] *= 4.0
    v = rng.standard_normal((n, d)).astype(np.float32)
    q = rng.standard_normal((16, d)).astype(np.float32)
    cache = tq.KVCache(d)  # the recommended default
    cache.append(k[:100], v[:100])
    cache.append(k[100:], v[100:])
    assert len(cache) == n
    out = cache.attend(q)
    ref = attention(q, k, v)
    rel = np.linalg.norm(out - ref, axis=1) / np.linalg.norm(ref, axis=1)
    # 3-bit values carry a relative error of sqrt(D_mse) = sqrt(0.034) = 0.18 each, and on this
    # unstructured data the output (a wide average of values) keeps about that relative error;
    # the 4-bit KIVI keys add a little: measured 0.21 on average.
    assert rel.mean() < 0.3, rel
    assert cache.nbytes * 2.5 < cache.f16_nbytes
    # Causal limits: query i sees the first limits[i] tokens.
    limits = [1, 10, 200, n]
    out = cache.attend(q[:4], limits=limits)
    # One token: the output is that token's value, kept in the attention sink (in f16).
    np.testing.assert_allclose(out[0], v[0].astype(np.float16), rtol=1e-5, atol=1e-6)
    for i, lim in enumerate(limits[1:], 1):
        ref = attention(q[i : i + 1], k[:lim], v[:lim])[0]
        assert np.linalg.norm(out[i] - ref) / np.linalg.norm(ref) < 0.4
    cache.truncate(100)
    assert len(cache) == 100


def test_kv_grouped_heads_and_strategies():
    d, n = 32, 64
    cache = tq.KVCache(d, 4, 3, heads=6, kv_heads=2, key_strategy="kivi", group=16, window=0)
    k, v = gaussian(2 * n, d, 14).reshape(2, n, d), gaussian(2 * n, d, 15).reshape(2, n, d)
    cache.append(k, v)
    q = gaussian(6 * 3, d, 16).reshape(6, 3, d)
    out = cache.attend(q)
    assert out.shape == (6, 3, d) and out.dtype == np.float32
    ref = attention(q[4], k[1], v[1])  # query heads 3..5 share kv head 1
    assert np.linalg.norm(out[4] - ref) / np.linalg.norm(ref) < 0.4
    with pytest.raises(ValueError, match="prod"):
        tq.KVCache(d, value_strategy="prod")
    with pytest.raises(ValueError, match="scale_precision"):
        tq.KVCache(d, scale_precision="f8")
    # f32 scales: 2 more bytes for each of the n - 4 value rows past the 4-token sink.
    wide = tq.KVCache(d, scale_precision="f32", window=0)
    narrow = tq.KVCache(d, window=0)
    k1, v1 = gaussian(n, d, 17), gaussian(n, d, 18)
    wide.append(k1, v1)
    narrow.append(k1, v1)
    assert len(wide) == len(narrow) == n
    assert wide.nbytes - narrow.nbytes == 2 * (n - 4)
    with pytest.raises(ValueError, match="window_precision"):
        tq.KVCache(d, window_precision="bf16")
    # f32 sink and window rows: 2 more bytes per value of the 4 + 12 such tokens.
    rows32 = tq.KVCache(d, window_precision="f32")
    rows16 = tq.KVCache(d, window_precision="f16")
    rows32.append(k1, v1)
    rows16.append(k1, v1)
    assert rows32.nbytes - rows16.nbytes == 2 * 2 * 16 * d
    with pytest.raises(ValueError, match=r"\(2, n, 32\)"):
        cache.append(k[0], v[0])
    with pytest.raises(ValueError, match="differ"):
        cache.append(k, np.ascontiguousarray(v[:, :3]))
    with pytest.raises(ValueError):
        cache.attend(q, limits=[0, 1, 2])
    with pytest.raises(ValueError):
        tq.KVCache(d, heads=3, kv_heads=2)
