//! The AVX2 bodies of the scan kernels. Every function here is `unsafe`: its `# Safety` names the
//! lengths the caller (the checked public kernels) must have proven.

use super::BLOCK;
use std::arch::x86_64::*;

/// Asks for the cache lines of `bytes` ahead of their use (`prefetcht0`, one per 64-byte line it
/// touches; a hint: no fault, no effect on results). The hardware's stream prefetchers stop at
/// 4 KiB pages, and the integer sums read a chunk's blocks a quarter at a time, so a cache that
/// has left the CPU's caches (a decoder's other layers ran in between) would otherwise wait on
/// memory at every chunk.
#[inline(always)]
pub(super) fn prefetch(bytes: &[u8]) {
    // Every 64-byte line `bytes` touches, from the line holding its first byte (which may start
    // before it: only the address is formed, with wrapping arithmetic, never dereferenced).
    let first = bytes.as_ptr();
    let skew = first as usize % 64;
    let base = first.wrapping_sub(skew);
    for at in (0..skew + bytes.len()).step_by(64) {
        // SAFETY: `prefetcht0` (SSE, in the x86-64 baseline) is a hint: it never faults and
        // reads nothing architecturally, whatever the address.
        unsafe { _mm_prefetch::<_MM_HINT_T0>(base.wrapping_add(at) as *const i8) };
    }
}

/// AVX2 body of `scan_block_b3`: groups of three nibble positions (four coordinates) per step,
/// the remaining coordinates through the scalar decoder.
///
/// # Safety
/// The CPU supports AVX2; `block.len()` is a multiple of 32 (nibble positions of 16 bytes)
/// and `tables.len() == 16 * coords3(block.len() / 32)`, so every 16-byte load of a nibble
/// position `< 2 · row_bytes` and of a table `< coords` stays in its slice.
#[target_feature(enable = "avx2")]
pub(super) unsafe fn scan_block_b3_avx2(block: &[u8], tables: &[u8], out: &mut [u32; BLOCK]) {
    out.fill(0);
    let coords = tables.len() / 16;
    let groups = coords / 4;
    let m1 = _mm256_set1_epi8(1);
    let m3 = _mm256_set1_epi8(3);
    let m7 = _mm256_set1_epi8(7);
    let zero = _mm256_setzero_si256();
    let mut g = 0;
    while g < groups {
        let chunk = (groups - g).min(64);
        let (mut words, mut odd) = (zero, zero);
        for gg in g..g + chunk {
            // Nibbles of 32 rows: lane 0 rows 0..15, lane 1 rows 16..31.
            let mut e = [zero; 3];
            for (k, ek) in e.iter_mut().enumerate() {
                // SAFETY: nibble position 3gg+k < 2·row_bytes, so 16 bytes are in the block.
                *ek = unsafe { nibble_rows(block, 3 * gg + k) };
            }
            let c0 = _mm256_and_si256(e[0], m7);
            let c1 = _mm256_or_si256(
                _mm256_and_si256(_mm256_srli_epi16(e[0], 3), m1),
                _mm256_slli_epi16(_mm256_and_si256(e[1], m3), 1),
            );
            let c2 = _mm256_or_si256(
                _mm256_and_si256(_mm256_srli_epi16(e[1], 2), m3),
                _mm256_slli_epi16(_mm256_and_si256(e[2], m1), 2),
            );
            let c3 = _mm256_and_si256(_mm256_srli_epi16(e[2], 1), m7);
            for (k, c) in [c0, c1, c2, c3].into_iter().enumerate() {
                // SAFETY: table 4gg+k < coords, 16 bytes each.
                let t = unsafe {
                    _mm256_broadcastsi128_si256(_mm_loadu_si128(
                        tables.as_ptr().add((4 * gg + k) * 16) as *const __m128i,
                    ))
                };
                let r = _mm256_shuffle_epi8(t, c);
                words = _mm256_add_epi16(words, r);
                odd = _mm256_add_epi16(odd, _mm256_srli_epi16(r, 8));
            }
        }
        g += chunk;
        flush_split_lanes(words, odd, out);
    }
    for j in 4 * groups..coords {
        for (slot, o) in out.iter_mut().enumerate() {
            *o += tables[16 * j + super::code3(block, j, slot)] as u32;
        }
    }
}

/// The nibbles of the 32 rows at nibble position `pos`, one per byte: lane 0 holds rows 0..15
/// (the low halves of the position's 16 bytes), lane 1 rows 16..31 (the high halves).
///
/// # Safety
/// The CPU supports AVX2 and `16 · (pos + 1) <= block.len()`.
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn nibble_rows(block: &[u8], pos: usize) -> __m256i {
    let low = _mm_set1_epi8(0x0F);
    // SAFETY: the caller guarantees 16 bytes at `16 · pos`.
    let b = unsafe { _mm_loadu_si128(block.as_ptr().add(pos * 16) as *const __m128i) };
    let l = _mm_and_si128(b, low);
    let h = _mm_and_si128(_mm_srli_epi16(b, 4), low);
    _mm256_inserti128_si256(_mm256_castsi128_si256(l), h, 1)
}

/// Adds the row sums of a per-coordinate scan to `out`: look-ups over 32 rows (lane 0 rows
/// 0..15, lane 1 rows 16..31, byte `i` of a lane row `i` of its half) accumulated as `u16` words,
/// `words` their wrapping sums (even byte + 256 · odd byte) and `odd` the exact sums of the odd
/// bytes, so the even-byte sums are `words - (odd << 8)` modulo 2^16 (exact while below 2^16).
#[inline]
#[target_feature(enable = "avx2")]
fn flush_split_lanes(words: __m256i, odd: __m256i, out: &mut [u32; BLOCK]) {
    let even = _mm256_sub_epi16(words, _mm256_slli_epi16(odd, 8));
    let lane = |v: __m256i, half: usize| {
        _mm256_cvtepu16_epi32(if half == 0 {
            _mm256_castsi256_si128(v)
        } else {
            _mm256_extracti128_si256::<1>(v)
        })
    };
    for half in 0..2 {
        let rows = interleave_rows(lane(even, half), lane(odd, half));
        add_rows(rows, &mut out[16 * half..16 * half + 16]);
    }
}

/// AVX2 body of `scan_block_b5` and `scan_block_b5_multi` (`Q` queries, each code rebuilt once
/// and looked up in every query's table): groups of ten nibble positions (eight coordinates) per
/// step, the remaining coordinates through the scalar decoder. A code `c < 32` is looked up as
/// `T_lo[x] | T_hi[x ^ 0x80]` with `x = c + 0x70`: for `c < 16`, `x < 0x80` indexes the low half
/// and `x ^ 0x80` has its top bit set, so `vpshufb` gives 0 from the high half; for `c >= 16` the
/// roles swap and both index with `c & 15`.
///
/// # Safety
/// The CPU supports AVX2; `block.len()` is a multiple of 32 (nibble positions of 16 bytes)
/// and every table slice has length `32 * coords5(block.len() / 32)`, so every 16-byte load of a
/// nibble position `< 2 · row_bytes` and of a half table `< 2 · coords` stays in its slice.
#[target_feature(enable = "avx2")]
pub(super) unsafe fn scan_block_b5_avx2<const Q: usize>(
    block: &[u8],
    tables: [&[u8]; Q],
    outs: &mut [[u32; BLOCK]; Q],
) {
    for o in outs.iter_mut() {
        o.fill(0);
    }
    // Every table slice has the same length (checked by the caller).
    let coords = tables[0].len() / 32;
    let groups = coords / 8;
    let m31 = _mm256_set1_epi8(31);
    let bias = _mm256_set1_epi8(0x70);
    let flip = _mm256_set1_epi8(0x80u8 as i8);
    let zero = _mm256_setzero_si256();
    let mut g = 0;
    while g < groups {
        // 32 groups of 8 look-ups of at most 255 per u16 lane: 65 280 < 65 536.
        let chunk = (groups - g).min(32);
        let mut acc = [[zero; 2]; Q];
        for gg in g..g + chunk {
            // Nibbles of 32 rows: lane 0 rows 0..15, lane 1 rows 16..31.
            let mut e = [zero; 10];
            for (k, ek) in e.iter_mut().enumerate() {
                // SAFETY: nibble position 10gg+k < 2·row_bytes, so 16 bytes are in the block.
                *ek = unsafe { nibble_rows(block, 10 * gg + k) };
            }
            for k in 0..8 {
                let (pos, off) = (5 * k / 4, 5 * k % 4);
                // Bytes hold nibbles (< 16): the 16-bit shifts move no set bit across a byte
                // boundary that the mask keeps. The code is rebuilt once for every query.
                let c = _mm256_and_si256(
                    _mm256_or_si256(
                        _mm256_srl_epi16(e[pos], _mm_cvtsi32_si128(off as i32)),
                        _mm256_sll_epi16(e[pos + 1], _mm_cvtsi32_si128(4 - off as i32)),
                    ),
                    m31,
                );
                let x = _mm256_add_epi8(c, bias);
                let xf = _mm256_xor_si256(x, flip);
                for (a, t) in acc.iter_mut().zip(tables) {
                    // SAFETY: table 8gg+k < coords, 32 bytes each, in every table slice.
                    let (tl, th) = unsafe {
                        let p = t.as_ptr().add((8 * gg + k) * 32);
                        (
                            _mm256_broadcastsi128_si256(_mm_loadu_si128(p as *const __m128i)),
                            _mm256_broadcastsi128_si256(_mm_loadu_si128(
                                p.add(16) as *const __m128i
                            )),
                        )
                    };
                    let r =
                        _mm256_or_si256(_mm256_shuffle_epi8(tl, x), _mm256_shuffle_epi8(th, xf));
                    a[0] = _mm256_add_epi16(a[0], r);
                    a[1] = _mm256_add_epi16(a[1], _mm256_srli_epi16(r, 8));
                }
            }
        }
        g += chunk;
        for (a, o) in acc.iter().zip(outs.iter_mut()) {
            flush_split_lanes(a[0], a[1], o);
        }
    }
    for j in 8 * groups..coords {
        for slot in 0..BLOCK {
            let code = super::code5(block, j, slot);
            for (t, o) in tables.iter().zip(outs.iter_mut()) {
                o[slot] += t[32 * j + code] as u32;
            }
        }
    }
}

