//! The binary's allocator: mimalloc for the daemon and the verbs that read a million map
//! entries, glibc's for everything else.
//!
//! Measured at a million sessions (`cargo xtask bench`): a `session sync` of 100,000 took
//! 1.65-1.75 s instead of 1.85-1.9, `status` and `check` 52 ms instead of 72-80; a restart
//! was no faster. But mimalloc's first allocation maps an arena and faults in a huge page:
//! half a millisecond more on every short client call, which a hook per session event
//! pays. So the choice is made per verb, once the command line is read ([`use_mimalloc`]);
//! blocks allocated before it stay glibc's.
//!
//! Each block is freed by the allocator that made it, told apart by mimalloc's own page map
//! (`mi_is_in_heap_region`: true for its pages, false for every other address). mimalloc's
//! constructor still runs in every process (it sets up the empty page map and reads the
//! `MIMALLOC_*` environment variables; `MIMALLOC_VERBOSE` and `MIMALLOC_SHOW_STATS` would
//! print to stderr): a client call measured 2.45 ms with it, as without it.

use std::{
    alloc::{GlobalAlloc, Layout, System},
    sync::atomic::{AtomicBool, Ordering},
};

use mimalloc::MiMalloc;

static MIMALLOC: AtomicBool = AtomicBool::new(false);

/// New blocks come from mimalloc from now on.
pub fn use_mimalloc() {
    MIMALLOC.store(true, Ordering::Relaxed);
}

/// Declared by the binary: `#[global_allocator] static A: port25_ctl::alloc::PerVerb`.
pub struct PerVerb;

#[inline]
fn mimallocs(p: *mut u8) -> bool {
    // SAFETY: a lookup in mimalloc's page map; any address may be asked.
    unsafe { libmimalloc_sys::mi_is_in_heap_region(p as *const _) }
}

// SAFETY: every block comes whole from one of two allocators that meet GlobalAlloc's
// contract, and goes back (freed, resized) to the one that made it.
unsafe impl GlobalAlloc for PerVerb {
    #[inline]
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if MIMALLOC.load(Ordering::Relaxed) {
            unsafe { MiMalloc.alloc(layout) }
        } else {
            unsafe { System.alloc(layout) }
        }
    }

    #[inline]
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if MIMALLOC.load(Ordering::Relaxed) {
            unsafe { MiMalloc.alloc_zeroed(layout) }
        } else {
            unsafe { System.alloc_zeroed(layout) }
        }
    }

    #[inline]
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        if mimallocs(ptr) {
            unsafe { MiMalloc.dealloc(ptr, layout) }
        } else {
            unsafe { System.dealloc(ptr, layout) }
        }
    }

    #[inline]
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if mimallocs(ptr) {
            unsafe { MiMalloc.realloc(ptr, layout, new_size) }
        } else {
            unsafe { System.realloc(ptr, layout, new_size) }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Blocks of both allocators, made before and after the switch, each freed and resized
    /// by the one that made it (a wrong pairing aborts or corrupts the heap in the test).
    #[test]
    fn each_block_goes_back_to_its_allocator() {
        let a = PerVerb;
        let sizes = [1usize, 24, 4096, 1 << 20, 64 << 20];
        let layouts: Vec<Layout> = sizes
            .iter()
            .map(|s| Layout::from_size_align(*s, 16).unwrap())
            .collect();
        let mut glibc = Vec::new();
        for l in &layouts {
            let p = unsafe { System.alloc(*l) };
            assert!(!p.is_null());
            assert!(!mimallocs(p), "a glibc block is not mimalloc's");
            glibc.push((p, *l));
        }
        let mut mi = Vec::new();
        for l in &layouts {
            let p = unsafe { MiMalloc.alloc(*l) };
            assert!(!p.is_null());
            assert!(
                mimallocs(p),
                "a mimalloc block of {} bytes is found",
                l.size()
            );
            mi.push((p, *l));
        }
        for (p, l) in glibc.into_iter().chain(mi) {
            unsafe {
                p.write_bytes(0xa5, l.size());
                let q = a.realloc(p, l, l.size() * 2);
                assert!(!q.is_null());
                assert_eq!(*q.add(l.size() - 1), 0xa5, "contents kept");
                a.dealloc(q, Layout::from_size_align(l.size() * 2, 16).unwrap());
            }
        }
    }
}
