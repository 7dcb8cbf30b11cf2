//! Residency of byte ranges of the mapping: what expert paging asks of the
//! kernel. Every call takes absolute file byte ranges (the mapping starts at
//! file offset 0) and is a no-op on an owned buffer. This and the mapping in
//! `reader.rs` are the daemon's only `unsafe` code outside the kernels.
//!
//! All of these only change *where* the file's bytes live (our page tables,
//! the page cache, the disk), never what a read of the mapping returns: the
//! mapping is read-only and shared, so a dropped page is read back from the
//! file on the next touch. That is what makes paging unable to change
//! results.

use super::Gguf;
use std::io;
use std::ops::Range;
use std::os::fd::AsRawFd;

/// The system page size (4 KiB on x86-64 and most aarch64 kernels).
pub fn page_size() -> usize {
    // SAFETY: sysconf has no memory effects; it returns -1 on error.
    let p = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if p > 0 { p as usize } else { 4096 }
}

fn check(rc: libc::c_int, what: &str) -> io::Result<()> {
    if rc == 0 {
        Ok(())
    } else {
        let e = io::Error::last_os_error();
        Err(io::Error::new(e.kind(), format!("{what}: {e}")))
    }
}

impl Gguf {
    /// Start address and length of the mapping, if the file is mapped.
    pub fn map_addr(&self) -> Option<(usize, usize)> {
        self.mmap().map(|m| (m.as_ptr() as usize, m.len()))
    }

    /// The pages covering `r` (outward to page bounds, clamped to the
    /// mapping), as (pointer, length). `None` when unmapped or empty.
    fn outer(&self, r: &Range<u64>) -> Option<(*mut libc::c_void, usize)> {
        let m = self.mmap()?;
        let ps = page_size() as u64;
        let end = r.end.min(m.len() as u64);
        if r.start >= end {
            return None;
        }
        let s = r.start / ps * ps;
        let e = end.div_ceil(ps) * ps;
        // The mapping's last page may be partial in the file but is whole in
        // memory: the kernel rounds the mapping up to a page.
        Some((
            m.as_ptr().wrapping_add(s as usize) as *mut _,
            (e - s) as usize,
        ))
    }

    /// The whole pages inside `r` (inward to page bounds): the pages no
    /// neighbouring range shares. `None` when there are none.
    fn inner(&self, r: &Range<u64>) -> Option<(*mut libc::c_void, usize, u64)> {
        let m = self.mmap()?;
        let ps = page_size() as u64;
        let s = r.start.div_ceil(ps) * ps;
        let e = r.end.min(m.len() as u64) / ps * ps;
        (s < e).then(|| {
            (
                m.as_ptr().wrapping_add(s as usize) as *mut _,
                (e - s) as usize,
                s,
            )
        })
    }

    /// Bytes of `r` whose pages are in memory (page cache), by `mincore`.
    /// Counted in whole pages, so up to a page more than `r` at each end.
    pub fn resident_bytes(&self, r: Range<u64>) -> io::Result<u64> {
        let Some((ptr, len)) = self.outer(&r) else {
            return Ok(if self.mmap().is_none() {
                r.end - r.start
            } else {
                0
            });
        };
        let ps = page_size();
        let mut vec = vec![0u8; len.div_ceil(ps)];
        // SAFETY: `ptr..ptr+len` lies inside our live mapping (page-aligned,
        // clamped to its length); `vec` has one byte per page of it, which is
        // all mincore writes.
        check(
            unsafe { libc::mincore(ptr, len, vec.as_mut_ptr()) },
            "mincore",
        )?;
        Ok(vec.iter().filter(|&&b| b & 1 != 0).count() as u64 * ps as u64)
    }

