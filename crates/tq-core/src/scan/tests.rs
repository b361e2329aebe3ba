use super::*;
use crate::prefetch::Ahead;
use crate::rng::{SeededRng, stream};

/// SIMD and scalar accumulation differ only by summation order: each coordinate sums 32 terms,
/// so the difference is bounded by 32 · eps · Σ|w·c|.
#[test]
fn accumulate_parity_over_widths_and_dims() {
    let mut r = SeededRng::new(4, stream::DATA);
    // Miri interprets ~1000x slower: there, fewer widths and sizes still cover each path.
    let (widths, dims): (&[u32], &[usize]) = if cfg!(miri) {
        (&[1, 3, 4, 5], &[1, 7, 65])
    } else {
        (
            &[1, 2, 3, 4, 5, 6, 7, 8],
            &[1, 2, 3, 7, 8, 64, 65, 66, 128, 129],
        )
    };
    for &bits in widths {
        for &d in dims {
            let row_bytes = crate::bitpack::packed_len(d, bits);
            let mut block = vec![0u8; block_bytes(row_bytes)];
            let mut rows = Vec::new();
            for slot in 0..BLOCK {
                let codes: Vec<u8> = (0..d).map(|_| (r.next_u64() % (1 << bits)) as u8).collect();
                let mut packed = vec![0u8; row_bytes];
                crate::bitpack::pack(&codes, bits, &mut packed).unwrap();
                write_row(&mut block, slot, &packed);
                rows.push(codes);
            }
            let values: Vec<f32> = (0..1 << bits).map(|_| r.gaussian() as f32).collect();
            let mut weights = [0f32; BLOCK];
            for (i, w) in weights.iter_mut().enumerate() {
                *w = if i % 5 == 4 { 0.0 } else { r.uniform() as f32 };
            }
            let (mut a, mut b) = (vec![0.5f32; d], vec![0.5f32; d]);
            accumulate_blocks(&block, row_bytes, bits, &values, &weights, &mut a);
            accumulate_block_scalar(&block, bits, &values, &weights, &mut b);
            for j in 0..d {
                let want: f32 = 0.5
                    + rows
                        .iter()
                        .zip(&weights)
                        .map(|(c, w)| w * values[c[j] as usize])
                        .sum::<f32>();
                let mag: f32 = rows
                    .iter()
                    .zip(&weights)
                    .map(|(c, w)| (w * values[c[j] as usize]).abs())
                    .sum::<f32>()
                    + 0.5;
                let tol = 32.0 * f32::EPSILON * mag;
                assert!(
                    (a[j] - want).abs() <= tol && (b[j] - want).abs() <= tol,
                    "bits={bits} d={d} j={j}"
                );
            }
        }
    }
}

/// Any number of weight vectors (taken by the kernel in groups of up to four, every group served
/// by one decode) gives each one exactly what it gets alone, at every width (gathers at 6-8 bits),
/// with single vectors and, past four, a whole group weighing zero over the first blocks.
#[test]
fn accumulate_multi_equals_one_at_a_time() {
    let mut r = SeededRng::new(12, stream::DATA);
    let cases = (1..=8u32).flat_map(|b| [1usize, 2, 3, 4, 5, 7, 9].map(|nq| (b, nq)));
    for (bits, nq) in cases {
        let d = 40;
        let row_bytes = crate::bitpack::packed_len(d, bits);
        let n: usize = 70;
        let blocks: Vec<u8> = (0..n.div_ceil(BLOCK) * block_bytes(row_bytes))
            .map(|_| r.next_u64() as u8)
            .collect();
        let values: Vec<f32> = (0..1 << bits).map(|_| r.gaussian() as f32).collect();
        let ws: Vec<Vec<f32>> = (0..nq)
            .map(|q| {
                (0..n)
                    .map(|i| {
                        if i < 40 && (q % 3 == 1 || (nq > 4 && q < 4)) {
                            0.0
                        } else {
                            r.uniform() as f32
                        }
                    })
                    .collect()
            })
            .collect();
        let mut multi = vec![vec![0.0f32; d]; nq];
        {
            let wr: Vec<&[f32]> = ws.iter().map(|w| w.as_slice()).collect();
            let mut ar: Vec<&mut [f32]> = multi.iter_mut().map(|a| a.as_mut_slice()).collect();
            accumulate_blocks_multi(&blocks, row_bytes, bits, &values, None, &wr, &mut ar);
        }
        for (w, m) in ws.iter().zip(&multi) {
            let mut one = vec![0.0f32; d];
            accumulate_blocks(&blocks, row_bytes, bits, &values, w, &mut one);
            assert_eq!(&one, m, "bits={bits} queries={nq}");
        }
        // Row scales inside the kernel give exactly what pre-scaled weights give (SIMD path and
        // scalar twin: 70 rows leave a partial last block).
        let scales: Vec<f32> = (0..n).map(|_| 0.5 + r.uniform() as f32).collect();
        let mut inside = vec![vec![0.0f32; d]; nq];
        {
            let wr: Vec<&[f32]> = ws.iter().map(|w| w.as_slice()).collect();
            let mut ar: Vec<&mut [f32]> = inside.iter_mut().map(|a| a.as_mut_slice()).collect();
            accumulate_blocks_multi(
                &blocks,
                row_bytes,
                bits,
                &values,
                Some(&scales),
                &wr,
                &mut ar,
            );
        }
        for (w, m) in ws.iter().zip(&inside) {
            let pre: Vec<f32> = w.iter().zip(&scales).map(|(w, s)| w * s).collect();
            let mut one = vec![0.0f32; d];
            accumulate_blocks(&blocks, row_bytes, bits, &values, &pre, &mut one);
            assert_eq!(&one, m, "bits={bits} queries={nq} scaled");
            let mut twin = vec![0.0f32; d];
            for (bi, block) in blocks.chunks_exact(block_bytes(row_bytes)).enumerate() {
                let mut w32 = [0.0f32; BLOCK];
                let part = &pre[bi * BLOCK..((bi + 1) * BLOCK).min(n)];
                w32[..part.len()].copy_from_slice(part);
                accumulate_block_scalar(block, bits, &values, &w32, &mut twin);
            }
            for (a, b) in twin.iter().zip(m) {
                assert!((a - b).abs() <= 1e-4 * (1.0 + a.abs()), "bits={bits} twin");
            }
        }
    }
}

/// The `bits`-bit code of coordinate `j` of row `slot`, read from the block's nibbles (any width).
/// The specification of the layout that the SIMD kernels decode; O(bits).
fn code_at(block: &[u8], bits: u32, j: usize, slot: usize) -> usize {
    let start = bits as usize * j;
    let mut v = 0usize;
    let mut got = 0usize;
    let mut pos = start / 4;
    let mut off = start % 4;
    while got < bits as usize {
        v |= ((nibble(block, pos, slot) >> off) as usize) << got;
        got += 4 - off;
        off = 0;
        pos += 1;
    }
    v & ((1 << bits) - 1)
}

#[test]
fn code_at_reads_the_packed_layout() {
    let mut r = SeededRng::new(8, stream::DATA);
    for bits in 1..=8u32 {
        let d = 37;
        let row_bytes = crate::bitpack::packed_len(d, bits);
        let mut block = vec![0u8; block_bytes(row_bytes)];
        let codes: Vec<u8> = (0..d).map(|_| (r.next_u64() % (1 << bits)) as u8).collect();
        let mut packed = vec![0u8; row_bytes];
        crate::bitpack::pack(&codes, bits, &mut packed).unwrap();
        write_row(&mut block, 21, &packed);
        for (j, &c) in codes.iter().enumerate() {
            assert_eq!(code_at(&block, bits, j, 21), c as usize);
        }
    }
}

#[test]
fn accumulate_blocks_equals_block_by_block() {
    let mut r = SeededRng::new(6, stream::DATA);
    for bits in [1u32, 2, 3, 4, 6] {
        let d = 100;
        let row_bytes = crate::bitpack::packed_len(d, bits);
        let n: usize = 77;
        let blocks: Vec<u8> = (0..n.div_ceil(BLOCK) * block_bytes(row_bytes))
            .map(|_| r.next_u64() as u8)
            .collect();
        let values: Vec<f32> = (0..1 << bits).map(|_| r.gaussian() as f32).collect();
        let weights: Vec<f32> = (0..n)
            .map(|i| if i < 32 { 0.0 } else { r.uniform() as f32 })
            .collect();
        let mut a = vec![0.0f32; d];
        accumulate_blocks(&blocks, row_bytes, bits, &values, &weights, &mut a);
        let mut b = vec![0.0f32; d];
        for (blk, w) in blocks
            .chunks_exact(block_bytes(row_bytes))
            .zip(weights.chunks(BLOCK))
        {
            let mut w32 = [0.0f32; BLOCK];
            w32[..w.len()].copy_from_slice(w);
            accumulate_block_scalar(blk, bits, &values, &w32, &mut b);
        }
        let mag: f32 = b.iter().map(|x| x.abs()).sum::<f32>() / d as f32 + 1.0;
        for (x, y) in a.iter().zip(&b) {
            assert!((x - y).abs() <= 1e-4 * mag, "bits={bits}: {x} vs {y}");
        }
    }
}

#[test]
fn scan_b3_parity_over_awkward_sizes() {
    let dims: &[usize] = if cfg!(miri) {
        &[1, 5, 17, 65]
    } else {
        &[1, 4, 5, 7, 8, 15, 16, 17, 63, 64, 65, 127, 128, 129, 700]
    };
    for &d in dims {
        let row_bytes = crate::bitpack::packed_len(d, 3);
        let mut block = vec![0u8; block_bytes(row_bytes)];
        let mut rows = Vec::new();
        for slot in 0..BLOCK {
            let codes: Vec<u8> = random_bytes(d, 7 * d as u64 + slot as u64)
                .iter()
                .map(|c| c & 7)
                .collect();
            let mut packed = vec![0u8; row_bytes];
            crate::bitpack::pack(&codes, 3, &mut packed).unwrap();
            write_row(&mut block, slot, &packed);
            rows.push(codes);
        }
        let coords = coords3(row_bytes);
        let mut tables = random_bytes(16 * coords, 99 + d as u64);
        for j in d..coords {
            tables[16 * j..16 * j + 16].fill(0);
        }
        let (mut a, mut b) = ([0u32; BLOCK], [0u32; BLOCK]);
        scan_block_b3(&block, &tables, &mut a);
        scan_block_b3_scalar(&block, &tables, &mut b);
        assert_eq!(a, b, "d={d}");
        for (slot, codes) in rows.iter().enumerate() {
            let want: u32 = codes
                .iter()
                .enumerate()
                .map(|(j, &c)| tables[16 * j + c as usize] as u32)
                .sum();
            assert_eq!(b[slot], want, "d={d} slot {slot}");
        }
    }
}

/// The AVX2 5-bit scan equals its scalar twin, and both equal a direct sum over the unpacked
/// codes, over dimensions that leave partial groups of eight and padding codes; the `f32` twin
/// agrees on the same tables.
#[test]
fn scan_b5_parity_over_awkward_sizes() {
    let dims: &[usize] = if cfg!(miri) {
        &[1, 9, 17, 65]
    } else {
        &[1, 4, 5, 7, 8, 9, 15, 16, 17, 63, 64, 65, 127, 128, 129, 700]
    };
    for &d in dims {
        let row_bytes = crate::bitpack::packed_len(d, 5);
        let mut block = vec![0u8; block_bytes(row_bytes)];
        let mut rows = Vec::new();
        for slot in 0..BLOCK {
            let codes: Vec<u8> = random_bytes(d, 11 * d as u64 + slot as u64)
                .iter()
                .map(|c| c & 31)
                .collect();
            let mut packed = vec![0u8; row_bytes];
            crate::bitpack::pack(&codes, 5, &mut packed).unwrap();
            write_row(&mut block, slot, &packed);
            rows.push(codes);
        }
        let coords = coords5(row_bytes);
        assert!(coords >= d, "d={d}");
        let mut tables = random_bytes(32 * coords, 7 + d as u64);
        for j in d..coords {
            tables[32 * j..32 * j + 32].fill(0);
        }
        let (mut a, mut b) = ([0u32; BLOCK], [0u32; BLOCK]);
        scan_block_b5(&block, &tables, &mut a);
        scan_block_b5_scalar(&block, &tables, &mut b);
        assert_eq!(a, b, "d={d}");
        let float: Vec<f32> = tables.iter().map(|&t| t as f32).collect();
        let mut f = [0.0f32; BLOCK];
        scan_block_b5_f32(&block, &float, &mut f);
        for (slot, codes) in rows.iter().enumerate() {
            let want: u32 = codes
                .iter()
                .enumerate()
                .map(|(j, &c)| tables[32 * j + c as usize] as u32)
                .sum();
            assert_eq!(b[slot], want, "d={d} slot {slot}");
            assert_eq!(f[slot], want as f32, "d={d} slot {slot}");
        }
    }
}

/// The largest table entries in every position do not overflow the kernel's `u16` lanes: 700
/// coordinates (88 groups, more than two flushes) of 255 sum exactly.
#[test]
fn scan_b5_saturated_tables_sum_exactly() {
    let d = if cfg!(miri) { 80 } else { 700 };
    let row_bytes = crate::bitpack::packed_len(d, 5);
    let block = random_bytes(block_bytes(row_bytes), 3);
    let tables = vec![255u8; 32 * coords5(row_bytes)];
    let (mut a, mut b) = ([0u32; BLOCK], [0u32; BLOCK]);
    scan_block_b5(&block, &tables, &mut a);
    scan_block_b5_scalar(&block, &tables, &mut b);
    assert_eq!(a, b);
    assert!(a.iter().all(|&x| x == 255 * coords5(row_bytes) as u32));
}

