//! [`PackedRows`]: packed code rows stored in the 32-row block layout of [`tq_core::scan`].
//!
//! Rows are appended at the end; row `i` lives in block `i / 32`, slot `i % 32`. Memory is
//! `ceil(len / 32) · 32 · row_bytes` bytes: exactly `row_bytes` per row plus at most 31 rows of
//! padding in the last block. Scoring with per-query nibble tables reads whole blocks
//! ([`PackedRows::block`]); single rows are read back in O(row_bytes).

use tq_core::scan::{self, BLOCK};

/// Packed rows of `row_bytes` bytes in the block layout (see the module docs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PackedRows {
    row_bytes: usize,
    len: usize,
    data: Vec<u8>,
}

impl PackedRows {
    /// An empty container for rows of `row_bytes >= 1` bytes.
    pub fn new(row_bytes: usize) -> Self {
        debug_assert!(row_bytes > 0);
        Self {
            row_bytes,
            len: 0,
            data: Vec::new(),
        }
    }

    /// Rebuilds the block layout from `n` row-major rows (`rows.len() == n · row_bytes`, checked by
    /// the caller). O(n · row_bytes).
    pub fn from_row_major(row_bytes: usize, rows: &[u8]) -> Self {
        let mut out = Self::new(row_bytes);
        let n = rows.len() / row_bytes;
        out.resize_rows(n);
        for (i, row) in rows.chunks_exact(row_bytes).enumerate() {
            out.write_row(i, row);
        }
        out
    }

    /// The row-major copy of all rows (`len · row_bytes` bytes), the interchange layout.
    pub fn to_row_major(&self) -> Vec<u8> {
        let mut out = vec![0u8; self.len * self.row_bytes];
        for (i, row) in out.chunks_exact_mut(self.row_bytes).enumerate() {
            self.read_row(i, row);
        }
        out
    }

    /// Bytes per row.
    pub fn row_bytes(&self) -> usize {
        self.row_bytes
    }

    /// Number of rows.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when there are no rows.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Number of (possibly partial) blocks.
    pub fn num_blocks(&self) -> usize {
        self.len.div_ceil(BLOCK)
    }

    /// Bytes held, padding of the last block included.
    pub fn memory_bytes(&self) -> usize {
        self.data.len()
    }

    /// Block `b` (`32 · row_bytes` bytes; slots past `len` are zero).
    pub fn block(&self, b: usize) -> &[u8] {
        let bb = scan::block_bytes(self.row_bytes);
        &self.data[b * bb..(b + 1) * bb]
    }

    /// All block bytes (`num_blocks · 32 · row_bytes`).
    pub fn blocks(&self) -> &[u8] {
        &self.data
    }

    /// Grows or shrinks to `n` rows; new rows are zero, removed rows are cleared so the padding
    /// of the last block stays zero.
    pub fn resize_rows(&mut self, n: usize) {
        let bb = scan::block_bytes(self.row_bytes);
        if n < self.len {
            let zero = vec![0u8; self.row_bytes];
            for i in n..self.len.min(n.div_ceil(BLOCK) * BLOCK) {
                self.write_row(i, &zero);
            }
        }
        self.data.resize(n.div_ceil(BLOCK) * bb, 0);
        self.len = n;
    }

    /// Mutable bytes from block `first_block` to the end, for filling whole blocks in parallel.
    pub fn blocks_mut_from(&mut self, first_block: usize) -> &mut [u8] {
        let bb = scan::block_bytes(self.row_bytes);
        &mut self.data[first_block * bb..]
    }

    /// Mutable block `b`.
    pub fn block_mut(&mut self, b: usize) -> &mut [u8] {
        let bb = scan::block_bytes(self.row_bytes);
        &mut self.data[b * bb..(b + 1) * bb]
    }

    /// Overwrites row `i < len` with row-major packed `row`.
    pub fn write_row(&mut self, i: usize, row: &[u8]) {
        debug_assert!(i < self.len && row.len() == self.row_bytes);
        let (b, slot) = (i / BLOCK, i % BLOCK);
        scan::write_row(self.block_mut(b), slot, row);
    }

    /// Appends one row.
    pub fn push(&mut self, row: &[u8]) {
        let i = self.len;
        self.resize_rows(i + 1);
        self.write_row(i, row);
    }

    /// Reads row `i < len` into `out` (`row_bytes` bytes).
    pub fn read_row(&self, i: usize, out: &mut [u8]) {
        debug_assert!(i < self.len && out.len() == self.row_bytes);
        scan::read_row(self.block(i / BLOCK), i % BLOCK, out);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn row_major_round_trip_and_truncate(row_bytes in 1usize..40, n in 0usize..100, cut in 0usize..100) {
            let rows: Vec<u8> = (0..n * row_bytes).map(|i| (i * 31 % 251) as u8).collect();
            let mut p = PackedRows::from_row_major(row_bytes, &rows);
            prop_assert_eq!(p.len(), n);
            prop_assert_eq!(p.to_row_major(), rows.clone());
            let cut = cut.min(n);
            p.resize_rows(cut);
            prop_assert_eq!(p.to_row_major(), rows[..cut * row_bytes].to_vec());
            // appending after a truncation sees zeroed padding
            p.push(&vec![7u8; row_bytes]);
            let mut back = vec![0u8; row_bytes];
            p.read_row(cut, &mut back);
            prop_assert_eq!(back, vec![7u8; row_bytes]);
            let fresh = PackedRows::from_row_major(row_bytes, &p.to_row_major());
            prop_assert_eq!(fresh, p);
        }
    }
}
