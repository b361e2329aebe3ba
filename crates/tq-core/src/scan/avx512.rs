//! The AVX-512 bodies: VBMI value decoding for 5-8-bit codes (the byte planes of a value table of
//! up to 256 entries looked up with `vpermb` / `vpermi2b` instead of gathers, two coordinates' 32
//! codes per 512-bit register) and VNNI nibble dot products (`vpdpbusd`: four nibble positions
//! of a row against four `i8` weights into one `i32` lane; `vpdpwssd`: the integer weighted
//! sums of codes of every width and the 5-8-bit integer key dots, four coordinates per
//! register; `vpdpbusd` again for the byte sums of 1-4-bit values), and the `u8` and `i8`
//! weights of attention (the byte sums' and KIVI's query weights). Every function needs the
//! AVX-512 features it names (the callers check them once at run time); the `unsafe` ones also read
//! memory, and their `# Safety` names the lengths the caller (the checked public kernels) must
//! have proven.

use super::x86::{store_rows, wide_codes_k};
use super::{BLOCK, IntCodebook};
use crate::prefetch::Ahead;
use std::arch::x86_64::*;

/// The four byte planes of a value table of up to 256 entries: `t[p][q]` holds byte `p` (little
/// endian) of `values[64q..64q + 64]`, zero past the table's end. `folded`: the table has 256
/// entries and is antisymmetric bit for bit (`values[255 - k] == -values[k]`, as every Lloyd-Max
/// codebook here is), so entries 128..256 are entries 0..128 mirrored with the sign flipped.
pub(super) struct WidePlanes {
    t: [[__m512i; 4]; 4],
    folded: bool,
}

impl WidePlanes {
    /// The planes of `values[..min(len, 256)]`: per 64 entries, four 16-float loads (masked at
    /// the table's end), one `vpermb` each gathering byte `p` of its 16 floats into 128-bit lane
    /// `p`, and a 4 x 4 transpose of those lanes (eight `vshufi64x2`). O(1): at most 16 loads
    /// and 48 shuffles, cheap enough to run once per block.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vbmi")]
    pub(super) fn new(values: &[f32]) -> Self {
        let len = values.len().min(256);
        // Byte i of a gathered chunk: byte 4·(i mod 16) + i / 16 of its 16 floats.
        let idx: [u8; 64] = std::array::from_fn(|i| (4 * (i % 16) + i / 16) as u8);
        // SAFETY: `idx` has 64 bytes.
        let idx = unsafe { _mm512_loadu_si512(idx.as_ptr() as *const _) };
        // quarters[q][p]: plane p of entries 64q..64q + 64.
        let quarters: [[__m512i; 4]; 4] = std::array::from_fn(|q| {
            let r: [__m512i; 4] = std::array::from_fn(|c| {
                let start = 64 * q + 16 * c;
                if start >= len {
                    return _mm512_setzero_si512();
                }
                let n = (len - start).min(16);
                let mask = ((1u32 << n) - 1) as __mmask16;
                // SAFETY: the mask enables floats start..start + n, all inside `values`.
                let v = unsafe { _mm512_maskz_loadu_ps(mask, values.as_ptr().add(start)) };
                _mm512_permutexvar_epi8(idx, _mm512_castps_si512(v))
            });
            // Lanes (0, 1) and (2, 3) of chunks 0-1 and 2-3, then plane p = lane p of each.
            let a = _mm512_shuffle_i64x2::<0b01_00_01_00>(r[0], r[1]);
            let b = _mm512_shuffle_i64x2::<0b11_10_11_10>(r[0], r[1]);
            let c = _mm512_shuffle_i64x2::<0b01_00_01_00>(r[2], r[3]);
            let d = _mm512_shuffle_i64x2::<0b11_10_11_10>(r[2], r[3]);
            [
                _mm512_shuffle_i64x2::<0b10_00_10_00>(a, c),
                _mm512_shuffle_i64x2::<0b11_01_11_01>(a, c),
                _mm512_shuffle_i64x2::<0b10_00_10_00>(b, d),
                _mm512_shuffle_i64x2::<0b11_01_11_01>(b, d),
            ]
        });
        let t = std::array::from_fn(|p| std::array::from_fn(|q| quarters[q][p]));
        // Antisymmetry, 16 entries at a time: entries 16c.. against 255 - (16c..), reversed and
        // negated (bit patterns compared, so -0.0 mirrors only +0.0).
        let reverse = _mm512_setr_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
        let sign = _mm512_set1_epi32(i32::MIN);
        let folded = len == 256
            && (0..8).all(|c| {
                // SAFETY: 16c + 16 <= 128 and 240 - 16c + 16 <= 256 floats of `values`.
                let (low, high) = unsafe {
                    (
                        _mm512_loadu_si512(values.as_ptr().add(16 * c) as *const _),
                        _mm512_loadu_si512(values.as_ptr().add(240 - 16 * c) as *const _),
                    )
                };
                let mirrored = _mm512_xor_si512(_mm512_permutexvar_epi32(reverse, high), sign);
                _mm512_cmpeq_epi32_mask(low, mirrored) == 0xFFFF
            });
        Self { t, folded }
    }

    /// Whether the table was found antisymmetric (256 entries, mirrored with the sign flipped).
    #[cfg(test)]
    pub(super) fn folded(&self) -> bool {
        self.folded
    }
}

/// The f32 values of 64 `B`-bit codes (`5 <= B <= 8`, one per byte: the low 256 bits one
/// coordinate's 32 rows, the high 256 bits another's, each half as `decode_planes` takes them),
/// in `decode_planes`'s register order per half: register `g` holds, per 256-bit half, rows
/// `4g..4g+4` in its low 128 bits and `16+4g..20+4g` in its high. Each plane is one `vpermb`
/// (up to 6 bits), one `vpermi2b` (7 bits) or two and a byte blend on bit 7 (8 bits; one, when
/// the table is antisymmetric: codes from 128 index their mirror `255 - k` and flip the sign byte
/// plane's top bit, the same floats); two rounds of byte / word interleaves reassemble the floats.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vbmi")]
pub(super) fn decode_pair<const B: usize>(codes: __m512i, planes: &WidePlanes) -> [__m512; 4] {
    let t = &planes.t;
    let upper = _mm512_movepi8_mask(codes);
    if B == 8 && planes.folded {
        // Code k >= 128 reads entry 255 - k (0x7F - k wraps to the same low 7 bits, the ones
        // `vpermi2b` reads), and its sign bit (bit 7 of plane 3) takes the code's bit 7:
        // `b3 ^ (codes & 0x80)` (ternary-logic table 0x78).
        let mirror = _mm512_mask_sub_epi8(codes, upper, _mm512_set1_epi8(0x7F), codes);
        let mut b: [__m512i; 4] =
            std::array::from_fn(|p| _mm512_permutex2var_epi8(t[p][0], mirror, t[p][1]));
        b[3] = _mm512_ternarylogic_epi32::<0x78>(b[3], codes, _mm512_set1_epi8(i8::MIN));
        return interleave_planes(b);
    }
    let b: [__m512i; 4] = std::array::from_fn(|p| match B {
        ..=6 => _mm512_permutexvar_epi8(codes, t[p][0]),
        7 => _mm512_permutex2var_epi8(t[p][0], codes, t[p][1]),
        _ => _mm512_mask_blend_epi8(
            upper,
            _mm512_permutex2var_epi8(t[p][0], codes, t[p][1]),
            _mm512_permutex2var_epi8(t[p][2], codes, t[p][3]),
        ),
    });
    interleave_planes(b)
}

/// Four byte planes of 64 floats reassembled by two rounds of byte / word interleaves (within
/// 128-bit lanes, so each 256-bit half keeps `decode_planes`'s register order).
#[inline]
#[target_feature(enable = "avx512f,avx512bw")]
fn interleave_planes(b: [__m512i; 4]) -> [__m512; 4] {
    let l01 = _mm512_unpacklo_epi8(b[0], b[1]);
    let h01 = _mm512_unpackhi_epi8(b[0], b[1]);
    let l23 = _mm512_unpacklo_epi8(b[2], b[3]);
    let h23 = _mm512_unpackhi_epi8(b[2], b[3]);
    [
        _mm512_castsi512_ps(_mm512_unpacklo_epi16(l01, l23)),
        _mm512_castsi512_ps(_mm512_unpackhi_epi16(l01, l23)),
        _mm512_castsi512_ps(_mm512_unpacklo_epi16(h01, h23)),
        _mm512_castsi512_ps(_mm512_unpackhi_epi16(h01, h23)),
    ]
}