fn random_bytes(n: usize, seed: u64) -> Vec<u8> {
    let mut r = SeededRng::new(seed, stream::DATA);
    (0..n).map(|_| r.next_u64() as u8).collect()
}

#[test]
fn write_read_round_trip() {
    for row_bytes in [1usize, 3, 8, 64, 65] {
        let mut block = vec![0u8; block_bytes(row_bytes)];
        let rows: Vec<Vec<u8>> = (0..BLOCK)
            .map(|i| random_bytes(row_bytes, i as u64))
            .collect();
        for (i, r) in rows.iter().enumerate() {
            write_row(&mut block, i, r);
        }
        // overwrite one slot: neighbours stay intact
        write_row(&mut block, 5, &rows[5]);
        let mut whole = vec![0xAAu8; block_bytes(row_bytes)];
        write_block(&rows[..20].concat(), row_bytes, &mut whole);
        for (i, r) in rows.iter().enumerate().skip(20) {
            write_row(&mut whole, i, r);
        }
        assert_eq!(whole, block);
        let mut out = vec![0u8; row_bytes];
        for (i, r) in rows.iter().enumerate() {
            read_row(&block, i, &mut out);
            assert_eq!(&out, r);
        }
    }
}

#[test]
fn scan_parity_over_awkward_sizes() {
    // row_bytes up to 300 exercises the u16 flush (positions/2 > 256).
    let sizes: &[usize] = if cfg!(miri) {
        &[1, 17, 300]
    } else {
        &[1, 7, 8, 15, 16, 17, 63, 64, 65, 127, 128, 129, 300]
    };
    for &row_bytes in sizes {
        let block = random_bytes(block_bytes(row_bytes), row_bytes as u64);
        let tables = random_bytes(block.len(), 1000 + row_bytes as u64);
        let (mut a, mut b) = ([0u32; BLOCK], [0u32; BLOCK]);
        scan_block(&block, &tables, &mut a);
        scan_block_scalar(&block, &tables, &mut b);
        assert_eq!(a, b, "row_bytes={row_bytes}");
        // and against an independent read-back of every row
        let mut row = vec![0u8; row_bytes];
        for (slot, &got) in b.iter().enumerate() {
            read_row(&block, slot, &mut row);
            let want: u32 = (0..2 * row_bytes)
                .map(|n| tables[16 * n + ((row[n / 2] >> (4 * (n % 2))) & 0x0F) as usize] as u32)
                .sum();
            assert_eq!(got, want);
        }
    }
}

/// Every entry of `q` (16-entry tables quantized from `tables`) decodes to within half a step of
/// its float.
fn assert_within_half_a_step(tables: &[f32], q: &QuantizedLut, what: &str) {
    for (n, t) in tables.chunks_exact(16).enumerate() {
        let lo = t.iter().copied().fold(f32::INFINITY, f32::min);
        for (v, &want) in t.iter().enumerate() {
            let back = lo + q.step * q.tables[16 * n + v] as f32;
            assert!(
                (back - want).abs() <= 0.5001 * q.step,
                "{what}: table {n} entry {v}"
            );
        }
    }
}

#[test]
fn quantized_lut_error_is_within_half_a_step_per_table() {
    let mut r = SeededRng::new(9, stream::DATA);
    let tables: Vec<f32> = (0..16 * 40).map(|_| r.gaussian() as f32).collect();
    let mut q = QuantizedLut::default();
    q.quantize_from(&tables);
    assert_within_half_a_step(&tables, &q, "u8");
}

/// Tables on a coarser grid keep the offsets, take the widest range over `max` as the step,
/// stay within `0..=max` and come within half a step of every float; at 255 they are the `u8`
/// tables.
#[test]
fn quantized_lut_to_a_coarser_grid_is_within_half_a_step() {
    let mut r = SeededRng::new(10, stream::DATA);
    let tables: Vec<f32> = (0..16 * 25).map(|_| r.gaussian() as f32).collect();
    let mut fine = QuantizedLut::default();
    fine.quantize_from(&tables);
    for max in [1u8, 2, 63, 64, 127, 255] {
        let mut q = QuantizedLut::default();
        q.quantize_tables_to(&tables, 16, max);
        assert_eq!(q.offset, fine.offset);
        assert!((q.step * max as f32 - fine.step * 255.0).abs() <= 1e-6 * fine.step * 255.0);
        assert!(q.tables.iter().all(|&t| t <= max) && q.tables.contains(&max));
        assert_within_half_a_step(&tables, &q, &format!("max {max}"));
        if max == 255 {
            assert_eq!(q.tables, fine.tables);
        }
    }
}

/// The fused scores kernel adds four steps' look-ups as bytes when every table entry is below
/// 64: with a unit affine and unit scales its scores are the exact scan sums for tables that
/// reach that limit (and one past it, and the larger limits), saturated and random, over step
/// counts with every remainder of 4, the largest one-pass block (128 steps: saturated sums of
/// 65 280) and ones past it and past the 256-step flush; alone, paired with a job of the same
/// limit (two queries per pass, as a top-k search runs them) and with a finest-grid job (the
/// pair then takes one step at a time); the marks follow the scores.
#[test]
fn blocks_scores_grouped_look_ups_equal_scan_sums() {
    let sizes: &[usize] = if cfg!(miri) {
        &[3, 300]
    } else {
        &[1, 2, 3, 4, 5, 6, 7, 8, 9, 25, 64, 128, 129, 300]
    };
    let unit = Affine {
        offset: 0.0,
        step: 1.0,
        bias: 0.0,
    };
    for &row_bytes in sizes {
        let rows = 2 * BLOCK + 5;
        let blocks = random_bytes(3 * block_bytes(row_bytes), 70 + row_bytes as u64);
        let scales = vec![1.0f32; rows];
        for top in [63u8, 64, 127, 128, 255] {
            for saturated in [false, true] {
                let tables: Vec<Vec<u8>> = (0..3u64)
                    .map(|q| {
                        let mut t: Vec<u8> = if saturated {
                            vec![top; block_bytes(row_bytes)]
                        } else {
                            random_bytes(block_bytes(row_bytes), 80 + q + row_bytes as u64)
                                .into_iter()
                                .map(|v| (v as u32 * (top as u32 + 1) / 256) as u8)
                                .collect()
                        };
                        let at = q as usize % t.len();
                        t[at] = top;
                        // The second job's tables stay on the finest grid: the pair of them
                        // must take the one-step path.
                        if q == 1 {
                            t[0] = 255;
                        }
                        t
                    })
                    .collect();
                let mut want = vec![vec![0.0f32; rows]; 3];
                for (q, t) in tables.iter().enumerate() {
                    let mut sums = [0u32; BLOCK];
                    for (b, block) in blocks.chunks_exact(block_bytes(row_bytes)).enumerate() {
                        scan_block_scalar(block, t, &mut sums);
                        for (i, &v) in sums.iter().enumerate() {
                            if b * BLOCK + i < rows {
                                want[q][b * BLOCK + i] = v as f32;
                            }
                        }
                    }
                }
                let above = want[0][rows / 2];
                // Alone: the grouping `top` allows.
                let mut got = vec![f32::NAN; rows];
                let mut masks = vec![0u32; rows.div_ceil(BLOCK)];
                scan_blocks_scores_above(
                    &blocks,
                    row_bytes,
                    &tables[0],
                    unit,
                    &scales,
                    &mut got,
                    (above, &mut masks),
                );
                assert_eq!(
                    got, want[0],
                    "row_bytes={row_bytes} top={top} sat={saturated}"
                );
                for (i, &v) in got.iter().enumerate() {
                    assert_eq!(masks[i / BLOCK] >> (i % BLOCK) & 1 == 1, v > above);
                }
                // Paired with a finest-grid job, then with one of the same limit.
                for other in [1, 2] {
                    let (mut a, mut b) = (vec![f32::NAN; rows], vec![f32::NAN; rows]);
                    let mut jobs = [
                        ScoreJob {
                            tables: &tables[0],
                            affine: unit,
                            out: &mut a,
                            marks: None,
                        },
                        ScoreJob {
                            tables: &tables[other],
                            affine: unit,
                            out: &mut b,
                            marks: None,
                        },
                    ];
                    scan_blocks_scores_multi(&blocks, row_bytes, &scales, &mut jobs, Ahead::NONE);
                    let what = format!("pair {other}, row_bytes={row_bytes} top={top}");
                    assert_eq!(a, want[0], "{what}");
                    assert_eq!(b, want[other], "{what}");
                }
            }
        }
    }
}

/// Every query of a multi-query scan equals its own scalar scan, for query counts that fill one
/// group, several groups and a partial last group, over sizes that cross the 256-step flush;
/// saturated tables (all 255) check the even-byte recovery at its largest sums.
#[test]
fn scan_multi_equals_one_query_at_a_time() {
    let sizes: &[usize] = if cfg!(miri) {
        &[1, 300]
    } else {
        &[1, 7, 16, 25, 64, 128, 129, 300]
    };
    let counts: &[usize] = if cfg!(miri) {
        &[1, 5]
    } else {
        &[1, 2, 3, 4, 5, 7, 9]
    };
    for &row_bytes in sizes {
        let block = random_bytes(block_bytes(row_bytes), 7 + row_bytes as u64);
        for &nq in counts {
            let tables: Vec<Vec<u8>> = (0..nq)
                .map(|q| {
                    if q == 1 {
                        vec![255u8; block.len()]
                    } else {
                        random_bytes(block.len(), 100 * q as u64 + row_bytes as u64)
                    }
                })
                .collect();
            let refs: Vec<&[u8]> = tables.iter().map(Vec::as_slice).collect();
            let mut got = vec![[0u32; BLOCK]; nq];
            scan_block_multi(&block, &refs, &mut got);
            for (q, t) in tables.iter().enumerate() {
                let mut want = [0u32; BLOCK];
                scan_block_scalar(&block, t, &mut want);
                assert_eq!(got[q], want, "row_bytes={row_bytes} queries={nq} q={q}");
            }
        }
    }
}

/// The fused block scores equal the scan's sums mapped through the affine by hand, for row
/// counts that end inside a block and sizes that cross the 256-step flush; the AVX2 body's FMAs
/// differ from the scalar twin by rounding only.
#[test]
fn blocks_scores_equal_scan_then_affine() {
    let mut r = SeededRng::new(21, stream::DATA);
    let sizes: &[usize] = if cfg!(miri) {
        &[1, 300]
    } else {
        &[1, 25, 64, 300]
    };
    let affine = Affine {
        offset: -3.25,
        step: 0.0137,
        bias: 0.5,
    };
    for &row_bytes in sizes {
        for rows in [1usize, 31, 32, 33, 100] {
            let blocks = random_bytes(
                rows.div_ceil(BLOCK) * block_bytes(row_bytes),
                3 + rows as u64,
            );
            let tables = random_bytes(block_bytes(row_bytes), 40 + row_bytes as u64);
            let scales: Vec<f32> = (0..rows).map(|_| r.uniform() as f32 + 0.5).collect();
            let (mut a, mut b) = (vec![f32::NAN; rows], vec![f32::NAN; rows]);
            scan_blocks_scores(&blocks, row_bytes, &tables, affine, &scales, &mut a);
            scan_blocks_scores_scalar(&blocks, row_bytes, &tables, affine, &scales, &mut b);
            // The marks are exactly the rows above a threshold inside the scores' range.
            let above = a.iter().copied().sum::<f32>() / rows as f32;
            let mut masks = vec![u32::MAX; rows.div_ceil(BLOCK)];
            let mut c = vec![0.0f32; rows];
            scan_blocks_scores_above(
                &blocks,
                row_bytes,
                &tables,
                affine,
                &scales,
                &mut c,
                (above, &mut masks),
            );
            assert_eq!(a, c);
            for (i, &v) in c.iter().enumerate() {
                assert_eq!(masks[i / BLOCK] >> (i % BLOCK) & 1 == 1, v > above, "i={i}");
            }
            for (blk, &m) in masks.iter().enumerate() {
                let n = (rows - blk * BLOCK).min(BLOCK);
                assert_eq!(m >> n.min(31) >> (n / 32), 0, "no marks past the last row");
            }
            let mut sums = [0u32; BLOCK];
            for (i, (&x, &y)) in a.iter().zip(&b).enumerate() {
                let blk = i / BLOCK;
                let bb = block_bytes(row_bytes);
                scan_block_scalar(&blocks[blk * bb..(blk + 1) * bb], &tables, &mut sums);
                let want = scales[i] as f64
                    * (affine.offset as f64 + affine.step as f64 * sums[i % BLOCK] as f64)
                    + affine.bias as f64;
                let tol = 1e-6 * (want.abs() + scales[i] as f64 * affine.offset.abs() as f64 + 1.0);
                assert!(
                    (x as f64 - want).abs() <= tol && (y as f64 - want).abs() <= tol,
                    "row_bytes={row_bytes} rows={rows} i={i}: {x} {y} {want}"
                );
            }
        }
    }
}

