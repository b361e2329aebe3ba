//! Every public safe kernel of `scan` refuses mismatched lengths before it reads memory.
//!
//! The SIMD bodies read through raw pointers sized by their arguments, so a length check that
//! exists only in debug builds would leave undefined behaviour reachable from safe code. These
//! tests call each kernel with every kind of mismatch and require a clean panic (the documented
//! `# Panics` contract). The test command also runs this file in the release profile, where
//! `debug_assert!` is compiled out.

use std::panic::{AssertUnwindSafe, catch_unwind};
use tq_core::prefetch::Ahead;

use tq_core::scan::{
    self, BLOCK, accumulate_block_scalar, accumulate_blocks, accumulate_blocks_multi, block_bytes,
    coords3, scan_block, scan_block_b3, scan_block_b3_f32, scan_block_b3_scalar, scan_block_f32,
    scan_block_scalar,
};

thread_local! {
    static EXPECTING: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Runs `f` and requires that it panics. Expected panics are kept quiet (the default hook would
/// print each one); any other panic still prints through the default hook.
fn must_panic(what: &str, f: impl FnOnce()) {
    static HOOK: std::sync::Once = std::sync::Once::new();
    HOOK.call_once(|| {
        let default = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if !EXPECTING.with(|e| e.get()) {
                default(info)
            }
        }));
    });
    EXPECTING.with(|e| e.set(true));
    let r = catch_unwind(AssertUnwindSafe(f));
    EXPECTING.with(|e| e.set(false));
    assert!(r.is_err(), "{what}: accepted mismatched lengths");
}

#[test]
fn nibble_scans_refuse_mismatched_lengths() {
    let rb = 4;
    let block = vec![0u8; block_bytes(rb)];
    let mut out = [0u32; BLOCK];
    let mut outf = [0f32; BLOCK];
    // Tables shorter and longer than the block, and a block that is not whole 32-byte steps.
    for tables_len in [0, 16, block.len() - 16, block.len() + 32, 10 * block.len()] {
        let t = vec![1u8; tables_len];
        let tf = vec![1f32; tables_len];
        must_panic("scan_block", || scan_block(&block, &t, &mut out));
        must_panic("scan_block_scalar", || {
            scan_block_scalar(&block, &t, &mut out)
        });
        must_panic("scan_block_f32", || scan_block_f32(&block, &tf, &mut outf));
    }
    // A long block with short tables (the kernel would read tables past their end).
    let long = vec![0u8; block_bytes(64)];
    let t = vec![1u8; block.len()];
    must_panic("scan_block long block", || scan_block(&long, &t, &mut out));
    let odd = vec![0u8; 48];
    let t48 = vec![1u8; 48];
    must_panic("scan_block odd block", || scan_block(&odd, &t48, &mut out));
    // The correct shape runs.
    let t = vec![1u8; block.len()];
    scan_block(&block, &t, &mut out);
    assert_eq!(out, [(2 * rb) as u32; BLOCK]);
}

#[test]
fn three_bit_scans_refuse_mismatched_lengths() {
    let rb = 12; // 32 codes of 3 bits
    let block = vec![0u8; block_bytes(rb)];
    let want = 16 * coords3(rb);
    let mut out = [0u32; BLOCK];
    let mut outf = [0f32; BLOCK];
    for tables_len in [0, 16, want - 16, want + 16, 4 * want] {
        let t = vec![1u8; tables_len];
        let tf = vec![1f32; tables_len];
        must_panic("scan_block_b3", || scan_block_b3(&block, &t, &mut out));
        must_panic("scan_block_b3_scalar", || {
            scan_block_b3_scalar(&block, &t, &mut out)
        });
        must_panic("scan_block_b3_f32", || {
            scan_block_b3_f32(&block, &tf, &mut outf)
        });
    }
    // Tables sized for a longer row than the block holds (reads past the block).
    let t = vec![1u8; 16 * coords3(rb * 8)];
    must_panic("scan_block_b3 short block", || {
        scan_block_b3(&block, &t, &mut out)
    });
    let t = vec![1u8; want];
    scan_block_b3(&block, &t, &mut out);
    assert_eq!(out, [coords3(rb) as u32; BLOCK]);
}

