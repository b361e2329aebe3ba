"""Type stubs of the tq extension module (crates/tq-py/src/lib.rs)."""

import os
from typing import Optional, Sequence, Tuple, Union

import numpy as np
import numpy.typing as npt

__version__: str

FloatArray = npt.NDArray[Union[np.float32, np.float64]]
PathLike = Union[str, "os.PathLike[str]"]

class Quantizer:
    """A TurboQuant quantizer; ``quantize(x)`` encodes the rows of ``x``.

    kind: "mse" (TurboQuant_mse), "prod" (TurboQuant_prod, unbiased inner products), "polar",
    "kivi" or "gmse"; rotation: "hadamard" or "haar"; scale (mse): "norm", "unbiased" or
    "least-squares"; seed fixes every random choice.
    """

    def __init__(
        self,
        dim: int,
        bits: int,
        kind: str = "mse",
        rotation: str = "hadamard",
        scale: str = "norm",
        seed: int = 0,
    ) -> None: ...
    @property
    def dim(self) -> int: ...
    @property
    def bits(self) -> int: ...
    @property
    def kind(self) -> str: ...
    @property
    def bytes_per_vector(self) -> int:
        """Stored bytes per vector: codes and every per-vector scalar."""
    def quantize(self, x: FloatArray) -> "Codes":
        """Encodes the rows of ``x`` (float32/float64, shape (n, dim), C or Fortran order)."""

class Codes:
    """Encoded vectors, scored and searched on their codes."""

    def __len__(self) -> int: ...
    @property
    def dim(self) -> int: ...
    @property
    def kind(self) -> str: ...
    @property
    def nbytes(self) -> int:
        """Bytes the codes store (codes and every scalar)."""
    def dequantize(self) -> npt.NDArray[np.float32]:
        """The decoded vectors, (n, dim)."""
    def scores(self, queries: FloatArray) -> npt.NDArray[np.float32]:
        """Estimated inner products, (nq, n)."""
    def top_k(
        self, queries: FloatArray, k: int
    ) -> Tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]:
        """(D, I) of the k largest estimated inner products per query, best first."""
    def save(self, path: PathLike) -> None:
        """Writes a tq-batch safetensors file (crash-safe)."""

def load(path: PathLike) -> Codes:
    """Reads a tq-batch file (validated before use)."""

class Index:
    """A faiss-shaped index of TurboQuant codes (metric "ip" or "l2"); scale defaults to
    "unbiased" (inner products unbiased per vector), other arguments as for Quantizer."""

    def __init__(
        self,
        dim: int,
        bits: int,
        metric: str = "ip",
        kind: str = "mse",
        rotation: str = "hadamard",
        scale: str = "unbiased",
        seed: int = 0,
    ) -> None: ...
    @property
    def d(self) -> int: ...
    @property
    def ntotal(self) -> int: ...
    @property
    def metric(self) -> str: ...
    @property
    def nbytes(self) -> int: ...
    def __len__(self) -> int: ...
    def add(self, x: FloatArray) -> None:
        """Appends the rows of ``x``; their ids are ntotal .. ntotal + n."""
    def search(
        self, q: FloatArray, k: int
    ) -> Tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]:
        """(D, I), (nq, k), best first; I = -1 and D = -FLT_MAX (ip) / FLT_MAX (l2) when k > ntotal."""
    def reset(self) -> None: ...
    def write(self, path: PathLike) -> None:
        """Writes the index (a tq-batch file that names its metric)."""

def read_index(path: PathLike) -> Index:
    """Reads an index written by ``Index.write``."""

class KVCache:
    """A quantized KV cache of one attention layer; attention runs on the codes.

    Defaults to the recommended configuration (4-bit KIVI keys in groups of 64 tokens, 3-bit
    TurboQuant values with least-squares f16 scales, the first 4 and the 12 newest tokens kept
    unquantized in float16); each argument given overrides one field.
    """

    def __init__(
        self,
        head_dim: int,
        key_bits: Optional[Union[int, str]] = None,
        value_bits: Optional[Union[int, str]] = None,
        *,
        heads: int = 1,
        kv_heads: Optional[int] = None,
        window: Optional[int] = None,
        sink: Optional[int] = None,
        key_strategy: Optional[str] = None,
        value_strategy: Optional[str] = None,
        group: Optional[int] = None,
        scale: Optional[str] = None,
        scale_precision: Optional[str] = None,
        window_precision: Optional[str] = None,
        rotation: Optional[str] = None,
        seed: Optional[int] = None,
    ) -> None: ...
    def __len__(self) -> int: ...
    @property
    def head_dim(self) -> int: ...
    @property
    def heads(self) -> int: ...
    @property
    def kv_heads(self) -> int: ...
    @property
    def nbytes(self) -> int: ...
    @property
    def f16_nbytes(self) -> int: ...
    def append(self, keys: FloatArray, values: FloatArray) -> None:
        """(n, head_dim) with one kv head, else (kv_heads, n, head_dim)."""
    def attend(
        self, queries: FloatArray, limits: Optional[Sequence[int]] = None
    ) -> npt.NDArray[np.float32]:
        """softmax(q K^T / sqrt(d)) V per query; queries (m, d) or (heads, m, d)."""
    def truncate(self, n: int) -> None: ...