/// Every job of a fused multi-query scan gets the scores and marks it gets scanned alone, for job
/// counts that fill a group, several groups and a partial one, with and without marks.
#[test]
fn blocks_scores_multi_equal_one_job_at_a_time() {
    let mut r = SeededRng::new(22, stream::DATA);
    for (row_bytes, rows) in [(25usize, 100usize), (64, 32), (300, 33)] {
        let blocks = random_bytes(rows.div_ceil(BLOCK) * block_bytes(row_bytes), 5);
        let scales: Vec<f32> = (0..rows).map(|_| r.uniform() as f32 + 0.5).collect();
        for jobs in 1..=5usize {
            let tables: Vec<Vec<u8>> = (0..jobs)
                .map(|q| random_bytes(block_bytes(row_bytes), 60 + q as u64))
                .collect();
            let affines: Vec<Affine> = (0..jobs)
                .map(|q| Affine {
                    offset: -1.0 - q as f32,
                    step: 0.01 + 0.002 * q as f32,
                    bias: 0.25 * q as f32,
                })
                .collect();
            let mut alone = vec![vec![0.0f32; rows]; jobs];
            let mut alone_masks = vec![vec![0u32; rows.div_ceil(BLOCK)]; jobs];
            let mut above = vec![0.0f32; jobs];
            for q in 0..jobs {
                scan_blocks_scores(
                    &blocks,
                    row_bytes,
                    &tables[q],
                    affines[q],
                    &scales,
                    &mut alone[q],
                );
                above[q] = alone[q].iter().sum::<f32>() / rows as f32;
                mark_above(&alone[q], above[q], &mut alone_masks[q]);
            }
            let mut outs = vec![vec![f32::NAN; rows]; jobs];
            let mut masks = vec![vec![u32::MAX; rows.div_ceil(BLOCK)]; jobs];
            let mut list: Vec<ScoreJob<'_>> = outs
                .iter_mut()
                .zip(masks.iter_mut())
                .enumerate()
                .map(|(q, (out, m))| ScoreJob {
                    tables: &tables[q],
                    affine: affines[q],
                    out,
                    marks: (q % 2 == 0).then_some((above[q], m.as_mut_slice())),
                })
                .collect();
            scan_blocks_scores_multi(&blocks, row_bytes, &scales, &mut list, Ahead::NONE);
            drop(list);
            for q in 0..jobs {
                assert_eq!(outs[q], alone[q], "row_bytes={row_bytes} jobs={jobs} q={q}");
                if q % 2 == 0 {
                    assert_eq!(masks[q], alone_masks[q], "marks, jobs={jobs} q={q}");
                } else {
                    assert!(
                        masks[q].iter().all(|&m| m == u32::MAX),
                        "unmarked job untouched"
                    );
                }
            }
        }
    }
}

/// Every query of a multi-query 5-bit scan equals its own scalar scan, for 1-7 queries (full and
/// partial groups of three) over sizes with partial coordinate groups and padding, saturated
/// tables included.
#[test]
fn scan_b5_multi_equals_one_query_at_a_time() {
    let sizes: &[usize] = if cfg!(miri) {
        &[5, 41]
    } else {
        &[5, 7, 40, 41, 80, 163]
    };
    for &row_bytes in sizes {
        let block = random_bytes(block_bytes(row_bytes), 11 + row_bytes as u64);
        let len = 32 * coords5(row_bytes);
        for nq in 1..=7usize {
            let tables: Vec<Vec<u8>> = (0..nq)
                .map(|q| {
                    if q == 2 {
                        vec![255u8; len]
                    } else {
                        random_bytes(len, 300 + 10 * q as u64 + row_bytes as u64)
                    }
                })
                .collect();
            let refs: Vec<&[u8]> = tables.iter().map(Vec::as_slice).collect();
            let mut got = vec![[0u32; BLOCK]; nq];
            scan_block_b5_multi(&block, &refs, &mut got);
            for (q, t) in tables.iter().enumerate() {
                let mut want = [0u32; BLOCK];
                scan_block_b5_scalar(&block, t, &mut want);
                assert_eq!(got[q], want, "row_bytes={row_bytes} queries={nq} q={q}");
            }
        }
    }
}

/// The block dots of every width against the `code_at` specification, SIMD path and scalar twin.
#[test]
fn dot_block_codes_matches_the_layout_spec() {
    let mut r = SeededRng::new(8, stream::DATA);
    let dims: &[usize] = if cfg!(miri) {
        &[7]
    } else {
        &[1, 3, 7, 8, 64, 65, 128, 129]
    };
    for bits in 1u32..=8 {
        for &d in dims {
            let row_bytes = crate::bitpack::packed_len(d, bits);
            let block: Vec<u8> = (0..block_bytes(row_bytes))
                .map(|_| r.next_u64() as u8)
                .collect();
            let values: Vec<f32> = (0..1 << bits).map(|_| r.gaussian() as f32).collect();
            let q: Vec<f32> = (0..d).map(|_| r.gaussian() as f32).collect();
            let (mut a, mut b) = ([0f32; BLOCK], [0f32; BLOCK]);
            dot_block_codes(&block, bits, &values, &q, &mut a);
            dot_block_codes_scalar(&block, bits, &values, &q, &mut b);
            for slot in 0..BLOCK {
                let terms = (0..d).map(|j| q[j] * values[code_at(&block, bits, j, slot)]);
                let want: f32 = terms.clone().sum();
                let tol = d as f32 * f32::EPSILON * terms.map(f32::abs).sum::<f32>();
                assert!(
                    (a[slot] - want).abs() <= tol && (b[slot] - want).abs() <= tol,
                    "bits={bits} d={d} slot={slot}: {} {} {want}",
                    a[slot],
                    b[slot]
                );
            }
        }
    }
}

/// The integer dot kernel equals its scalar twin and an independent read-back of every row,
/// over awkward sizes (odd step counts, the `i16` flush every 16 positions) and extreme
/// weights, one query at a time and in groups.
#[test]
fn dot_nibbles_i8_parity_over_awkward_sizes() {
    let sizes: &[usize] = if cfg!(miri) {
        &[1, 3, 17]
    } else {
        &[1, 2, 3, 7, 8, 15, 16, 17, 31, 32, 33, 64, 65, 300]
    };
    let mut r = SeededRng::new(21, stream::DATA);
    for &row_bytes in sizes {
        let block = random_bytes(block_bytes(row_bytes), 77 + row_bytes as u64);
        let positions = 2 * row_bytes;
        let mut sets: Vec<Vec<i8>> = (0..4)
            .map(|_| (0..positions).map(|_| r.next_u64() as i8).collect())
            .collect();
        // Saturated weights and nibbles (the largest partial sums in magnitude).
        sets.push(vec![-128; positions]);
        sets.push(vec![127; positions]);
        let all_ones = vec![0xFFu8; block.len()];
        for blk in [&block, &all_ones] {
            let refs: Vec<&[i8]> = sets.iter().map(|w| &w[..]).collect();
            let mut many = vec![[0i32; BLOCK]; refs.len()];
            dot_nibbles_i8(blk, &refs, &mut many);
            let mut row = vec![0u8; row_bytes];
            for (w, got) in refs.iter().zip(&many) {
                let mut twin = [0i32; BLOCK];
                dot_nibbles_i8_scalar(blk, w, &mut twin);
                assert_eq!(got, &twin, "row_bytes={row_bytes}");
                let mut one = [[0i32; BLOCK]];
                dot_nibbles_i8(blk, &[w], &mut one);
                assert_eq!(&one[0], got, "row_bytes={row_bytes}, one query");
                for (slot, &g) in got.iter().enumerate() {
                    read_row(blk, slot, &mut row);
                    let want: i32 = (0..positions)
                        .map(|n| w[n] as i32 * ((row[n / 2] >> (4 * (n % 2))) & 0x0F) as i32)
                        .sum();
                    assert_eq!(g, want, "row_bytes={row_bytes} slot={slot}");
                }
            }
        }
    }
}

#[test]
#[should_panic(expected = "weights do not fit")]
fn dot_nibbles_i8_refuses_short_weights() {
    let block = vec![0u8; block_bytes(4)];
    let w = vec![0i8; 7];
    dot_nibbles_i8(&block, &[&w], &mut [[0i32; BLOCK]]);
}

/// Writing 4-bit codes straight into a block gives the block that packing the rows and
/// `write_block` give, for whole and partial blocks, odd and awkward dimensions (the SSE2
/// transpose covers 16 positions at a time, the scalar tail the rest), and its scalar twin
/// agrees.
#[test]
fn write_block_codes4_equals_packing_then_writing() {
    let mut r = SeededRng::new(31, stream::DATA);
    let dims: &[usize] = if cfg!(miri) {
        &[1, 17]
    } else {
        &[1, 2, 7, 15, 16, 17, 31, 32, 33, 64, 100, 128, 129]
    };
    for &d in dims {
        let rb = d.div_ceil(2);
        for n in [32usize, 31, 17, 1, 0] {
            let codes: Vec<u8> = (0..n * d).map(|_| (r.next_u64() % 16) as u8).collect();
            let mut packed = vec![0u8; n * rb];
            for (c, p) in codes.chunks_exact(d).zip(packed.chunks_exact_mut(rb)) {
                crate::bitpack::pack(c, 4, p).unwrap();
            }
            let mut want = vec![0u8; block_bytes(rb)];
            write_block(&packed, rb, &mut want);
            let (mut got, mut twin) = (vec![0xAAu8; want.len()], vec![0x55u8; want.len()]);
            write_block_codes4(&codes, d, &mut got);
            write_block_codes4_scalar(&codes, d, &mut twin);
            assert_eq!(got, want, "d {d} n {n}");
            assert_eq!(twin, want, "d {d} n {n}");
        }
    }
}

#[test]
#[should_panic(expected = "not whole rows")]
fn write_block_codes4_refuses_a_wrong_block() {
    write_block_codes4(&[0u8; 32 * 8], 8, &mut [0u8; 32 * 8]);
}

/// The AVX-512 VBMI decoders give exactly the floats of the AVX2 ones (byte planes at 5 bits,
/// gathers at 6-8) in the same order, so the value sums (1-6 weight vectors, with and without row
/// scales) and the exact 6-8-bit dots agree bit for bit; odd and even dimensions cover the paired
/// decode's lone last coordinate and 8 bits' one-load pairs; 8 bits also run an antisymmetric
/// table (the folded decode) and a near miss that must not fold. On a CPU without VBMI there is
/// no second path to compare, and the test says so on stderr.
#[cfg(target_arch = "x86_64")]
#[test]
fn vbmi_kernels_equal_avx2_bit_for_bit() {
    // The CPU's features, not `has_avx512_vbmi` (which `TQ_NO_AVX512` turns off).
    let vbmi = std::arch::is_x86_feature_detected!("avx2")
        && std::arch::is_x86_feature_detected!("fma")
        && std::arch::is_x86_feature_detected!("avx512f")
        && std::arch::is_x86_feature_detected!("avx512bw")
        && std::arch::is_x86_feature_detected!("avx512vbmi");
    if cfg!(miri) || !vbmi {
        eprintln!("no AVX-512 VBMI on this CPU: nothing to compare");
        return;
    }
    let mut r = SeededRng::new(31, stream::DATA);
    for bits in 5..=8u32 {
        for d in [1usize, 2, 3, 4, 5, 6, 7, 9, 33, 64, 65, 127, 128, 129] {
            let row_bytes = crate::bitpack::packed_len(d, bits);
            let n = 75usize;
            let blocks: Vec<u8> = (0..n.div_ceil(BLOCK) * block_bytes(row_bytes))
                .map(|_| r.next_u64() as u8)
                .collect();
            // At 8 bits three tables: a general one, an antisymmetric one (the folded decode) and
            // one whose last mirrored pair is one ulp off (no fold).
            let general: Vec<f32> = (0..1 << bits).map(|_| r.gaussian() as f32).collect();
            let mut tables = vec![general.clone()];
            if bits == 8 {
                let mut anti = general.clone();
                for k in 0..128 {
                    anti[255 - k] = -anti[k];
                }
                let mut near = anti.clone();
                near[128] = f32::from_bits(near[128].to_bits() + 1);
                tables.extend([anti, near]);
            }
            for (ti, values) in tables.iter().enumerate() {
                if bits == 8 {
                    // SAFETY: the CPU has AVX-512 F, BW and VBMI (checked above).
                    let folded = unsafe { super::avx512::WidePlanes::new(values) }.folded();
                    assert_eq!(folded, ti == 1, "d={d} table {ti}: antisymmetry found");
                }
                let scales: Vec<f32> = (0..n).map(|_| 0.5 + r.uniform() as f32).collect();
                for nq in [1usize, 2, 3, 4, 6] {
                    let ws: Vec<Vec<f32>> = (0..nq)
                        .map(|_| (0..n).map(|_| r.uniform() as f32).collect())
                        .collect();
                    for row_scales in [None, Some(scales.as_slice())] {
                        let run = |vbmi: bool| {
                            let mut out = vec![vec![0.25f32; d]; nq];
                            let wr: Vec<&[f32]> = ws.iter().map(|w| w.as_slice()).collect();
                            let mut ar: Vec<&mut [f32]> =
                                out.iter_mut().map(|a| a.as_mut_slice()).collect();
                            // SAFETY: AVX2, FMA and (for `vbmi`) AVX-512 VBMI are present; the
                            // blocks, weights, scales and accumulators have the checked shapes.
                            unsafe {
                                super::x86::accumulate_blocks_x86(
                                    &blocks, row_bytes, bits, values, row_scales, &wr, &mut ar,
                                    vbmi,
                                )
                            };
                            out
                        };
                        assert_eq!(run(false), run(true), "bits={bits} d={d} queries={nq}");
                    }
                }
                if bits >= 6 {
                    let q: Vec<f32> = (0..d).map(|_| r.gaussian() as f32).collect();
                    for block in blocks.chunks_exact(block_bytes(row_bytes)) {
                        let (mut a, mut b) = ([0f32; BLOCK], [0f32; BLOCK]);
                        // SAFETY: as above; `q` has d <= 8 · row_bytes / bits coordinates.
                        unsafe {
                            super::x86::dot_block_wide_x86(block, bits, values, &q, &mut a, false);
                            super::x86::dot_block_wide_x86(block, bits, values, &q, &mut b, true);
                        }
                        assert_eq!(a, b, "dot bits={bits} d={d}");
                    }
                }
            }
        }
    }
}

/// The affine map of job `q` in [`fused_scores_with_32_registers_equal_avx2`].
#[cfg(target_arch = "x86_64")]
fn test_affine(q: usize) -> Affine {
    Affine {
        offset: -2.0 + q as f32,
        step: 0.01 * (q + 1) as f32,
        bias: 0.5 * q as f32,
    }
}