#[test]
fn accumulation_refuses_mismatched_lengths() {
    let (rb, bits, dim) = (16usize, 4u32, 32usize);
    let n: usize = 40;
    let blocks = vec![0u8; n.div_ceil(BLOCK) * block_bytes(rb)];
    let values = vec![1f32; 16];
    let w = vec![1f32; n];
    let mut acc = vec![0f32; dim];
    // Weights that do not cover the blocks: too few blocks' worth, too many.
    for wn in [0, 10, 32, 65, 200] {
        let w = vec![1f32; wn];
        must_panic("accumulate_blocks weights", || {
            accumulate_blocks(&blocks, rb, bits, &values, &w, &mut acc)
        });
    }
    // An accumulator longer than a row's codes (reads nibble positions past the block).
    for d in [dim + 1, 4 * dim] {
        let mut long = vec![0f32; d];
        must_panic("accumulate_blocks dim", || {
            accumulate_blocks(&blocks, rb, bits, &values, &w, &mut long)
        });
    }
    // Too few values for the width, widths outside 1..=8, rows of zero bytes.
    must_panic("accumulate_blocks values", || {
        accumulate_blocks(&blocks, rb, bits, &values[..8], &w, &mut acc)
    });
    for b in [0u32, 9, 33] {
        must_panic("accumulate_blocks bits", || {
            accumulate_blocks(&blocks, rb, b, &values, &w, &mut acc)
        });
    }
    must_panic("accumulate_blocks row_bytes", || {
        accumulate_blocks(&[], 0, bits, &values, &[], &mut acc)
    });
    // Blocks that are not whole blocks of the row size.
    must_panic("accumulate_blocks partial block", || {
        accumulate_blocks(&blocks[1..], rb, bits, &values, &w, &mut acc)
    });
    // Several queries: counts and lengths must agree.
    let mut a2 = vec![0f32; dim];
    let mut a3 = vec![0f32; dim - 1];
    must_panic("accumulate_blocks_multi counts", || {
        accumulate_blocks_multi(&blocks, rb, bits, &values, None, &[&w, &w], &mut [&mut acc])
    });
    must_panic("accumulate_blocks_multi lengths", || {
        accumulate_blocks_multi(
            &blocks,
            rb,
            bits,
            &values,
            None,
            &[&w, &w],
            &mut [&mut a2, &mut a3],
        )
    });
    let few = vec![1f32; w.len() - 1];
    must_panic("accumulate_blocks_multi row scales", || {
        accumulate_blocks_multi(
            &blocks,
            rb,
            bits,
            &values,
            Some(&few),
            &[&w],
            &mut [&mut acc],
        )
    });
    let short = vec![1f32; 5];
    must_panic("accumulate_blocks_multi weights", || {
        accumulate_blocks_multi(
            &blocks,
            rb,
            bits,
            &values,
            None,
            &[&w, &short],
            &mut [&mut acc],
        )
    });
    // The scalar one-block twin checks too.
    let ws = [1f32; BLOCK];
    let block = &blocks[..block_bytes(rb)];
    must_panic("accumulate_block_scalar dim", || {
        accumulate_block_scalar(block, bits, &values, &ws, &mut vec![0f32; dim + 1])
    });
    must_panic("accumulate_block_scalar block", || {
        accumulate_block_scalar(&block[..31], bits, &values, &ws, &mut acc)
    });
    // The correct shape runs: every code is 0, so each coordinate sums n weights of value 1.
    accumulate_blocks(&blocks, rb, bits, &values, &w, &mut acc);
    assert!(acc.iter().all(|&x| x == n as f32));
}