/// AVX2 body of `accumulate_blocks_multi`: per block and coordinate, the 32 codes are cut out
/// of one to three nibble vectors (rows 0..16 in the low 128-bit lane, rows 16..32 in the high),
/// decoded once (up to 3 bits by `vpermps` from an 8-entry table, the codes shifted into place
/// per lane ([`decode_permute`]); 4-5 bits as four `vpshufb` byte planes of the value table
/// interleaved back into f32, no lane-crossing permutes; 6-8 bits by gathers; with `vbmi`, 5-8
/// bits two coordinates at a time by AVX-512 VBMI byte permutes ([`super::avx512::decode_pair`]);
/// all in the same register order, so every path gives the same floats), and FMA'd into 8-lane
/// partial sums of every weight vector (the weights permuted once per block into the order the
/// decode yields); the partial sums are reduced once at the end. Up to four weight vectors run
/// in a kernel of exactly that many (the per-query FMAs unrolled); more run in groups of four,
/// every group served by each decode.
///
/// # Safety
/// The CPU supports AVX2 and FMA, and AVX-512 F, BW and VBMI when `vbmi`; `1 <= bits <= 8`;
/// `row_bytes >= 1` and `blocks` is whole blocks of `32 · row_bytes` bytes; every weight vector
/// covers exactly those blocks; every accumulator has the same length `dim <= 8 · row_bytes /
/// bits`, so each coordinate's nibble positions lie inside its block; `values` has at least
/// `2^bits` entries; `scales`, when given, is at least as long as every weight vector.
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn accumulate_blocks_x86(
    blocks: &[u8],
    row_bytes: usize,
    bits: u32,
    values: &[f32],
    scales: Option<&[f32]>,
    weights: &[&[f32]],
    accs: &mut [&mut [f32]],
    vbmi: bool,
) {
    // Up to four weight vectors: one kernel of exactly that many. More: groups of four (the
    // last one partly empty), all of them served by each decode.
    let (b, v, s, w, x) = (bits, values, scales, weights, vbmi);
    // SAFETY: the caller's contract, passed on unchanged (`ONE` only for at most `Q` vectors).
    unsafe {
        match w.len() {
            0 => {}
            1 => accumulate_bits::<1, true>(blocks, row_bytes, b, v, s, w, accs, x),
            2 => accumulate_bits::<2, true>(blocks, row_bytes, b, v, s, w, accs, x),
            3 => accumulate_bits::<3, true>(blocks, row_bytes, b, v, s, w, accs, x),
            4 => accumulate_bits::<4, true>(blocks, row_bytes, b, v, s, w, accs, x),
            _ => accumulate_bits::<4, false>(blocks, row_bytes, b, v, s, w, accs, x),
        }
    }
}

/// [`accumulate_blocks_x86`] dispatched on the width, the weight vectors taken `Q` at a time;
/// `ONE`: they are one group; `vbmi`: 5-8-bit codes are decoded by [`accumulate_vbmi`].
///
/// # Safety
/// As [`accumulate_blocks_x86`], with `weights` not empty and `weights.len() <= Q` when `ONE`.
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
unsafe fn accumulate_bits<const Q: usize, const ONE: bool>(
    blocks: &[u8],
    row_bytes: usize,
    bits: u32,
    v: &[f32],
    s: Option<&[f32]>,
    w: &[&[f32]],
    accs: &mut [&mut [f32]],
    vbmi: bool,
) {
    // SAFETY: the caller's contract, passed on unchanged; `vbmi` only where the CPU has it.
    unsafe {
        match (bits, vbmi) {
            (1, _) => accumulate_avx2::<1, Q, ONE>(blocks, row_bytes, v, s, w, accs),
            (2, _) => accumulate_avx2::<2, Q, ONE>(blocks, row_bytes, v, s, w, accs),
            (3, _) => accumulate_avx2::<3, Q, ONE>(blocks, row_bytes, v, s, w, accs),
            (4, _) => accumulate_avx2::<4, Q, ONE>(blocks, row_bytes, v, s, w, accs),
            (5, false) => accumulate_avx2::<5, Q, ONE>(blocks, row_bytes, v, s, w, accs),
            (6, false) => accumulate_avx2::<6, Q, ONE>(blocks, row_bytes, v, s, w, accs),
            (7, false) => accumulate_avx2::<7, Q, ONE>(blocks, row_bytes, v, s, w, accs),
            (_, false) => accumulate_avx2::<8, Q, ONE>(blocks, row_bytes, v, s, w, accs),
            (5, true) => accumulate_vbmi::<5, Q, ONE>(blocks, row_bytes, v, s, w, accs),
            (6, true) => accumulate_vbmi::<6, Q, ONE>(blocks, row_bytes, v, s, w, accs),
            (7, true) => accumulate_vbmi::<7, Q, ONE>(blocks, row_bytes, v, s, w, accs),
            (_, true) => accumulate_vbmi::<8, Q, ONE>(blocks, row_bytes, v, s, w, accs),
        }
    }
}