/// One marked job per output: job `i` scans `tables[i]` with the affine map of job `first + i`.
#[cfg(target_arch = "x86_64")]
fn jobs_of<'a>(
    tables: &'a [Vec<u8>],
    first: usize,
    above: f32,
    out: &'a mut [Vec<f32>],
    masks: &'a mut [Vec<u32>],
) -> Vec<ScoreJob<'a>> {
    out.iter_mut()
        .zip(masks.iter_mut())
        .zip(tables)
        .enumerate()
        .map(|(i, ((o, m), t))| ScoreJob {
            tables: t,
            affine: test_affine(first + i),
            out: o.as_mut_slice(),
            marks: Some((above, m.as_mut_slice())),
        })
        .collect()
}

/// The fused score kernel compiled with AVX-512 VL (up to three jobs per pass) gives every job
/// the scores and marks of the AVX2 copy run one job at a time, with one-step and four-step
/// look-up grouping (tables below 64 for the latter), over sizes that cross the 256-step flush
/// and a partial last block. Without AVX-512 VL there is nothing to compare.
#[cfg(target_arch = "x86_64")]
#[test]
fn fused_scores_with_32_registers_equal_avx2() {
    use std::arch::is_x86_feature_detected as has;
    if cfg!(miri) || !(has!("avx2") && has!("fma") && has!("avx512f") && has!("avx512vl")) {
        eprintln!("no AVX-512 VL on this CPU: nothing to compare");
        return;
    }
    for row_bytes in [1usize, 7, 16, 64, 129, 300] {
        let rows = 3 * BLOCK - 5;
        let bl = block_bytes(row_bytes);
        let blocks = random_bytes(3 * bl, 70 + row_bytes as u64);
        let scales: Vec<f32> = (0..rows).map(|i| 0.5 + (i % 7) as f32 * 0.25).collect();
        for small in [false, true] {
            let tables: Vec<Vec<u8>> = (0..3)
                .map(|q| {
                    let t = random_bytes(bl, 80 + q as u64 + row_bytes as u64);
                    t.into_iter()
                        .map(|x| if small { x % 64 } else { x })
                        .collect()
                })
                .collect();
            let above = 0.5;
            let fresh = || (vec![vec![f32::NAN; rows]; 3], vec![vec![0u32; 3]; 3]);
            // Runs `$jobs` through the body `$f`, `$q` jobs per pass.
            // The AVX2 copy walks without prefetches, the VL copy asks for a second region (the
            // tables, as rows of some other data) as it goes: the same bits either way.
            macro_rules! go {
                ($f:ident, $q:literal, $jobs:expr, $ahead:expr) => {{
                    let jobs: &mut [ScoreJob<'_>; $q] =
                        $jobs.as_mut_slice().try_into().expect("job count");
                    // SAFETY: the CPU features are present (checked above); `blocks` holds one
                    // block of `bl` bytes per 32 of the `rows` rows, every table `bl` bytes,
                    // every output `rows` floats, every mask slice one entry per block, and
                    // `small` tables have every entry below 64, as four-step grouping needs.
                    unsafe {
                        if small {
                            super::x86::$f::<$q, 4>(&blocks, bl, &scales, jobs, $ahead)
                        } else {
                            super::x86::$f::<$q, 1>(&blocks, bl, &scales, jobs, $ahead)
                        }
                    }
                }};
            }
            // One job at a time through the AVX2 copy.
            let (mut want, mut want_masks) = fresh();
            for q in 0..3 {
                let (o, m) = (&mut want[q..q + 1], &mut want_masks[q..q + 1]);
                let mut job = jobs_of(&tables[q..], q, above, o, m);
                go!(scan_blocks_scores_avx2, 1, job, Ahead::NONE);
            }
            for n in 1..=3 {
                let (mut got, mut got_masks) = fresh();
                let mut jobs = jobs_of(&tables, 0, above, &mut got[..n], &mut got_masks[..n]);
                let ahead = Ahead::over(rows).with(&tables[0]).with(&scales);
                match n {
                    3 => go!(scan_blocks_scores_vl, 3, jobs, ahead),
                    2 => go!(scan_blocks_scores_vl, 2, jobs, ahead),
                    _ => go!(scan_blocks_scores_vl, 1, jobs, ahead),
                }
                drop(jobs);
                let what = format!("row_bytes={row_bytes} small={small} jobs={n}");
                assert_eq!(got[..n], want[..n], "{what}");
                assert_eq!(got_masks[..n], want_masks[..n], "{what}, marks");
                assert!(
                    want_masks.iter().flatten().any(|&m| m != 0),
                    "{what}: some row marked"
                );
            }
        }
    }
}

/// The AVX-512 VNNI nibble dots, and with BW and VBMI the `vpermb` body, equal the AVX2 ones (and
/// so the scalar twin: integer sums) over awkward step counts (every remainder of the four-step
/// group), one to three weight vectors per pass, random and saturated weights and nibbles.
/// Without VNNI there is nothing to compare.
#[cfg(target_arch = "x86_64")]
#[test]
fn vnni_dots_equal_avx2() {
    let vnni = std::arch::is_x86_feature_detected!("avx2")
        && std::arch::is_x86_feature_detected!("avx512f")
        && std::arch::is_x86_feature_detected!("avx512vl")
        && std::arch::is_x86_feature_detected!("avx512vnni");
    if cfg!(miri) || !vnni {
        eprintln!("no AVX-512 VNNI on this CPU: nothing to compare");
        return;
    }
    let vbmi = std::arch::is_x86_feature_detected!("avx512bw")
        && std::arch::is_x86_feature_detected!("avx512vbmi");
    let mut r = SeededRng::new(41, stream::DATA);
    for row_bytes in [1usize, 2, 3, 4, 5, 6, 7, 8, 9, 16, 31, 32, 33, 64, 65] {
        let positions = 2 * row_bytes;
        let random = random_bytes(block_bytes(row_bytes), 5 + row_bytes as u64);
        let ones = vec![0xFFu8; block_bytes(row_bytes)];
        let mut sets: Vec<Vec<i8>> = (0..3)
            .map(|_| (0..positions).map(|_| r.next_u64() as i8).collect())
            .collect();
        sets.push(vec![-128; positions]);
        sets.push(vec![127; positions]);
        for block in [&random, &ones] {
            for w in sets.windows(3) {
                let (a, b, c) = (&w[0][..], &w[1][..], &w[2][..]);
                let (mut x1, mut y1) = ([[0i32; BLOCK]; 1], [[0i32; BLOCK]; 1]);
                let (mut x2, mut y2) = ([[0i32; BLOCK]; 2], [[0i32; BLOCK]; 2]);
                let (mut x3, mut y3) = ([[0i32; BLOCK]; 3], [[0i32; BLOCK]; 3]);
                // SAFETY: the CPU features are present (checked above); every weight slice has
                // `block.len() / 16` entries of a block whose length is a multiple of 32.
                unsafe {
                    super::x86::dot_nibbles_i8_avx2::<1>(block, [a], &mut x1);
                    super::avx512::dot_nibbles_i8_vnni::<1>(block, [a], &mut y1);
                    super::x86::dot_nibbles_i8_avx2::<2>(block, [a, b], &mut x2);
                    super::avx512::dot_nibbles_i8_vnni::<2>(block, [a, b], &mut y2);
                    super::x86::dot_nibbles_i8_avx2::<3>(block, [a, b, c], &mut x3);
                    super::avx512::dot_nibbles_i8_vnni::<3>(block, [a, b, c], &mut y3);
                }
                assert_eq!(x1, y1, "row_bytes={row_bytes}");
                assert_eq!(x2, y2, "row_bytes={row_bytes}, two vectors");
                assert_eq!(x3, y3, "row_bytes={row_bytes}, three vectors");
                assert_eq!(x1[0], x3[0], "row_bytes={row_bytes}, first of three");
                if vbmi {
                    let (mut z1, mut z2, mut z3) =
                        ([[0i32; BLOCK]; 1], [[0i32; BLOCK]; 2], [[0i32; BLOCK]; 3]);
                    // SAFETY: as above, and AVX-512 BW and VBMI are present.
                    unsafe {
                        super::avx512::dot_nibbles_i8_vbmi::<1>(block, [a], &mut z1);
                        super::avx512::dot_nibbles_i8_vbmi::<2>(block, [a, b], &mut z2);
                        super::avx512::dot_nibbles_i8_vbmi::<3>(block, [a, b, c], &mut z3);
                    }
                    assert_eq!(x1, z1, "row_bytes={row_bytes}, VBMI");
                    assert_eq!(x2, z2, "row_bytes={row_bytes}, VBMI, two vectors");
                    assert_eq!(x3, z3, "row_bytes={row_bytes}, VBMI, three vectors");
                }
            }
        }
    }
}

/// Random weights for the integer dots, each chunk scaled so `Σ|w| · max|value|` sits at the
/// kernel's limit (the largest partial sums it accepts), or plain random ones within ±2047.
fn int_weights(r: &mut SeededRng, d: usize, max_abs: i64, at_limit: bool) -> Vec<i16> {
    let raw: Vec<i64> = (0..d)
        .map(|_| (r.next_u64() % 65535) as i64 - 32767)
        .collect();
    if !at_limit {
        // Within ±2047: a whole chunk stays inside the budget for any grid.
        return raw.iter().map(|&w| (w / 16) as i16).collect();
    }
    let budget = i64::from(i32::MAX) / max_abs.max(1);
    raw.chunks(INT_CHUNK)
        .flat_map(|c| {
            let l1: i64 = c.iter().map(|w| w.abs()).sum::<i64>().max(1);
            c.iter()
                .map(move |&w| (w * budget / l1).clamp(-32767, 32767) as i16)
        })
        .collect()
}

/// The largest `Σ|w|` of a chunk of weights.
fn chunk_l1(w: &[i16]) -> i64 {
    w.chunks(INT_CHUNK)
        .map(|c| c.iter().map(|&w| i64::from(w).abs()).sum())
        .max()
        .unwrap_or(0)
}

/// The integer dot kernel (the dispatching one, and on x86 each SIMD body it may pick) equals
/// its scalar twin bit for bit and an independent read-back of every row, at 5-8 bits over
/// awkward sizes (coordinate counts that leave a last unit of one to three coordinates; several
/// chunks, the last one partial; partial last blocks), with general, antisymmetric (folded at 8
/// bits) and nearly antisymmetric grids, random weights and weights at the overflow limit.
#[test]
fn int_dots_equal_the_scalar_twin_and_the_rows() {
    let mut r = SeededRng::new(51, stream::DATA);
    let dims: &[usize] = if cfg!(miri) {
        &[3]
    } else {
        &[1, 2, 3, 4, 5, 7, 9, 33, 64, 65, 127, 128, 129, 256, 301]
    };
    let affine = Affine {
        offset: 0.375,
        step: 1.0e-6,
        bias: -0.25,
    };
    for bits in 5..=8u32 {
        let n_values = 1usize << bits;
        for &d in dims {
            let row_bytes = crate::bitpack::packed_len(d, bits);
            let rows: usize = if cfg!(miri) { 33 } else { 75 };
            let bb = block_bytes(row_bytes);
            let blocks = random_bytes(rows.div_ceil(BLOCK) * bb, 9 + d as u64);
            let mut general: Vec<i16> = (0..n_values)
                .map(|_| ((r.next_u64() % 16383) as i32 - 8192) as i16)
                .collect();
            // The grid's extremes: -8192 (the mirror of 8191) sets the budget.
            (general[0], general[1]) = (-8192, 8191);
            let mut anti = general.clone();
            for k in 0..n_values / 2 {
                anti[n_values - 1 - k] = !anti[k];
            }
            let mut near = anti.clone();
            near[n_values / 2] ^= 1;
            for (ti, values) in [general, anti, near].into_iter().enumerate() {
                let book = IntCodebook::from_values(values, 0.001);
                assert_eq!(
                    book.folded(),
                    bits == 8 && ti == 1,
                    "bits={bits} table {ti}"
                );
                let scales: Vec<f32> = (0..rows).map(|_| 0.5 + r.uniform() as f32).collect();
                for at_limit in [false, true] {
                    let w = int_weights(&mut r, d, book.max_abs(), at_limit);
                    assert!(chunk_l1(&w) * book.max_abs() <= i64::from(i32::MAX));
                    let (mut a, mut b) = (vec![0f32; rows], vec![0f32; rows]);
                    #[rustfmt::skip]
                    dot_blocks_scores_i16(&blocks, row_bytes, bits, &book, &w, affine, &scales, &mut a);
                    #[rustfmt::skip]
                    dot_blocks_scores_i16_scalar(&blocks, row_bytes, bits, &book, &w, affine, &scales, &mut b);
                    let what = format!("bits={bits} d={d} table {ti} limit {at_limit}");
                    let bits_of = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                    assert_eq!(bits_of(&a), bits_of(&b), "{what}");
                    for (i, &got) in a.iter().enumerate() {
                        let block = &blocks[i / BLOCK * bb..(i / BLOCK + 1) * bb];
                        // Each chunk's exact sum (i64), then the chunks added in f32.
                        let sum = (0..d).step_by(INT_CHUNK).fold(0.0f32, |total, c| {
                            let chunk: i64 = (c..d.min(c + INT_CHUNK))
                                .map(|j| {
                                    let k = code_at(block, bits, j, i % BLOCK);
                                    i64::from(w[j]) * i64::from(book.values()[k])
                                })
                                .sum();
                            total + chunk as f32
                        });
                        let want = scales[i] * (affine.offset + affine.step * sum) + affine.bias;
                        assert_eq!(got.to_bits(), want.to_bits(), "{what} row {i}");
                    }
                    #[cfg(target_arch = "x86_64")]
                    int_dot_bodies_agree(&blocks, row_bytes, bits, &book, &w, &what);
                }
            }
        }
    }
}

/// Each x86 body of the integer dots the CPU can run gives the scalar twin's sums, for one
/// weight vector and for three per pass.
#[cfg(target_arch = "x86_64")]
fn int_dot_bodies_agree(
    blocks: &[u8],
    row_bytes: usize,
    bits: u32,
    book: &IntCodebook,
    w: &[i16],
    what: &str,
) {
    use std::arch::is_x86_feature_detected as has;
    if cfg!(miri) || !has!("avx2") {
        return;
    }
    let vnni = has!("avx512f")
        && has!("avx512bw")
        && has!("avx512vbmi")
        && has!("avx512vnni")
        && has!("gfni");
    for block in blocks.chunks_exact(block_bytes(row_bytes)) {
        let mut want = [0f32; BLOCK];
        super::kernels::dot_block_i16_scalar(block, bits, book.values(), w, &mut want);
        let want = want.map(f32::to_bits);
        let mut got = [[0f32; BLOCK]];
        // SAFETY: AVX2 is present; the block, weights and table have the checked shapes.
        unsafe {
            super::x86::dot_block_i16_avx2(block, bits, book.wide(), book.planes(), [w], &mut got)
        };
        assert_eq!(got[0].map(f32::to_bits), want, "{what}: AVX2");
        if vnni {
            // SAFETY: the AVX-512 features are present (checked above); shapes as above.
            unsafe {
                let planes = super::avx512::IntPlanes::new(book, bits);
                super::avx512::dot_block_i16_x86(block, bits, &planes, [w], &mut got);
            }
            assert_eq!(got[0].map(f32::to_bits), want, "{what}: AVX-512");
        }
        // Three weight vectors per pass (the negated weights have at most the same budget).
        let neg: Vec<i16> = w.iter().map(|&x| x.saturating_neg()).collect();
        let mut want_neg = [0f32; BLOCK];
        super::kernels::dot_block_i16_scalar(block, bits, book.values(), &neg, &mut want_neg);
        let want3 = [want, want_neg.map(f32::to_bits), want];
        let mut got3 = [[0f32; BLOCK]; 3];
        // SAFETY: as above; the three slices have one length.
        unsafe {
            super::x86::dot_block_i16_avx2(
                block,
                bits,
                book.wide(),
                book.planes(),
                [w, &neg, w],
                &mut got3,
            )
        };
        assert_eq!(
            got3.map(|g| g.map(f32::to_bits)),
            want3,
            "{what}: AVX2, three"
        );
        if vnni {
            // SAFETY: as above.
            unsafe {
                let planes = super::avx512::IntPlanes::new(book, bits);
                super::avx512::dot_block_i16_x86(block, bits, &planes, [w, &neg, w], &mut got3);
            }
            assert_eq!(
                got3.map(|g| g.map(f32::to_bits)),
                want3,
                "{what}: AVX-512, three"
            );
        }
    }
}

/// A codebook's grid is within half a step of every centroid, keeps an antisymmetric codebook's
/// symmetry as one's complement (so the 8-bit kernel folds), and a query's weights respect the
/// overflow budget per chunk, each within half a weight step of the query, with about 11 bits
/// per weight at any dimension.
#[test]
fn int_codebook_and_query_grids() {
    let mut r = SeededRng::new(52, stream::DATA);
    let mut half: Vec<f32> = (0..128).map(|_| r.gaussian().abs() as f32 * 0.1).collect();
    half.sort_by(f32::total_cmp);
    let centroids: Vec<f32> = half
        .iter()
        .rev()
        .map(|&c| -c)
        .chain(half.iter().copied())
        .collect();
    let book = IntCodebook::from_centroids(&centroids);
    assert!(book.folded(), "an antisymmetric codebook folds");
    for (&c, &m) in centroids.iter().zip(book.values()) {
        let v = (f64::from(m) + 0.5) * f64::from(book.step());
        let err = (v - f64::from(c)).abs();
        assert!(err <= 0.5 * f64::from(book.step()) * 1.0001, "{c} as {v}");
        assert!(i32::from(m).abs() <= INT_CODE_MAX + 1);
    }
    let mut skew = centroids.clone();
    skew[200] += 1e-3;
    assert!(!IntCodebook::from_centroids(&skew).folded());
    for d in [1usize, 3, 64, 128, 1000, 300_000] {
        let mut q: Vec<f32> = (0..d).map(|_| r.gaussian() as f32).collect();
        if d == 3 {
            q[1] = 1.0e6; // one dominant coordinate: the i16 range binds, not the budget
        }
        let iq = book.quantize_query(&q);
        let l1 = chunk_l1(&iq.weights);
        assert!(l1 <= INT_WEIGHT_BUDGET, "d={d}: {l1}");
        assert!(l1 * book.max_abs() <= i64::from(i32::MAX));
        if d >= 1000 {
            let mean = iq.weights.iter().map(|&w| f64::from(w).abs()).sum::<f64>() / d as f64;
            assert!(mean > 1000.0, "d={d}: mean weight {mean}");
        }
        let s = iq.step / book.step();
        for (&x, &w) in q.iter().zip(&iq.weights) {
            assert!(
                (f32::from(w) * s - x).abs() <= 0.5 * s * 1.001,
                "d={d}: {x} as {w}"
            );
        }
        // The affine map reproduces the dot of the query's weights with the grid's values.
        let codes: Vec<usize> = (0..d).map(|_| (r.next_u64() % 256) as usize).collect();
        let sum: i64 = codes
            .iter()
            .zip(&iq.weights)
            .map(|(&k, &w)| i64::from(w) * i64::from(book.values()[k]))
            .sum();
        let got = f64::from(iq.offset) + f64::from(iq.step) * sum as f64;
        let want: f64 = codes
            .iter()
            .zip(&iq.weights)
            .map(|(&k, &w)| f64::from(w) * f64::from(s) * (f64::from(book.values()[k]) + 0.5))
            .sum::<f64>()
            * f64::from(book.step());
        let scale: f64 = codes
            .iter()
            .zip(&iq.weights)
            .map(|(&k, &w)| (f64::from(w) * f64::from(s) * f64::from(book.values()[k])).abs())
            .sum::<f64>()
            * f64::from(book.step());
        assert!((got - want).abs() <= 1e-5 * scale, "d={d}: {got} vs {want}");
    }
    let zero = IntCodebook::from_centroids(&[0.0; 4]).quantize_query(&[0.0; 4]);
    assert_eq!(zero.weights, [0; 4]);
}

#[test]
#[should_panic(expected = "could overflow an i32 dot")]
fn int_dots_refuse_weights_past_the_budget() {
    let book = IntCodebook::from_values(vec![INT_CODE_MAX as i16; 256], 1.0);
    let w = vec![32767i16; 16]; // one chunk: 16 · 32767 · 8191 > 2^31
    let mut out = [0f32; BLOCK];
    let blocks = vec![0u8; block_bytes(16)];
    let affine = Affine {
        offset: 0.0,
        step: 1.0,
        bias: 0.0,
    };
    dot_blocks_scores_i16(&blocks, 16, 8, &book, &w, affine, &[1.0; BLOCK], &mut out);
}

/// Several queries per pass (groups of up to three, any remainder) give each query the scores
/// it gets alone, bit for bit, at 5-8 bits over sizes with odd pairs and several chunks.
#[test]
fn int_dots_multi_equal_one_query_at_a_time() {
    let mut r = SeededRng::new(53, stream::DATA);
    let dims: &[usize] = if cfg!(miri) {
        &[3]
    } else {
        &[1, 3, 64, 129, 301]
    };
    for bits in 5..=8u32 {
        for &d in dims {
            let row_bytes = crate::bitpack::packed_len(d, bits);
            let rows = 70usize;
            let bb = block_bytes(row_bytes);
            let blocks = random_bytes(rows.div_ceil(BLOCK) * bb, 99 + d as u64);
            let centroids: Vec<f32> = (0..1 << bits).map(|_| r.gaussian() as f32).collect();
            let book = IntCodebook::from_centroids(&centroids);
            let scales: Vec<f32> = (0..rows).map(|_| 0.5 + r.uniform() as f32).collect();
            let queries: Vec<IntQuery> = (0..5)
                .map(|_| {
                    let q: Vec<f32> = (0..d).map(|_| r.gaussian() as f32).collect();
                    book.quantize_query(&q)
                })
                .collect();
            let affine = |q: &IntQuery| Affine {
                offset: q.offset,
                step: q.step,
                bias: 0.125,
            };
            let alone: Vec<Vec<u32>> = queries
                .iter()
                .map(|q| {
                    let mut o = vec![0f32; rows];
                    #[rustfmt::skip]
                    dot_blocks_scores_i16(&blocks, row_bytes, bits, &book, &q.weights, affine(q), &scales, &mut o);
                    o.iter().map(|x| x.to_bits()).collect()
                })
                .collect();
            for n in 1..=queries.len() {
                let mut outs = vec![vec![0f32; rows]; n];
                let mut jobs: Vec<IntJob<'_>> = queries[..n]
                    .iter()
                    .zip(outs.iter_mut())
                    .map(|(q, o)| IntJob {
                        weights: &q.weights,
                        affine: affine(q),
                        out: o,
                    })
                    .collect();
                // Asking for a second region's rows as the blocks are walked changes nothing.
                let ahead = Ahead::over(rows + n).with(&scales).with(&blocks);
                dot_blocks_scores_i16_multi(
                    &blocks, row_bytes, bits, &book, &scales, &mut jobs, ahead,
                );
                for (k, o) in outs.iter().enumerate() {
                    let got: Vec<u32> = o.iter().map(|x| x.to_bits()).collect();
                    assert_eq!(got, alone[k], "bits={bits} d={d} {n} jobs, job {k}");
                }
            }
        }
    }
}

/// Sums at the edge of `i32`: every code the grid's extreme value (all-ones blocks index the
/// last entry), every weight of one sign and the largest magnitude the budget allows (including
/// -32768 where it fits), so each row's chunk sum lands within one product of `±(2^31 - 1)`;
/// the kernel (every x86 body the CPU runs) and the scalar twin give the exact value.
#[test]
fn int_dots_reach_the_i32_limit_exactly() {
    for bits in 5..=8u32 {
        for (last, sign) in [(-8192i16, 1i64), (-8192, -1), (8191, 1), (8191, -1)] {
            let n_values = 1usize << bits;
            let mut values = vec![0i16; n_values];
            values[n_values - 1] = last;
            let book = IntCodebook::from_values(values, 1.0);
            // d = 4: weights clamp at -32768 / 32767, short of the edge.
            for d in [4usize, 8, 16, 128, 200] {
                let row_bytes = crate::bitpack::packed_len(d, bits);
                let blocks = vec![0xFFu8; block_bytes(row_bytes)];
                // Per chunk, weights of one sign summing to the budget.
                let budget = i64::from(i32::MAX) / book.max_abs();
                let w: Vec<i16> = (0..d)
                    .map(|j| {
                        let len = (d - j / INT_CHUNK * INT_CHUNK).min(INT_CHUNK) as i64;
                        let base = budget / len;
                        let extra = i64::from(((j % INT_CHUNK) as i64) < budget % len);
                        let m = (base + extra).min(32768);
                        if sign < 0 {
                            (-m) as i16
                        } else {
                            m.min(32767) as i16
                        }
                    })
                    .collect();
                assert!(chunk_l1(&w) * book.max_abs() <= i64::from(i32::MAX));
                let affine = Affine {
                    offset: 0.0,
                    step: 1.0,
                    bias: 0.0,
                };
                let ones = [1.0f32; BLOCK];
                let (mut a, mut b) = ([0f32; BLOCK], [0f32; BLOCK]);
                #[rustfmt::skip]
                dot_blocks_scores_i16(&blocks, row_bytes, bits, &book, &w, affine, &ones, &mut a);
                #[rustfmt::skip]
                dot_blocks_scores_i16_scalar(&blocks, row_bytes, bits, &book, &w, affine, &ones, &mut b);
                let want = w.chunks(INT_CHUNK).fold(0.0f32, |t, c| {
                    let s: i64 = c.iter().map(|&x| i64::from(x) * i64::from(last)).sum();
                    assert!(s.abs() <= i64::from(i32::MAX));
                    if d >= 8 {
                        let edge = i64::from(i32::MAX) - 32768 * 8192;
                        assert!(s.abs() > edge, "not at the edge");
                    }
                    t + s as f32
                });
                let what = format!("bits={bits} last={last} sign={sign} d={d}");
                assert!(
                    a.iter().chain(&b).all(|&x| x == want),
                    "{what}: {a:?} vs {want}"
                );
                #[cfg(target_arch = "x86_64")]
                int_dot_bodies_agree(&blocks, row_bytes, bits, &book, &w, &what);
            }
        }
    }
}

/// The shipped 8-bit Lloyd-Max codebooks are antisymmetric, so their grids fold (one byte
/// permute per plane in the 8-bit kernel).
#[test]
fn shipped_8_bit_grids_fold() {
    for d in [2usize, 64, 128, 256, 1536] {
        let c = crate::Codebook::get(d, 8).unwrap();
        assert!(IntCodebook::from_centroids(c.centroids()).folded(), "d={d}");
    }
}

/// The integer weighted sums of 1- to 8-bit codes: the dispatching kernel, its scalar twin,
/// every x86 body the CPU runs (one and three weight vectors per pass) and an independent
/// read-back of the rows give the same bits, over odd dimensions (a lone last nibble position or
/// coordinate of a pair), partial last blocks and chunks, zero blocks, and sums at the edge of
/// `i32`.
#[test]
fn int_sums_equal_the_scalar_twin_and_the_rows() {
    let mut r = SeededRng::new(61, stream::DATA);
    let (dims, row_counts): (&[usize], &[usize]) = if cfg!(miri) {
        (&[3], &[33])
    } else {
        (
            &[1, 2, 3, 4, 5, 7, 8, 9, 15, 16, 17, 33, 63, 64, 65, 128, 129],
            &[1, 31, 32, 129, 300],
        )
    };
    let mut grids = Vec::new();
    for bits in 1..=8u32 {
        let mut values: Vec<i16> = (0..1 << bits)
            .map(|_| ((r.next_u64() % 16383) as i32 - 8192) as i16)
            .collect();
        // Code 0 is the grid's most negative value: all-zero blocks sum at the budget's edge.
        values[0] = -8192;
        if bits == 8 {
            // An antisymmetric 8-bit grid too: its look-up folds (one `vpermi2b` per plane).
            let mut folded = values.clone();
            for k in 0..128 {
                folded[255 - k] = !folded[k];
            }
            let book = IntCodebook::from_values(folded, 0.001);
            assert!(book.folded());
            grids.push((bits, book));
        }
        if bits == 5 {
            // A grid longer than the codes need: a 5-bit code's stray sixth bit must not reach
            // its upper half.
            let mut long = values.clone();
            long.extend(values.iter().map(|v| v / 2 + 77));
            grids.push((bits, IntCodebook::from_values(long, 0.001)));
        }
        grids.push((bits, IntCodebook::from_values(values, 0.001)));
    }
    for (bits, book) in grids {
        for &d in dims {
            let row_bytes = crate::bitpack::packed_len(d, bits);
            let bb = block_bytes(row_bytes);
            for &rows in row_counts {
                let nb = rows.div_ceil(BLOCK);
                for case in 0..3 {
                    let blocks = match case {
                        2 => vec![0u8; nb * bb],
                        _ => random_bytes(nb * bb, 5 + d as u64 + rows as u64),
                    };
                    // Case 0: random signed weights with zero runs; 1: one dominant weight per
                    // chunk; 2: flat positive weights, each chunk's sum at the budget.
                    let w: Vec<f32> = (0..rows)
                        .map(|i| match case {
                            // Zero runs of 130 rows: some blocks, and a whole chunk (128-255).
                            0 if (i / 130) % 3 == 1 => 0.0,
                            0 => r.gaussian() as f32,
                            1 if i % INT_CHUNK == 7 => 3.0e4,
                            1 => r.uniform() as f32 * 1e-3,
                            _ => 1.0,
                        })
                        .collect();
                    let scales: Vec<f32> = (0..rows).map(|_| 0.5 + r.uniform() as f32).collect();
                    let iw = book
                        .quantize_weights(&w, Some(&scales))
                        .expect("finite weights");
                    let what = format!("bits={bits} d={d} rows={rows} case {case}");
                    let start: Vec<f32> = (0..d).map(|j| j as f32 * 0.25).collect();
                    let (mut a, mut b) = (start.clone(), start.clone());
                    accumulate_blocks_i16(&blocks, row_bytes, bits, &book, &[&iw], &mut [&mut a]);
                    accumulate_blocks_i16_scalar(&blocks, row_bytes, bits, &book, &iw, &mut b);
                    assert_eq!(bits_of(&a), bits_of(&b), "{what}");
                    // Independent read-back: each chunk's exact sum in i64, checked to fit i32.
                    let mut local = vec![0.0f32; d];
                    for (c, &(offset, step)) in iw.chunks.iter().enumerate() {
                        for (j, l) in local.iter_mut().enumerate() {
                            let sum: i64 = (c * INT_CHUNK..((c + 1) * INT_CHUNK).min(nb * BLOCK))
                                .map(|i| {
                                    let block = &blocks[i / BLOCK * bb..(i / BLOCK + 1) * bb];
                                    let k = code_at(block, bits, j, i % BLOCK);
                                    i64::from(iw.weights[i]) * i64::from(book.values()[k])
                                })
                                .sum();
                            let sum = i32::try_from(sum).expect("a chunk's sum fits i32");
                            *l += offset + step * sum as f32;
                        }
                    }
                    let want: Vec<f32> = start.iter().zip(&local).map(|(s, l)| s + l).collect();
                    assert_eq!(bits_of(&a), bits_of(&want), "{what}");
                    #[cfg(target_arch = "x86_64")]
                    int_sum_bodies_agree(&blocks, row_bytes, bits, &book, &iw, &b, &what);
                }
            }
        }
    }
}

fn bits_of(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

/// Each x86 body of the integer sums the CPU can run gives the scalar twin's bits for one weight
/// vector, for two per pass (the same weights, so whole chunks are skipped) and for three (the
/// second with other weights).
#[cfg(target_arch = "x86_64")]
fn int_sum_bodies_agree(
    blocks: &[u8],
    row_bytes: usize,
    bits: u32,
    book: &IntCodebook,
    iw: &IntWeights,
    want: &[f32],
    what: &str,
) {
    use std::arch::is_x86_feature_detected as has;
    if cfg!(miri) || !has!("avx2") {
        return;
    }
    let d = want.len();
    let start: Vec<f32> = (0..d).map(|j| j as f32 * 0.25).collect();
    let rows = iw.padded_len();
    let other: Vec<f32> = (0..rows).map(|i| ((i * 7919) % 97) as f32 - 48.0).collect();
    let iw2 = book.quantize_weights(&other, None).expect("finite");
    let mut want2 = start.clone();
    accumulate_blocks_i16_scalar(blocks, row_bytes, bits, book, &iw2, &mut want2);
    let codes = super::kernels::IntSumCodes { blocks, row_bytes };
    let vnni = has!("avx512f") && has!("avx512bw") && has!("avx512vnni");
    let vbmi = vnni && has!("avx512vbmi") && has!("gfni");
    for body in 0..2 {
        if body == 1 && !(if bits == 4 { vnni } else { vbmi }) {
            continue;
        }
        let mut one = [start.clone()];
        let mut two = [start.clone(), start.clone()];
        let mut three = [start.clone(), start.clone(), start.clone()];
        {
            let mut a1: [&mut [f32]; 1] = one.each_mut().map(|v| v.as_mut_slice());
            let mut a2: [&mut [f32]; 2] = two.each_mut().map(|v| v.as_mut_slice());
            let mut a3: [&mut [f32]; 3] = three.each_mut().map(|v| v.as_mut_slice());
            // Two vectors with the same zero runs (whole chunks skipped), three with another.
            let (w2, ws) = ([iw, iw], [iw, &iw2, iw]);
            // SAFETY: the CPU features were checked above; the arguments passed the public
            // kernel's checks in the caller.
            unsafe {
                match (bits, body) {
                    (4, 0) => {
                        use super::x86::accumulate_i16_avx2 as f;
                        let planes = super::x86::nibble_planes_avx2(book.planes());
                        f::<4, 1>(codes, planes, [iw], &mut a1);
                        f::<4, 2>(codes, planes, w2, &mut a2);
                        f::<4, 3>(codes, planes, ws, &mut a3);
                    }
                    (4, _) => {
                        use super::avx512::accumulate_i16_vnni as f;
                        let planes = super::avx512::nibble_planes_512(book.planes());
                        f::<4, 1>(codes, planes, [iw], &mut a1);
                        f::<4, 2>(codes, planes, w2, &mut a2);
                        f::<4, 3>(codes, planes, ws, &mut a3);
                    }
                    (_, 0) => {
                        let halves = super::x86::plane_halves(book.planes(), bits);
                        wide_avx2(bits, codes, book.wide(), halves, [iw], &mut a1);
                        wide_avx2(bits, codes, book.wide(), halves, w2, &mut a2);
                        wide_avx2(bits, codes, book.wide(), halves, ws, &mut a3);
                    }
                    _ => {
                        let planes = super::avx512::IntPlanes::new(book, bits);
                        wide_vnni(bits, codes, &planes, [iw], &mut a1);
                        wide_vnni(bits, codes, &planes, w2, &mut a2);
                        wide_vnni(bits, codes, &planes, ws, &mut a3);
                    }
                }
            }
        }
        assert_eq!(bits_of(&one[0]), bits_of(want), "{what} body {body}");
        for (k, t) in two.iter().enumerate() {
            assert_eq!(bits_of(t), bits_of(want), "{what} body {body} {k} of 2");
        }
        assert_eq!(
            bits_of(&three[0]),
            bits_of(want),
            "{what} body {body} first of 3"
        );
        assert_eq!(
            bits_of(&three[1]),
            bits_of(&want2),
            "{what} body {body} second of 3"
        );
        assert_eq!(
            bits_of(&three[2]),
            bits_of(want),
            "{what} body {body} third of 3"
        );
    }
}

/// The AVX2 wide body at `bits` (1-3 or 5-8).
///
/// # Safety
/// AVX2; the arguments as the body's.
#[cfg(target_arch = "x86_64")]
unsafe fn wide_avx2<const Q: usize>(
    bits: u32,
    codes: super::kernels::IntSumCodes<'_>,
    wide: &[i32],
    halves: [[std::arch::x86_64::__m256i; 2]; 2],
    ws: [&IntWeights; Q],
    accs: &mut [&mut [f32]; Q],
) {
    use super::x86::accumulate_i16_wide_avx2 as f;
    // SAFETY: the caller's contract.
    unsafe {
        match bits {
            1 => f::<1, Q>(codes, wide, halves, ws, accs),
            2 => f::<2, Q>(codes, wide, halves, ws, accs),
            3 => f::<3, Q>(codes, wide, halves, ws, accs),
            5 => f::<5, Q>(codes, wide, halves, ws, accs),
            6 => f::<6, Q>(codes, wide, halves, ws, accs),
            7 => f::<7, Q>(codes, wide, halves, ws, accs),
            _ => f::<8, Q>(codes, wide, halves, ws, accs),
        }
    }
}

/// The AVX-512 wide body at `bits` (1-3 or 5-8).
///
/// # Safety
/// AVX2, AVX-512 F, BW, VBMI and VNNI, and GFNI; the arguments as the body's.
#[cfg(target_arch = "x86_64")]
unsafe fn wide_vnni<const Q: usize>(
    bits: u32,
    codes: super::kernels::IntSumCodes<'_>,
    planes: &super::avx512::IntPlanes,
    ws: [&IntWeights; Q],
    accs: &mut [&mut [f32]; Q],
) {
    use super::avx512::accumulate_i16_wide_vnni as f;
    // SAFETY: the caller's contract.
    unsafe {
        match bits {
            1 => f::<1, Q>(codes, planes, ws, accs),
            2 => f::<2, Q>(codes, planes, ws, accs),
            3 => f::<3, Q>(codes, planes, ws, accs),
            5 => f::<5, Q>(codes, planes, ws, accs),
            6 => f::<6, Q>(codes, planes, ws, accs),
            7 => f::<7, Q>(codes, planes, ws, accs),
            _ => f::<8, Q>(codes, planes, ws, accs),
        }
    }
}

/// `quantize_weights`: within half a step of each weight, every chunk within the budget, zero
/// blocks inactive, `None` for non-finite products and vanishing weights.
#[test]
fn int_weights_stay_in_budget_and_near_the_weights() {
    let mut r = SeededRng::new(62, stream::DATA);
    let book = IntCodebook::from_values((0..16).map(|k| k * 100 - 800).collect(), 0.01);
    let rows: usize = 1000;
    for case in 0..3 {
        let w: Vec<f32> = (0..rows)
            .map(|i| match case {
                0 => r.gaussian() as f32,
                1 if (200..300).contains(&i) => 0.0,
                1 => (r.uniform() as f32).powi(8),
                _ => 1.0e30,
            })
            .collect();
        let iw = book.quantize_weights(&w, None).expect("finite");
        assert_eq!(iw.padded_len(), rows.div_ceil(BLOCK) * BLOCK);
        assert!(iw.weights[rows..].iter().all(|&x| x == 0));
        for (c, &(offset, step)) in iw.chunks.iter().enumerate() {
            let ws = &iw.weights[c * INT_CHUNK..((c + 1) * INT_CHUNK).min(rows)];
            let l1: i64 = ws.iter().map(|&x| i64::from(x).abs()).sum();
            assert!(l1 <= INT_WEIGHT_BUDGET, "case {case} chunk {c}: {l1}");
            assert!(ws.iter().all(|&x| x != i16::MIN));
            let s = f64::from(step) / f64::from(book.step());
            for (i, &x) in ws.iter().enumerate() {
                let want = f64::from(w[c * INT_CHUNK + i]);
                let err = (f64::from(x) * s - want).abs();
                // Half a step, plus the f32 product's rounding (2^-23 of at most 32767 steps).
                assert!(err <= 0.505 * s, "case {case} row {i}: {err} vs {s}");
            }
            let total: i64 = ws.iter().map(|&x| i64::from(x)).sum();
            let want_offset = 0.5 * total as f64 * f64::from(step);
            assert!((f64::from(offset) - want_offset).abs() <= 1e-6 * want_offset.abs() + 1e-30);
        }
        for (b, &a) in iw.active.iter().enumerate() {
            let any = iw.weights[b * BLOCK..(b + 1) * BLOCK]
                .iter()
                .any(|&x| x != 0);
            assert_eq!(a, any, "case {case} block {b}");
        }
        if case == 1 {
            assert!(!iw.active[7] && !iw.active[8], "rows 224-287 weigh nothing");
        }
    }
    // A chunk of weights near 1e-39 (a subnormal f32 step) beside a chunk near 1, and a chunk
    // of zeros: every chunk still within its limits, the tiny one's steps taken in f64.
    let mixed: Vec<f32> = (0..3 * INT_CHUNK)
        .map(|i| match i / INT_CHUNK {
            0 => 1.0e-39 * (1.0 + (i % 7) as f32),
            1 => 0.0,
            _ => 0.5 + (i % 5) as f32,
        })
        .collect();
    let iw = book
        .quantize_weights(&mixed, None)
        .expect("normal largest weight");
    for (c, ws) in iw.weights.chunks(INT_CHUNK).enumerate() {
        let l1: i64 = ws.iter().map(|&x| i64::from(x).abs()).sum();
        assert!(
            l1 <= INT_WEIGHT_BUDGET && ws.iter().all(|&x| x != i16::MIN),
            "chunk {c}"
        );
    }
    assert!(
        iw.weights[..INT_CHUNK].iter().all(|&x| x > 0),
        "tiny weights kept"
    );
    assert_eq!(iw.chunks[1], (0.0, 0.0));
    assert!(iw.weights[INT_CHUNK..2 * INT_CHUNK].iter().all(|&x| x == 0));
    assert!(book.quantize_weights(&[1.0, f32::NAN], None).is_none());
    assert!(
        book.quantize_weights(&[f32::MAX, 2.0], Some(&[1.0, 4.0]))
            .is_some()
    );
    assert!(
        book.quantize_weights(&[f32::MAX, 1.0], Some(&[4.0, 1.0]))
            .is_none()
    );
    assert!(book.quantize_weights(&[1.0e-38, 0.0], None).is_none());
    let empty = book.quantize_weights(&[], None).expect("no weights");
    assert_eq!(empty.padded_len(), 0);
}

/// The lane-wise maximum gives the serial fold's step and bytes, for lengths with every remainder
/// of 8, signs mixed, entries past the query zeroed, and all-zero weights (step 1, zero bytes).
#[test]
fn nibble_weights_match_the_serial_maximum() {
    let mut r = SeededRng::new(7, stream::DATA);
    for d in [1usize, 7, 8, 9, 15, 16, 63, 64, 65, 130] {
        let q: Vec<f32> = (0..d).map(|_| r.uniform() as f32 - 0.5).collect();
        let s: Vec<f32> = (0..d).map(|_| r.uniform() as f32 + 0.01).collect();
        let maxw = q
            .iter()
            .zip(&s)
            .fold(0.0f32, |m, (a, b)| m.max((a * b).abs()));
        let mut out = vec![5i8; d + 3];
        let step = nibble_weights_i8(&q, &s, &mut out);
        assert_eq!(step, maxw / 127.0, "d={d}");
        for (c, (&o, (a, b))) in out.iter().zip(q.iter().zip(&s)).enumerate() {
            let want = (a * b / step).round_ties_even().clamp(-127.0, 127.0) as i8;
            assert_eq!(o, want, "d={d} c={c}");
        }
        assert!(out[d..].iter().all(|&o| o == 0), "d={d}");
        assert!(out.iter().any(|&o| o.unsigned_abs() == 127), "d={d}");
    }
    let mut out = [5i8; 4];
    assert_eq!(nibble_weights_i8(&[0.0; 4], &[1.0; 4], &mut out), 1.0);
    assert_eq!(out, [0; 4]);
}

#[test]
#[should_panic(expected = "weights")]
fn nibble_weights_refuse_a_short_output() {
    nibble_weights_i8(&[1.0; 4], &[1.0; 4], &mut [0i8; 3]);
}

#[test]
#[should_panic(expected = "3 scales")]
fn nibble_weights_refuse_scales_of_another_length() {
    nibble_weights_i8(&[1.0; 4], &[1.0; 3], &mut [0i8; 4]);
}

/// The byte dots of 4-bit codes give their scalar twin's scores bit for bit and an independent
/// read-back of every row, for one to four jobs per call (one and two passes), over row widths
/// whose last unit holds two positions or four, partial last blocks and weights at `±127`; and
/// at the widest rows the kernel takes (32 768 bytes) with every code on the grid's largest
/// entry and every weight at -128, the largest sum magnitude it can meet.
#[test]
fn byte_dots_equal_the_scalar_twin_and_the_rows() {
    let mut r = SeededRng::new(52, stream::DATA);
    let row_widths: &[usize] = if cfg!(miri) {
        &[3]
    } else {
        &[1, 2, 3, 4, 5, 7, 8, 31, 32, 33, 64, 65]
    };
    let centroids: Vec<f32> = (0..16).map(|k| (k as f32 - 7.5) * 0.37).collect();
    let book = ByteCodebook::from_centroids(&centroids);
    assert_eq!(book.values()[0], 1);
    assert_eq!(book.values()[15], 255);
    for &row_bytes in row_widths {
        for rows in [1usize, 31, 32, 75] {
            let bb = block_bytes(row_bytes);
            let blocks = random_bytes(rows.div_ceil(BLOCK) * bb, 11 + row_bytes as u64);
            let scales: Vec<f32> = (0..rows).map(|_| 0.5 + r.uniform() as f32).collect();
            let weights: Vec<Vec<i8>> = (0..4)
                .map(|q| {
                    (0..2 * row_bytes)
                        .map(|_| match q {
                            0 => 127,
                            1 => -127,
                            _ => ((r.next_u64() % 255) as i32 - 127) as i8,
                        })
                        .collect()
                })
                .collect();
            let affines: Vec<Affine> = (0..4)
                .map(|q| Affine {
                    offset: -0.5 + q as f32,
                    step: 1.0e-4,
                    bias: 0.25,
                })
                .collect();
            for n in 1..=4 {
                let mut outs = vec![vec![0f32; rows]; n];
                let mut jobs: Vec<ByteJob<'_>> = weights
                    .iter()
                    .zip(&affines)
                    .zip(outs.iter_mut())
                    .map(|((w, &affine), out)| ByteJob {
                        weights: w,
                        affine,
                        out,
                    })
                    .collect();
                // Asking for a second region's rows as the blocks are walked changes nothing.
                let ahead = Ahead::over(rows).with(&scales).with(&blocks[1..]);
                dot_blocks_scores_u8(&blocks, row_bytes, &book, &scales, &mut jobs, ahead);
                for (q, got) in outs.iter().enumerate() {
                    let what = format!("row_bytes={row_bytes} rows={rows} jobs={n} job {q}");
                    let mut twin = vec![0f32; rows];
                    #[rustfmt::skip]
                    dot_blocks_scores_u8_scalar(&blocks, row_bytes, &book, &weights[q], affines[q], &scales, &mut twin);
                    let bits_of = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                    assert_eq!(bits_of(got), bits_of(&twin), "{what}");
                    for (i, &g) in got.iter().enumerate() {
                        let block = &blocks[i / BLOCK * bb..(i / BLOCK + 1) * bb];
                        let sum: i64 = (0..2 * row_bytes)
                            .map(|j| {
                                let k = code_at(block, 4, j, i % BLOCK);
                                i64::from(weights[q][j]) * i64::from(book.values()[k])
                            })
                            .sum();
                        let a = affines[q];
                        let want = scales[i] * (a.offset + a.step * sum as f32) + a.bias;
                        assert_eq!(g.to_bits(), want.to_bits(), "{what} row {i}");
                    }
                }
            }
        }
    }
    let row_bytes = 1 << 15;
    let blocks = vec![0xFFu8; block_bytes(row_bytes)];
    let weights = vec![-128i8; 2 * row_bytes];
    let (scales, affine) = (
        vec![1.0f32; BLOCK],
        Affine {
            offset: 0.0,
            step: 1.0,
            bias: 0.0,
        },
    );
    let (mut got, mut twin) = (vec![0f32; BLOCK], vec![0f32; BLOCK]);
    let mut jobs = [ByteJob {
        weights: &weights,
        affine,
        out: &mut got,
    }];
    dot_blocks_scores_u8(&blocks, row_bytes, &book, &scales, &mut jobs, Ahead::NONE);
    dot_blocks_scores_u8_scalar(
        &blocks, row_bytes, &book, &weights, affine, &scales, &mut twin,
    );
    let want = (-128i64 * 255 * 2 * row_bytes as i64) as f32;
    assert!(
        got.iter().chain(&twin).all(|&v| v == want),
        "{} {} {want}",
        got[0],
        twin[0]
    );
}

/// A query on the byte grid scores within the bound its two roundings allow: the query's
/// weights within half a step `s_q` and the centroids within half a grid step `s_c`, so a dot
/// moves by at most `Σ_j (s_q / 2 · |c_j| + |q_j| · s_c / 2 + s_q · s_c / 4)`.
#[test]
fn byte_query_dots_stay_within_their_rounding_bound() {
    let mut r = SeededRng::new(53, stream::DATA);
    let d = 64;
    let row_bytes = d / 2;
    let centroids: Vec<f32> = (0..16)
        .map(|k| ((k as f32 - 7.5) * 0.29).sinh() * 0.1)
        .collect();
    let book = ByteCodebook::from_centroids(&centroids);
    let rows: usize = 96;
    let mut blocks = vec![0u8; rows.div_ceil(BLOCK) * block_bytes(row_bytes)];
    let codes: Vec<Vec<u8>> = (0..rows)
        .map(|_| (0..d).map(|_| (r.next_u64() % 16) as u8).collect())
        .collect();
    for (i, c) in codes.iter().enumerate() {
        let mut packed = vec![0u8; row_bytes];
        crate::bitpack::pack(c, 4, &mut packed).unwrap();
        let bb = block_bytes(row_bytes);
        write_row(
            &mut blocks[i / BLOCK * bb..(i / BLOCK + 1) * bb],
            i % BLOCK,
            &packed,
        );
    }
    for trial in 0..8 {
        let q: Vec<f32> = (0..d)
            .map(|_| r.gaussian() as f32 * (1 + trial) as f32)
            .collect();
        let bq = book.quantize_query(&q, 2 * row_bytes);
        let sq = f64::from(q.iter().fold(0.0f32, |m, x| m.max(x.abs()))) / 127.0;
        let sc = f64::from(book.step());
        let scales = vec![1.0f32; rows];
        let mut out = vec![0f32; rows];
        let affine = Affine {
            offset: bq.offset,
            step: bq.step,
            bias: 0.0,
        };
        dot_blocks_scores_u8_scalar(
            &blocks,
            row_bytes,
            &book,
            &bq.weights,
            affine,
            &scales,
            &mut out,
        );
        for (i, c) in codes.iter().enumerate() {
            let exact: f64 = c
                .iter()
                .zip(&q)
                .map(|(&k, &x)| f64::from(x) * f64::from(centroids[k as usize]))
                .sum();
            let bound: f64 = c
                .iter()
                .zip(&q)
                .map(|(&k, &x)| {
                    sq / 2.0 * f64::from(centroids[k as usize].abs())
                        + f64::from(x.abs()) * sc / 2.0
                        + sq * sc / 4.0
                })
                .sum();
            // The float arithmetic on top: the sum is exact in f32 (below 2^24 here), the offset
            // and the step are rounded once from f64 (half an ulp each: 2^-24 of |offset| and of
            // |step · S|), the product and the sum once each (2^-24 of |step · S| and of the
            // result); |step · S| <= |offset| + |result| and |result| <= |exact| + bound, so
            // 4 · 2^-24 · (|offset| + |exact| + bound) covers them, doubled here.
            let slack = 8.0 * f64::from(f32::EPSILON) / 2.0
                * (f64::from(bq.offset.abs()) + exact.abs() + bound);
            let err = (f64::from(out[i]) - exact).abs();
            assert!(
                err <= bound + slack,
                "trial {trial} row {i}: {err} > {bound}"
            );
        }
    }
}

/// The byte sums of 1-4-bit rows give their scalar twin's bits and an independent read-back of
/// every chunk's exact sums, for one to four weight vectors per call (one and two groups), over
/// dimensions whose last unit is partial, partial last blocks and chunks, flat weights, one
/// dominant weight per chunk (the rest rounding to 0 or 1), zero runs (whole inactive blocks and
/// a whole chunk) and every weight and grid entry at its extreme (the largest sums a chunk
/// holds).
#[test]
fn byte_sums_equal_the_scalar_twin_and_the_rows() {
    let mut r = SeededRng::new(63, stream::DATA);
    let (dims, row_counts): (&[usize], &[usize]) = if cfg!(miri) {
        (&[5], &[33])
    } else {
        (
            &[1, 2, 3, 4, 5, 7, 8, 15, 16, 17, 33, 63, 64, 65, 128, 129],
            &[1, 31, 32, 129, 300],
        )
    };
    // Where the CPU has the byte sums' body (and it is not turned off), the comparisons below
    // are the SIMD body against the scalar twin.
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::is_x86_feature_detected as has;
        let off = std::env::var("TQ_NO_AVX512").is_ok_and(|v| !v.is_empty() && v != "0");
        let cpu = has!("avx2") && has!("fma") && has!("avx512f") && has!("avx512vl");
        if cpu && has!("avx512bw") && has!("avx512vnni") && !off {
            assert!(byte_sums_native());
        }
    }
    for bits in 1..=4u32 {
        let n = 1usize << bits;
        let centroids: Vec<f32> = (0..n)
            .map(|k| (k as f32 - (n - 1) as f32 / 2.0) * 0.37)
            .collect();
        let book = ByteCodebook::from_centroids(&centroids);
        assert_eq!(book.bits(), bits);
        for &d in dims {
            let row_bytes = crate::bitpack::packed_len(d, bits);
            let bb = block_bytes(row_bytes);
            for &rows in row_counts {
                let nb = rows.div_ceil(BLOCK);
                for case in 0..4 {
                    let blocks = match case {
                        // Every code 0: the grid's most negative entry (-127).
                        3 => vec![0u8; nb * bb],
                        _ => random_bytes(nb * bb, 7 + d as u64 + rows as u64),
                    };
                    let weights: Vec<Vec<f32>> = (0..4)
                        .map(|v| {
                            (0..rows)
                                .map(|i| match case {
                                    0 if (i / 130 + v) % 3 == 1 => 0.0,
                                    0 => r.uniform() as f32,
                                    1 if i % INT_CHUNK == 7 + v => 1.0,
                                    1 => r.uniform() as f32 * 4e-3,
                                    2 => (r.uniform() * 1e-3) as f32 * (1 << (i % 20)) as f32,
                                    _ => 2.0,
                                })
                                .collect()
                        })
                        .collect();
                    let scales: Vec<f32> = (0..rows)
                        .map(|_| {
                            if case == 3 {
                                1.0
                            } else {
                                0.5 + r.uniform() as f32
                            }
                        })
                        .collect();
                    let bw: Vec<ByteWeights> = weights
                        .iter()
                        .map(|w| {
                            book.quantize_weights(w, Some(&scales))
                                .expect("non-negative")
                        })
                        .collect();
                    if case == 3 {
                        assert!(
                            bw.iter()
                                .all(|w| w.weights[..rows].iter().all(|&x| x == 255))
                        );
                    }
                    let start: Vec<f32> = (0..d).map(|j| j as f32 * 0.25).collect();
                    for k in 1..=4 {
                        let what = format!("{bits} bits d={d} rows={rows} case {case} vectors {k}");
                        let refs: Vec<&ByteWeights> = bw[..k].iter().collect();
                        let mut accs = vec![start.clone(); k];
                        {
                            let mut a: Vec<&mut [f32]> =
                                accs.iter_mut().map(|a| &mut a[..]).collect();
                            accumulate_blocks_u8(&blocks, row_bytes, &book, &refs, &mut a);
                        }
                        for (w, got) in refs.iter().zip(&accs) {
                            let mut twin = start.clone();
                            accumulate_blocks_u8_scalar(&blocks, row_bytes, &book, w, &mut twin);
                            assert_eq!(bits_of(got), bits_of(&twin), "{what}");
                            // Independent read-back: each chunk's exact sum in i64, checked to fit.
                            let mut local = vec![0.0f32; d];
                            for (c, &(offset, step)) in w.chunks.iter().enumerate() {
                                for (j, l) in local.iter_mut().enumerate() {
                                    let sum: i64 = (c * INT_CHUNK
                                        ..((c + 1) * INT_CHUNK).min(nb * BLOCK))
                                        .map(|i| {
                                            let block =
                                                &blocks[i / BLOCK * bb..(i / BLOCK + 1) * bb];
                                            let code = code_at(block, bits, j, i % BLOCK);
                                            i64::from(w.weights[i])
                                                * (i64::from(book.values()[code]) - 128)
                                        })
                                        .sum();
                                    let sum = i32::try_from(sum).expect("a chunk's sum fits i32");
                                    *l += offset + step * sum as f32;
                                }
                            }
                            let want: Vec<f32> =
                                start.iter().zip(&local).map(|(s, l)| s + l).collect();
                            assert_eq!(bits_of(got), bits_of(&want), "{what}");
                        }
                    }
                }
            }
        }
    }
}

/// `ByteCodebook::quantize_weights`: every weight within half its chunk's step of its product
/// (the step the chunk's largest over 255), zero chunks inactive with no step, and the inputs it
/// refuses (negative, NaN, infinite products) refused.
#[test]
fn byte_weights_stay_within_half_a_step() {
    let mut r = SeededRng::new(64, stream::DATA);
    let centroids: Vec<f32> = (0..16).map(|k| (k as f32 - 7.5) * 0.21).collect();
    let book = ByteCodebook::from_centroids(&centroids);
    let n = 1000usize;
    let mut w: Vec<f32> = (0..n)
        .map(|i| (r.uniform() as f32) * 10f32.powi(-((i / 128) as i32)))
        .collect();
    w[300..400].fill(0.0);
    w[512..640].fill(0.0);
    let scales: Vec<f32> = (0..n).map(|_| 0.25 + r.uniform() as f32).collect();
    let q = book
        .quantize_weights(&w, Some(&scales))
        .expect("non-negative");
    assert_eq!(q.padded_len(), n.div_ceil(BLOCK) * BLOCK);
    for (c, &(offset, unit)) in q.chunks.iter().enumerate() {
        assert_eq!(offset, 0.0);
        let rows = c * INT_CHUNK..((c + 1) * INT_CHUNK).min(n);
        let x: Vec<f32> = rows.clone().map(|i| w[i] * scales[i]).collect();
        let top = x.iter().fold(0.0f32, |a, &b| a.max(b));
        if top == 0.0 {
            assert_eq!(unit, 0.0, "chunk {c}");
            continue;
        }
        let s = f64::from(top) / 255.0;
        // The unit is `s · step` in f32: the division by 255 and the product, two roundings.
        let tol = 4.0 * 2f64.powi(-24);
        assert!((f64::from(unit) / f64::from(book.step()) / s - 1.0).abs() < tol);
        for (i, &xi) in rows.zip(&x) {
            let got = f64::from(q.weights[i]) * s;
            // Half a step, and the f32 products and division's few 2^-24 of the chunk's top.
            assert!(
                (got - f64::from(xi)).abs() <= s * 0.5 + f64::from(top) * 1e-6,
                "row {i}: {got} vs {xi}"
            );
        }
    }
    for b in 0..n.div_ceil(BLOCK) {
        let live = q.weights[b * BLOCK..(b + 1) * BLOCK]
            .iter()
            .any(|&x| x != 0);
        assert_eq!(q.active[b], live, "block {b}");
    }
    assert!(!q.active[16] && !q.active[17] && !q.active[18] && !q.active[19]);
    for bad in [-1e-3f32, -0.0, f32::NAN, f32::INFINITY] {
        let mut v = w.clone();
        v[777] = bad;
        assert!(book.quantize_weights(&v, None).is_none(), "{bad}");
    }
    // Finite weights and scales whose product overflows, and a chunk whose largest product is
    // so small that its step would be subnormal (the `i16` weights keep such chunks).
    let mut v = w.clone();
    v[5] = f32::MAX;
    let mut s2 = scales.clone();
    s2[5] = 4.0;
    assert!(book.quantize_weights(&v, Some(&s2)).is_none());
    let mut v = w.clone();
    v[128..256].iter_mut().for_each(|x| *x = 1e-37 * (1.0 + *x));
    assert!(book.quantize_weights(&v, None).is_none());
    assert!(book.quantize_weights(&[], None).is_some());
}

/// The 512-bit body of `ByteCodebook::quantize_weights` gives the lane-wise body's bytes and
/// chunk steps, and refuses what it refuses, over lengths with partial registers and chunks,
/// zero chunks, weights spanning many binades, ties of the rounding (products on exact halves
/// of a step) and each refused kind of product at several places.
#[cfg(target_arch = "x86_64")]
#[test]
fn byte_weights_512_equal_the_lane_wise_body() {
    if !byte_sums_native() {
        return;
    }
    let mut r = SeededRng::new(65, stream::DATA);
    let run = |w: &[f32], s: Option<&[f32]>| {
        let mut fast = ChunkWeights::<u8>::zeroed(w.len(), s);
        let mut lanes = ChunkWeights::<u8>::zeroed(w.len(), s);
        // SAFETY: the byte sums' features include AVX-512 F; `zeroed` covers the weights.
        let a = unsafe { super::avx512::quantize_bytes_512(w, s, &mut fast) };
        let b = crate::simd::arch().dispatch(super::tables::QuantizeBytes {
            weights: w,
            row_scales: s,
            out: &mut lanes,
        });
        assert_eq!(a.is_some(), b.is_some(), "{} weights", w.len());
        if a.is_some() {
            assert_eq!(fast.weights, lanes.weights, "{} weights", w.len());
            assert_eq!(fast.chunks, lanes.chunks, "{} weights", w.len());
        }
    };
    for n in [0usize, 1, 15, 16, 17, 127, 128, 129, 255, 300, 1000] {
        let w: Vec<f32> = (0..n)
            .map(|i| match i % 7 {
                0 => 0.0,
                1 => (i % 255) as f32 + 0.5,
                _ => r.uniform() as f32 * 10f32.powi(-((i / 40) as i32 % 30)),
            })
            .collect();
        let s: Vec<f32> = (0..n).map(|_| 0.25 + r.uniform() as f32).collect();
        run(&w, None);
        run(&w, Some(&s));
        let mut z = w.clone();
        z[..n.min(200)].fill(0.0);
        run(&z, Some(&s));
        // A top of 255 (a step of 1) and products on exact halves: ties, to even.
        let ties: Vec<f32> = (0..n)
            .map(|i| {
                if i % 128 == 0 {
                    255.0
                } else {
                    (i % 255) as f32 + 0.5
                }
            })
            .collect();
        run(&ties, None);
        for bad in [-1e-3f32, -0.0, f32::NAN, f32::INFINITY, 1e-37] {
            for at in [0, n / 2, n.saturating_sub(1)] {
                if at < n {
                    let mut v = w.clone();
                    v[at] = bad;
                    run(&v, None);
                }
            }
        }
    }
}

/// The 512-bit body of `nibble_weights_i8` (one group) gives the lane-wise body's bytes and
/// step over every length of whole registers it takes up to 128, longer outputs (zeroed past
/// the query), zero queries, exact ties and infinite products (a step of infinity).
#[test]
fn nibble_weights_512_equal_the_lane_wise_body() {
    #[cfg(target_arch = "x86_64")]
    {
        if !avx512f_native() {
            return;
        }
        let mut r = SeededRng::new(66, stream::DATA);
        for n in [0usize, 16, 32, 48, 64, 128] {
            let q: Vec<f32> = (0..n).map(|_| r.gaussian() as f32).collect();
            let mut s: Vec<f32> = (0..n).map(|_| r.uniform() as f32 * 3.0).collect();
            // `f32::MAX · 2`: an infinite product, a step of infinity.
            let mut big = q.clone();
            if n > 3 {
                big[3] = f32::MAX;
                s[3] = 2.0;
            }
            let mut ties = q.clone();
            // `127 · k / 2` over a top of 127 (a step of 1, scales of 1): exact halves.
            ties.iter_mut().enumerate().for_each(|(i, x)| {
                *x = if i == 0 {
                    127.0
                } else {
                    (i % 127) as f32 - 63.5
                }
            });
            let ones = vec![1.0f32; n];
            for (q, s) in [(&q, &s), (&big, &s), (&ties, &ones), (&vec![0.0; n], &s)] {
                let mut a = vec![7i8; n + 9];
                let mut b = vec![7i8; n + 9];
                // SAFETY: AVX-512 F is present (checked above); equal lengths, a longer output.
                let mut sa = [0.0f32];
                unsafe { super::avx512::query_nibble_weights_groups_512(q, s, &mut a, &mut sa) };
                let sa = sa[0];
                let sb = crate::simd::arch().dispatch(super::tables::NibbleWeights {
                    q,
                    scales: s,
                    out: &mut b,
                });
                assert_eq!(sa.to_bits(), sb.to_bits(), "n={n}");
                assert_eq!(a, b, "n={n}");
            }
        }
    }
}

/// `nibble_weights_i8_groups` gives each group `nibble_weights_i8`'s bytes (zero past the
/// query) and step, for group counts 0-9, query lengths of whole registers and not, and wider
/// outputs; groups of zero scales and of infinite products among them.
#[test]
fn nibble_weights_for_many_groups_equal_one_group_at_a_time() {
    let mut r = SeededRng::new(67, stream::DATA);
    for d in [7usize, 16, 64, 128] {
        let mut q: Vec<f32> = (0..d).map(|_| r.gaussian() as f32).collect();
        // `q_0 · f32::MAX` overflows: the third group's step is infinite.
        q[0] = 2.0;
        for groups in 0..=9usize {
            for p in [d, d + 5] {
                let mut scales: Vec<f32> =
                    (0..groups * d).map(|_| r.uniform() as f32 * 2.0).collect();
                if groups > 2 {
                    // A group of zero scales and one with an infinite product.
                    scales[d..2 * d].fill(0.0);
                    scales[2 * d] = f32::MAX;
                }
                let mut out = vec![9i8; groups * p];
                let mut steps = vec![-1.0f32; groups];
                nibble_weights_i8_groups(&q, &scales, &mut out, &mut steps);
                for g in 0..groups {
                    let mut one = vec![9i8; p];
                    let step = nibble_weights_i8(&q, &scales[g * d..(g + 1) * d], &mut one);
                    assert_eq!(steps[g].to_bits(), step.to_bits(), "d={d} g={g}/{groups}");
                    assert_eq!(&out[g * p..(g + 1) * p], &one[..], "d={d} g={g}/{groups}");
                }
            }
        }
    }
}

/// Byte queries take 4-bit codebooks only: a 3-bit byte codebook (the byte sums' at 3 bits)
/// refuses to put a query on its grid.
#[test]
#[should_panic(expected = "byte queries score 4-bit codes")]
fn byte_queries_refuse_a_three_bit_codebook() {
    let book = ByteCodebook::from_centroids(&[-1.0, -0.5, -0.2, -0.1, 0.1, 0.2, 0.5, 1.0]);
    assert_eq!(book.bits(), 3);
    book.quantize_query(&[1.0; 8], 16);
}

/// Byte dots score 4-bit codes only: a 3-bit byte codebook is refused before any memory is read.
#[test]
#[should_panic(expected = "byte dots score 4-bit codes")]
fn byte_dots_refuse_a_three_bit_codebook() {
    let book = ByteCodebook::from_centroids(&[-1.0, -0.5, -0.2, -0.1, 0.1, 0.2, 0.5, 1.0]);
    let row_bytes = 4;
    let blocks = vec![0u8; block_bytes(row_bytes)];
    let (weights, scales, mut out) = (vec![1i8; 2 * row_bytes], vec![1.0f32; BLOCK], [0f32; BLOCK]);
    let affine = Affine {
        offset: 0.0,
        step: 1.0,
        bias: 0.0,
    };
    let mut jobs = [ByteJob {
        weights: &weights,
        affine,
        out: &mut out,
    }];
    dot_blocks_scores_u8(&blocks, row_bytes, &book, &scales, &mut jobs, Ahead::NONE);
}