    /// Bytes of `r` mapped into this process (its resident set), from the
    /// present bits of `/proc/self/pagemap`, in whole pages. The page cache
    /// may hold more of the file (see [`Gguf::resident_bytes`]); this is
    /// what /proc/self/smaps counts as the mapping's Rss.
    pub fn mapped_bytes(&self, r: Range<u64>) -> io::Result<u64> {
        use std::os::unix::fs::FileExt;
        let Some((ptr, len)) = self.outer(&r) else {
            return Ok(0);
        };
        // Opened once: the pager asks about hundreds of ranges per sweep.
        static PAGEMAP: std::sync::OnceLock<Result<std::fs::File, io::ErrorKind>> =
            std::sync::OnceLock::new();
        let f = PAGEMAP
            .get_or_init(|| std::fs::File::open("/proc/self/pagemap").map_err(|e| e.kind()))
            .as_ref()
            .map_err(|&k| io::Error::new(k, "opening /proc/self/pagemap"))?;
        let ps = page_size();
        let pages = len / ps;
        let mut buf = vec![0u8; pages * 8];
        f.read_exact_at(&mut buf, (ptr as usize / ps * 8) as u64)?;
        let present = buf
            .chunks_exact(8)
            .filter(|e| u64::from_le_bytes((*e).try_into().unwrap_or([0; 8])) >> 63 == 1)
            .count();
        Ok((present * ps) as u64)
    }

    /// Asks for the pages `r` touches to be backed by transparent huge pages
    /// (`MADV_HUGEPAGE`), or for `r`'s whole pages no longer to be
    /// (`MADV_NOHUGEPAGE`, `huge` false, leaving shared edge pages as they are):
    /// faults then read 2 MiB folios into the page cache and map them with
    /// one page-table entry, which spares decode (a stream of ~1 GB a
    /// token) most of its TLB misses. Returns whether huge pages are on for
    /// `r` now (asked for and THP not `never`); advice the kernel cannot
    /// take is not an error.
    pub fn advise_huge(&self, r: Range<u64>, huge: bool) -> io::Result<bool> {
        let enabled = std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled")
            .is_ok_and(|s| !s.contains("[never]"));
        // Huge: every page `r` touches (a page shared with a neighbour can
        // only be mapped huge with a whole 2 MiB block of advised pages
        // around it). Not: only the pages no neighbour shares.
        let span = if huge {
            self.outer(&r)
        } else {
            self.inner(&r).map(|(p, l, _)| (p, l))
        };
        let Some((ptr, len)) = span else {
            return Ok(false);
        };
        let (advice, name) = if huge {
            (libc::MADV_HUGEPAGE, "MADV_HUGEPAGE")
        } else {
            (libc::MADV_NOHUGEPAGE, "MADV_NOHUGEPAGE")
        };
        // SAFETY: advice on pages of our read-only mapping; huge pages hold
        // the same file bytes, so every `&[u8]` into it stays valid.
        let rc = unsafe { libc::madvise(ptr, len, advice) };
        if rc != 0 {
            let e = io::Error::last_os_error();
            // EINVAL: a kernel built without THP.
            if e.raw_os_error() == Some(libc::EINVAL) {
                return Ok(false);
            }
            return Err(io::Error::new(e.kind(), format!("{name}: {e}")));
        }
        Ok(huge && enabled)
    }