#[test]
fn layout_writers_refuse_mismatched_lengths() {
    let rb = 3;
    let mut block = vec![0u8; block_bytes(rb)];
    let row = vec![0xFFu8; rb];
    must_panic("write_row slot", || scan::write_row(&mut block, 32, &row));
    must_panic("write_row row", || {
        scan::write_row(&mut block, 0, &[1u8; 4])
    });
    let mut out = vec![0u8; rb + 1];
    must_panic("read_row out", || scan::read_row(&block, 0, &mut out));
    must_panic("write_block rows", || {
        scan::write_block(&vec![0u8; 33 * rb], rb, &mut block)
    });
    must_panic("write_block partial row", || {
        scan::write_block(&[0u8; 4], rb, &mut block)
    });
    must_panic("write_rows past the block", || {
        scan::write_rows(&vec![0u8; 2 * rb], rb, &mut block, 31)
    });
    must_panic("write_rows partial row", || {
        scan::write_rows(&vec![0u8; 2 * rb + 1], rb, &mut block, 3)
    });
    must_panic("score_row_f32", || {
        scan::score_row_f32(&row, &[0f32; 16]);
    });
    let mut lut = scan::QuantizedLut::default();
    must_panic("QuantizedLut::quantize_from", || {
        lut.quantize_from(&[0f32; 17])
    });
    scan::write_row(&mut block, 31, &row);
    let mut back = vec![0u8; rb];
    scan::read_row(&block, 31, &mut back);
    assert_eq!(back, row);
}

/// The multi-query scans, the fused scan-to-score kernels and `mark_above` refuse every mismatch:
/// a wrong table, output count, block, scale or mask length, `row_bytes` 0 or past 2^22.
#[test]
fn multi_and_fused_kernels_refuse_mismatched_lengths() {
    use scan::{Affine, ScoreJob, coords5, mark_above, scan_block_b5_multi, scan_block_multi};
    let rb = 10;
    let block = vec![0u8; block_bytes(rb)];
    let good = vec![1u8; block.len()];
    let short = vec![1u8; block.len() - 32];
    let mut outs = vec![[0u32; BLOCK]; 2];
    must_panic("multi short table", || {
        scan_block_multi(&block, &[&good, &short], &mut outs)
    });
    must_panic("multi output count", || {
        scan_block_multi(&block, &[&good], &mut outs)
    });
    let good5 = vec![1u8; 32 * coords5(rb)];
    let short5 = vec![1u8; 32 * coords5(rb) - 32];
    must_panic("b5 multi short table", || {
        scan_block_b5_multi(&block, &[&good5, &short5], &mut outs)
    });
    must_panic("b5 multi output count", || {
        scan_block_b5_multi(&block, &[&good5, &good5, &good5], &mut outs)
    });
    let affine = Affine {
        offset: 0.0,
        step: 1.0,
        bias: 0.0,
    };
    let rows = 40;
    let blocks = vec![0u8; 2 * block_bytes(rb)];
    let scales = vec![1f32; rows];
    let mut out = vec![0f32; rows];
    let mut masks = vec![0u32; 2];
    must_panic("scores: blocks", || {
        scan::scan_blocks_scores(&blocks[32..], rb, &good, affine, &scales, &mut out)
    });
    must_panic("scores: tables", || {
        scan::scan_blocks_scores(&blocks, rb, &short, affine, &scales, &mut out)
    });
    must_panic("scores: scales", || {
        scan::scan_blocks_scores(&blocks, rb, &good, affine, &scales[1..], &mut out)
    });
    must_panic("scores: row_bytes 0", || {
        scan::scan_blocks_scores(&[], 0, &[], affine, &scales, &mut out)
    });
    must_panic("scores: row_bytes past 2^22", || {
        scan::scan_blocks_scores(&[], (1 << 22) + 1, &[], affine, &[], &mut [])
    });
    must_panic("scores_above: masks", || {
        scan::scan_blocks_scores_above(
            &blocks,
            rb,
            &good,
            affine,
            &scales,
            &mut out,
            (0.0, &mut masks[..1]),
        )
    });
    must_panic("scores_multi: one job's output", || {
        let mut a = vec![0f32; rows];
        let mut b = vec![0f32; rows - 1];
        let mut jobs = [
            ScoreJob {
                tables: &good,
                affine,
                out: &mut a,
                marks: None,
            },
            ScoreJob {
                tables: &good,
                affine,
                out: &mut b,
                marks: None,
            },
        ];
        scan::scan_blocks_scores_multi(&blocks, rb, &scales, &mut jobs, Ahead::NONE)
    });
    must_panic("mark_above: masks", || {
        mark_above(&out, 0.0, &mut masks[..1])
    });
    // The well-formed calls go through: two jobs, the second with marks.
    let mut first = vec![0f32; rows];
    let mut jobs = [
        ScoreJob {
            tables: &good,
            affine,
            out: &mut first,
            marks: None,
        },
        ScoreJob {
            tables: &good,
            affine,
            out: &mut out,
            marks: Some((0.0, &mut masks)),
        },
    ];
    scan::scan_blocks_scores_multi(&blocks, rb, &scales, &mut jobs, Ahead::NONE);
    mark_above(&first, 0.0, &mut masks);
}

