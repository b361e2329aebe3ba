//! Software prefetch of a second stream in step with a scan: [`Ahead`].
//!
//! A decode step of attention reads two streams from memory, the key codes (scored first) and
//! the value codes (summed once the softmax is known). Read one after the other, each runs at
//! the speed a single stream gets from memory, and the value pass waits for its data while the
//! memory sat idle during the softmax. A key scan that carries an [`Ahead`] naming the value
//! rows' bytes asks for them as it goes, a few cache lines per block of keys, so both streams
//! come in together and the value pass finds its rows in the core's caches.

use std::marker::PhantomData;
use std::ops::Range;

/// Most regions one [`Ahead`] names.
pub const AHEAD_REGIONS: usize = 8;

/// Byte regions to fetch toward the core (into the second-level cache) in step with a walk over
/// `rows` rows: walking rows `a..b` asks for each region's bytes `[a · len / rows, b · len /
/// rows)`, rounded out to whole cache lines. The regions are other data laid out by row (codes in
/// row order, one scale per row), so the lines asked for are the ones their own walk over the
/// same rows will read. A hint only: nothing is read or written, no result depends on it, and on
/// CPUs other than x86-64 it does nothing. [`Ahead::NONE`] names nothing. `Copy` and cheap to
/// pass (a fixed array of at most [`AHEAD_REGIONS`] regions).
#[derive(Clone, Copy)]
pub struct Ahead<'a> {
    /// Start, length in bytes, and bytes per row in 32.32 fixed point (`len · 2^32 / rows`,
    /// so a walk maps rows to bytes by one multiply and no division).
    regions: [(*const u8, usize, u128); AHEAD_REGIONS],
    n: usize,
    rows: usize,
    first: usize,
    _bytes: PhantomData<&'a [u8]>,
}

// SAFETY: an `Ahead` is a shared borrow of its regions' bytes (the `PhantomData`) that is never
// dereferenced: its pointers only feed prefetch hints, which cannot fault or race.
unsafe impl Send for Ahead<'_> {}
// SAFETY: as for `Send`.
unsafe impl Sync for Ahead<'_> {}

impl std::fmt::Debug for Ahead<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ahead")
            .field("regions", &self.n)
            .field("rows", &self.rows)
            .field("first", &self.first)
            .finish()
    }
}

impl Default for Ahead<'_> {
    fn default() -> Self {
        Self::NONE
    }
}

impl<'a> Ahead<'a> {
    /// Names nothing: walks ask for nothing.
    pub const NONE: Ahead<'static> = Ahead {
        regions: [(std::ptr::null(), 0, 0); AHEAD_REGIONS],
        n: 0,
        rows: 0,
        first: 0,
        _bytes: PhantomData,
    };

    /// No regions yet, spread over `rows` rows.
    pub fn over(rows: usize) -> Self {
        Self {
            rows,
            ..Ahead::NONE
        }
    }

    /// Adds `data` (any plain values laid out by row: its bytes are spread evenly over the rows).
    /// Empty slices and regions past the [`AHEAD_REGIONS`]-th are left out (a hint, so nothing
    /// fails). O(1).
    pub fn with<T>(self, data: &'a [T]) -> Self {
        self.push(data.as_ptr() as *const u8, std::mem::size_of_val(data))
    }

    /// Adds the region of `bytes` bytes at `ptr` unless it is empty or the array is full.
    fn push(mut self, ptr: *const u8, bytes: usize) -> Self {
        if bytes > 0 && self.n < AHEAD_REGIONS {
            let per_row = ((bytes as u128) << 32) / self.rows.max(1) as u128;
            self.regions[self.n] = (ptr, bytes, per_row);
            self.n += 1;
        }
        self
    }

    /// Every region of `self` and then of `other` (up to [`AHEAD_REGIONS`]), over `self`'s rows.
    pub fn and(mut self, other: &Ahead<'a>) -> Self {
        for &(ptr, bytes, _) in &other.regions[..other.n] {
            self = self.push(ptr, bytes);
        }
        self
    }

    /// The same regions, with row `0` of a walk standing for row `first` of the regions' rows (a
    /// walk over a slice of the rows starting at `first`).
    pub fn from_row(mut self, first: usize) -> Self {
        self.first = self.first.saturating_add(first);
        self
    }

    /// `true` when walks ask for nothing.
    pub fn is_none(&self) -> bool {
        self.n == 0 || self.rows == 0
    }

    /// Asks for the lines of every region that rows `rows` (of the walk) cover; rows past the
    /// end ask for nothing. O(bytes of those rows / 64) hints.
    #[inline]
    pub fn rows(&self, rows: Range<usize>) {
        if self.is_none() {
            return;
        }
        let (a, b) = (
            self.first.saturating_add(rows.start).min(self.rows),
            self.first.saturating_add(rows.end).min(self.rows),
        );
        if a >= b {
            return;
        }
        for &(ptr, len, per_row) in &self.regions[..self.n] {
            // Rows below `self.rows` map below `len` (the fixed point rounds down).
            let start = ((a as u128 * per_row) >> 32) as usize;
            let end = ((b as u128 * per_row) >> 32) as usize;
            fetch(ptr, start & !63, end.min(len));
        }
    }
}

/// Hints the lines of `ptr[at..end]`, `at` a multiple of 64 (the walk starts at the line holding
/// the first byte and stays inside the region).
#[inline]
fn fetch(ptr: *const u8, mut at: usize, end: usize) {
    while at < end {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `at < end <= len`, an offset inside the region `ptr` starts; a prefetch hint
        // neither faults nor reads into the program (SSE, part of x86-64).
        unsafe {
            use std::arch::x86_64::{_MM_HINT_T1, _mm_prefetch};
            _mm_prefetch::<_MM_HINT_T1>(ptr.add(at) as *const i8);
        }
        #[cfg(not(target_arch = "x86_64"))]
        let _ = ptr;
        at += 64;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn walks_stay_inside_and_name_nothing_past_the_rows() {
        let codes = vec![7u8; 1000];
        let scales = vec![1.0f32; 33];
        let a = Ahead::over(33).with(&codes).with(&scales);
        assert!(!a.is_none());
        // Every row range, inside and past the end, offset or not: hints only, nothing fails.
        for first in [0, 5, 32, 33, usize::MAX] {
            let b = a.from_row(first);
            for s in 0..40 {
                b.rows(s..s + 3);
                b.rows(s..s);
            }
        }
        assert!(Ahead::NONE.is_none());
        assert!(Ahead::over(0).with(&codes).is_none());
        assert!(Ahead::over(10).with::<u8>(&[]).is_none());
    }

    #[test]
    fn regions_past_the_limit_are_left_out() {
        let data = [1u16; 4];
        let mut a = Ahead::over(4);
        for _ in 0..AHEAD_REGIONS + 3 {
            a = a.with(&data);
        }
        assert_eq!(a.n, AHEAD_REGIONS);
        let b = Ahead::over(4).with(&data).and(&a);
        assert_eq!(b.n, AHEAD_REGIONS);
        assert_eq!(format!("{b:?}"), "Ahead { regions: 8, rows: 4, first: 0 }");
    }
}
