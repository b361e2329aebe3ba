//! The code kernels below never read past the blocks they are given: every call's blocks end
//! right before a page the process may not read (`PROT_NONE`), so one byte too many faults. Covers
//! the bodies this CPU picks (on an AVX-512 VBMI machine the per-lane cuts and masked tails) of
//! the integer value sums (1-8 bits, one and three weight vectors), the f32 value sums (1-8 bits),
//! the integer key dots and the f32 key decode (5-8 bits), the byte dots of 4-bit keys (one to
//! four queries) and the nibble dot products (KIVI's 4-bit keys, one to three weight vectors),
//! over dimensions that leave partial units and rows that leave partial blocks.
#![cfg(unix)]

use tq_core::bitpack::packed_len;
use tq_core::prefetch::Ahead;
use tq_core::rng::{SeededRng, stream};
use tq_core::scan::{
    Affine, BLOCK, ByteCodebook, ByteJob, IntCodebook, accumulate_blocks_i16,
    accumulate_blocks_multi, block_bytes, dot_block_codes, dot_blocks_scores_i16,
    dot_blocks_scores_u8, dot_nibbles_i8,
};

/// `len` writable bytes that end where an unreadable page begins.
struct Guarded {
    map: *mut libc::c_void,
    map_len: usize,
    data: *mut u8,
    len: usize,
}

impl Guarded {
    fn new(len: usize) -> Self {
        // SAFETY: plain libc calls; the results are checked before use.
        unsafe {
            let page = libc::sysconf(libc::_SC_PAGESIZE);
            assert!(page > 0, "page size");
            let page = page as usize;
            let data_pages = len.div_ceil(page).max(1);
            let map_len = (data_pages + 1) * page;
            let map = libc::mmap(
                std::ptr::null_mut(),
                map_len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            );
            assert_ne!(map, libc::MAP_FAILED, "mmap");
            let guard = (map as *mut u8).add(data_pages * page);
            assert_eq!(
                libc::mprotect(guard as *mut libc::c_void, page, libc::PROT_NONE),
                0,
                "mprotect"
            );
            Self {
                map,
                map_len,
                data: guard.sub(len),
                len,
            }
        }
    }

    fn bytes(&mut self) -> &mut [u8] {
        // SAFETY: `len` bytes inside the readable, writable pages, owned by `self`.
        unsafe { std::slice::from_raw_parts_mut(self.data, self.len) }
    }
}

impl Drop for Guarded {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `new`.
        unsafe { libc::munmap(self.map, self.map_len) };
    }
}

const DIMS: &[usize] = &[1, 2, 3, 5, 6, 7, 9, 13, 31, 33, 63, 64, 65, 127, 129];
const ROWS: &[usize] = &[1, 31, 33];

/// A grid of `2^bits` increasing values, antisymmetric as the Lloyd-Max codebooks are
/// (`values[n - 1 - k] == !values[k]`), so the 8-bit one folds.
fn grid(bits: u32) -> IntCodebook {
    let n = 1usize << bits;
    let mut values = vec![0i16; n];
    for k in 0..n / 2 {
        values[k] = -4000 + (k * 7900 / n) as i16;
        values[n - 1 - k] = !values[k];
    }
    IntCodebook::from_values(values, 0.001)
}

#[test]
fn value_sums_read_only_their_blocks() {
    let mut r = SeededRng::new(81, stream::DATA);
    for bits in 1..=8u32 {
        let book = grid(bits);
        let centroids: Vec<f32> = book.values().iter().map(|&v| f32::from(v)).collect();
        for &d in DIMS {
            let rb = packed_len(d, bits);
            for &rows in ROWS {
                let mut mem = Guarded::new(rows.div_ceil(BLOCK) * block_bytes(rb));
                let blocks = mem.bytes();
                blocks.iter_mut().for_each(|b| *b = r.next_u64() as u8);
                let w: Vec<f32> = (0..rows).map(|_| r.uniform() as f32).collect();
                let iw = book.quantize_weights(&w, None).expect("finite weights");
                let mut acc = vec![0f32; d];
                accumulate_blocks_i16(blocks, rb, bits, &book, &[&iw], &mut [&mut acc.clone()]);
                accumulate_blocks_i16(
                    blocks,
                    rb,
                    bits,
                    &book,
                    &[&iw, &iw, &iw],
                    &mut [&mut acc.clone(), &mut acc.clone(), &mut acc],
                );
                let mut acc = vec![0f32; d];
                accumulate_blocks_multi(blocks, rb, bits, &centroids, None, &[&w], &mut [&mut acc]);
            }
        }
    }
}