/// The 32 `B`-bit codes of coordinate `j` (`j mod 4 == K`, `K` 0 or 2) in the low 256 bits and,
/// when `second`, those of coordinate `j + 1` in the high 256 bits (zero otherwise), as
/// [`decode_pair`] takes them: coordinate `c`'s row `r` at byte `32c + r`. Two 8-bit
/// coordinates come from one load ([`byte_pair`]); 7-bit ones from the row windows of
/// [`pair_codes_in`]; 5 and 6 bits, and a lone 8-bit coordinate, by [`wide_codes_k`] on AVX2
/// registers (one per coordinate). Chosen by measurement on Zen 4, where 512-bit permutes share
/// two pipes: the windows' four permutes cost more than `wide_codes_k`'s shifts at 5 and 6 bits
/// (f32 value sums 6% slower) and less at 7, where `wide_codes_k` reads three nibble positions
/// per coordinate (f32 value sums 2% faster, key dots 16%).
///
/// # Safety
/// The CPU supports AVX2 and AVX-512 F, BW and VBMI; `5 <= B <= 8`; `j % 4 == K`; the nibble
/// positions of coordinate `j` (and of `j + 1` when `second`) lie in the block (16 bytes each).
#[inline]
#[target_feature(enable = "avx2,avx512f,avx512bw,avx512vbmi")]
pub(super) unsafe fn pair_codes<const B: usize, const K: usize>(
    block: &[u8],
    j: usize,
    second: bool,
) -> __m512i {
    // (Instantiated at every width by the AVX2 copy of the value kernel, which never calls it.)
    const { assert!(K == 0 || K == 2) };
    debug_assert!((5..=8).contains(&B));
    if B == 8 && second {
        // SAFETY: nibble positions 2j..2j + 4 of coordinates j and j + 1 are 64 contiguous
        // bytes of the block (the caller's contract).
        return unsafe { byte_pair(block, j) };
    }
    if B == 7 {
        // SAFETY: the caller's contract.
        return unsafe { pair_codes_in::<B, K>(block, j, second) };
    }
    // SAFETY: the caller's contract.
    let lo = unsafe { wide_codes_k::<B, K>(block, j) };
    let hi = if second {
        // SAFETY: the caller's contract; `(j + 1) % 4 == K + 1`.
        unsafe {
            if K == 0 {
                wide_codes_k::<B, 1>(block, j + 1)
            } else {
                wide_codes_k::<B, 3>(block, j + 1)
            }
        }
    } else {
        _mm256_setzero_si256()
    };
    _mm512_inserti64x4::<1>(_mm512_castsi256_si512(lo), hi)
}

/// Where [`pair_codes_in`]'s fields land before its last permute: the 64-bit word `r / 4`
/// holds rows `4(r / 4)..+4`, coordinate `j`'s codes in its bytes `0..4` and `j + 1`'s in
/// `4..8`. Returns the byte holding coordinate `c`'s row `r`.
const fn field_byte(r: usize, c: usize) -> u8 {
    (8 * (r / 4) + 4 * c + r % 4) as u8
}

/// `vpermb` indices from [`field_byte`]'s order to [`pair_codes`]'s (coordinate `c`'s row `r` at
/// byte `32c + r`).
const PAIR_ORDER: [u8; 64] = {
    let mut idx = [0u8; 64];
    let mut o = 0;
    while o < 64 {
        idx[o] = field_byte(o % 32, o / 32);
        o += 1;
    }
    idx
};

/// Nibble positions `p..p + 4` of `block` (16 bytes each), those past its end zero (a masked
/// load reads only the block's bytes).
///
/// # Safety
/// AVX-512 F and BW; position `p` lies in `block` (`16 · p < block.len()`, a multiple of 16).
#[inline]
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn load_positions(block: &[u8], p: usize) -> __m512i {
    let positions = block.len() / 16;
    debug_assert!(p < positions);
    // SAFETY: position p lies in the block; the masked load reads only positions below
    // `positions`.
    unsafe {
        let at = block.as_ptr().add(16 * p);
        if p + 4 <= positions {
            _mm512_loadu_si512(at as *const _)
        } else {
            _mm512_maskz_loadu_epi8((1u64 << (16 * (positions - p))) - 1, at as *const i8)
        }
    }
}

/// `vpermb` indices gathering each row's 16-bit window of four nibble positions from their 64
/// bytes (128-bit lane `p` = position `p`, byte `r mod 16`: the low nibble for rows below 16,
/// the high one above): `WINDOW[h]` puts, at byte `2r + b` (row `r`'s word, byte `b`), byte
/// `r mod 16` of lane `2b + h`, whose nibble becomes the low (`h = 0`) or high (`h = 1`) half
/// of that byte.
const WINDOW: [[u8; 64]; 2] = {
    let mut idx = [[0u8; 64]; 2];
    let mut o = 0;
    while o < 64 {
        let (r, b) = (o / 2, o % 2);
        idx[0][o] = (16 * (2 * b) + r % 16) as u8;
        idx[1][o] = (16 * (2 * b + 1) + r % 16) as u8;
        o += 1;
    }
    idx
};

/// The 64 `B`-bit codes of coordinates `j` and `j + 1` (`j mod 4 == K`, `K` 0 or 2; those of
/// `j + 1` zero unless `second`), one per byte in [`pair_codes`]' order. One 64-byte load of
/// the four nibble positions from `B·j / 4` (masked past the block's end) holds both codes of
/// every row, at bit offset `B·K mod 4` of the row's 16-bit window: two `vpermb`, two shifts
/// and a bit select assemble the 32 windows, one `vpmultishiftqb` cuts each row's two fields
/// out of them, a mask keeps their `B` bits and one `vpermb` places them: nine operations for
/// 64 codes, four of them permutes.
///
/// # Safety
/// The CPU supports AVX-512 F, BW and VBMI; `5 <= B <= 8`; `j % 4 == K`; the nibble positions of
/// coordinate `j` (and of `j + 1` when `second`) lie in the block (16 bytes each).
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vbmi")]
unsafe fn pair_codes_in<const B: usize, const K: usize>(
    block: &[u8],
    j: usize,
    second: bool,
) -> __m512i {
    // (Instantiated at every width by the AVX2 copies of the kernels, which never call it.)
    const { assert!(K == 0 || K == 2) };
    debug_assert!((5..=8).contains(&B) && j % 4 == K);
    // SAFETY: position B·j / 4 (coordinate j's first) lies in the block.
    let x = unsafe { load_positions(block, B * j / 4) };
    // SAFETY: `WINDOW` holds two 64-byte tables.
    let (even, odd) = unsafe {
        (
            _mm512_loadu_si512(WINDOW[0].as_ptr() as *const _),
            _mm512_loadu_si512(WINDOW[1].as_ptr() as *const _),
        )
    };
    // Rows 0..16 (64-bit words 0..4) take low nibbles, rows 16..32 high ones.
    let low = _mm512_srlv_epi64(
        _mm512_permutexvar_epi8(even, x),
        _mm512_setr_epi64(0, 0, 0, 0, 4, 4, 4, 4),
    );
    let high = _mm512_sllv_epi64(
        _mm512_permutexvar_epi8(odd, x),
        _mm512_setr_epi64(4, 4, 4, 4, 0, 0, 0, 0),
    );
    // Bit select: `low` where the mask 0x0F has a bit, `high` elsewhere (0xCA = a ? b : c).
    let windows = _mm512_ternarylogic_epi32::<0xCA>(_mm512_set1_epi8(0x0F), low, high);
    // Byte 4c + k of each 64-bit word: the field at bit 16k + B·K mod 4 + c·B (window k).
    let shifts = const {
        let mut s = 0u64;
        let mut i = 0;
        while i < 8 {
            let (c, k) = (i / 4, i % 4);
            s |= ((16 * k + B * K % 4 + c * B) as u64) << (8 * i);
            i += 1;
        }
        s
    };
    let fields = _mm512_multishift_epi64_epi8(_mm512_set1_epi64(shifts as i64), windows);
    let mask = const { ((1u64 << B) - 1) * 0x0101_0101 };
    let keep = if second { mask | (mask << 32) } else { mask };
    let codes = _mm512_and_si512(fields, _mm512_set1_epi64(keep as i64));
    // SAFETY: 64 bytes.
    let order = unsafe { _mm512_loadu_si512(PAIR_ORDER.as_ptr() as *const _) };
    _mm512_permutexvar_epi8(order, codes)
}

/// [`pair_codes`] at 8 bits, from one 64-byte load: nibble positions `P0..P4 = 2j..2j + 4`
/// (coordinate `j`'s low and high nibbles, then `j + 1`'s). Rows 0..16 of a coordinate are the
/// low nibbles of its two positions, rows 16..32 their high nibbles: with `E = [P0, P0, P2, P2]`
/// and `O = [P1, P1, P3, P3]` (128-bit lanes), the codes are `E >> 4s` for the low nibble and
/// `O << 4(1 - s)` for the high one (`s` 0 in lanes 0 and 2, 1 in lanes 1 and 3), joined by one
/// bit select.
///
/// # Safety
/// The CPU supports AVX-512 F; `j` is even and `32 · j + 64 <= block.len()` (coordinates `j`
/// and `j + 1` are in the rows).
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn byte_pair(block: &[u8], j: usize) -> __m512i {
    // SAFETY: the caller's contract: 64 bytes at nibble position 2j.
    let a = unsafe { _mm512_loadu_si512(block.as_ptr().add(32 * j) as *const _) };
    // 128-bit lanes (0, 0, 2, 2) and (1, 1, 3, 3) of `a`.
    let e = _mm512_shuffle_i64x2::<0b10_10_00_00>(a, a);
    let o = _mm512_shuffle_i64x2::<0b11_11_01_01>(a, a);
    let low = _mm512_srlv_epi64(e, _mm512_setr_epi64(0, 0, 4, 4, 0, 0, 4, 4));
    let high = _mm512_sllv_epi64(o, _mm512_setr_epi64(4, 4, 0, 0, 4, 4, 0, 0));
    // Bit select: `low` where the mask 0x0F has a bit, `high` elsewhere (0xCA = a ? b : c).
    _mm512_ternarylogic_epi32::<0xCA>(_mm512_set1_epi8(0x0F), low, high)
}

/// The two 256-bit halves of a decoded pair register.
#[inline]
#[target_feature(enable = "avx512f")]
pub(super) fn halves(x: __m512) -> (__m256, __m256) {
    (
        _mm512_castps512_ps256(x),
        _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(x))),
    )
}

