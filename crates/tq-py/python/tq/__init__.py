"""tq: TurboQuant vector quantization for embeddings and KV caches, numpy in, numpy out.

- ``Quantizer(dim, bits, kind="mse")`` encodes rows into ``Codes`` (scores, top-k, dequantize,
  save; ``load`` reads files written here, by the Rust crates or by ``tq-bench``);
- ``Index(dim, bits, metric="ip")`` is a faiss-shaped index: ``add(x)``, ``search(q, k) -> (D, I)``,
  ``write(path)`` / ``read_index(path)``;
- ``KVCache(head_dim)`` is a quantized attention KV cache with attention computed on the codes.

Heavy calls release the GIL and run on all cores. Bad input raises ``TypeError`` (wrong type or
dtype) or ``ValueError`` (shape, layout, non-finite values, bad files); file-system failures raise
``OSError``.
"""

from ._tq import Codes, Index, KVCache, Quantizer, __version__, load, read_index

__all__ = ["Codes", "Index", "KVCache", "Quantizer", "__version__", "load", "read_index"]