#[test]
fn key_dots_read_only_their_blocks() {
    let mut r = SeededRng::new(82, stream::DATA);
    for bits in 5..=8u32 {
        let book = grid(bits);
        let centroids: Vec<f32> = book.values().iter().map(|&v| f32::from(v)).collect();
        for &d in DIMS {
            let rb = packed_len(d, bits);
            let q: Vec<f32> = (0..d).map(|_| r.gaussian() as f32).collect();
            let iq = book.quantize_query(&q);
            let affine = Affine {
                offset: iq.offset,
                step: iq.step,
                bias: 0.0,
            };
            for &rows in ROWS {
                let mut mem = Guarded::new(rows.div_ceil(BLOCK) * block_bytes(rb));
                let blocks = mem.bytes();
                blocks.iter_mut().for_each(|b| *b = r.next_u64() as u8);
                let (scales, mut out) = (vec![1f32; rows], vec![0f32; rows]);
                dot_blocks_scores_i16(
                    blocks,
                    rb,
                    bits,
                    &book,
                    &iq.weights,
                    affine,
                    &scales,
                    &mut out,
                );
                let last = &blocks[blocks.len() - block_bytes(rb)..];
                let mut one = [0f32; BLOCK];
                dot_block_codes(last, bits, &centroids, &q, &mut one);
            }
        }
    }
}

#[test]
fn nibble_dots_read_only_their_block() {
    let mut r = SeededRng::new(83, stream::DATA);
    for row_bytes in [1usize, 2, 3, 5, 8, 31, 32, 33, 64] {
        let len = block_bytes(row_bytes);
        let mut mem = Guarded::new(len);
        let block = mem.bytes();
        block.iter_mut().for_each(|b| *b = r.next_u64() as u8);
        let weights: Vec<Vec<i8>> = (0..3)
            .map(|_| (0..2 * row_bytes).map(|_| r.next_u64() as i8).collect())
            .collect();
        for n in 1..=3 {
            let refs: Vec<&[i8]> = weights[..n].iter().map(Vec::as_slice).collect();
            let mut outs = vec![[0i32; BLOCK]; n];
            dot_nibbles_i8(block, &refs, &mut outs);
        }
    }
}

#[test]
fn byte_dots_read_only_their_blocks() {
    let mut r = SeededRng::new(84, stream::DATA);
    let centroids: Vec<f32> = (0..16).map(|k| k as f32 - 7.5).collect();
    let book = ByteCodebook::from_centroids(&centroids);
    for &d in DIMS {
        let rb = packed_len(d, 4);
        let queries: Vec<_> = (0..4)
            .map(|_| {
                let q: Vec<f32> = (0..d).map(|_| r.gaussian() as f32).collect();
                book.quantize_query(&q, 2 * rb)
            })
            .collect();
        for &rows in ROWS {
            let mut mem = Guarded::new(rows.div_ceil(BLOCK) * block_bytes(rb));
            let blocks = mem.bytes();
            blocks.iter_mut().for_each(|b| *b = r.next_u64() as u8);
            let scales = vec![1f32; rows];
            let mut outs = vec![vec![0f32; rows]; queries.len()];
            let mut jobs: Vec<ByteJob<'_>> = queries
                .iter()
                .zip(outs.iter_mut())
                .map(|(q, out)| ByteJob {
                    weights: &q.weights,
                    affine: Affine {
                        offset: q.offset,
                        step: q.step,
                        bias: 0.0,
                    },
                    out,
                })
                .collect();
            dot_blocks_scores_u8(blocks, rb, &book, &scales, &mut jobs, Ahead::NONE);
        }
    }
}