/// `dot_block_codes` for `B`-bit codes (`6 <= B <= 8`) with VBMI decoding: `out[r] = Σ_j q[j] ·
/// values[code_j(row r)]`, coordinates two at a time through [`decode_pair`], FMA'd into four
/// 8-row sums in the order of the AVX2 twin (`dot_block_wide_x86`), so both give the same
/// floats.
///
/// # Safety
/// The CPU supports AVX2, FMA and AVX-512 F, BW and VBMI; `block` is one block of
/// `32 · row_bytes` bytes with `q.len() <= 8 · row_bytes / B`; `values` has at least `2^B`
/// entries.
#[target_feature(enable = "avx2,fma,avx512f,avx512bw,avx512vbmi")]
pub(super) unsafe fn dot_block_pairs<const B: usize>(
    block: &[u8],
    values: &[f32],
    q: &[f32],
    out: &mut [f32; BLOCK],
) {
    let planes = WidePlanes::new(&values[..1 << B]);
    let mut acc = [_mm256_setzero_ps(); 4];
    for (pair, qs) in q.chunks(2).enumerate() {
        let j = 2 * pair;
        // SAFETY (both): coordinates j (and j + 1 when present) are below q.len(), so their
        // nibble positions lie in the block; every code indexes the planes.
        let codes = unsafe {
            if pair % 2 == 0 {
                pair_codes::<B, 0>(block, j, qs.len() == 2)
            } else {
                pair_codes::<B, 2>(block, j, qs.len() == 2)
            }
        };
        let x = decode_pair::<B>(codes, &planes);
        for (k, &qj) in qs.iter().enumerate() {
            let qv = _mm256_set1_ps(qj);
            for (a, x) in acc.iter_mut().zip(x) {
                let (lo, hi) = halves(x);
                *a = _mm256_fmadd_ps(if k == 0 { lo } else { hi }, qv, *a);
            }
        }
    }
    store_rows(acc, out);
}

/// VNNI body of `dot_nibbles_i8` for `Q` weight vectors: four scan steps (eight nibble
/// positions) at a time. Each step's nibbles are split and two rounds of interleaves (bytes of
/// steps `(4u, 4u + 1)` and `(4u + 2, 4u + 3)`, then their 16-bit pairs) gather one row's four
/// nibbles at positions `8u, 8u + 2, 8u + 4, 8u + 6` (low 128-bit lane) or `8u + 1, .., 8u + 7`
/// (high lane) into one 32-bit lane, so one `vpdpbusd` against the matching weights adds four
/// products to that row's `i32` sum: no `i16` stage, no widening. Missing steps of the last group
/// are zero nibbles with zero weights. Exact: the same integer sums as the AVX2 and scalar paths.
///
/// # Safety
/// The CPU supports AVX2, AVX-512 F, VL and VNNI; `block.len()` is a multiple of 32 and every
/// weight slice has `block.len() / 16` entries.
#[target_feature(enable = "avx2,avx512f,avx512vl,avx512vnni")]
pub(super) unsafe fn dot_nibbles_i8_vnni<const Q: usize>(
    block: &[u8],
    weights: [&[i8]; Q],
    outs: &mut [[i32; BLOCK]; Q],
) {
    let steps = block.len() / 32;
    let mask = _mm256_set1_epi8(0x0F);
    // Of eight weights (positions 8u..8u + 8), lane 0 takes the even positions and lane 1 the
    // odd ones, four per 32-bit lane, repeated over the lane.
    #[rustfmt::skip]
    let pick = _mm256_setr_epi8(
        0, 2, 4, 6, 0, 2, 4, 6, 0, 2, 4, 6, 0, 2, 4, 6,
        1, 3, 5, 7, 1, 3, 5, 7, 1, 3, 5, 7, 1, 3, 5, 7,
    );
    let zero = _mm256_setzero_si256();
    // acc[q][2k]: rows 8k..8k + 4, acc[q][2k + 1]: rows 8k + 4..8k + 8 (even positions in the
    // low lane, odd ones in the high lane).
    let mut acc = [[zero; 8]; Q];
    for u in 0..steps.div_ceil(4) {
        let x: [__m256i; 4] = std::array::from_fn(|i| {
            let s = 4 * u + i;
            if s < steps {
                // SAFETY: step s < steps: 32 bytes at 32 s lie in the block.
                unsafe { _mm256_loadu_si256(block.as_ptr().add(32 * s) as *const __m256i) }
            } else {
                zero
            }
        });
        let l = x.map(|v| _mm256_and_si256(v, mask));
        let h = x.map(|v| _mm256_and_si256(_mm256_srli_epi16(v, 4), mask));
        // Rows 0-7, 8-15, 16-23, 24-31 of a pair of steps, each row's two positions adjacent.
        let pair = |a: usize, b: usize| {
            [
                _mm256_unpacklo_epi8(l[a], l[b]),
                _mm256_unpackhi_epi8(l[a], l[b]),
                _mm256_unpacklo_epi8(h[a], h[b]),
                _mm256_unpackhi_epi8(h[a], h[b]),
            ]
        };
        let (first, second) = (pair(0, 1), pair(2, 3));
        let quads: [__m256i; 8] = std::array::from_fn(|m| {
            let k = m / 2;
            if m % 2 == 0 {
                _mm256_unpacklo_epi16(first[k], second[k])
            } else {
                _mm256_unpackhi_epi16(first[k], second[k])
            }
        });
        for (a, w) in acc.iter_mut().zip(weights) {
            // Positions 8u..8u + 8; past the last step, zeros.
            let eight = if 8 * u + 8 <= w.len() {
                // SAFETY: 8u + 8 <= w.len(); an unaligned 8-byte read.
                unsafe { (w.as_ptr().add(8 * u) as *const i64).read_unaligned() }
            } else {
                let mut b = [0u8; 8];
                for (d, &s) in b.iter_mut().zip(&w[8 * u..]) {
                    *d = s as u8;
                }
                i64::from_le_bytes(b)
            };
            let wv = _mm256_shuffle_epi8(_mm256_set1_epi64x(eight), pick);
            for (a, q) in a.iter_mut().zip(quads) {
                *a = _mm256_dpbusd_epi32(*a, q, wv);
            }
        }
    }
    for (a, o) in acc.iter().zip(outs.iter_mut()) {
        for k in 0..4 {
            let (lo, hi) = (a[2 * k], a[2 * k + 1]);
            let rows = _mm256_add_epi32(
                _mm256_permute2x128_si256::<0x20>(lo, hi),
                _mm256_permute2x128_si256::<0x31>(lo, hi),
            );
            // SAFETY: `o` holds 32 i32; rows 8k..8k + 8.
            unsafe { _mm256_storeu_si256(o.as_mut_ptr().add(8 * k) as *mut __m256i, rows) };
        }
    }
}

/// `vpermb` indices putting four nibble positions' bytes of one row side by side: byte `4k + c`
/// of the result is byte `k` of 128-bit lane `c` (position `c`), so 32-bit lane `k` holds the
/// four positions' nibbles of rows `k` (low halves) and `k + 16` (high halves). The same
/// permutation puts [`unit_codes`]' order (coordinate `c`'s row `r` at byte `16c + r`) in
/// row-major order (row `r`'s four codes in bytes `4r..4r + 4`) for the integer key dots.
const ROW_QUADS: [u8; 64] = {
    let mut idx = [0u8; 64];
    let mut o = 0;
    while o < 64 {
        idx[o] = (16 * (o % 4) + o / 4) as u8;
        o += 1;
    }
    idx
};

/// VBMI body of `dot_nibbles_i8` for `Q` weight vectors: four nibble positions per 64-byte load
/// (masked past the block's end), one `vpermb` ([`ROW_QUADS`]) to put each row's four nibbles
/// in one 32-bit lane, the low and high nibbles split (rows 0-15 and 16-31), and per vector one
/// broadcast of its four weights and one `vpdpbusd` per 16 rows into `i32` lanes already in row
/// order: a third of the VNNI body's shared operations (no interleave rounds, no final lane
/// join). Missing positions of the last load are zero nibbles with zero weights. Exact: the
/// same integer sums as the AVX2, VNNI and scalar paths.
///
/// # Safety
/// The CPU supports AVX2, AVX-512 F, BW, VBMI and VNNI; `block.len()` is a multiple of 32 and
/// every weight slice has `block.len() / 16` entries.
#[target_feature(enable = "avx2,avx512f,avx512bw,avx512vbmi,avx512vnni")]
pub(super) unsafe fn dot_nibbles_i8_vbmi<const Q: usize>(
    block: &[u8],
    weights: [&[i8]; Q],
    outs: &mut [[i32; BLOCK]; Q],
) {
    let positions = block.len() / 16;
    // SAFETY: `ROW_QUADS` has 64 bytes.
    let idx = unsafe { _mm512_loadu_si512(ROW_QUADS.as_ptr() as *const _) };
    let mask = _mm512_set1_epi8(0x0F);
    // A lone vector alternates two accumulators (it was bound by `vpdpbusd`'s latency); with
    // more vectors the extra registers measured slower for these per-block calls.
    let last = if positions.is_multiple_of(4) {
        [_mm512_setzero_si512(); Q]
    } else {
        last_weights(&weights)
    };
    // SAFETY: the weight vectors hold `positions` entries (the caller's contract).
    let sums = unsafe { block_units::<Q, false>(block, idx, mask, &weights, last, Q == 1) };
    for q in 0..Q {
        // SAFETY: `outs[q]` holds 32 i32: rows 0-15, then 16-31.
        unsafe {
            let o = outs[q].as_mut_ptr();
            _mm512_storeu_si512(o as *mut _, sums[q][0]);
            _mm512_storeu_si512(o.add(16) as *mut _, sums[q][1]);
        }
    }
}