#[test]
fn byte_dots_refuse_mismatched_lengths() {
    use scan::{Affine, ByteCodebook, ByteJob, dot_blocks_scores_u8, dot_blocks_scores_u8_scalar};
    let centroids: Vec<f32> = (0..16).map(|k| k as f32 - 7.5).collect();
    let book = ByteCodebook::from_centroids(&centroids);
    let (rb, rows) = (10usize, 40usize);
    let blocks = vec![0u8; 2 * block_bytes(rb)];
    let scales = vec![1f32; rows];
    let good = vec![1i8; 2 * rb];
    let short = vec![1i8; 2 * rb - 1];
    let affine = Affine {
        offset: 0.0,
        step: 1.0,
        bias: 0.0,
    };
    let run = |blocks: &[u8], rb: usize, w: &[i8], scales: &[f32], out: &mut [f32]| {
        let mut jobs = [ByteJob {
            weights: w,
            affine,
            out,
        }];
        dot_blocks_scores_u8(blocks, rb, &book, scales, &mut jobs, Ahead::NONE)
    };
    let mut out = vec![0f32; rows];
    must_panic("byte dots: weights", || {
        run(&blocks, rb, &short, &scales, &mut out)
    });
    must_panic("byte dots: blocks", || {
        run(&blocks[32..], rb, &good, &scales, &mut out)
    });
    must_panic("byte dots: scales", || {
        run(&blocks, rb, &good, &scales[1..], &mut out)
    });
    must_panic("byte dots: outputs", || {
        run(&blocks, rb, &good, &scales, &mut out[1..])
    });
    must_panic("byte dots: row_bytes 0", || run(&[], 0, &[], &[], &mut []));
    must_panic("byte dots: row_bytes past 2^15", || {
        run(&[], (1 << 15) + 1, &vec![0i8; (1 << 16) + 2], &[], &mut [])
    });
    must_panic("byte dots: one job of two", || {
        let mut a = vec![0f32; rows];
        let mut jobs = [
            ByteJob {
                weights: &good,
                affine,
                out: &mut a,
            },
            ByteJob {
                weights: &short,
                affine,
                out: &mut out,
            },
        ];
        dot_blocks_scores_u8(&blocks, rb, &book, &scales, &mut jobs, Ahead::NONE)
    });
    must_panic("byte dots scalar: weights", || {
        dot_blocks_scores_u8_scalar(&blocks, rb, &book, &short, affine, &scales, &mut out)
    });
    must_panic("byte dots scalar: outputs", || {
        dot_blocks_scores_u8_scalar(&blocks, rb, &book, &good, affine, &scales, &mut out[1..])
    });
    must_panic("byte codebook: 15 values", || {
        ByteCodebook::from_centroids(&centroids[1..]);
    });
    must_panic("byte codebook: not finite", || {
        let mut c = centroids.clone();
        c[3] = f32::NAN;
        ByteCodebook::from_centroids(&c);
    });
    must_panic("byte query: too long", || {
        book.quantize_query(&[1.0; 21], 20);
    });
    // The well-formed call goes through.
    run(&blocks, rb, &good, &scales, &mut out);
}

