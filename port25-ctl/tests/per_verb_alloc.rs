//! The binary's allocator as the binary runs it: `PerVerb` global, blocks made before the
//! switch to mimalloc freed and resized after it, on other threads too, and the other way
//! round. A block freed by the wrong allocator aborts this test or corrupts its contents.

use port25_ctl::alloc::{use_mimalloc, PerVerb};

#[global_allocator]
static ALLOC: PerVerb = PerVerb;

fn owned_by_mimalloc<T>(p: *const T) -> bool {
    // SAFETY: a page-map lookup; any address may be asked.
    unsafe { libmimalloc_sys::mi_is_in_heap_region(p.cast()) }
}

fn filled(n: usize, seed: u8) -> Vec<u8> {
    (0..n).map(|i| (i as u8).wrapping_add(seed)).collect()
}

fn check(v: &[u8], seed: u8) {
    assert!(v
        .iter()
        .enumerate()
        .all(|(i, b)| *b == (i as u8).wrapping_add(seed)));
}

#[test]
fn blocks_from_before_and_after_the_switch_go_back_to_their_allocator() {
    let sizes = [1usize, 7, 64, 4096, 100_000, 3 << 20];
    let before: Vec<Vec<u8>> = sizes.iter().map(|n| filled(*n, 1)).collect();
    let before_strings: Vec<String> = (0..10_000).map(|i| format!("user{i}")).collect();
    for v in &before {
        assert!(!owned_by_mimalloc(v.as_ptr()), "glibc's before the switch");
    }
    use_mimalloc();
    let after: Vec<Vec<u8>> = sizes.iter().map(|n| filled(*n, 2)).collect();
    for v in &after {
        assert!(owned_by_mimalloc(v.as_ptr()), "mimalloc's after the switch");
    }
    // Each side grown (realloc), shrunk and freed on threads of their own, crossed.
    let threads: Vec<_> = [(before, 1u8), (after, 2u8)]
        .into_iter()
        .map(|(mut vs, seed)| {
            std::thread::spawn(move || {
                for v in &mut vs {
                    let n = v.len();
                    v.extend(std::iter::repeat_n(0, n * 3));
                    check(&v[..n], seed);
                    v.truncate(n);
                    v.shrink_to_fit();
                    check(v, seed);
                }
                drop(vs);
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    // A map made of both kinds of block, rebuilt and dropped (what a reconcile does).
    let mut m: std::collections::HashMap<String, Vec<u8>> = before_strings
        .into_iter()
        .map(|s| {
            let v = filled(s.len(), 3);
            (s, v)
        })
        .collect();
    for i in 0..10_000 {
        m.insert(format!("new{i}"), filled(16, 3));
    }
    assert_eq!(m.len(), 20_000);
    let moved = std::thread::spawn(move || {
        m.values().for_each(|v| check(v, 3));
        m.len()
    });
    assert_eq!(moved.join().unwrap(), 20_000);
}