    /// Reads `r` into memory and maps it, blocking until done
    /// (`MADV_POPULATE_READ`; `MADV_WILLNEED` on kernels before 5.14).
    /// Meant for a helper thread: the engine then finds the pages mapped.
    pub fn populate(&self, r: Range<u64>) -> io::Result<()> {
        let Some((ptr, len)) = self.outer(&r) else {
            return Ok(());
        };
        // SAFETY: advice on pages of our read-only mapping; populating only
        // faults pages in, it cannot change what they read as.
        let rc = unsafe { libc::madvise(ptr, len, libc::MADV_POPULATE_READ) };
        if rc == 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EINVAL) {
            return Err(io::Error::new(e.kind(), format!("MADV_POPULATE_READ: {e}")));
        }
        // SAFETY: as above; WILLNEED starts readahead and returns.
        check(
            unsafe { libc::madvise(ptr, len, libc::MADV_WILLNEED) },
            "MADV_WILLNEED",
        )
    }

    /// Starts reading exactly the pages of `r` into the page cache, without
    /// waiting or mapping them (`POSIX_FADV_WILLNEED` on the file: unlike a
    /// fault, it reads nothing beyond the range).
    pub fn read_ahead(&self, r: Range<u64>) -> io::Result<()> {
        let (Some(f), Some((_, len))) = (&self.file, self.outer(&r)) else {
            return Ok(());
        };
        let ps = page_size() as u64;
        // SAFETY: fadvise takes a descriptor we own and plain integers.
        let rc = unsafe {
            libc::posix_fadvise(
                f.as_raw_fd(),
                (r.start / ps * ps) as libc::off_t,
                len as libc::off_t,
                libc::POSIX_FADV_WILLNEED,
            )
        };
        if rc != 0 {
            let e = io::Error::from_raw_os_error(rc);
            return Err(io::Error::new(
                e.kind(),
                format!("POSIX_FADV_WILLNEED: {e}"),
            ));
        }
        Ok(())
    }

    /// Starts reading `r` into the page cache without waiting or mapping it
    /// (`MADV_WILLNEED`).
    pub fn will_need(&self, r: Range<u64>) -> io::Result<()> {
        let Some((ptr, len)) = self.outer(&r) else {
            return Ok(());
        };
        // SAFETY: advice on pages of our read-only mapping; no effect on
        // their contents.
        check(
            unsafe { libc::madvise(ptr, len, libc::MADV_WILLNEED) },
            "MADV_WILLNEED",
        )
    }

    /// Gives the whole pages of `r` back: reclaims them (`MADV_PAGEOUT`),
    /// unmaps them from this process (`MADV_DONTNEED`) and drops them from
    /// the page cache (`POSIX_FADV_DONTNEED`; pages another process maps
    /// stay). Returns the
    /// bytes covered. The next read of `r` reads the file again.
    pub fn evict(&self, r: Range<u64>) -> io::Result<u64> {
        let Some((ptr, len, off)) = self.inner(&r) else {
            return Ok(0);
        };
        // SAFETY (both calls): the pages belong to our shared, read-only file
        // mapping. PAGEOUT and DONTNEED only reclaim pages and drop
        // page-table entries: the next access faults the same file bytes
        // back in, so every `&[u8]` into the mapping stays valid and keeps
        // its contents (the file is never rewritten in place; see `Gguf`).
        //
        // PAGEOUT first: it splits a large folio that reaches past the range
        // (files written or read ahead recently sit in large folios), which
        // fadvise alone would skip whole. Kernels before 5.4 lack it (EINVAL):
        // then only whole folios inside the range leave.
        unsafe { libc::madvise(ptr, len, libc::MADV_PAGEOUT) };
        check(
            unsafe { libc::madvise(ptr, len, libc::MADV_DONTNEED) },
            "MADV_DONTNEED",
        )?;
        if let Some(f) = &self.file {
            // SAFETY: fadvise takes a descriptor we own and plain integers.
            let rc = unsafe {
                libc::posix_fadvise(
                    f.as_raw_fd(),
                    off as libc::off_t,
                    len as libc::off_t,
                    libc::POSIX_FADV_DONTNEED,
                )
            };
            if rc != 0 {
                let e = io::Error::from_raw_os_error(rc);
                return Err(io::Error::new(
                    e.kind(),
                    format!("POSIX_FADV_DONTNEED: {e}"),
                ));
            }
        }
        Ok(len as u64)
    }

    /// Locks the pages of `r` in memory (faulting them in first).
    pub fn lock(&self, r: Range<u64>) -> io::Result<()> {
        let Some((ptr, len)) = self.outer(&r) else {
            return Ok(());
        };
        // SAFETY: mlock pins pages of our live mapping; no effect on contents.
        check(unsafe { libc::mlock(ptr, len) }, "mlock")
    }

    /// Undoes [`Gguf::lock`].
    pub fn unlock(&self, r: Range<u64>) -> io::Result<()> {
        let Some((ptr, len)) = self.outer(&r) else {
            return Ok(());
        };
        // SAFETY: munlock on pages of our live mapping; no effect on contents.
        check(unsafe { libc::munlock(ptr, len) }, "munlock")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn mapped(bytes: usize) -> (tempfile::TempDir, Gguf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.gguf");
        let f = std::fs::File::create(&path).unwrap();
        let spec =
            crate::gguf::TensorSpec::new("t", &[bytes as u64 / 4], crate::gguf::GgmlType::F32);
        let mut w = crate::gguf::GgufWriter::new(f, &[], vec![spec]).unwrap();
        w.write_data(&vec![7u8; bytes]).unwrap();
        let mut f = w.finish().unwrap();
        f.flush().unwrap();
        // Clean pages: dirty ones cannot leave the page cache.
        f.sync_all().unwrap();
        (dir, Gguf::open(&path).unwrap())
    }

    #[test]
    fn evicted_pages_leave_memory_and_read_back_the_same() {
        let ps = page_size() as u64;
        let (_d, g) = mapped(64 * ps as usize);
        let len = g.bytes().len() as u64;
        // Page-aligned in the file, so exactly 32 pages.
        let r = (len - 40 * ps) / ps * ps..(len - 8 * ps) / ps * ps;
        assert_eq!(g.mapped_bytes(r.clone()).unwrap(), 0);
        g.populate(r.clone()).unwrap();
        assert_eq!(g.resident_bytes(r.clone()).unwrap(), 32 * ps);
        assert_eq!(g.mapped_bytes(r.clone()).unwrap(), 32 * ps);
        let sum: u64 = g.bytes()[r.start as usize..r.end as usize]
            .iter()
            .map(|&b| b as u64)
            .sum();
        assert_eq!(g.evict(r.clone()).unwrap(), 32 * ps);
        // A page another mapping holds stays in the page cache; ours does
        // not, and nobody else maps this fresh file.
        assert_eq!(g.resident_bytes(r.clone()).unwrap(), 0);
        assert_eq!(g.mapped_bytes(r.clone()).unwrap(), 0);
        let again: u64 = g.bytes()[r.start as usize..r.end as usize]
            .iter()
            .map(|&b| b as u64)
            .sum();
        assert_eq!(sum, again);
        assert_eq!(sum, 7 * 32 * ps);
    }

    #[test]
    fn partial_pages_are_kept_by_evict_and_counted_by_residency() {
        let ps = page_size() as u64;
        let (_d, g) = mapped(16 * ps as usize);
        let len = g.bytes().len() as u64;
        // Less than a whole page inside: nothing to evict.
        let r = len - 3 * ps - 10..len - 2 * ps + 10;
        assert_eq!(g.evict(r.clone()).unwrap(), 0);
        g.populate(r.clone()).unwrap();
        assert_eq!(g.resident_bytes(r).unwrap(), 2 * ps);
        // Empty and out-of-range ranges are no-ops.
        assert_eq!(g.resident_bytes(len..len + 5).unwrap(), 0);
        g.populate(len..len + 5).unwrap();
    }

    #[test]
    fn huge_page_advice_keeps_bytes_and_eviction_working() {
        let ps = page_size() as u64;
        let (_d, g) = mapped(1024 * ps as usize);
        let len = g.bytes().len() as u64;
        // Advice on the whole mapping and on a range inside it; what the
        // kernel does with it depends on its THP setting, never on bytes.
        let thp = g.advise_huge(0..len, true).unwrap();
        let r = (len / 2) / ps * ps..(len / 2) / ps * ps + 32 * ps;
        assert_eq!(g.advise_huge(r.clone(), true).unwrap(), thp);
        // Taking the advice back for part of it (a cap that shrank) is
        // never "on", and giving it again is as before.
        assert!(!g.advise_huge(r.clone(), false).unwrap());
        assert_eq!(g.advise_huge(r.clone(), true).unwrap(), thp);
        g.populate(0..len).unwrap();
        assert!(g.bytes()[g.bytes().len() - 4096..].iter().all(|&b| b == 7));
        // Eviction still gives the range back, huge pages or not (a huge
        // page is split to give back part of it).
        assert_eq!(g.evict(r.clone()).unwrap(), 32 * ps);
        assert_eq!(g.mapped_bytes(r.clone()).unwrap(), 0);
        let sum: u64 = g.bytes()[r.start as usize..r.end as usize]
            .iter()
            .map(|&b| u64::from(b))
            .sum();
        assert_eq!(sum, 7 * 32 * ps);
        // Out of range: nothing to advise.
        assert!(!g.advise_huge(len + 1..len + 5, true).unwrap());
    }
}