#[test]
fn integer_value_sums_refuse_mismatched_lengths() {
    use scan::{IntCodebook, accumulate_blocks_i16, accumulate_blocks_i16_scalar};
    let (rb, dim, n) = (16usize, 32usize, 40usize);
    let blocks = vec![0u8; n.div_ceil(BLOCK) * block_bytes(rb)];
    let book = IntCodebook::from_values((0..16).map(|k| k * 10 - 80).collect(), 0.01);
    let wide = IntCodebook::from_values((0..256).map(|k| k - 128).collect(), 0.01);
    let iw = book.quantize_weights(&vec![1f32; n], None).expect("finite");
    let mut acc = vec![0f32; dim];
    // Weights covering other rows than the blocks' (more, fewer).
    for wn in [0usize, 10, 65, 200] {
        let other = book
            .quantize_weights(&vec![1f32; wn], None)
            .expect("finite");
        must_panic("accumulate_blocks_i16 weights", || {
            accumulate_blocks_i16(&blocks, rb, 4, &book, &[&other], &mut [&mut acc])
        });
        must_panic("accumulate_blocks_i16_scalar weights", || {
            accumulate_blocks_i16_scalar(&blocks, rb, 4, &book, &other, &mut acc)
        });
    }
    // An accumulator longer than a row's codes, at 4 and at 8 bits.
    for (bits, d) in [(4u32, dim + 1), (8, 2 * rb / 2 + 1)] {
        let mut long = vec![0f32; d];
        must_panic("accumulate_blocks_i16 dim", || {
            accumulate_blocks_i16(&blocks, rb, bits, &wide, &[&iw], &mut [&mut long])
        });
    }
    // Widths outside 1..=8, a grid too small for the width, rows of zero bytes, partial blocks.
    for b in [0u32, 9] {
        must_panic("accumulate_blocks_i16 bits", || {
            accumulate_blocks_i16(&blocks, rb, b, &wide, &[&iw], &mut [&mut acc])
        });
    }
    must_panic("accumulate_blocks_i16 grid", || {
        accumulate_blocks_i16(&blocks, rb, 5, &book, &[&iw], &mut [&mut acc])
    });
    must_panic("accumulate_blocks_i16 row_bytes", || {
        accumulate_blocks_i16(&[], 0, 4, &book, &[], &mut [])
    });
    must_panic("accumulate_blocks_i16 partial block", || {
        accumulate_blocks_i16(&blocks[1..], rb, 4, &book, &[&iw], &mut [&mut acc])
    });
    // Several vectors: counts and lengths must agree.
    let (mut a2, mut a3) = (vec![0f32; dim], vec![0f32; dim - 1]);
    must_panic("accumulate_blocks_i16 counts", || {
        accumulate_blocks_i16(&blocks, rb, 4, &book, &[&iw, &iw], &mut [&mut acc])
    });
    must_panic("accumulate_blocks_i16 lengths", || {
        accumulate_blocks_i16(&blocks, rb, 4, &book, &[&iw, &iw], &mut [&mut a2, &mut a3])
    });
    // Row scales shorter than the weights.
    must_panic("quantize_weights row scales", || {
        let _ = book.quantize_weights(&[1.0; 8], Some(&[1.0; 7]));
    });
    // The correct shape runs: every code is 0 (grid value -80), weights 1 on n rows. Each row's
    // integer weight is round(1 / s) with s = n_chunk / (B - n_chunk), about 2 000 or more, so
    // the sum is within 0.5 / 2 000 (2.5e-4) of exact, relative.
    accumulate_blocks_i16(&blocks, rb, 4, &book, &[&iw], &mut [&mut acc]);
    let want = n as f32 * (-80.0 + 0.5) * 0.01;
    assert!(
        acc.iter().all(|&x| (x - want).abs() <= 1e-3 * want.abs()),
        "{acc:?}"
    );
}