/// VBMI body of `dot_blocks_scores_u8` for `Q` jobs over every block: per four nibble
/// positions one 64-byte load (masked past a block's end), one `vpermb` ([`ROW_QUADS`]) putting
/// each row's four nibbles in one 32-bit lane, two `vpermb` looking the low and high nibbles up
/// in the grid (`values` repeated through 64 entries, so the bits above a nibble are ignored),
/// and per job one broadcast of its four weights and one `vpdpbusd` per 16 rows, alternating
/// between two accumulators so the additions of one job do not wait on each other. A block's
/// sums become its scores in registers (`scale · (offset + step · S) + bias`, separate
/// multiplies and adds as the scalar twin). Missing positions of a last load look up entry 0
/// but meet zero weights; the last block's empty rows are computed from their codes, but their
/// scales are not read and their outputs not written.
///
/// # Safety
/// The CPU supports AVX2, AVX-512 F, BW, VBMI and VNNI; `block_bytes` is a multiple of 32 with
/// `block_bytes / 32 <= 32 768`; `blocks.len() == scales.len().div_ceil(32) · block_bytes`; every
/// job has `block_bytes / 16` weights and `scales.len()` outputs.
#[target_feature(enable = "avx2,avx512f,avx512bw,avx512vbmi,avx512vnni")]
pub(super) unsafe fn dot_blocks_u8_vbmi<const Q: usize>(
    blocks: &[u8],
    block_bytes: usize,
    values: &[u8; 16],
    scales: &[f32],
    jobs: &mut [super::ByteJob<'_>; Q],
    ahead: Ahead<'_>,
) {
    let table: [u8; 64] = std::array::from_fn(|i| values[i % 16]);
    // SAFETY (both): 64-byte arrays.
    let (idx, table) = unsafe {
        (
            _mm512_loadu_si512(ROW_QUADS.as_ptr() as *const _),
            _mm512_loadu_si512(table.as_ptr() as *const _),
        )
    };
    let weights: [&[i8]; Q] = std::array::from_fn(|q| jobs[q].weights);
    let last = last_weights(&weights);
    let rows = scales.len();
    for (b, block) in blocks.chunks_exact(block_bytes).enumerate() {
        ahead.rows(BLOCK * b..BLOCK * (b + 1));
        // SAFETY: every job's weights hold `block_bytes / 16` entries (the caller's contract).
        let sums = unsafe { block_units::<Q, true>(block, idx, table, &weights, last, true) };
        for h in 0..2 {
            let first = BLOCK * b + 16 * h;
            let n = rows.saturating_sub(first).min(16);
            if n == 0 {
                break;
            }
            let mask = ((1u32 << n) - 1) as __mmask16;
            // SAFETY: rows first..first + n are below `scales.len()`.
            let s = unsafe { _mm512_maskz_loadu_ps(mask, scales.as_ptr().add(first)) };
            for (job, sum) in jobs.iter_mut().zip(&sums) {
                let sum = _mm512_cvtepi32_ps(sum[h]);
                let a = job.affine;
                let dot = _mm512_add_ps(
                    _mm512_set1_ps(a.offset),
                    _mm512_mul_ps(_mm512_set1_ps(a.step), sum),
                );
                let v = _mm512_add_ps(_mm512_mul_ps(s, dot), _mm512_set1_ps(a.bias));
                // SAFETY: the job has `rows` outputs, rows first..first + n among them.
                unsafe { _mm512_mask_storeu_ps(job.out.as_mut_ptr().add(first), mask, v) };
            }
        }
    }
}

/// A block's sums over all its units for each of the `Q` weight vectors (rows 0-15 and 16-31):
/// the whole units by [`nibble_unit`] (with `split`, even and odd units in two accumulators
/// added at the end, so one vector's additions do not wait on each other), the last one to three
/// positions with `last` (each vector's zero-padded last word, [`last_weights`]).
///
/// # Safety
/// AVX-512 F, BW, VBMI and VNNI; `block.len()` is a multiple of 16 and every weight vector has
/// `block.len() / 16` entries.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vbmi,avx512vnni")]
unsafe fn block_units<const Q: usize, const LOOK_UP: bool>(
    block: &[u8],
    idx: __m512i,
    table: __m512i,
    weights: &[&[i8]; Q],
    last: [__m512i; Q],
    split: bool,
) -> [[__m512i; 2]; Q] {
    let positions = block.len() / 16;
    let full = positions / 4;
    let zero = _mm512_setzero_si512();
    let (mut even, mut odd) = ([[zero; 2]; Q], [[zero; 2]; Q]);
    let mut u = 0;
    if split {
        while u + 1 < full {
            // SAFETY (all): units u and u + 1 are whole (`u + 1 < full`): positions 4u..4u + 8
            // lie in the block and in every weight vector.
            let w = unsafe { four_weights(weights, u) };
            even = unsafe { nibble_unit::<Q, LOOK_UP>(block, u, idx, table, w, even) };
            let w = unsafe { four_weights(weights, u + 1) };
            odd = unsafe { nibble_unit::<Q, LOOK_UP>(block, u + 1, idx, table, w, odd) };
            u += 2;
        }
    }
    while u < full {
        // SAFETY: unit u is whole (`u < full`).
        let w = unsafe { four_weights(weights, u) };
        even = unsafe { nibble_unit::<Q, LOOK_UP>(block, u, idx, table, w, even) };
        u += 1;
    }
    if 4 * full < positions {
        // SAFETY: position 4 · full lies in the block (`4 · full < positions`).
        odd = unsafe { nibble_unit::<Q, LOOK_UP>(block, full, idx, table, last, odd) };
    }
    std::array::from_fn(|q| {
        [
            _mm512_add_epi32(even[q][0], odd[q][0]),
            _mm512_add_epi32(even[q][1], odd[q][1]),
        ]
    })
}

/// `acc` plus unit `u`'s products for each of the `Q` weight vectors: the 128 nibbles at
/// positions `4u..4u + 4` of `block` (zero past its end) by one load and one `vpermb` into row
/// order ([`ROW_QUADS`], each row's four positions in one 32-bit lane), split into rows 0-15 and
/// 16-31 and, with `LOOK_UP`, looked up in `table` by one `vpermb` each (a 16-entry grid
/// repeated through 64 bytes, so the bits above a nibble do not matter), else masked with it
/// (`0x0F` in every byte: the nibbles themselves); then per vector one broadcast of its four
/// weights (`four[q]`, broadcast) and one `vpdpbusd` for rows 0-15 and one for 16-31.
///
/// # Safety
/// AVX-512 F, BW, VBMI and VNNI; position `4u` lies in `block` (16 bytes per position).
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vbmi,avx512vnni")]
unsafe fn nibble_unit<const Q: usize, const LOOK_UP: bool>(
    block: &[u8],
    u: usize,
    idx: __m512i,
    table: __m512i,
    four: [__m512i; Q],
    mut acc: [[__m512i; 2]; Q],
) -> [[__m512i; 2]; Q] {
    // SAFETY: position 4u lies in the block (the caller's contract).
    let x = unsafe { load_positions(block, 4 * u) };
    let t = _mm512_permutexvar_epi8(idx, x);
    let high = _mm512_srli_epi16::<4>(t);
    let (lo, hi) = if LOOK_UP {
        (
            _mm512_permutexvar_epi8(t, table),
            _mm512_permutexvar_epi8(high, table),
        )
    } else {
        (_mm512_and_si512(t, table), _mm512_and_si512(high, table))
    };
    for q in 0..Q {
        acc[q][0] = _mm512_dpbusd_epi32(acc[q][0], lo, four[q]);
        acc[q][1] = _mm512_dpbusd_epi32(acc[q][1], hi, four[q]);
    }
    acc
}

/// Weights `4u..4u + 4` of each vector as one 32-bit word in every lane (a broadcast straight
/// from memory, not through a general register).
///
/// # Safety
/// AVX-512 F; `4u + 4 <= w.len()` for every vector `w`.
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn four_weights<const Q: usize>(weights: &[&[i8]; Q], u: usize) -> [__m512i; Q] {
    // SAFETY: 4u + 4 <= w.len() (the caller's contract); unaligned 4-byte loads.
    std::array::from_fn(|q| unsafe {
        _mm512_broadcastd_epi32(_mm_loadu_si32(weights[q].as_ptr().add(4 * u) as *const _))
    })
}

/// The weights of each vector from position `4 · ⌊len / 4⌋` on (up to three), zero-padded to
/// one 32-bit word (zero when the length is a multiple of four), in every lane.
#[inline]
#[target_feature(enable = "avx512f")]
fn last_weights<const Q: usize>(weights: &[&[i8]; Q]) -> [__m512i; Q] {
    weights.map(|w| {
        let mut b = [0u8; 4];
        for (d, &s) in b.iter_mut().zip(&w[w.len() / 4 * 4..]) {
            *d = s as u8;
        }
        _mm512_set1_epi32(i32::from_le_bytes(b))
    })
}

/// An [`IntCodebook`]'s two byte planes in registers: `t[p][q]` holds byte `p` (little endian)
/// of `values[64q..64q + 64]`, zero past the table's end, except that for codes of `b <= 5`
/// bits entries `0..2^b` repeat through the first 64 (so a look-up may leave the code's bits
/// above `b` set).
pub(super) struct IntPlanes {
    t: [[__m512i; 4]; 2],
    folded: bool,
}

impl IntPlanes {
    /// The planes of `codebook` for `bits`-bit codes (eight 64-byte loads).
    #[inline]
    #[target_feature(enable = "avx512f")]
    pub(super) fn new(codebook: &IntCodebook, bits: u32) -> Self {
        let planes = codebook.planes();
        let t = std::array::from_fn(|p| {
            std::array::from_fn(|q| {
                if q == 0 && bits <= 5 {
                    let period = 1usize << bits;
                    let first: [u8; 64] = std::array::from_fn(|k| planes[p][k % period]);
                    // SAFETY: 64 bytes.
                    unsafe { _mm512_loadu_si512(first.as_ptr() as *const _) }
                } else {
                    // SAFETY: bytes 64q..64q + 64 of a 256-byte plane.
                    unsafe { _mm512_loadu_si512(planes[p][64 * q..].as_ptr() as *const _) }
                }
            })
        });
        Self {
            t,
            folded: codebook.folded(),
        }
    }
}

/// AVX-512 body of `dot_blocks_scores_i16` for one block: `out[r] = Σ_j weights[j] ·
/// values[code_j(row r)]`, in `i32` per chunk of `INT_CHUNK` coordinates whose sums are added
/// to `f32` totals, four coordinates per step ([`dot_block_i16_vnni`]), for each of the `Q`
/// weight vectors (all of one length) from one look-up. The same sums as the scalar twin.
///
/// # Safety
/// The CPU supports AVX2, AVX-512 F, BW, VBMI and VNNI, and GFNI; `5 <= bits <= 8`; `block` is
/// one block of `32 · row_bytes` bytes; every weight slice has the same length `<= 8 ·
/// row_bytes / bits`; no chunk's partial sum overflows an `i32` (`Σ|w| · max|value| <=
/// i32::MAX` per chunk).
#[target_feature(enable = "avx2,avx512f,avx512bw,avx512vbmi,avx512vnni,gfni")]
pub(super) unsafe fn dot_block_i16_x86<const Q: usize>(
    block: &[u8],
    bits: u32,
    planes: &IntPlanes,
    weights: [&[i16]; Q],
    out: &mut [[f32; BLOCK]; Q],
) {
    // SAFETY (all three): the caller's contract, passed on with `bits == B`.
    unsafe {
        match bits {
            5 => dot_block_i16_vnni::<5, Q>(block, planes, weights, out),
            6 => dot_block_i16_vnni::<6, Q>(block, planes, weights, out),
            7 => dot_block_i16_vnni::<7, Q>(block, planes, weights, out),
            _ => dot_block_i16_vnni::<8, Q>(block, planes, weights, out),
        }
    }
}

/// `vpermt2d` indices gathering 16 rows' sums in order from two registers of pair sums: after
/// [`ROW_QUADS`], the look-up and the byte interleaves, the first register holds rows `4L` and
/// `4L + 1` of each 128-bit lane `L` and the second rows `4L + 2` and `4L + 3`, each row's sum
/// (once its two 32-bit halves are added) in the low half of its own 64-bit word.
const ROW_SUMS: [i32; 16] = {
    let mut idx = [0i32; 16];
    let mut r = 0;
    while r < 16 {
        let (lane, t) = (r / 4, r % 4);
        idx[r] = if t < 2 {
            2 * (2 * lane + t)
        } else {
            16 + 2 * (2 * lane + t - 2)
        } as i32;
        r += 1;
    }
    idx
};

/// [`dot_block_i16_x86`] for `B`-bit codes: four coordinates per step, their 128 codes cut by
/// [`unit_codes`] and put in row-major order (one `vpermb` per 16 rows), the grid's two byte
/// planes looked up and interleaved into words, so each 32-bit lane holds one row's products
/// of two coordinates: one `vpdpwssd` per 8 rows adds a row's four products into two lanes
/// (coordinates `(4u, 4u + 1)` and `(4u + 2, 4u + 3)`), whose sums are joined per chunk.
///
/// # Safety
/// As [`dot_block_i16_x86`] with `bits == B`.
#[target_feature(enable = "avx2,avx512f,avx512bw,avx512vbmi,avx512vnni,gfni")]
unsafe fn dot_block_i16_vnni<const B: usize, const Q: usize>(
    block: &[u8],
    planes: &IntPlanes,
    weights: [&[i16]; Q],
    out: &mut [[f32; BLOCK]; Q],
) {
    // SAFETY (both): 64-byte constants.
    let (row_major, row_sums) = unsafe {
        (
            _mm512_loadu_si512(ROW_QUADS.as_ptr() as *const _),
            _mm512_loadu_si512(ROW_SUMS.as_ptr() as *const _),
        )
    };
    const { assert!(super::INT_CHUNK.is_multiple_of(4)) };
    let dim = if Q == 0 { 0 } else { weights[0].len() };
    // acc[q][k]: the k-th register of rows (see `ROW_SUMS`); total[q]: rows 0-15, 16-31.
    let mut acc = [[_mm512_setzero_si512(); 4]; Q];
    let mut total = [[_mm512_setzero_ps(); 2]; Q];
    for u in 0..dim.div_ceil(4) {
        let j = 4 * u;
        // SAFETY: coordinate j is below the weights' length, so position B·u lies in the block.
        let [low, high] = unsafe { unit_codes::<B>(block, u) };
        let (l0, h0) = look_up_ints::<B>(_mm512_permutexvar_epi8(row_major, low), planes);
        let (l1, h1) = look_up_ints::<B>(_mm512_permutexvar_epi8(row_major, high), planes);
        let x = [
            _mm512_unpacklo_epi8(l0, h0),
            _mm512_unpackhi_epi8(l0, h0),
            _mm512_unpacklo_epi8(l1, h1),
            _mm512_unpackhi_epi8(l1, h1),
        ];
        let flush = (j + 4).is_multiple_of(super::INT_CHUNK) || j + 4 >= dim;
        for ((a, t), w) in acc.iter_mut().zip(&mut total).zip(weights) {
            // The four weights as one 64-bit word, zero past the row's coordinates.
            let four = if j + 4 <= dim {
                // SAFETY: w[j..j + 4] are in the slice.
                unsafe { std::ptr::read_unaligned(w.as_ptr().add(j) as *const u64) }
            } else {
                (j..dim).fold(0u64, |v, k| v | (u64::from(w[k] as u16) << (16 * (k - j))))
            };
            let wv = _mm512_set1_epi64(four as i64);
            for (a, x) in a.iter_mut().zip(x) {
                *a = dpwssd(*a, x, wv);
            }
            if flush {
                // Each row's two 32-bit sums added, then 16 rows gathered in order per half.
                let s = a.map(|a| _mm512_add_epi32(a, _mm512_srli_epi64::<32>(a)));
                for (h, t) in t.iter_mut().enumerate() {
                    let rows = _mm512_permutex2var_epi32(s[2 * h], row_sums, s[2 * h + 1]);
                    *t = _mm512_add_ps(*t, _mm512_cvtepi32_ps(rows));
                }
                *a = [_mm512_setzero_si512(); 4];
            }
        }
    }
    for (t, o) in total.iter().zip(out.iter_mut()) {
        // SAFETY: rows 0..16 and 16..32 of `o` (32 floats).
        unsafe {
            _mm512_storeu_ps(o.as_mut_ptr(), t[0]);
            _mm512_storeu_ps(o.as_mut_ptr().add(16), t[1]);
        }
    }
}

/// `vgf2p8affineqb` matrices (row `i`, the bit-`i` mask of the result, in byte `7 - i`): [`SIGN`]
/// copies a byte's bit 7 into every bit; [`MIRROR`] flips bits 0-6 when bit 7 is set (`k ^ 0x7F`
/// for codes from 128, whose low 7 bits are those of `255 - k`; the byte unchanged below).
const SIGN: i64 = gf_matrix(false);
/// See [`SIGN`].
const MIRROR: i64 = gf_matrix(true);

const fn gf_matrix(mirror: bool) -> i64 {
    let mut a = 0u64;
    let mut i = 0;
    while i < 8 {
        let row = if mirror && i < 7 {
            0x80 | (1u64 << i)
        } else {
            0x80
        };
        a |= row << (8 * (7 - i));
        i += 1;
    }
    a as i64
}

/// The low and high bytes of the grid values of 64 `B`-bit codes: one `vpermb` (6 bits) or
/// `vpermi2b` (7 bits) per plane; at 8 bits two and a blend on bit 7, or, when the grid is
/// antisymmetric (`values[255 - k] == !values[k]`), one on the mirrored index `255 - k` for codes
/// from 128 (the index and the sign mask each one `vgf2p8affineqb`), whose bytes are then
/// complemented.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vbmi,gfni")]
fn look_up_ints<const B: usize>(codes: __m512i, planes: &IntPlanes) -> (__m512i, __m512i) {
    let t = &planes.t;
    match B {
        ..=6 => (
            _mm512_permutexvar_epi8(codes, t[0][0]),
            _mm512_permutexvar_epi8(codes, t[1][0]),
        ),
        7 => (
            _mm512_permutex2var_epi8(t[0][0], codes, t[0][1]),
            _mm512_permutex2var_epi8(t[1][0], codes, t[1][1]),
        ),
        _ => {
            if planes.folded {
                // `flip`: all ones in the bytes of codes from 128; `mirror`: for those `k ^ 0x7F`,
                // whose low 7 bits (the ones `vpermi2b` reads) are those of `255 - k`. The bytes
                // looked up are then complemented under `flip` (the word's one's complement).
                let flip = _mm512_gf2p8affine_epi64_epi8::<0>(codes, _mm512_set1_epi64(SIGN));
                let mirror = _mm512_gf2p8affine_epi64_epi8::<0>(codes, _mm512_set1_epi64(MIRROR));
                let lo = _mm512_permutex2var_epi8(t[0][0], mirror, t[0][1]);
                let hi = _mm512_permutex2var_epi8(t[1][0], mirror, t[1][1]);
                (_mm512_xor_si512(lo, flip), _mm512_xor_si512(hi, flip))
            } else {
                let upper = _mm512_movepi8_mask(codes);
                let plane = |p: usize| {
                    _mm512_mask_blend_epi8(
                        upper,
                        _mm512_permutex2var_epi8(t[p][0], codes, t[p][1]),
                        _mm512_permutex2var_epi8(t[p][2], codes, t[p][3]),
                    )
                };
                (plane(0), plane(1))
            }
        }
    }
}

/// `acc + Σ pairs of a · b` in `i32` lanes: one `vpdpwssd`. Written out, because under LLVM's
/// generic x86-64 tuning a chain of the intrinsic on one accumulator (four per load here) comes
/// out as `vpmaddwd` and `vpaddd` pairs, twice the operations in the integer sums' inner loop
/// (about 7% of a grouped-query decode step on Zen 4).
#[inline]
#[target_feature(enable = "avx512f,avx512vnni")]
fn dpwssd(acc: __m512i, a: __m512i, b: __m512i) -> __m512i {
    let mut acc = acc;
    // SAFETY: a register-only instruction the enabled features provide; no memory, stack or
    // flags touched.
    unsafe {
        std::arch::asm!(
            "vpdpwssd {acc}, {a}, {b}",
            acc = inout(zmm_reg) acc,
            a = in(zmm_reg) a,
            b = in(zmm_reg) b,
            options(pure, nomem, nostack, preserves_flags),
        );
    }
    acc
}

/// One unit of 4-bit codes for the integer sums on AVX-512: nibble positions `4u..4u + 4` (one
/// coordinate per 128-bit lane; past the row's positions, which come in pairs, the last two are
/// zeros by a masked load), split into
/// rows 0-15 and 16-31, looked up in the grid's two byte planes (`planes`, in every lane) by
/// `vpshufb` and interleaved into words of rows 0-7, 8-15, 16-23 and 24-31.
///
/// # Safety
/// AVX-512 F and BW; `block` is one block (16 bytes per nibble position) and position `4u` lies
/// in it.
#[inline]
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn decode_nibbles_512(block: &[u8], u: usize, planes: &[__m512i; 2]) -> [__m512i; 4] {
    // SAFETY: position 4u lies in the block (the caller's contract).
    let x = unsafe { load_positions(block, 4 * u) };
    let nib = _mm512_set1_epi8(0x0F);
    let lo = _mm512_and_si512(x, nib);
    let hi = _mm512_and_si512(_mm512_srli_epi16::<4>(x), nib);
    let (l0, h0) = (
        _mm512_shuffle_epi8(planes[0], lo),
        _mm512_shuffle_epi8(planes[1], lo),
    );
    let (l1, h1) = (
        _mm512_shuffle_epi8(planes[0], hi),
        _mm512_shuffle_epi8(planes[1], hi),
    );
    [
        _mm512_unpacklo_epi8(l0, h0),
        _mm512_unpackhi_epi8(l0, h0),
        _mm512_unpacklo_epi8(l1, h1),
        _mm512_unpackhi_epi8(l1, h1),
    ]
}

/// The 4-bit grid's two byte planes (the first 16 bytes of each) in all four 128-bit lanes.
#[inline]
#[target_feature(enable = "avx512f")]
pub(super) fn nibble_planes_512(planes: &[[u8; 256]; 2]) -> [__m512i; 2] {
    // SAFETY: 16 bytes of each 256-byte plane.
    planes.map(|p| unsafe { _mm512_broadcast_i32x4(_mm_loadu_si128(p.as_ptr() as *const __m128i)) })
}

/// The weights of one block for 4-bit units on AVX-512: rows 0-7, 8-15, 16-23 and 24-31, each in
/// all four 128-bit lanes.
///
/// # Safety
/// 32 readable `i16` at `p`.
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn nibble_weights_512(p: *const i16) -> [__m512i; 4] {
    // SAFETY: the caller's 64 bytes.
    std::array::from_fn(|r| unsafe {
        _mm512_broadcast_i32x4(_mm_loadu_si128(p.add(8 * r) as *const __m128i))
    })
}

/// Four units' sums inside each 128-bit lane on AVX-512: each lane's four 32-bit partial sums
/// added by two rounds of interleaves (element `4c + u` is lane `c` of unit `u`).
#[inline]
#[target_feature(enable = "avx512f")]
fn reduce_lanes_512(a: [__m512i; 4]) -> __m512i {
    let t01 = _mm512_add_epi32(
        _mm512_unpacklo_epi32(a[0], a[1]),
        _mm512_unpackhi_epi32(a[0], a[1]),
    );
    let t23 = _mm512_add_epi32(
        _mm512_unpacklo_epi32(a[2], a[3]),
        _mm512_unpackhi_epi32(a[2], a[3]),
    );
    _mm512_add_epi32(
        _mm512_unpacklo_epi64(t01, t23),
        _mm512_unpackhi_epi64(t01, t23),
    )
}

super::x86::int_sums_kernel!(
    #[target_feature(enable = "avx2,avx512f,avx512bw,avx512vnni")]
    accumulate_i16_vnni, __m512i, per: 4, regs: 4, zero: _mm512_setzero_si512(),
    decode: |block: &[u8], unit: usize, _dim: usize| decode_nibbles_512(block, unit, &planes),
    weights: nibble_weights_512, dot: dpwssd, reduce: reduce_lanes_512,
    fsplat: _mm512_set1_ps, cvt: _mm512_cvtepi32_ps, fadd: _mm512_add_ps, fmul: _mm512_mul_ps,
    fload: _mm512_loadu_ps, fstore: _mm512_storeu_ps, wtype: super::IntWeights, extra: (planes: [__m512i; 2])
);

/// One unit of 4-bit codes for the byte sums on AVX-512: nibble positions `4u..4u + 4` (one
/// coordinate per 128-bit lane, zeros past the block by a masked load) looked up in the signed
/// grid (`table`, its 16 bytes in every lane) by `vpshufb`: rows 0-15 (the low nibbles), then
/// rows 16-31 (the high ones), so each 32-bit lane holds four adjacent rows of one coordinate.
///
/// # Safety
/// AVX-512 F and BW; `block` is one block (16 bytes per nibble position) and position `4u` lies
/// in it.
#[inline]
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn decode_nibbles_i8_512(block: &[u8], u: usize, table: __m512i) -> [__m512i; 2] {
    // SAFETY: position 4u lies in the block (the caller's contract).
    let x = unsafe { load_positions(block, 4 * u) };
    let nib = _mm512_set1_epi8(0x0F);
    let lo = _mm512_and_si512(x, nib);
    let hi = _mm512_and_si512(_mm512_srli_epi16::<4>(x), nib);
    [
        _mm512_shuffle_epi8(table, lo),
        _mm512_shuffle_epi8(table, hi),
    ]
}

/// A byte grid's 16 signed entries (`values[k] − 128`; 0 past a 1-3-bit codebook's `2^B`) in
/// all four 128-bit lanes.
#[inline]
#[target_feature(enable = "avx512f")]
pub(super) fn signed_grid_512(values: &[u8; 16]) -> __m512i {
    let signed: [u8; 16] = std::array::from_fn(|k| values[k] ^ 0x80);
    // SAFETY: 16 bytes.
    unsafe { _mm512_broadcast_i32x4(_mm_loadu_si128(signed.as_ptr() as *const __m128i)) }
}

/// The `u8` weights of one block for the byte sums: rows 0-15, then 16-31, each in all four
/// 128-bit lanes.
///
/// # Safety
/// 32 readable bytes at `p`.
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn byte_weights_512(p: *const u8) -> [__m512i; 2] {
    // SAFETY: the caller's 32 bytes.
    std::array::from_fn(|h| unsafe {
        _mm512_broadcast_i32x4(_mm_loadu_si128(p.add(16 * h) as *const __m128i))
    })
}

/// `acc + Σ quads of weights · grid` in `i32` lanes (`u8` weights, `i8` grid values): one
/// `vpdpbusd`.
#[inline]
#[target_feature(enable = "avx512f,avx512vnni")]
fn dpbusd_grid(acc: __m512i, grid: __m512i, weights: __m512i) -> __m512i {
    _mm512_dpbusd_epi32(acc, weights, grid)
}

/// One unit of `B`-bit codes (`1 <= B <= 4`) for the byte sums on AVX-512: the four
/// coordinates from `4u`, one per 128-bit lane, rows 0-15 then rows 16-31, looked up in the
/// signed grid (`table`, its 16 bytes in every lane) by `vpshufb`: 4-bit nibbles straight from
/// their load ([`decode_nibbles_i8_512`]), 1-3-bit codes cut out by [`unit_codes`] and masked
/// to their `B` bits.
///
/// # Safety
/// AVX-512 F and BW; `1 <= B <= 4`; `block` is one block and position `B·u` lies in it.
#[inline]
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn decode_i8_512<const B: usize>(block: &[u8], u: usize, table: __m512i) -> [__m512i; 2] {
    const { assert!(B >= 1 && B <= 4) };
    if B == 4 {
        // SAFETY: the caller's contract.
        return unsafe { decode_nibbles_i8_512(block, u, table) };
    }
    // SAFETY: the caller's contract.
    let [low, high] = unsafe { unit_codes::<B>(block, u) };
    let mask = _mm512_set1_epi8(((1u32 << B) - 1) as i8);
    [
        _mm512_shuffle_epi8(table, _mm512_and_si512(low, mask)),
        _mm512_shuffle_epi8(table, _mm512_and_si512(high, mask)),
    ]
}

super::x86::int_sums_kernel!(
    #[target_feature(enable = "avx2,avx512f,avx512bw,avx512vnni")]
    accumulate_u8_vnni, __m512i, per: 4, regs: 2, zero: _mm512_setzero_si512(),
    decode: |block: &[u8], unit: usize, _dim: usize| decode_i8_512::<B>(block, unit, table),
    weights: byte_weights_512, dot: dpbusd_grid, reduce: reduce_lanes_512,
    fsplat: _mm512_set1_ps, cvt: _mm512_cvtepi32_ps, fadd: _mm512_add_ps, fmul: _mm512_mul_ps,
    fload: _mm512_loadu_ps, fstore: _mm512_storeu_ps, wtype: super::ByteWeights,
    extra: (table: __m512i)
);

/// The nibble positions holding unit `u`'s four coordinates `4u + c` for `B`-bit codes: lane
/// `c` of piece `k` is position `B·u + ⌊B·c / 4⌋ + k` (a unit's `4B` bits are whole nibbles, so
/// each unit starts one), zero past the block's end. A code lies at bit offset `B·c mod 4` of
/// its piece 0, continues in piece 1 when `B·c mod 4 + B > 4` and in piece 2 when it is above
/// 8. At 5 bits the pieces are two 64-byte loads; otherwise one `vpermt2q` (or `vshufi64x2` at
/// 8 bits) per piece from a load of positions `B·u..B·u + 4` and, above 4 bits, of the next
/// four. Piece 2 is zero except at 7 bits.
///
/// # Safety
/// AVX-512 F and BW; `1 <= B <= 8`, `B != 4`; `block` is one block (16 bytes per nibble
/// position) and position `B·u` lies in it.
#[inline]
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn unit_pieces<const B: usize>(block: &[u8], u: usize) -> [__m512i; 3] {
    let first = B * u;
    if B == 5 {
        // SAFETY (both): position 5u lies in the block; 5u + 1 too, as coordinate 4u's code
        // ends there; `load_positions` masks what is past the end.
        return unsafe {
            [
                load_positions(block, first),
                load_positions(block, first + 1),
                _mm512_setzero_si512(),
            ]
        };
    }
    // SAFETY: position first lies in the block; the second load only when first + 4 does
    // (and is needed: below 4 bits a unit spans at most 3 positions).
    let (a, b) = unsafe {
        let a = load_positions(block, first);
        let b = if B > 4 && first + 4 < block.len() / 16 {
            load_positions(block, first + 4)
        } else {
            _mm512_setzero_si512()
        };
        (a, b)
    };
    if B == 8 {
        // Lanes (0, 2) of each load, then (1, 3).
        let x = _mm512_shuffle_i64x2::<0b10_00_10_00>(a, b);
        let y = _mm512_shuffle_i64x2::<0b11_01_11_01>(a, b);
        return [x, y, _mm512_setzero_si512()];
    }
    // vpermt2q indices: qword 2c + h of piece k is qword 2p + h of (a, b), p = ⌊B·c / 4⌋ + k.
    let index = |k: usize| {
        let mut q = [0i64; 8];
        for (i, q) in q.iter_mut().enumerate() {
            let (c, h) = (i / 2, i % 2);
            *q = (2 * (B * c / 4 + k) + h) as i64;
        }
        // SAFETY: 64 bytes.
        unsafe { _mm512_loadu_si512(q.as_ptr() as *const _) }
    };
    let z = if B == 7 {
        _mm512_permutex2var_epi64(a, index(2), b)
    } else {
        _mm512_setzero_si512()
    };
    [
        _mm512_permutex2var_epi64(a, index(0), b),
        _mm512_permutex2var_epi64(a, index(1), b),
        z,
    ]
}

/// The `B`-bit codes (`1 <= B <= 8`, `B != 4`) of unit `u`'s four coordinates `4u..4u + 4`, one
/// coordinate per 128-bit lane and one code per byte: rows 0-15 (the low nibbles) in the first
/// register, rows 16-31 (the high nibbles) in the second. Each lane's pieces
/// ([`unit_pieces`]) are shifted by its own bit offset (`vpsrlvq` / `vpsllvq`) and joined by
/// bit selects (at 1 and 2 bits a code lies in one nibble: a shift alone). Bits above a code's
/// `B` are not cleared where the look-up ignores them (bits 6 and 7; below 6 bits the table
/// repeats with period `2^B`, [`IntPlanes`]). Lanes past the row's coordinates hold codes of no
/// coordinate, or zero.
///
/// # Safety
/// AVX-512 F and BW; `1 <= B <= 8`, `B != 4`; `block` is one block and position `B·u` lies in
/// it.
#[inline]
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn unit_codes<const B: usize>(block: &[u8], u: usize) -> [__m512i; 2] {
    // SAFETY: the caller's contract.
    let [x, y, z] = unsafe { unit_pieces::<B>(block, u) };
    if B == 8 {
        // Whole bytes: the low nibble from position 2j, the high one from 2j + 1.
        let nib = _mm512_set1_epi8(0x0F);
        return [
            _mm512_ternarylogic_epi32::<0xCA>(nib, x, _mm512_slli_epi64::<4>(y)),
            _mm512_ternarylogic_epi32::<0xCA>(nib, _mm512_srli_epi64::<4>(x), y),
        ];
    }
    // Per 64-bit word (lane c = word / 2): the offset B·c mod 4, the bits of the first nibble
    // (0x0F >> offset) and of the first two (0xFF >> offset) in every byte.
    let (off, m1, m12) = const {
        let (mut off, mut m1, mut m12) = ([0i64; 8], [0i64; 8], [0i64; 8]);
        let mut q = 0;
        while q < 8 {
            let o = (B * (q / 2)) % 4;
            off[q] = o as i64;
            m1[q] = ((0x0F >> o) as u64 * 0x0101_0101_0101_0101) as i64;
            m12[q] = ((0xFF >> o) as u64 * 0x0101_0101_0101_0101) as i64;
            q += 1;
        }
        (off, m1, m12)
    };
    // SAFETY (the three): 64-byte constants.
    let (off, m1, m12) = unsafe {
        (
            _mm512_loadu_si512(off.as_ptr() as *const _),
            _mm512_loadu_si512(m1.as_ptr() as *const _),
            _mm512_loadu_si512(m12.as_ptr() as *const _),
        )
    };
    let four = _mm512_set1_epi64(4);
    let (up4, down4) = (_mm512_sub_epi64(four, off), _mm512_add_epi64(four, off));
    if B <= 2 {
        // Every code lies in one nibble: shifted down by its offset, the bits above it ignored.
        return [_mm512_srlv_epi64(x, off), _mm512_srlv_epi64(x, down4)];
    }
    // A lane's code: bits 0..4 - o from the first position's nibble, shifted down by o; the
    // next 4 from the second's nibble; at 7 bits, what is left from the third's.
    let mut low =
        _mm512_ternarylogic_epi32::<0xCA>(m1, _mm512_srlv_epi64(x, off), _mm512_sllv_epi64(y, up4));
    let mut high = _mm512_ternarylogic_epi32::<0xCA>(
        m1,
        _mm512_srlv_epi64(x, down4),
        _mm512_srlv_epi64(y, off),
    );
    if B == 7 {
        let up8 = _mm512_add_epi64(up4, four);
        low = _mm512_ternarylogic_epi32::<0xCA>(m12, low, _mm512_sllv_epi64(z, up8));
        high = _mm512_ternarylogic_epi32::<0xCA>(m12, high, _mm512_sllv_epi64(z, up4));
    }
    [low, high]
}

/// The grid values of unit `u`'s four coordinates `4u..4u + 4` (`1 <= B <= 8`, `B != 4`), one
/// coordinate per 128-bit lane as [`decode_nibbles_512`] gives 4-bit units: the codes
/// ([`unit_codes`]), the grid's two byte planes looked up ([`look_up_ints`]) and interleaved
/// into words of rows 0-7, 8-15, 16-23 and 24-31. Lanes past `dim` are summed and never read.
///
/// # Safety
/// AVX-512 F, BW and VBMI, and GFNI; `1 <= B <= 8`, `B != 4`; `block` is one block and position
/// `B·u` lies in it; `planes` is the grid's, made for `B`-bit codes.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vbmi,gfni")]
unsafe fn decode_wide_512<const B: usize>(
    block: &[u8],
    u: usize,
    planes: &IntPlanes,
) -> [__m512i; 4] {
    // SAFETY: the caller's contract.
    let [low, high] = unsafe { unit_codes::<B>(block, u) };
    let (l0, h0) = look_up_ints::<B>(low, planes);
    let (l1, h1) = look_up_ints::<B>(high, planes);
    [
        _mm512_unpacklo_epi8(l0, h0),
        _mm512_unpackhi_epi8(l0, h0),
        _mm512_unpacklo_epi8(l1, h1),
        _mm512_unpackhi_epi8(l1, h1),
    ]
}

super::x86::int_sums_kernel!(
    #[target_feature(enable = "avx2,avx512f,avx512bw,avx512vbmi,avx512vnni,gfni")]
    accumulate_i16_wide_vnni, __m512i, per: 4, regs: 4, zero: _mm512_setzero_si512(),
    decode: |block: &[u8], unit: usize, _dim: usize| decode_wide_512::<B>(block, unit, planes),
    weights: nibble_weights_512, dot: dpwssd, reduce: reduce_lanes_512,
    fsplat: _mm512_set1_ps, cvt: _mm512_cvtepi32_ps, fadd: _mm512_add_ps, fmul: _mm512_mul_ps,
    fload: _mm512_loadu_ps, fstore: _mm512_storeu_ps, wtype: super::IntWeights, extra: (planes: &IntPlanes)
);

/// The body of `ByteCodebook::quantize_weights` on 512-bit lanes, the same bytes as its
/// lane-wise body: per chunk of [`super::INT_CHUNK`] rows the products `weights[i] ·
/// row_scales[i]` (kept in eight registers; masked loads past the end read zeros), their largest
/// bit pattern by one unsigned integer maximum, then each product times `1 / s` (`s` the
/// largest over 255), capped at 255 and converted with round-to-nearest-even (`vcvtps2udq`
/// with its rounding given, not the MXCSR's) and narrowed to bytes by one masked `vpmovdb`
/// store. Leaves each chunk's `(0, s)` in `chunks` (`(0, 0)` for a chunk of zero products);
/// `None` for a negative (or -0), NaN or infinite product or a subnormal step, as the lane-wise
/// body.
///
/// # Safety
/// AVX-512 F; `row_scales`, when given, and `out.weights` hold at least `weights.len()` values.
#[target_feature(enable = "avx512f")]
pub(super) unsafe fn quantize_bytes_512(
    weights: &[f32],
    row_scales: Option<&[f32]>,
    out: &mut super::ByteWeights,
) -> Option<()> {
    // SAFETY (both): the caller's contract.
    unsafe {
        match row_scales {
            Some(sc) => quantize_bytes_with::<true>(weights, sc, out),
            None => quantize_bytes_with::<false>(weights, &[], out),
        }
    }
}

/// [`quantize_bytes_512`] with the scales (`SCALED`) or without (`scales` unread), whole chunks
/// by unmasked loads.
///
/// # Safety
/// As [`quantize_bytes_512`]; with `SCALED`, `scales` holds at least `weights.len()` values.
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn quantize_bytes_with<const SCALED: bool>(
    weights: &[f32],
    scales: &[f32],
    out: &mut super::ByteWeights,
) -> Option<()> {
    const CHUNK: usize = super::INT_CHUNK;
    const REGS: usize = CHUNK / 16;
    const { assert!(CHUNK == 128) };
    let n = weights.len();
    let (wp, sp, op) = (weights.as_ptr(), scales.as_ptr(), out.weights.as_mut_ptr());
    let mut start = 0;
    while start < n {
        let len = (n - start).min(CHUNK);
        // Per register: all 16 lanes, or the chunk's last `len mod 16`, or none.
        let mask = |k: usize| -> __mmask16 {
            let left = len.saturating_sub(16 * k);
            if left >= 16 {
                0xFFFF
            } else {
                ((1u32 << left) - 1) as __mmask16
            }
        };
        // Registers holding rows of the chunk (the rest stay zero and are not stored, so no
        // pointer is offset past the buffers).
        let regs = len.div_ceil(16);
        let mut x = [_mm512_setzero_ps(); REGS];
        for (k, xk) in x.iter_mut().enumerate().take(regs) {
            let at = start + 16 * k;
            // SAFETY: `at < n`; a whole chunk reads `start..start + 128` inside the weights (and
            // the scales); a partial one masks what lies past `n`.
            *xk = unsafe {
                let (w, sc) = if len == CHUNK {
                    (
                        _mm512_loadu_ps(wp.add(at)),
                        SCALED.then(|| _mm512_loadu_ps(sp.add(at))),
                    )
                } else {
                    let m = mask(k);
                    (
                        _mm512_maskz_loadu_ps(m, wp.add(at)),
                        SCALED.then(|| _mm512_maskz_loadu_ps(m, sp.add(at))),
                    )
                };
                sc.map_or(w, |sc| _mm512_mul_ps(w, sc))
            };
        }
        let top = x.iter().fold(_mm512_setzero_si512(), |t, &v| {
            _mm512_max_epu32(t, _mm512_castps_si512(v))
        });
        let top = _mm512_reduce_max_epu32(top);
        if top > f32::MAX.to_bits() {
            return None;
        }
        let top = f32::from_bits(top);
        if top == 0.0 {
            out.chunks.push((0.0, 0.0));
            start += len;
            continue;
        }
        let step = top / 255.0;
        if !step.is_normal() {
            return None;
        }
        let (inv, cap) = (_mm512_set1_ps(1.0 / step), _mm512_set1_ps(255.0));
        for (k, &xk) in x.iter().enumerate().take(regs) {
            let q = _mm512_min_ps(_mm512_mul_ps(xk, inv), cap);
            let b =
                _mm512_cvt_roundps_epu32::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(q);
            // SAFETY: the store covers the chunk's rows (masked past `n`), inside
            // `out.weights` (the caller's contract).
            unsafe {
                let at = op.add(start + 16 * k) as *mut i8;
                if len == CHUNK {
                    _mm_storeu_si128(at as *mut __m128i, _mm512_cvtepi32_epi8(b));
                } else {
                    _mm512_mask_cvtepi32_storeu_epi8(at, mask(k), b);
                }
            }
        }
        out.chunks.push((0.0, step));
        start += len;
    }
    Some(())
}

/// `nibble_weights_i8_groups` (and, for one group, `nibble_weights_i8`) on 512-bit lanes for
/// a query of whole registers, the same bytes and steps as the lane-wise body: per group the
/// products `q_c · s_c`, their largest magnitude (`vmaxps` of the products with the sign
/// cleared: a maximum does not depend on the order), the step `max / 127` (1 when zero), then
/// each `q_c · s_c · (1 / step)` clamped to `±127`, converted with round-to-nearest-even given
/// in the instruction (`vcvtps2dq`) and narrowed to bytes in a register (`vpmovdb`); a group's
/// entries of `out` past `q.len()` are zeroed. Three passes over the groups (each group's
/// largest product into `steps`, then each step, then each group's weights), so no group
/// waits on another's maximum and divisions.
///
/// # Safety
/// AVX-512 F; `q.len()` is a multiple of 16, `scales.len() == steps.len() · q.len()`,
/// `out.len() == steps.len() · p` with `p >= q.len()`, `steps` not empty.
#[target_feature(enable = "avx512f")]
pub(super) unsafe fn query_nibble_weights_groups_512(
    q: &[f32],
    scales: &[f32],
    out: &mut [i8],
    steps: &mut [f32],
) {
    let (n, groups) = (q.len(), steps.len());
    let p = out.len() / groups;
    let (qp, sp, op) = (q.as_ptr(), scales.as_ptr(), out.as_mut_ptr());
    let abs = _mm512_set1_epi32(0x7FFF_FFFF);
    for (g, top_g) in steps.iter_mut().enumerate() {
        let mut top = _mm512_setzero_ps();
        for at in (0..n).step_by(16) {
            // SAFETY: `g · n + at + 16 <= scales.len()` and `at + 16 <= n` (whole registers).
            let w = unsafe {
                _mm512_mul_ps(
                    _mm512_loadu_ps(qp.add(at)),
                    _mm512_loadu_ps(sp.add(g * n + at)),
                )
            };
            let w = _mm512_castsi512_ps(_mm512_and_si512(_mm512_castps_si512(w), abs));
            // A NaN product (none from finite inputs) is passed over, as the lane-wise
            // compares do.
            top = _mm512_max_ps(w, top);
        }
        *top_g = _mm512_reduce_max_ps(top);
    }
    for s in steps.iter_mut() {
        *s = if *s > 0.0 { *s / 127.0 } else { 1.0 };
    }
    let (lo, hi) = (_mm512_set1_ps(-127.0), _mm512_set1_ps(127.0));
    for (g, &step) in steps.iter().enumerate() {
        let inv = _mm512_set1_ps(1.0 / step);
        for at in (0..n).step_by(16) {
            // SAFETY: as above for `q` and `scales`; `g · p + at + 16 <= g · p + n <=
            // out.len()`.
            unsafe {
                let w = _mm512_mul_ps(
                    _mm512_loadu_ps(qp.add(at)),
                    _mm512_loadu_ps(sp.add(g * n + at)),
                );
                // NaN (an infinite product times a zero `1 / step`) passes the clamp and
                // converts to `i32::MIN`, whose low byte is 0: the lane-wise body's byte.
                let x = _mm512_min_ps(hi, _mm512_max_ps(lo, _mm512_mul_ps(w, inv)));
                let b = _mm512_cvt_roundps_epi32::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
                    x,
                );
                _mm_storeu_si128(op.add(g * p + at) as *mut __m128i, _mm512_cvtepi32_epi8(b));
            }
        }
        // SAFETY: `g · p + n..(g + 1) · p` lies in `out`.
        unsafe { std::ptr::write_bytes(op.add(g * p + n), 0, p - n) };
    }
}