/// Stamps out the value accumulation kernel for one instruction-set level (`$vbmi`: 5-8-bit
/// codes are decoded two coordinates at a time by AVX-512 VBMI byte permutes,
/// [`super::avx512::decode_pair`]), so each copy is compiled with its features and inlines its
/// decoders.
macro_rules! accumulate_kernel {
    ($(#[$attr:meta])* $name:ident, $vbmi:literal) => {
        /// [`accumulate_blocks_x86`] for `B`-bit codes, the weight vectors in `ceil(n / Q)`
        /// groups of `Q` (the last group's missing members inactive): per block and coordinate
        /// one decode, then each group's FMAs unrolled.
        ///
        /// # Safety
        /// As [`accumulate_blocks_x86`] with `bits == B`, `weights` not empty and, when `ONE`, at
        /// most `Q` weight vectors; for the VBMI copy, `B >= 5` and the CPU supports AVX-512 F,
        /// BW and VBMI.
        $(#[$attr])*
        // The AVX2 copy needs `unsafe` to call the VBMI decoders it never reaches; the VBMI copy
        // calls them safely.
        #[allow(unused_unsafe)]
        unsafe fn $name<const B: usize, const Q: usize, const ONE: bool>(
            blocks: &[u8],
            row_bytes: usize,
            values: &[f32],
            scales: Option<&[f32]>,
            weights: &[&[f32]],
            accs: &mut [&mut [f32]],
        ) {
            // The VBMI copy decodes 5-8-bit codes only (`accumulate_bits` calls it for those).
            const { assert!(!$vbmi || B >= 5) };
            let dim = accs.first().map_or(0, |a| a.len());
            let n = weights.len();
            let groups = if ONE { 1 } else { n.div_ceil(Q) };
            // planes[p][k]: byte p (little-endian) of values[k]; entries past 2^B are never
            // indexed.
            let mut planes = [[0u8; 32]; 4];
            for (k, v) in values[..if B <= 5 { 1 << B } else { 0 }].iter().enumerate() {
                for (plane, byte) in planes.iter_mut().zip(v.to_le_bytes()) {
                    plane[k] = byte;
                }
            }
            // SAFETY: each plane has 32 bytes: two 16-byte halves.
            let half = |p: usize, h: usize| unsafe {
                let p = planes[p].as_ptr().add(16 * h);
                _mm256_broadcastsi128_si256(_mm_loadu_si128(p as *const _))
            };
            let lo = [half(0, 0), half(1, 0), half(2, 0), half(3, 0)];
            let hi = [half(0, 1), half(1, 1), half(2, 1), half(3, 1)];
            // Up to 3 bits: an 8-entry `vpermps` table whose entry k is `values[k mod 2^B]` (an
            // index's bits past B belong to a neighbouring code).
            let perm = if B <= 3 {
                // SAFETY: `values` has at least 2^B entries (the caller's contract).
                let t: [f32; 8] =
                    std::array::from_fn(|k| unsafe { *values.get_unchecked(k % (1 << B)) });
                // SAFETY: `t` has 8 floats.
                unsafe { _mm256_loadu_ps(t.as_ptr()) }
            } else {
                _mm256_setzero_ps()
            };
            // SAFETY: `$vbmi` only where the CPU has AVX-512 F (the caller's contract).
            let wide = $vbmi.then(|| unsafe { super::avx512::WidePlanes::new(&values[..1 << B]) });
            // lanes[j · groups + g][i]: 8-lane partial sums of query Q·g + i, coordinate j (a
            // coordinate's queries adjacent).
            let mut lanes = vec![[_mm256_setzero_ps(); Q]; dim * groups];
            // One group (the common case: a kv head's few grouped queries) keeps its weights in a
            // stack array the compiler sees whole; more groups take vectors.
            let (mut w_one, mut active_one) = ([[[_mm256_setzero_ps(); 4]; Q]; 1], [[false; Q]; 1]);
            let (mut w_many, mut active_many);
            let (w, active): (&mut [[[__m256; 4]; Q]], &mut [[bool; Q]]) = if ONE {
                (&mut w_one, &mut active_one)
            } else {
                w_many = vec![[[_mm256_setzero_ps(); 4]; Q]; groups];
                active_many = vec![[false; Q]; groups];
                (&mut w_many, &mut active_many)
            };
            let bb = super::block_bytes(row_bytes);
            for (bi, block) in blocks.chunks_exact(bb).enumerate() {
                for (k, src) in weights.iter().enumerate() {
                    let part = &src[bi * BLOCK..((bi + 1) * BLOCK).min(src.len())];
                    let w32 = super::kernels::block_weights(part, scales.map(|s| &s[bi * BLOCK..]));
                    // Register g of the decode holds rows 4g..4g+4 (low lane) and 16+4g..20+4g
                    // (high).
                    // SAFETY: 4g + 4 <= 16 and 16 + 4g + 4 <= 32 floats of `w32`.
                    let wk: [__m256; 4] = std::array::from_fn(|g| unsafe {
                        _mm256_loadu2_m128(w32.as_ptr().add(16 + 4 * g), w32.as_ptr().add(4 * g))
                    });
                    let nonzero = wk.iter().fold(0, |m, &x| {
                        m | _mm256_movemask_ps(_mm256_cmp_ps::<_CMP_NEQ_UQ>(x, _mm256_setzero_ps()))
                    });
                    w[k / Q][k % Q] = wk;
                    active[k / Q][k % Q] = nonzero != 0;
                }
                if !active.iter().flatten().any(|&a| a) {
                    continue;
                }
                // Adds one coordinate's decoded rows, times every active weight vector, to its
                // lanes.
                let fma = |lane: &mut [[__m256; Q]], x: [__m256; 4]| {
                    for ((lane, w), active) in lane.iter_mut().zip(&*w).zip(&*active) {
                        for q in 0..Q {
                            if active[q] {
                                let mut s = lane[q];
                                for (xg, wg) in x.iter().zip(&w[q]) {
                                    s = _mm256_fmadd_ps(*xg, *wg, s);
                                }
                                lane[q] = s;
                            }
                        }
                    }
                };
                if let Some(planes) = &wide {
                    // Two coordinates per decode, four per step (so every shift is a constant).
                    let pair = |lanes: &mut [[__m256; Q]], codes: __m512i| {
                        // SAFETY: `$vbmi` only with the CPU features (the caller's contract).
                        let h = unsafe {
                            super::avx512::decode_pair::<B>(codes, planes)
                                .map(|r| super::avx512::halves(r))
                        };
                        let mut lane = lanes.chunks_exact_mut(groups);
                        if let Some(l) = lane.next() {
                            fma(l, h.map(|(lo, _)| lo));
                        }
                        if let Some(l) = lane.next() {
                            fma(l, h.map(|(_, hi)| hi));
                        }
                    };
                    for (quad, lanes) in lanes.chunks_mut(4 * groups).enumerate() {
                        let (j, coords) = (4 * quad, lanes.len() / groups);
                        let (first, second) = lanes.split_at_mut((2 * groups).min(lanes.len()));
                        // SAFETY (both): coordinates j..j + coords are below dim, so their nibble
                        // positions lie in the block; `$vbmi` only with the CPU features.
                        let codes =
                            unsafe { super::avx512::pair_codes::<B, 0>(block, j, coords >= 2) };
                        pair(first, codes);
                        if coords > 2 {
                            let codes = unsafe {
                                super::avx512::pair_codes::<B, 2>(block, j + 2, coords == 4)
                            };
                            pair(second, codes);
                        }
                    }
                    continue;
                }
                // Four coordinates per step, so each one's bit offset is a constant.
                for (quad, lanes) in lanes.chunks_mut(4 * groups).enumerate() {
                    let j = 4 * quad;
                    let mut lane = lanes.chunks_exact_mut(groups);
                    // SAFETY (each): coordinate j + K < dim has its nibble positions in the block
                    // and every code indexes `values` (the caller's contract).
                    let (v, p) = (values, perm);
                    if let Some(l) = lane.next() {
                        fma(l, unsafe { decode_coordinate::<B, 0>(block, j, p, &lo, &hi, v) });
                    }
                    if let Some(l) = lane.next() {
                        fma(l, unsafe { decode_coordinate::<B, 1>(block, j + 1, p, &lo, &hi, v) });
                    }
                    if let Some(l) = lane.next() {
                        fma(l, unsafe { decode_coordinate::<B, 2>(block, j + 2, p, &lo, &hi, v) });
                    }
                    if let Some(l) = lane.next() {
                        fma(l, unsafe { decode_coordinate::<B, 3>(block, j + 3, p, &lo, &hi, v) });
                    }
                }
            }
            for (k, acc) in accs.iter_mut().take(n).enumerate() {
                for (a, l) in acc.iter_mut().zip(lanes.iter().skip(k / Q).step_by(groups)) {
                    let s = l[k % Q];
                    let x = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
                    let x = _mm_add_ps(x, _mm_movehl_ps(x, x));
                    let x = _mm_add_ss(x, _mm_shuffle_ps(x, x, 1));
                    *a += _mm_cvtss_f32(x);
                }
            }
        }
    };
}

accumulate_kernel!(
    #[target_feature(enable = "avx2,fma")]
    accumulate_avx2,
    false
);
accumulate_kernel!(
    #[target_feature(enable = "avx2,fma,avx512f,avx512bw,avx512vbmi")]
    accumulate_vbmi,
    true
);

/// The f32 values of coordinate `j`'s 32 `B`-bit codes on the AVX2 paths (`K = j mod 4`, so the
/// bit offsets are constants), in [`decode_planes`]'s register order: up to 3 bits by
/// [`decode_permute`]; at 4-8 bits the codes are cut out by [`wide_codes_k`] and looked up as byte
/// planes (4-5 bits, [`decode_planes`]) or gathered (6-8 bits, [`gather_values`]).
///
/// # Safety
/// The CPU supports AVX2; `K == j mod 4`; the nibble positions of coordinate `j` lie in the block;
/// `values` has `2^B` entries, `perm` is [`decode_permute`]'s table (up to 3 bits) and `lo` / `hi`
/// the byte planes of `values` (4-5 bits).
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn decode_coordinate<const B: usize, const K: usize>(
    block: &[u8],
    j: usize,
    perm: __m256,
    lo: &[__m256i; 4],
    hi: &[__m256i; 4],
    values: &[f32],
) -> [__m256; 4] {
    // SAFETY: the caller's contract.
    unsafe {
        if B <= 3 {
            decode_permute::<B, K>(block, j, perm)
        } else if B <= 5 {
            decode_planes::<B>(wide_codes_k::<B, K>(block, j), lo, hi)
        } else {
            gather_values(wide_codes_k::<B, K>(block, j), values)
        }
    }
}

/// The f32 values of coordinate `j`'s 32 `B`-bit codes (`B <= 3`, `K = j mod 4`, so the code's
/// bit offset in its nibble, `B·j mod 4`, is a constant), in [`decode_planes`]'s register order:
/// register `g` broadcasts the word at byte `4g` of the coordinate's nibble position, shifts
/// each lane's row to the bottom (rows `4g..4g+4` are the low nibbles of bytes `4g..4g+4`, rows
/// `16+4g..20+4g` their high nibbles) and looks the lane's low three bits up in `perm` (entry
/// `k` is `values[k mod 2^B]`, so bits above the code do not matter); a 3-bit code that runs
/// into the next nibble position takes its upper bits from there. Per 8 codes one broadcast
/// load, one shift and one permute (five more operations for a crossing code), where the
/// byte-plane decode spends three shuffles; at 4 bits the two permutes and a blend it would need
/// lose to the planes.
///
/// # Safety
/// The CPU supports AVX2; `K == j mod 4`; the nibble positions of coordinate `j` (`B·j/4`, and
/// the next one when the code crosses into it) lie in the block (16 bytes each).
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn decode_permute<const B: usize, const K: usize>(
    block: &[u8],
    j: usize,
    perm: __m256,
) -> [__m256; 4] {
    // (Instantiated for every width by `accumulate_avx2`, called only up to 3 bits.)
    const { assert!(K < 4) };
    debug_assert!(B <= 3);
    // Constant shifts below 32: plain `vpsrlvd`s, with no out-of-range guard.
    let off = (B * K % 4) as i32;
    let rows = _mm256_setr_epi32(0, 8, 16, 24, 4, 12, 20, 28);
    let shifts = _mm256_add_epi32(rows, _mm256_set1_epi32(off));
    let pos = B * j / 4;
    // SAFETY (each use): the word at byte `4g < 16` of a nibble position of coordinate `j`.
    let word = |p: usize, g: usize| unsafe {
        _mm256_set1_epi32(std::ptr::read_unaligned(
            block.as_ptr().add(16 * p + 4 * g) as *const i32
        ))
    };
    std::array::from_fn(|g| {
        let mut idx = _mm256_srlv_epi32(word(pos, g), shifts);
        if B as i32 + off > 4 {
            // The code's low `4 - off` bits come from this nibble, the rest from the next.
            let keep = _mm256_set1_epi32((1 << (4 - off)) - 1);
            let next = _mm256_srlv_epi32(word(pos + 1, g), rows);
            idx = _mm256_or_si256(
                _mm256_and_si256(idx, keep),
                _mm256_sll_epi32(next, _mm_cvtsi32_si128(4 - off)),
            );
        }
        _mm256_permutevar8x32_ps(perm, idx)
    })
}

/// The 32 `B`-bit codes (`1 <= B <= 8`) of coordinate `j` of `block`, one per byte: rows 0..16
/// in the low lane, rows 16..32 in the high lane ([`wide_codes_k`] for `j`'s residue mod 4).
///
/// # Safety
/// As [`wide_codes_k`].
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn wide_codes<const B: usize>(block: &[u8], j: usize) -> __m256i {
    // SAFETY: the caller's contract; the residue matches `j`.
    unsafe {
        match j % 4 {
            0 => wide_codes_k::<B, 0>(block, j),
            1 => wide_codes_k::<B, 1>(block, j),
            2 => wide_codes_k::<B, 2>(block, j),
            _ => wide_codes_k::<B, 3>(block, j),
        }
    }
}

/// The 32 `B`-bit codes (`1 <= B <= 8`) of coordinate `j` (`j mod 4 == K`) of `block`, one per
/// byte: rows 0..16 in the low lane, rows 16..32 in the high lane. The code's bits are gathered
/// from one to three nibble positions, each piece masked before it is shifted so no bit crosses
/// into a neighbouring byte; `K` makes the bit offset (`B·K mod 4`) and so every shift a
/// constant. Below 4 bits the bits of the first nibble above the code are kept (each byte stays
/// below 16).
///
/// # Safety
/// The CPU supports AVX2; `j % 4 == K`; nibble positions `B·j/4 ..= (B·j + B - 1)/4` lie in the
/// block (16 bytes each).
#[inline]
#[target_feature(enable = "avx2")]
pub(super) unsafe fn wide_codes_k<const B: usize, const K: usize>(
    block: &[u8],
    j: usize,
) -> __m256i {
    debug_assert_eq!(j % 4, K);
    let lane_shift = _mm256_setr_epi32(0, 0, 0, 0, 4, 4, 4, 4);
    let nib = |pos: usize| {
        // SAFETY: `pos` is one of the caller's nibble positions.
        let v = unsafe { _mm_loadu_si128(block.as_ptr().add(16 * pos) as *const __m128i) };
        _mm256_and_si256(
            _mm256_srlv_epi32(_mm256_broadcastsi128_si256(v), lane_shift),
            _mm256_set1_epi8(0x0F),
        )
    };
    let (mut pos, off) = (B * j / 4, B * K % 4);
    let mut code = _mm256_and_si256(
        _mm256_srl_epi16(nib(pos), _mm_cvtsi32_si128(off as i32)),
        _mm256_set1_epi8((0x0F >> off) as i8),
    );
    let mut got = 4 - off;
    while got < B {
        pos += 1;
        let need = (B - got).min(4);
        let piece = _mm256_and_si256(nib(pos), _mm256_set1_epi8(((1 << need) - 1) as i8));
        code = _mm256_or_si256(code, _mm256_sll_epi16(piece, _mm_cvtsi32_si128(got as i32)));
        got += need;
    }
    code
}

/// The f32 `values` of 32 codes (one per byte, rows 0..16 in the low lane, 16..32 in the high) by
/// four 8-lane gathers, in the register order of [`decode_planes`]: register `g` holds rows
/// `4g..4g+4` in its low lane and `16+4g..20+4g` in its high lane.
///
/// # Safety
/// The CPU supports AVX2; every code indexes `values`.
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn gather_values(code: __m256i, values: &[f32]) -> [__m256; 4] {
    // SAFETY: every index is a code, inside `values` (the caller's contract).
    gather_indices(code).map(|i| unsafe { _mm256_i32gather_ps::<4>(values.as_ptr(), i) })
}

/// [`gather_values`] from a table of `i32`, through the float gather (the bits are moved, not
/// converted): on Zen 4 `vpgatherdd` took 1.5x as long as `vgatherdps` at 6 bits (11.1 against
/// 16.7 M keys/s, `wide_dots` with `TQ_NO_AVX512=1`).
///
/// # Safety
/// The CPU supports AVX2; every code indexes `values`.
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn gather_ints(code: __m256i, values: &[i32]) -> [__m256i; 4] {
    // SAFETY: every index is a code, inside `values` (the caller's contract).
    gather_indices(code).map(|i| unsafe {
        _mm256_castps_si256(_mm256_i32gather_ps::<4>(values.as_ptr() as *const f32, i))
    })
}

/// The 32 codes of a register (rows 0..16 in the low lane, 16..32 in the high) widened to
/// `i32` indices in [`decode_planes`]'s register order.
#[inline]
#[target_feature(enable = "avx2")]
fn gather_indices(code: __m256i) -> [__m256i; 4] {
    let (lo, hi) = (
        _mm256_castsi256_si128(code),
        _mm256_extracti128_si256(code, 1),
    );
    // Bytes: rows 0-3, 16-19, 4-7, 20-23 | rows 8-11, 24-27, 12-15, 28-31.
    let (a, b) = (_mm_unpacklo_epi32(lo, hi), _mm_unpackhi_epi32(lo, hi));
    [
        _mm256_cvtepu8_epi32(a),
        _mm256_cvtepu8_epi32(_mm_srli_si128(a, 8)),
        _mm256_cvtepu8_epi32(b),
        _mm256_cvtepu8_epi32(_mm_srli_si128(b, 8)),
    ]
}

/// AVX2 body of `dot_blocks_scores_i16` for one block: `out[r] = Σ_j weights[j] ·
/// values[code_j(row r)]`, each coordinate's 32 codes cut out of the nibble layout
/// ([`wide_codes`]), looked up by `pshufb` (5 bits, [`dot_block_i16_b5`]) or gathered (6-8 bits)
/// and multiplied (`vpmaddwd`) into four 8-row `i32` sums (integers: the order does not matter),
/// each chunk of `INT_CHUNK` coordinates' sums added to `f32` totals; for each of the `Q` weight
/// vectors (all of one length) from one look-up.
///
/// # Safety
/// The CPU supports AVX2; `5 <= bits <= 8`; `block` is one block of `32 · row_bytes` bytes; every
/// weight slice has the same length, at most `8 · row_bytes / bits`; `values` has at least
/// `2^bits` entries and `planes` holds their bytes; no chunk's partial sum overflows an `i32`.
#[target_feature(enable = "avx2")]
pub(super) unsafe fn dot_block_i16_avx2<const Q: usize>(
    block: &[u8],
    bits: u32,
    values: &[i32],
    planes: &[[u8; 256]; 2],
    weights: [&[i16]; Q],
    out: &mut [[f32; BLOCK]; Q],
) {
    // SAFETY (all four): the caller's contract, passed on with `bits == B`.
    unsafe {
        match bits {
            5 => dot_block_i16_b5::<Q>(block, planes, weights, out),
            6 => dot_block_i16_wide::<6, Q>(block, values, weights, out),
            7 => dot_block_i16_wide::<7, Q>(block, values, weights, out),
            _ => dot_block_i16_wide::<8, Q>(block, values, weights, out),
        }
    }
}

/// [`dot_block_i16_avx2`] at 5 bits, without gathers: each coordinate's codes look the grid's
/// two 32-entry byte planes up by two `pshufb` over their halves and a blend on bit 4 (as the
/// 5-bit table scan does), and each pair of coordinates' words is interleaved into `(j, j + 1)`
/// pairs per row, so one `vpmaddwd` per 8 rows adds both products. The same integers.
///
/// # Safety
/// As [`dot_block_i16_avx2`] with `bits == 5`; `planes` holds the grid's bytes (entries past 32
/// unread).
#[target_feature(enable = "avx2")]
unsafe fn dot_block_i16_b5<const Q: usize>(
    block: &[u8],
    planes: &[[u8; 256]; 2],
    weights: [&[i16]; Q],
    out: &mut [[f32; BLOCK]; Q],
) {
    let t = plane_halves(planes, 5);
    let look_up = |codes: __m256i| look_up_b5(codes, &t);
    const { assert!(super::INT_CHUNK.is_multiple_of(2)) };
    let dim = if Q == 0 { 0 } else { weights[0].len() };
    let zero = _mm256_setzero_si256();
    let mut acc = [[zero; 4]; Q];
    let mut total = [[_mm256_setzero_ps(); 4]; Q];
    for pair in 0..dim.div_ceil(2) {
        let (j, second) = (2 * pair, 2 * pair + 1 < dim);
        // SAFETY (both): coordinates j and (when `second`) j + 1 are below the weights' length,
        // so their nibble positions lie in the block.
        let (lo0, hi0) = look_up(unsafe { wide_codes::<5>(block, j) });
        let (lo1, hi1) = if second {
            look_up(unsafe { wide_codes::<5>(block, j + 1) })
        } else {
            (zero, zero)
        };
        // Words of rows 0-7 | 16-23 and 8-15 | 24-31, then (j, j + 1) pairs in the register
        // order of `store_rows`.
        let (a0, b0) = (
            _mm256_unpacklo_epi8(lo0, hi0),
            _mm256_unpackhi_epi8(lo0, hi0),
        );
        let (a1, b1) = (
            _mm256_unpacklo_epi8(lo1, hi1),
            _mm256_unpackhi_epi8(lo1, hi1),
        );
        let x = [
            _mm256_unpacklo_epi16(a0, a1),
            _mm256_unpackhi_epi16(a0, a1),
            _mm256_unpacklo_epi16(b0, b1),
            _mm256_unpackhi_epi16(b0, b1),
        ];
        let flush = (j + 2).is_multiple_of(super::INT_CHUNK) || j + 2 >= dim;
        for ((a, t), w) in acc.iter_mut().zip(&mut total).zip(weights) {
            let second_weight = if second { w[j + 1] } else { 0 };
            let pair_weights = u32::from(w[j] as u16) | (u32::from(second_weight as u16) << 16);
            madd_rows(a, t, x, _mm256_set1_epi32(pair_weights as i32), flush);
        }
    }
    for (t, o) in total.into_iter().zip(out.iter_mut()) {
        store_rows(t, o);
    }
}

/// [`dot_block_i16_avx2`] for `B`-bit codes.
///
/// # Safety
/// As [`dot_block_i16_avx2`] with `bits == B`.
#[target_feature(enable = "avx2")]
unsafe fn dot_block_i16_wide<const B: usize, const Q: usize>(
    block: &[u8],
    values: &[i32],
    weights: [&[i16]; Q],
    out: &mut [[f32; BLOCK]; Q],
) {
    let dim = if Q == 0 { 0 } else { weights[0].len() };
    let mut acc = [[_mm256_setzero_si256(); 4]; Q];
    let mut total = [[_mm256_setzero_ps(); 4]; Q];
    for j in 0..dim {
        // SAFETY: coordinate j < dim has its nibbles in the block; codes index `values`.
        let x = unsafe { gather_ints(wide_codes::<B>(block, j), values) };
        let flush = (j + 1).is_multiple_of(super::INT_CHUNK) || j + 1 == dim;
        for ((a, t), w) in acc.iter_mut().zip(&mut total).zip(weights) {
            // `vpmaddwd` against (w, 0) word pairs: each lane's low word (the value as i16)
            // times w, plus its high word times 0; exact, and faster than `vpmulld`.
            madd_rows(a, t, x, _mm256_set1_epi32(i32::from(w[j] as u16)), flush);
        }
    }
    for (t, o) in total.into_iter().zip(out.iter_mut()) {
        store_rows(t, o);
    }
}

/// Adds `vpmaddwd(x[g], wv)` (each 32-bit lane's two word products) to the rows' `i32` sums
/// `acc`, and with `flush` (a chunk's end) moves those sums into the `f32` totals.
#[inline]
#[target_feature(enable = "avx2")]
fn madd_rows(
    acc: &mut [__m256i; 4],
    total: &mut [__m256; 4],
    x: [__m256i; 4],
    wv: __m256i,
    flush: bool,
) {
    for (a, x) in acc.iter_mut().zip(x) {
        *a = _mm256_add_epi32(*a, _mm256_madd_epi16(x, wv));
    }
    if flush {
        for (t, a) in total.iter_mut().zip(acc.iter_mut()) {
            *t = _mm256_add_ps(*t, _mm256_cvtepi32_ps(*a));
            *a = _mm256_setzero_si256();
        }
    }
}

/// AVX2 body of `dot_block_codes` for widths 6-8: `out[r] = Σ_j q[j] · values[code_j(row r)]`,
/// the 32 codes of each coordinate cut out of the nibble layout ([`wide_codes`]), decoded by
/// gathers (with `vbmi`, two coordinates at a time by byte permutes,
/// [`super::avx512::dot_block_pairs`]: the same floats in the same order) and FMA'd into four
/// 8-row sums.
///
/// # Safety
/// The CPU supports AVX2 and FMA, and AVX-512 F, BW and VBMI when `vbmi`; `6 <= bits <= 8`;
/// `block` is one block of `32 · row_bytes` bytes with `q.len() <= 8 · row_bytes / bits`;
/// `values` has at least `2^bits` entries.
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn dot_block_wide_x86(
    block: &[u8],
    bits: u32,
    values: &[f32],
    q: &[f32],
    out: &mut [f32; BLOCK],
    vbmi: bool,
) {
    use super::avx512::dot_block_pairs;
    // SAFETY: the caller's contract, passed on unchanged; `vbmi` only with the CPU features.
    unsafe {
        match (bits, vbmi) {
            (6, false) => dot_block_wide::<6>(block, values, q, out),
            (7, false) => dot_block_wide::<7>(block, values, q, out),
            (_, false) => dot_block_wide::<8>(block, values, q, out),
            (6, true) => dot_block_pairs::<6>(block, values, q, out),
            (7, true) => dot_block_pairs::<7>(block, values, q, out),
            (_, true) => dot_block_pairs::<8>(block, values, q, out),
        }
    }
}

/// [`dot_block_wide_x86`] for `B`-bit codes.
///
/// # Safety
/// As [`dot_block_wide_x86`] with `bits == B`.
#[target_feature(enable = "avx2,fma")]
unsafe fn dot_block_wide<const B: usize>(
    block: &[u8],
    values: &[f32],
    q: &[f32],
    out: &mut [f32; BLOCK],
) {
    let mut acc = [_mm256_setzero_ps(); 4];
    for (j, &qj) in q.iter().enumerate() {
        // SAFETY: coordinate j < q.len() has its nibbles in the block; codes index `values`.
        let x = unsafe { gather_values(wide_codes::<B>(block, j), values) };
        let qv = _mm256_set1_ps(qj);
        for (a, x) in acc.iter_mut().zip(x) {
            *a = _mm256_fmadd_ps(x, qv, *a);
        }
    }
    store_rows(acc, out);
}

/// Stores four registers in the decoders' row order to `out`: register `g` holds rows
/// `4g..4g+4` in its low lane and `16+4g..20+4g` in its high lane.
#[inline]
#[target_feature(enable = "avx")]
pub(super) fn store_rows(acc: [__m256; 4], out: &mut [f32; BLOCK]) {
    for (g, a) in acc.iter().enumerate() {
        // SAFETY: 4g + 4 <= 16 and 16 + 4g + 4 <= 32 floats of `out`.
        unsafe {
            _mm256_storeu2_m128(
                out.as_mut_ptr().add(16 + 4 * g),
                out.as_mut_ptr().add(4 * g),
                *a,
            )
        };
    }
}

/// The f32 values of 32 codes (`code`: one per byte, rows 0..16 in the low lane, 16..32 in the
/// high) from the byte planes of a 16-entry (`lo`) or 32-entry (`lo`, `hi`, 5 bits) table: each
/// plane is one `vpshufb` (two at 5 bits, one per half, joined by a `vpblendvb` on the code's
/// bit 4), and two rounds of byte / word interleaves reassemble the floats. Register `g`
/// holds rows `4g..4g+4` in its low lane and `16+4g..20+4g` in its high lane.
#[inline]
#[target_feature(enable = "avx2")]
fn decode_planes<const B: usize>(
    code: __m256i,
    lo: &[__m256i; 4],
    hi: &[__m256i; 4],
) -> [__m256; 4] {
    let b: [__m256i; 4] = if B == 5 {
        // `vpshufb` reads an index's low four bits (bit 7 clear: codes are below 32), so both
        // halves are looked up with the code itself and bit 4, shifted to bit 7 (codes' bits
        // 5-7 are zero, so nothing crosses between bytes), picks the half.
        let upper = _mm256_slli_epi16(code, 3);
        std::array::from_fn(|p| {
            _mm256_blendv_epi8(
                _mm256_shuffle_epi8(lo[p], code),
                _mm256_shuffle_epi8(hi[p], code),
                upper,
            )
        })
    } else {
        std::array::from_fn(|p| _mm256_shuffle_epi8(lo[p], code))
    };
    let l01 = _mm256_unpacklo_epi8(b[0], b[1]);
    let h01 = _mm256_unpackhi_epi8(b[0], b[1]);
    let l23 = _mm256_unpacklo_epi8(b[2], b[3]);
    let h23 = _mm256_unpackhi_epi8(b[2], b[3]);
    [
        _mm256_castsi256_ps(_mm256_unpacklo_epi16(l01, l23)),
        _mm256_castsi256_ps(_mm256_unpackhi_epi16(l01, l23)),
        _mm256_castsi256_ps(_mm256_unpacklo_epi16(h01, h23)),
        _mm256_castsi256_ps(_mm256_unpackhi_epi16(h01, h23)),
    ]
}

/// AVX2 body of `scan_block` and `scan_block_multi`: the 32 rows of `block` scored against `Q`
/// queries' tables in one pass over the codes ([`nibble_chunk`]), flushed to `u32` every 256
/// steps.
///
/// # Safety
/// The CPU supports AVX2; `block.len()` is a multiple of 32 and every table slice has length
/// `block.len()`.
#[target_feature(enable = "avx2")]
pub(super) unsafe fn scan_block_multi_avx2<const Q: usize>(
    block: &[u8],
    tables: [&[u8]; Q],
    outs: &mut [[u32; BLOCK]; Q],
) {
    for o in outs.iter_mut() {
        o.fill(0);
    }
    let steps = block.len() / 32;
    let mut done = 0;
    while done < steps {
        let chunk = (steps - done).min(256);
        // SAFETY: forwarded from the caller; `done + chunk <= steps`.
        let acc = unsafe { nibble_chunk::<Q, 1>(block, tables, done, done + chunk) };
        done += chunk;
        for (a, o) in acc.iter().zip(outs.iter_mut()) {
            add_rows(chunk_rows(a, steps <= SHORT_STEPS), o);
        }
    }
}

/// Stamps out the body of `scan_blocks_scores_multi` (docs below) for one instruction-set level:
/// the same operations on 256-bit registers, compiled once for AVX2 (sixteen registers: two jobs
/// per pass) and once with AVX-512 VL enabled, whose 32 registers hold the accumulators of
/// [`super::FUSED_QUERIES_WIDE`] jobs.
macro_rules! scan_scores_kernel {
    ($(#[$attr:meta])* $name:ident) => {
        $(#[$attr])*
        pub(super) unsafe fn $name<const Q: usize, const G: usize>(
            blocks: &[u8],
            block_len: usize,
            scales: &[f32],
            jobs: &mut [super::ScoreJob<'_>; Q],
            ahead: crate::prefetch::Ahead<'_>,
        ) {
            let steps = block_len / 32;
            let rows = scales.len();
            let tables: [&[u8]; Q] = std::array::from_fn(|q| jobs[q].tables);
            for (b, block) in blocks.chunks_exact(block_len).enumerate() {
                ahead.rows(b * BLOCK..(b + 1) * BLOCK);
                let zero = _mm256_setzero_si256();
                let mut sums = [[zero; 4]; Q];
                let mut done = 0;
                while done < steps {
                    let chunk = (steps - done).min(256);
                    // SAFETY: forwarded from the caller; `done + chunk <= steps`.
                    let acc = unsafe { nibble_chunk::<Q, G>(block, tables, done, done + chunk) };
                    done += chunk;
                    for (s, a) in sums.iter_mut().zip(&acc) {
                        for (s, r) in s.iter_mut().zip(chunk_rows(a, steps <= SHORT_STEPS)) {
                            *s = _mm256_add_epi32(*s, r);
                        }
                    }
                }
                let start = b * BLOCK;
                let n = (rows - start).min(BLOCK);
                // A whole block reads its scales and writes its scores in place (no copies
                // through 32-float buffers, which cost as much as a short block's scan); the last
                // block's empty slots go through the buffers.
                let tail: [f32; BLOCK];
                let scale: &[f32] = if n == BLOCK {
                    &scales[start..start + BLOCK]
                } else {
                    let mut t = [0.0f32; BLOCK];
                    t[..n].copy_from_slice(&scales[start..start + n]);
                    tail = t;
                    &tail
                };
                for (job, sums) in jobs.iter_mut().zip(sums) {
                    let (offset, step, bias) = (
                        _mm256_set1_ps(job.affine.offset),
                        _mm256_set1_ps(job.affine.step),
                        _mm256_set1_ps(job.affine.bias),
                    );
                    let above = _mm256_set1_ps(job.marks.as_ref().map_or(f32::INFINITY, |m| m.0));
                    let affine = |res: &mut [f32]| {
                        let mut mask = 0u32;
                        for (k, s) in sums.into_iter().enumerate() {
                            // SAFETY: `scale` and `res` hold 32 floats; sums are below 2^31 (the
                            // public check bounds `row_bytes`), so the signed conversion rounds as
                            // `u32 as f32`.
                            let v = unsafe {
                                let v = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), step, offset);
                                let sc = _mm256_loadu_ps(scale.as_ptr().add(8 * k));
                                let v = _mm256_fmadd_ps(v, sc, bias);
                                _mm256_storeu_ps(res.as_mut_ptr().add(8 * k), v);
                                v
                            };
                            let gt = _mm256_cmp_ps::<_CMP_GT_OQ>(v, above);
                            let gt = _mm256_movemask_ps(gt) as u32;
                            mask |= gt << (8 * k);
                        }
                        mask
                    };
                    let mask = if n == BLOCK {
                        affine(&mut job.out[start..start + BLOCK])
                    } else {
                        let mut buf = [0.0f32; BLOCK];
                        let mask = affine(&mut buf);
                        job.out[start..start + n].copy_from_slice(&buf[..n]);
                        mask
                    };
                    if let Some((_, m)) = job.marks.as_mut() {
                        m[b] = if n == BLOCK {
                            mask
                        } else {
                            mask & ((1u32 << n) - 1)
                        };
                    }
                }
            }
        }
    };
}

scan_scores_kernel!(
    /// AVX2 body of `scan_blocks_scores_multi`: per block, one nibble pass for the `Q` jobs' tables
    /// with each job's `u32` row sums kept in registers, then per job `out = scales · (offset +
    /// step · sum) + bias` in `f32` (8 rows per FMA pair) and, with marks `(above, masks)`, bit `r`
    /// of `masks[b]` set iff row `32b + r`'s score is `> above`. Rows past `scales.len()` (the last
    /// block's empty slots) are computed and dropped. `G` look-up steps are added as bytes before
    /// they are accumulated ([`nibble_chunk`]), which needs every job's table entries at most
    /// `255 / G` (else the sums are wrong, though memory stays safe). Each block asks for
    /// `ahead`'s lines of its rows before it is scanned.
    ///
    /// # Safety
    /// The CPU supports AVX2 and FMA; `block_len` is a positive multiple of 32, `blocks.len() ==
    /// scales.len().div_ceil(32) · block_len`, and every job has `tables.len() == block_len`,
    /// `out.len() == scales.len()` and masks, if any, of `scales.len().div_ceil(32)` entries.
    #[target_feature(enable = "avx2,fma")]
    scan_blocks_scores_avx2
);

scan_scores_kernel!(
    /// [`scan_blocks_scores_avx2`] with AVX-512 F and VL enabled (32 registers).
    ///
    /// # Safety
    /// As [`scan_blocks_scores_avx2`], and the CPU supports AVX-512 F and VL.
    #[target_feature(enable = "avx2,fma,avx512f,avx512vl")]
    scan_blocks_scores_vl
);

/// Whether every byte of `tables` is below 64: 128 bytes at a time, the OR of four loads with bit
/// 6 of each byte shifted onto bit 7 (a 16-bit shift: the bit a low byte pushes out lands on bit
/// 0 of its neighbour) and the sign bits read by `vpmovmskb`, stopping at the first run with
/// either bit set; the last bytes one by one.
#[target_feature(enable = "avx2")]
pub(super) fn entries_below_64(tables: &[u8]) -> bool {
    let mut runs = tables.chunks_exact(128);
    for run in &mut runs {
        let v: [__m256i; 4] = std::array::from_fn(|k| {
            // SAFETY: `run` holds 128 bytes; unaligned 32-byte load at `32k`.
            unsafe { _mm256_loadu_si256(run.as_ptr().add(32 * k) as *const __m256i) }
        });
        let or = _mm256_or_si256(_mm256_or_si256(v[0], v[1]), _mm256_or_si256(v[2], v[3]));
        if _mm256_movemask_epi8(_mm256_or_si256(or, _mm256_slli_epi16(or, 1))) != 0 {
            return false;
        }
    }
    runs.remainder().iter().all(|&t| t < 64)
}

/// Steps `from..to` (`to - from <= 256`) of a nibble scan of `block` against `Q` queries' tables,
/// as four `u16` accumulators per query: words and odd bytes of the low-nibble rows 0..15, then
/// of the high-nibble rows 16..31. Each 32-byte step holds two nibble positions (16 bytes each,
/// lane 0 the even position and lane 1 the odd one); its nibbles are split once and looked up in
/// every query's pair of tables, with faiss-style accumulation: whole words (wrapping) and the
/// odd bytes (`>> 8`, exact: at most 256 · 255), the even bytes recovered by [`word_rows`].
///
/// With `G > 1` every table entry is at most `255 / G` (the caller checked), so the look-ups of
/// `G` consecutive steps (the same rows at other positions) are first added as bytes without
/// carry, and only their sum is accumulated: per step and query two shuffles, about `2 - 2 / G`
/// byte adds and `6 / G` word adds and shifts, where one step at a time takes two shuffles, four
/// word adds and two shifts. Steps past the last whole group go one at a time. The sums are the
/// same integers for every `G`.
///
/// # Safety
/// The CPU supports AVX2; `32 · to <= block.len()` and every table slice is at least as long.
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn nibble_chunk<const Q: usize, const G: usize>(
    block: &[u8],
    tables: [&[u8]; Q],
    from: usize,
    to: usize,
) -> [[__m256i; 4]; Q] {
    let zero = _mm256_setzero_si256();
    let mut acc = [[zero; 4]; Q];
    let mut s = from;
    while s + G <= to {
        // SAFETY: forwarded; `s + G <= to`.
        unsafe { nibble_group::<Q, G>(block, tables, s, &mut acc) };
        s += G;
    }
    while s < to {
        // SAFETY: forwarded; `s < to`.
        unsafe { nibble_group::<Q, 1>(block, tables, s, &mut acc) };
        s += 1;
    }
    acc
}

/// Steps `s..s + G` of [`nibble_chunk`]: per query, the byte sums of the `G` steps' look-ups
/// (exact when every entry is at most `255 / G`), added to `acc` as words and odd bytes.
///
/// # Safety
/// The CPU supports AVX2; `32 · (s + G) <= block.len()` and every table slice is as long.
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn nibble_group<const Q: usize, const G: usize>(
    block: &[u8],
    tables: [&[u8]; Q],
    s: usize,
    acc: &mut [[__m256i; 4]; Q],
) {
    const {
        assert!(
            G == 1 || G.is_multiple_of(2),
            "steps go one or two at a time"
        )
    };
    let zero = _mm256_setzero_si256();
    let mut part = [[zero; 2]; Q];
    if G == 1 {
        // SAFETY: forwarded (`32 · s + 32 <= block.len()`).
        unsafe { look_up::<Q, false>(block, tables, s, &mut part) };
    } else {
        // Two steps at a time (their nibbles split once, then each query's four look-ups),
        // which keeps the live registers within sixteen for two queries.
        for h in (s..s + G).step_by(2) {
            // SAFETY: forwarded (`32 · h + 64 <= block.len()`: `G` is even here).
            unsafe { look_up::<Q, true>(block, tables, h, &mut part) };
        }
    }
    for (a, [rl, rh]) in acc.iter_mut().zip(part) {
        a[0] = _mm256_add_epi16(a[0], rl);
        a[1] = _mm256_add_epi16(a[1], _mm256_srli_epi16(rl, 8));
        a[2] = _mm256_add_epi16(a[2], rh);
        a[3] = _mm256_add_epi16(a[3], _mm256_srli_epi16(rh, 8));
    }
}

/// Adds to `part` each query's byte look-ups of step `h` (and `h + 1` with `TWO`): low-nibble
/// rows in `part[q][0]`, high-nibble rows in `part[q][1]` (wrapping bytes: the caller bounds
/// the entries).
///
/// # Safety
/// The CPU supports AVX2; `32 · (h + 2) <= block.len()` with `TWO`, else `32 · (h + 1)`, and
/// every table slice is as long.
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn look_up<const Q: usize, const TWO: bool>(
    block: &[u8],
    tables: [&[u8]; Q],
    h: usize,
    part: &mut [[__m256i; 2]; Q],
) {
    let mask = _mm256_set1_epi8(0x0F);
    let split = |k: usize| {
        // SAFETY: `32 · (h + k) + 32 <= block.len()` for the steps asked.
        let x = unsafe { _mm256_loadu_si256(block.as_ptr().add((h + k) * 32) as *const __m256i) };
        (
            _mm256_and_si256(x, mask),
            _mm256_and_si256(_mm256_srli_epi16(x, 4), mask),
        )
    };
    let (lo0, hi0) = split(0);
    let (lo1, hi1) = if TWO { split(1) } else { (lo0, hi0) };
    for (p, t) in part.iter_mut().zip(tables) {
        // SAFETY: as above, the tables being as long as the block.
        let t0 = unsafe { _mm256_loadu_si256(t.as_ptr().add(h * 32) as *const __m256i) };
        let (mut rl, mut rh) = (_mm256_shuffle_epi8(t0, lo0), _mm256_shuffle_epi8(t0, hi0));
        if TWO {
            // SAFETY: as above.
            let t1 = unsafe { _mm256_loadu_si256(t.as_ptr().add(h * 32 + 32) as *const __m256i) };
            rl = _mm256_add_epi8(rl, _mm256_shuffle_epi8(t1, lo1));
            rh = _mm256_add_epi8(rh, _mm256_shuffle_epi8(t1, hi1));
        }
        p[0] = _mm256_add_epi8(p[0], rl);
        p[1] = _mm256_add_epi8(p[1], rh);
    }
}

/// The `u32` sums of 16 rows (rows 0..7, rows 8..15) from look-ups accumulated as `u16` words:
/// `words` holds the wrapping sums of whole words (even byte + 256 · odd byte), `odd` the exact
/// sums of the odd bytes, so the even-byte sums are `words - (odd << 8)` modulo 2^16 (exact while
/// they stay below 2^16). Byte `i` of either 128-bit lane is row `i` (the two lanes hold two
/// nibble positions of the same rows), so row `2j` is word `j` of both lanes' even sums and row
/// `2j + 1` word `j` of their odd sums; the lanes are added in `u32`.
#[inline]
#[target_feature(enable = "avx2")]
fn word_rows(words: __m256i, odd: __m256i) -> [__m256i; 2] {
    let even = _mm256_sub_epi16(words, _mm256_slli_epi16(odd, 8));
    let widen = |v: __m256i| {
        _mm256_add_epi32(
            _mm256_cvtepu16_epi32(_mm256_castsi256_si128(v)),
            _mm256_cvtepu16_epi32(_mm256_extracti128_si256::<1>(v)),
        )
    };
    interleave_rows(widen(even), widen(odd))
}

/// The `u32` sums of a chunk's 32 rows (rows 0..7, 8..15, 16..23, 24..31) from its four
/// accumulators ([`nibble_chunk`]): with `short` (the whole block is at most [`SHORT_STEPS`]
/// steps) through [`word_rows_short`], else [`word_rows`].
#[inline]
#[target_feature(enable = "avx2")]
fn chunk_rows(a: &[__m256i; 4], short: bool) -> [__m256i; 4] {
    let ([r0, r1], [r2, r3]) = if short {
        (word_rows_short(a[0], a[1]), word_rows_short(a[2], a[3]))
    } else {
        (word_rows(a[0], a[1]), word_rows(a[2], a[3]))
    };
    [r0, r1, r2, r3]
}

/// Blocks of at most this many steps have row totals (two lanes of at most `128 · 255` each)
/// that fit `u16`, so [`word_rows_short`] may add the lanes before widening.
const SHORT_STEPS: usize = 128;

/// [`word_rows`] for a chunk of at most [`SHORT_STEPS`] steps: the two lanes' even and odd sums
/// are added as `u16` first (exact there), then interleaved and widened once, six shuffles where
/// [`word_rows`] takes ten.
#[inline]
#[target_feature(enable = "avx2")]
fn word_rows_short(words: __m256i, odd: __m256i) -> [__m256i; 2] {
    let even = _mm256_sub_epi16(words, _mm256_slli_epi16(odd, 8));
    let fold =
        |v: __m256i| _mm_add_epi16(_mm256_castsi256_si128(v), _mm256_extracti128_si256::<1>(v));
    let (e, o) = (fold(even), fold(odd));
    [
        _mm256_cvtepu16_epi32(_mm_unpacklo_epi16(e, o)),
        _mm256_cvtepu16_epi32(_mm_unpackhi_epi16(e, o)),
    ]
}

/// Adds `N` vectors of eight `u32` row sums to `out[..8N]`, vector `k` to rows `8k..8k + 8`.
///
/// # Panics
/// If `out.len() < 8 · N` (a bounds check before any store).
#[inline]
#[target_feature(enable = "avx2")]
fn add_rows<const N: usize>(rows: [__m256i; N], out: &mut [u32]) {
    for (r, o) in rows.into_iter().zip(out[..8 * N].chunks_exact_mut(8)) {
        // SAFETY: `o` is 8 u32 = 32 bytes; unaligned load and store.
        unsafe {
            let p = o.as_mut_ptr() as *mut __m256i;
            _mm256_storeu_si256(p, _mm256_add_epi32(_mm256_loadu_si256(p), r));
        }
    }
}

/// Sixteen `u32` row sums in order (rows 0..7, rows 8..15) from their even rows `e` and odd rows
/// `o` (8 each, in order).
#[inline]
#[target_feature(enable = "avx2")]
fn interleave_rows(e: __m256i, o: __m256i) -> [__m256i; 2] {
    // Per 128-bit lane: `lo` holds rows 0..3 and 8..11, `hi` rows 4..7 and 12..15.
    let (lo, hi) = (_mm256_unpacklo_epi32(e, o), _mm256_unpackhi_epi32(e, o));
    [
        _mm256_permute2x128_si256::<0x20>(lo, hi),
        _mm256_permute2x128_si256::<0x31>(lo, hi),
    ]
}

/// AVX2 body of `dot_nibbles_i8` for `Q` weight vectors. Each 32-byte step holds nibble positions
/// `2s` (lane 0) and `2s + 1` (lane 1); two steps are split into nibbles once and their bytes
/// interleaved, so each 16-bit pair holds one row's nibbles at positions `(2s, 2s + 2)` (lane 0)
/// or `(2s + 1, 2s + 3)` (lane 1), and `vpmaddubsw` against the matching weight pairs gives that
/// row's partial sum over the two positions (at most `2 · 15 · 128` in magnitude). Eight such
/// double steps are summed in `i16` (at most `8 · 3840 < 2^15`), then the two lanes are widened
/// and added in `i32`. An odd last step pairs with zero nibbles and zero weights.
///
/// # Safety
/// The CPU supports AVX2; `block.len()` is a multiple of 32 and every weight slice has
/// `block.len() / 16` entries.
#[target_feature(enable = "avx2")]
pub(super) unsafe fn dot_nibbles_i8_avx2<const Q: usize>(
    block: &[u8],
    weights: [&[i8]; Q],
    outs: &mut [[i32; BLOCK]; Q],
) {
    let steps = block.len() / 32;
    let mask = _mm256_set1_epi8(0x0F);
    // Of four broadcast weights (positions 2s..2s + 4), lane 0 takes the pair (2s, 2s + 2) and
    // lane 1 the pair (2s + 1, 2s + 3), repeated over the lane.
    #[rustfmt::skip]
    let pick = _mm256_setr_epi8(
        0, 2, 0, 2, 0, 2, 0, 2, 0, 2, 0, 2, 0, 2, 0, 2,
        1, 3, 1, 3, 1, 3, 1, 3, 1, 3, 1, 3, 1, 3, 1, 3,
    );
    let zero = _mm256_setzero_si256();
    let mut wide = [[zero; 4]; Q];
    let pairs = steps.div_ceil(2);
    let mut t = 0;
    while t < pairs {
        let end = (t + 8).min(pairs);
        let mut narrow = [[zero; 4]; Q];
        for p in t..end {
            let s = 2 * p;
            // SAFETY: `s < steps`, so 32 bytes at `32 s` lie in the block; the second step
            // is read only when it exists.
            let (x0, x1) = unsafe {
                let x0 = _mm256_loadu_si256(block.as_ptr().add(32 * s) as *const __m256i);
                let x1 = if s + 1 < steps {
                    _mm256_loadu_si256(block.as_ptr().add(32 * s + 32) as *const __m256i)
                } else {
                    zero
                };
                (x0, x1)
            };
            let (l0, l1) = (_mm256_and_si256(x0, mask), _mm256_and_si256(x1, mask));
            let h0 = _mm256_and_si256(_mm256_srli_epi16(x0, 4), mask);
            let h1 = _mm256_and_si256(_mm256_srli_epi16(x1, 4), mask);
            let rows = [
                _mm256_unpacklo_epi8(l0, l1),
                _mm256_unpackhi_epi8(l0, l1),
                _mm256_unpacklo_epi8(h0, h1),
                _mm256_unpackhi_epi8(h0, h1),
            ];
            for (n, w) in narrow.iter_mut().zip(weights) {
                // Positions 2s..2s + 4: whole when the second step exists (then 4 s + 4 <=
                // 2 · steps = w.len()), else the last two positions and two zeros.
                let four = if s + 1 < steps {
                    // SAFETY: `2s + 4 <= w.len()` (above); an unaligned 4-byte read.
                    unsafe { (w.as_ptr().add(2 * s) as *const i32).read_unaligned() }
                } else {
                    i32::from_le_bytes([w[2 * s] as u8, w[2 * s + 1] as u8, 0, 0])
                };
                let wv = _mm256_shuffle_epi8(_mm256_set1_epi32(four), pick);
                for (a, r) in n.iter_mut().zip(rows) {
                    *a = _mm256_add_epi16(*a, _mm256_maddubs_epi16(r, wv));
                }
            }
        }
        for (w, n) in wide.iter_mut().zip(narrow) {
            for (a, v) in w.iter_mut().zip(n) {
                let lanes = _mm256_add_epi32(
                    _mm256_cvtepi16_epi32(_mm256_castsi256_si128(v)),
                    _mm256_cvtepi16_epi32(_mm256_extracti128_si256::<1>(v)),
                );
                *a = _mm256_add_epi32(*a, lanes);
            }
        }
        t = end;
    }
    for (w, o) in wide.iter().zip(outs.iter_mut()) {
        for (k, v) in w.iter().enumerate() {
            // SAFETY: `o` holds 32 i32; rows 8k..8k + 8.
            unsafe { _mm256_storeu_si256(o.as_mut_ptr().add(8 * k) as *mut __m256i, *v) };
        }
    }
}

/// `acc + Σ pairs of a · b` (`vpmaddwd` and an add).
#[inline]
#[target_feature(enable = "avx2")]
fn madd_add(acc: __m256i, a: __m256i, b: __m256i) -> __m256i {
    _mm256_add_epi32(acc, _mm256_madd_epi16(a, b))
}

/// Stamps out a body of `accumulate_blocks_i16` for one register width and code layout. A
/// "unit" is what one decode yields: `$per` coordinates, their 32 rows' grid values as `$regs`
/// registers of `i16` in which 32-bit lane `k` holds two adjacent rows of one coordinate;
/// `$decode(block, unit, dim)` makes them and `$weights(p)` the matching `$regs` registers of
/// the block's 32 weights at `p`. AVX-512 (every width): a unit is four coordinates, one per
/// 128-bit lane, four registers of rows 0-7, 8-15, 16-23 and 24-31. AVX2: at 4 bits a unit is
/// one load of two nibble positions (one coordinate per 128-bit lane), four registers as above;
/// at other widths one coordinate, two registers of rows 0-7 | 16-23 and 8-15 | 24-31. Units go
/// four at a time with their accumulators in registers (`$dot` multiplies a unit by its weights
/// and adds the pairs into `i32` sums); at a chunk's end `$reduce` turns the four units' lanes
/// into one register of their `4 · $per` coordinate sums (element `4k + u` is coordinate `k` of
/// unit `u`), converted, scaled and added to the `f32` locals. `$wt` is the weights' type
/// (`IntWeights`; `ByteWeights` for the byte sums, whose registers hold bytes: lane `k` four
/// adjacent rows, `$dot` a `vpdpbusd`).
macro_rules! int_sums_kernel {
    (
        $(#[$attr:meta])* $name:ident, $reg:ty, per: $per:literal, regs: $regs:literal,
        zero: $zero:expr, decode: $decode:expr, weights: $weights:ident, dot: $dot:ident,
        reduce: $reduce:ident, fsplat: $fsplat:ident, cvt: $cvt:ident, fadd: $fadd:ident,
        fmul: $fmul:ident, fload: $fload:ident, fstore: $fstore:ident,
        wtype: $wt:ty, extra: ($($ex:ident: $ext:ty),*)
    ) => {
        /// An `accumulate_blocks_i16` (or, on `ByteWeights`, `accumulate_blocks_u8`) body for
        /// `B`-bit codes and `Q` weight vectors (see the macro's docs).
        ///
        /// # Safety
        /// The CPU has the features this copy is compiled with; `B` is a width the copy's
        /// decode takes; the arguments passed `check_sums` for `B` bits (whole blocks,
        /// weights covering them, `dim <= 8 · row_bytes / B`, a grid of at least `2^B` values)
        /// and each weight vector is its codebook's `IntWeights` or `ByteWeights` (its chunks'
        /// sums fit `i32`).
        $(#[$attr])*
        pub(super) unsafe fn $name<const B: usize, const Q: usize>(
            codes: super::kernels::IntSumCodes<'_>,
            $($ex: $ext,)*
            weights: [&$wt; Q],
            accs: &mut [&mut [f32]; Q],
        ) {
            const W: usize = 4 * $per;
            let (blocks, row_bytes) = (codes.blocks, codes.row_bytes);
            let dim = accs[0].len();
            let bb = BLOCK * row_bytes;
            let nblocks = blocks.len() / bb;
            let units = dim.div_ceil($per);
            let groups = units.div_ceil(4);
            let per_chunk = super::INT_CHUNK / BLOCK;
            // A chunk's weights are kept for four blocks.
            const { assert!(super::INT_CHUNK / BLOCK == 4) };
            let mut local = vec![[0.0f32; W]; Q * groups];
            // A chunk's weights for four blocks, set per chunk for its live blocks only (the
            // others are not read), so the array is cleared once, not per chunk.
            let mut wide = [[[$zero; $regs]; 4]; Q];
            for c in 0..nblocks.div_ceil(per_chunk) {
                let range = c * per_chunk..((c + 1) * per_chunk).min(nblocks);
                // The chunk's blocks where some weight vector weighs a row (found once).
                let live: [bool; 4] = std::array::from_fn(|i| {
                    range.contains(&(range.start + i))
                        && weights.iter().any(|w| w.active[range.start + i])
                });
                if !live.contains(&true) {
                    continue;
                }
                for (i, b) in range.clone().enumerate().filter(|&(i, _)| live[i]) {
                    for (wq, w) in wide.iter_mut().zip(&weights) {
                        // SAFETY: each weight vector covers the blocks: rows 32b..32b + 32.
                        wq[i] = unsafe { $weights(w.weights.as_ptr().add(b * BLOCK)) };
                    }
                }
                for g4 in 0..groups {
                    // acc[u][q]: unit 4 · g4 + u, weight vector q.
                    let mut acc = [[$zero; Q]; 4];
                    let n = (units - 4 * g4).min(4);
                    for (i, b) in range.clone().enumerate().filter(|&(i, _)| live[i]) {
                        let block = &blocks[b * bb..(b + 1) * bb];
                        // With the first units of each block, the block about 8 KiB ahead
                        // (two chunks at 4 bits and d = 64; one block at least), so it arrives
                        // while the blocks between are summed, without pushing them out of L1.
                        if g4 == 0 {
                            let ahead = (b + (8192 / bb).max(1)) * bb;
                            if let Some(next) = blocks.get(ahead..ahead + bb) {
                                super::x86::prefetch(next);
                            }
                        }
                        let one = |acc: &mut [$reg; Q], unit: usize| {
                            // SAFETY: the unit's coordinates below `dim` lie in the rows.
                            let r: [$reg; $regs] = unsafe { $decode(block, unit, dim) };
                            for (a, w) in acc.iter_mut().zip(&wide) {
                                for (x, w) in r.iter().zip(&w[i]) {
                                    *a = $dot(*a, *x, *w);
                                }
                            }
                        };
                        if n == 4 {
                            let [a0, a1, a2, a3] = &mut acc;
                            one(a0, 4 * g4);
                            one(a1, 4 * g4 + 1);
                            one(a2, 4 * g4 + 2);
                            one(a3, 4 * g4 + 3);
                        } else {
                            for (u, a) in acc.iter_mut().enumerate().take(n) {
                                one(a, 4 * g4 + u);
                            }
                        }
                    }
                    for q in 0..Q {
                        let s = $reduce([acc[0][q], acc[1][q], acc[2][q], acc[3][q]]);
                        let (offset, step) = weights[q].chunks[c];
                        let f = $fadd($fsplat(offset), $fmul($fsplat(step), $cvt(s)));
                        let l = &mut local[q * groups + g4];
                        // SAFETY: `l` holds W floats, one register.
                        unsafe { $fstore(l.as_mut_ptr(), $fadd($fload(l.as_ptr()), f)) };
                    }
                }
            }
            for (q, acc) in accs.iter_mut().enumerate() {
                for (j, a) in acc.iter_mut().enumerate() {
                    #[allow(clippy::modulo_one)]
                    let (unit, k) = (j / $per, j % $per);
                    *a += local[q * groups + unit / 4][4 * k + unit % 4];
                }
            }
        }
    };
}
pub(super) use int_sums_kernel;

/// One unit of 4-bit codes for [`int_sums_kernel`] on AVX2: nibble positions `2u, 2u + 1` (one
/// coordinate per 128-bit lane), split into rows 0-15 and 16-31, looked up in the grid's two
/// byte planes (`planes`, in both lanes) by `vpshufb` and interleaved into words of rows 0-7,
/// 8-15, 16-23 and 24-31.
///
/// # Safety
/// AVX2; `block` is one block (16 bytes per nibble position, `2 · row_bytes` of them, an even
/// count) and position `2u` lies in it, so `2u + 1` does too.
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn decode_nibbles_avx2(block: &[u8], u: usize, planes: &[__m256i; 2]) -> [__m256i; 4] {
    debug_assert!(32 * u + 32 <= block.len());
    // SAFETY: positions 2u and 2u + 1 are inside the block (the caller's contract).
    let x = unsafe { _mm256_loadu_si256(block.as_ptr().add(32 * u) as *const __m256i) };
    let nib = _mm256_set1_epi8(0x0F);
    let lo = _mm256_and_si256(x, nib);
    let hi = _mm256_and_si256(_mm256_srli_epi16::<4>(x), nib);
    let (l0, h0) = (
        _mm256_shuffle_epi8(planes[0], lo),
        _mm256_shuffle_epi8(planes[1], lo),
    );
    let (l1, h1) = (
        _mm256_shuffle_epi8(planes[0], hi),
        _mm256_shuffle_epi8(planes[1], hi),
    );
    [
        _mm256_unpacklo_epi8(l0, h0),
        _mm256_unpackhi_epi8(l0, h0),
        _mm256_unpacklo_epi8(l1, h1),
        _mm256_unpackhi_epi8(l1, h1),
    ]
}

/// The 4-bit grid's two byte planes (the first 16 bytes of each) in both 128-bit lanes.
#[inline]
#[target_feature(enable = "avx2")]
pub(super) fn nibble_planes_avx2(planes: &[[u8; 256]; 2]) -> [__m256i; 2] {
    // SAFETY: 16 bytes of each 256-byte plane.
    planes.map(|p| unsafe {
        _mm256_broadcastsi128_si256(_mm_loadu_si128(p.as_ptr() as *const __m128i))
    })
}

/// The weights of one block for 4-bit units on AVX2: rows 0-7, 8-15, 16-23 and 24-31, each in
/// both 128-bit lanes.
///
/// # Safety
/// 32 readable `i16` at `p`.
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn nibble_weights_avx2(p: *const i16) -> [__m256i; 4] {
    // SAFETY: the caller's 64 bytes.
    std::array::from_fn(|r| unsafe {
        _mm256_broadcastsi128_si256(_mm_loadu_si128(p.add(8 * r) as *const __m128i))
    })
}

/// Four units' sums inside each 128-bit lane on AVX2: each lane's four 32-bit partial sums
/// added by two rounds of interleaves (element `4c + u` is lane `c` of unit `u`).
#[inline]
#[target_feature(enable = "avx2")]
fn reduce_lanes_avx2(a: [__m256i; 4]) -> __m256i {
    let t01 = _mm256_add_epi32(
        _mm256_unpacklo_epi32(a[0], a[1]),
        _mm256_unpackhi_epi32(a[0], a[1]),
    );
    let t23 = _mm256_add_epi32(
        _mm256_unpacklo_epi32(a[2], a[3]),
        _mm256_unpackhi_epi32(a[2], a[3]),
    );
    _mm256_add_epi32(
        _mm256_unpacklo_epi64(t01, t23),
        _mm256_unpackhi_epi64(t01, t23),
    )
}

int_sums_kernel!(
    #[target_feature(enable = "avx2")]
    accumulate_i16_avx2, __m256i, per: 2, regs: 4, zero: _mm256_setzero_si256(),
    decode: |block: &[u8], unit: usize, _dim: usize| decode_nibbles_avx2(block, unit, &planes),
    weights: nibble_weights_avx2, dot: madd_add, reduce: reduce_lanes_avx2,
    fsplat: _mm256_set1_ps, cvt: _mm256_cvtepi32_ps, fadd: _mm256_add_ps, fmul: _mm256_mul_ps,
    fload: _mm256_loadu_ps, fstore: _mm256_storeu_ps, wtype: super::IntWeights, extra: (planes: [__m256i; 2])
);

/// The four 5-8-bit units' sums on AVX2 (one coordinate per unit, in both 128-bit lanes): the
/// lanes' sums ([`reduce_lanes_avx2`]), then the two lanes added.
#[inline]
#[target_feature(enable = "avx2")]
fn reduce_units(a: [__m256i; 4]) -> __m128i {
    let s = reduce_lanes_avx2(a);
    _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256(s, 1))
}

/// The weights of one block for 5-8-bit units on AVX2: rows 0-7 | 16-23 and
/// 8-15 | 24-31.
///
/// # Safety
/// 32 readable `i16` at `p`.
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn wide_weights(p: *const i16) -> [__m256i; 2] {
    // SAFETY: the caller's 64 bytes.
    unsafe {
        [
            _mm256_loadu2_m128i(p.add(16) as *const __m128i, p as *const __m128i),
            _mm256_loadu2_m128i(p.add(24) as *const __m128i, p.add(8) as *const __m128i),
        ]
    }
}

/// One coordinate's 32 grid values as [`int_sums_kernel`] takes them on AVX2: its codes
/// cut out of the nibble layout ([`wide_codes`]), then below 4 bits the grid's two byte planes
/// looked up by one `pshufb` each, at 5 bits by `pshufb` over their halves with a blend on bit
/// 4, both interleaved into words; at 6-8 bits gathered as `i32` ([`gather_ints`]) and packed to
/// words (the grid fits `i16`).
///
/// # Safety
/// AVX2; `B` as the codes (1-3 or 5-8); coordinate `j < dim` has its nibble positions in
/// `block`; `wide` has `2^B` entries and `halves` is [`plane_halves`] of the grid for `B` bits.
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn decode_wide_avx2<const B: usize>(
    block: &[u8],
    j: usize,
    wide: &[i32],
    halves: &[[__m256i; 2]; 2],
) -> [__m256i; 2] {
    // SAFETY: the caller's contract.
    let codes = unsafe { wide_codes::<B>(block, j) };
    if B < 4 {
        // Codes below 16 (bits above `B` set or not): one `pshufb` per plane of a table that
        // repeats with period 2^B.
        let (lo, hi) = (
            _mm256_shuffle_epi8(halves[0][0], codes),
            _mm256_shuffle_epi8(halves[1][0], codes),
        );
        [_mm256_unpacklo_epi8(lo, hi), _mm256_unpackhi_epi8(lo, hi)]
    } else if B == 5 {
        let (lo, hi) = look_up_b5(codes, halves);
        [_mm256_unpacklo_epi8(lo, hi), _mm256_unpackhi_epi8(lo, hi)]
    } else {
        // SAFETY: every code indexes `wide` (the caller's contract).
        let g = unsafe { gather_ints(codes, wide) };
        [
            _mm256_packs_epi32(g[0], g[1]),
            _mm256_packs_epi32(g[2], g[3]),
        ]
    }
}

/// The low and high bytes of the grid values of 32 5-bit codes: each plane's two 16-entry halves
/// looked up by `pshufb` and joined by a blend on bit 4 (the key dots' and the value sums' 5-bit
/// look-up on AVX2).
#[inline]
#[target_feature(enable = "avx2")]
fn look_up_b5(codes: __m256i, halves: &[[__m256i; 2]; 2]) -> (__m256i, __m256i) {
    // Bit 4 of each code into bit 7 of its byte (the 16-bit shift's carries land in bits 0-2 of
    // the byte above, which `vpblendvb` does not read).
    let upper = _mm256_slli_epi16::<3>(codes);
    let plane = |t: &[__m256i; 2]| {
        _mm256_blendv_epi8(
            _mm256_shuffle_epi8(t[0], codes),
            _mm256_shuffle_epi8(t[1], codes),
            upper,
        )
    };
    (plane(&halves[0]), plane(&halves[1]))
}

/// The grid's two 32-entry byte planes as 16-byte halves in both 128-bit lanes (the 5-bit
/// look-up, [`look_up_b5`]); for `bits < 4` the first half repeats entries `0..2^bits`.
#[inline]
#[target_feature(enable = "avx2")]
pub(super) fn plane_halves(planes: &[[u8; 256]; 2], bits: u32) -> [[__m256i; 2]; 2] {
    std::array::from_fn(|p| {
        std::array::from_fn(|h| {
            let period = if bits < 4 { 1usize << bits } else { 256 };
            let half: [u8; 16] = std::array::from_fn(|k| planes[p][(16 * h + k) % period]);
            // SAFETY: 16 bytes.
            let half = unsafe { _mm_loadu_si128(half.as_ptr() as *const __m128i) };
            _mm256_broadcastsi128_si256(half)
        })
    })
}

int_sums_kernel!(
    #[target_feature(enable = "avx2")]
    accumulate_i16_wide_avx2, __m256i, per: 1, regs: 2, zero: _mm256_setzero_si256(),
    decode: |block: &[u8], unit: usize, _dim: usize| decode_wide_avx2::<B>(block, unit, wide, &halves),
    weights: wide_weights, dot: madd_add, reduce: reduce_units,
    fsplat: _mm_set1_ps, cvt: _mm_cvtepi32_ps, fadd: _mm_add_ps, fmul: _mm_mul_ps,
    fload: _mm_loadu_ps, fstore: _mm_storeu_ps, wtype: super::IntWeights,
    extra: (wide: &[i32], halves: [[__m256i; 2]; 2])
);
