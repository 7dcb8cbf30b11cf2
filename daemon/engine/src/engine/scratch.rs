//! Buffers the forward pass reuses from one call to the next.
//!
//! A 512-token prefill step asks for some 100 MB of activations per MoE
//! layer (the tokens' copies for each chosen expert, their gate, up and
//! down outputs). Allocations that large come straight from `mmap`, so
//! every layer of every step paid for the kernel mapping fresh zeroed
//! pages on first touch and for unmapping them (with TLB shootdowns) on
//! free: about a tenth of the prefill's time. Buffers taken here go back
//! on drop and are handed out again, so a steady stream of same-shaped
//! steps touches memory that is already mapped.

use std::ops::{Deref, DerefMut};
use std::sync::Mutex;

/// A free list of vectors of `T`, holding at most `keep_bytes` of
/// capacity between uses (what a step needs beyond it is freed as before).
#[derive(Debug)]
pub(crate) struct Scratch<T> {
    free: Mutex<Vec<Vec<T>>>,
    keep_bytes: usize,
}

impl<T: Copy + Default> Scratch<T> {
    pub(crate) fn new(keep_bytes: usize) -> Self {
        Scratch {
            free: Mutex::new(Vec::new()),
            keep_bytes,
        }
    }

    /// `len` elements of `T::default()`, in the smallest kept vector that
    /// holds them (or the largest one, grown, or a new one).
    pub(crate) fn zeroed(&self, len: usize) -> Buf<'_, T> {
        let mut v = self.pick(len);
        v.clear();
        v.resize(len, T::default());
        Buf { v, home: self }
    }

    /// `len` elements whose values are whatever the reused vector held
    /// (`T::default()` past its old length): for a buffer every element of
    /// which is written before it is read, so a large step does not clear
    /// megabytes it is about to overwrite.
    pub(crate) fn overwritten(&self, len: usize) -> Buf<'_, T> {
        let mut v = self.pick(len);
        v.truncate(len);
        v.resize(len, T::default());
        Buf { v, home: self }
    }

    /// An empty vector (with whatever capacity a kept one has) for a
    /// writer that sizes it itself.
    pub(crate) fn empty(&self, len_hint: usize) -> Buf<'_, T> {
        let mut v = self.pick(len_hint);
        v.clear();
        Buf { v, home: self }
    }

    fn pick(&self, len: usize) -> Vec<T> {
        let mut free = self.lock();
        let fits = (0..free.len())
            .filter(|&i| free[i].capacity() >= len)
            .min_by_key(|&i| free[i].capacity());
        let at = fits.or_else(|| (0..free.len()).max_by_key(|&i| free[i].capacity()));
        at.map_or_else(Vec::new, |i| free.swap_remove(i))
    }

    fn give_back(&self, v: Vec<T>) {
        let mut free = self.lock();
        let kept = bytes_of(&free);
        if v.capacity() > 0 && kept + bytes_of(std::slice::from_ref(&v)) <= self.keep_bytes {
            free.push(v);
        }
    }

    /// Bytes of capacity kept for reuse now.
    #[cfg(test)]
    fn kept_bytes(&self) -> usize {
        bytes_of(&self.lock())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Vec<T>>> {
        // The list is consistent after any panic (a push or a swap_remove
        // either happened or not), so a poisoned lock is still usable.
        self.free.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Bytes of capacity of `vs`.
fn bytes_of<T>(vs: &[Vec<T>]) -> usize {
    let size = std::mem::size_of::<T>().max(1);
    vs.iter().map(|v| v.capacity() * size).sum()
}

/// A vector on loan from a [`Scratch`]; it goes back when dropped.
#[derive(Debug)]
pub(crate) struct Buf<'a, T: Copy + Default> {
    v: Vec<T>,
    home: &'a Scratch<T>,
}

impl<T: Copy + Default> Buf<'_, T> {
    /// The vector itself, for writers that resize it.
    pub(crate) fn vec_mut(&mut self) -> &mut Vec<T> {
        &mut self.v
    }
}

impl<T: Copy + Default> Deref for Buf<'_, T> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        &self.v
    }
}

impl<T: Copy + Default> DerefMut for Buf<'_, T> {
    fn deref_mut(&mut self) -> &mut [T] {
        &mut self.v
    }
}

impl<T: Copy + Default> Drop for Buf<'_, T> {
    fn drop(&mut self) {
        self.home.give_back(std::mem::take(&mut self.v));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_come_back_zeroed_and_are_reused() {
        let s = Scratch::<f32>::new(1 << 20);
        let ptr = {
            let mut a = s.zeroed(1000);
            a.iter_mut().for_each(|v| *v = 7.0);
            a.as_ptr()
        };
        assert_eq!(s.kept_bytes(), 4000);
        let b = s.zeroed(900);
        assert_eq!(b.as_ptr(), ptr, "the kept vector is handed out again");
        assert_eq!(b.len(), 900);
        assert!(b.iter().all(|&v| v == 0.0), "stale values were left");
        assert_eq!(s.kept_bytes(), 0, "on loan, not kept");
    }

    #[test]
    fn overwritten_buffers_are_reused_without_clearing_and_sized() {
        let s = Scratch::<f32>::new(1 << 20);
        let ptr = {
            let mut a = s.zeroed(1000);
            a.iter_mut().for_each(|v| *v = 7.0);
            a.as_ptr()
        };
        {
            let b = s.overwritten(600);
            assert_eq!((b.as_ptr(), b.len()), (ptr, 600));
            assert!(b.iter().all(|&v| v == 7.0), "cleared although unasked");
        }
        // Longer than what it held: the new tail is T::default().
        let c = s.overwritten(1200);
        assert_eq!(c.len(), 1200);
        assert!(c[..600].iter().all(|&v| v == 7.0));
        assert!(c[600..].iter().all(|&v| v == 0.0));
    }

    #[test]
    fn the_smallest_vector_that_fits_is_chosen() {
        let s = Scratch::<u8>::new(1 << 20);
        let (small, big) = (s.zeroed(100), s.zeroed(10_000));
        let (ps, pb) = (small.as_ptr(), big.as_ptr());
        drop((small, big));
        assert_eq!(s.zeroed(50).as_ptr(), ps);
        assert_eq!(s.zeroed(5_000).as_ptr(), pb);
        // Nothing fits: the largest is grown (and kept).
        let grown = s.zeroed(20_000);
        assert_eq!(grown.len(), 20_000);
        drop(grown);
        assert!(s.kept_bytes() >= 20_000);
    }

    #[test]
    fn more_than_the_cap_is_freed_not_kept() {
        let s = Scratch::<u8>::new(1000);
        let (a, b) = (s.zeroed(600), s.zeroed(600));
        drop(a);
        drop(b);
        assert_eq!(s.kept_bytes(), 600, "the second would pass the cap");
        let mut e = s.empty(10);
        assert!(e.is_empty());
        e.vec_mut().extend([1, 2, 3]);
        assert_eq!(&e[..], &[1, 2, 3]);
    }
}
