//! The raw bpf(2) calls aya 0.14 does not offer: link details (the interface a pinned link is
//! on), batch map reads (aya-rs/aya#1124) and writes, and an element read of a value whose type is
//! not known in advance (a pinned record of another version).

use std::os::fd::{AsFd, AsRawFd};

use aya::{maps::MapData, Pod};
use aya_obj::generated::{bpf_attr, bpf_cmd};

pub fn sys_bpf(cmd: bpf_cmd, attr: &mut bpf_attr) -> std::io::Result<i64> {
    // SAFETY: attr is a valid, zero-initialised bpf_attr of the size we pass.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd as i64,
            attr as *mut bpf_attr,
            std::mem::size_of::<bpf_attr>(),
        )
    };
    if rc < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

/// Entries per BPF_MAP_LOOKUP_BATCH call.
const CHUNK: usize = 8192;

/// Every entry of a hash map, a chunk per syscall (BPF_MAP_LOOKUP_BATCH, Linux 5.6) instead
/// of two syscalls per entry. Err on kernels or map types without batch support.
pub fn lookup_all<K: Pod, V: Pod>(map: &MapData) -> std::io::Result<Vec<(K, V)>> {
    let (ks, vs) = (std::mem::size_of::<K>(), std::mem::size_of::<V>());
    let mut out = Vec::new();
    batches(map, ks, vs, |keys, values, n| {
        for i in 0..n {
            // SAFETY: the kernel filled n keys and values of these sizes; Pod types are
            // valid for any bytes, and read_unaligned copes with the byte buffers.
            let (k, v) = unsafe {
                (
                    std::ptr::read_unaligned(keys.as_ptr().add(i * ks) as *const K),
                    std::ptr::read_unaligned(values.as_ptr().add(i * vs) as *const V),
                )
            };
            out.push((k, v));
        }
    })?;
    Ok(out)
}

/// How many entries a hash map holds, read as [`lookup_all`] reads them but kept nowhere:
/// `status` counts a million-entry map without building it.
pub fn count_all(map: &MapData, key_size: usize, value_size: usize) -> std::io::Result<usize> {
    let mut count = 0;
    batches(map, key_size, value_size, |_, _, n| count += n)?;
    Ok(count)
}

/// Walks a hash map a chunk at a time: `f(keys, values, n)` for each chunk of n entries.
fn batches(
    map: &MapData,
    ks: usize,
    vs: usize,
    mut f: impl FnMut(&[u8], &[u8], usize),
) -> std::io::Result<()> {
    let mut keys = vec![0u8; CHUNK * ks];
    let mut values = vec![0u8; CHUNK * vs];
    // The resume token: a bucket index for hash maps; room for more to be safe.
    let mut token_in = [0u64; 2];
    let mut token_out = [0u64; 2];
    let mut first = true;
    loop {
        // SAFETY: bpf_attr is plain data; zeroed is its valid empty state.
        let mut attr: bpf_attr = unsafe { std::mem::zeroed() };
        attr.batch.in_batch = if first { 0 } else { token_in.as_ptr() as u64 };
        attr.batch.out_batch = token_out.as_mut_ptr() as u64;
        attr.batch.keys = keys.as_mut_ptr() as u64;
        attr.batch.values = values.as_mut_ptr() as u64;
        attr.batch.count = CHUNK as u32;
        attr.batch.map_fd = map.fd().as_fd().as_raw_fd() as u32;
        let r = sys_bpf(bpf_cmd::BPF_MAP_LOOKUP_BATCH, &mut attr);
        // SAFETY: the kernel wrote back how many entries it copied.
        let n = unsafe { attr.batch.count } as usize;
        f(&keys, &values, n.min(CHUNK));
        match r {
            Ok(_) => {
                token_in = token_out;
                first = false;
            }
            // The end of the map.
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(()),
            Err(e) => return Err(e),
        }
    }
}

/// Writes `entries` a chunk per syscall (BPF_MAP_UPDATE_BATCH, Linux 5.6) instead of one
/// syscall each: a cold start writes a million exempt entries. Err((written, error)) on a
/// failure, with how many went in (in all; not a prefix of `entries` once split).
///
/// A large write is split across the machine's cores, a part per thread: the time is the
/// kernel's (an allocation and a bucket insert per entry, ~0.85 us here, 1.7 s of a cold
/// start at 2.1M entries), and a hash map's inserts on other buckets do not wait on each
/// other. Entries of one write have no order among them (the apply orders its writes, and
/// the keys of one write are distinct). The calling thread writes the first part; a part
/// whose thread cannot be started is written there too.
pub fn update_batch<K: Pod + Sync, V: Pod + Sync>(
    map: &MapData,
    entries: &[(K, V)],
) -> Result<(), (usize, std::io::Error)> {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get().min(4));
    let parts = threads.min(entries.len() / PART_MIN).max(1);
    if parts == 1 {
        return update_batch_on(map, entries);
    }
    let part = entries.len().div_ceil(parts);
    let results: Vec<_> = std::thread::scope(|s| {
        let mut chunks = entries.chunks(part);
        let first = chunks.next().unwrap_or_default();
        let handles: Vec<_> = chunks
            .map(|p| {
                let h = std::thread::Builder::new()
                    .name("port25-mapwrite".into())
                    .spawn_scoped(s, move || update_batch_on(map, p));
                (p, h.ok())
            })
            .collect();
        let mut results = vec![(first.len(), update_batch_on(map, first))];
        for (p, h) in handles {
            let r = match h {
                Some(h) => h.join().unwrap_or_else(|_| {
                    Err((0, std::io::Error::other("a batch-writing thread panicked")))
                }),
                None => update_batch_on(map, p),
            };
            results.push((p.len(), r));
        }
        results
    });
    let written = results
        .iter()
        .map(|(len, r)| match r {
            Ok(()) => *len,
            Err((n, _)) => *n,
        })
        .sum();
    let mut errors = results.into_iter().filter_map(|(_, r)| r.err());
    match errors.next() {
        // Two writers on one CPU can meet the kernel's per-CPU bucket-lock guard on older
        // preemptible kernels (EBUSY, before "bpf: Disable preemption when increasing
        // per-cpu map_locked"): the whole write again, on this thread alone (a write of
        // the same keys and values twice is the same map).
        Some((_, e)) if e.raw_os_error() == Some(libc::EBUSY) => update_batch_on(map, entries),
        Some((_, e)) => Err((written, e)),
        None => Ok(()),
    }
}

/// Entries below which a write stays on the calling thread (a thread's start is ~50 us; a
/// part of this size takes ~50 ms).
const PART_MIN: usize = 64 * 1024;

fn update_batch_on<K: Pod, V: Pod>(
    map: &MapData,
    entries: &[(K, V)],
) -> Result<(), (usize, std::io::Error)> {
    let (ks, vs) = (std::mem::size_of::<K>(), std::mem::size_of::<V>());
    let mut keys = vec![0u8; CHUNK.min(entries.len()) * ks];
    let mut values = vec![0u8; CHUNK.min(entries.len()) * vs];
    let mut written = 0;
    for chunk in entries.chunks(CHUNK) {
        for (i, (k, v)) in chunk.iter().enumerate() {
            // SAFETY: Pod types are plain bytes; the buffers hold CHUNK of each, and
            // write_unaligned copes with the byte buffers' alignment.
            unsafe {
                std::ptr::write_unaligned(keys.as_mut_ptr().add(i * ks) as *mut K, *k);
                std::ptr::write_unaligned(values.as_mut_ptr().add(i * vs) as *mut V, *v);
            }
        }
        // SAFETY: bpf_attr is plain data; zeroed is its valid empty state.
        let mut attr: bpf_attr = unsafe { std::mem::zeroed() };
        attr.batch.keys = keys.as_mut_ptr() as u64;
        attr.batch.values = values.as_mut_ptr() as u64;
        attr.batch.count = chunk.len() as u32;
        attr.batch.map_fd = map.fd().as_fd().as_raw_fd() as u32;
        if let Err(e) = sys_bpf(bpf_cmd::BPF_MAP_UPDATE_BATCH, &mut attr) {
            // SAFETY: the kernel wrote back how many entries it wrote.
            let n = unsafe { attr.batch.count } as usize;
            return Err((written + n.min(chunk.len()), e));
        }
        written += chunk.len();
    }
    Ok(())
}

/// The value at `key` as raw bytes (`value_size` of them, as the map declares), whatever
/// type a version of port25 gave it.
pub fn lookup_raw(map: &MapData, key: &[u8], value_size: usize) -> std::io::Result<Vec<u8>> {
    let mut value = vec![0u8; value_size];
    // SAFETY: bpf_attr is plain data; zeroed is its valid empty state.
    let mut attr: bpf_attr = unsafe { std::mem::zeroed() };
    attr.__bindgen_anon_2.map_fd = map.fd().as_fd().as_raw_fd() as u32;
    attr.__bindgen_anon_2.key = key.as_ptr() as u64;
    attr.__bindgen_anon_2.__bindgen_anon_1.value = value.as_mut_ptr() as u64;
    sys_bpf(bpf_cmd::BPF_MAP_LOOKUP_ELEM, &mut attr)?;
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bpf::datapath::EBPF_OBJECT;
    use port25_common::maps::{Exempt, EXIP4};

    /// The exempt-address map of the embedded object, created (not pinned) with room for
    /// `room` entries. None when not root or built without the object.
    fn exip4(room: u32) -> Option<aya::Ebpf> {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: needs root to create maps");
            return None;
        }
        if EBPF_OBJECT.is_empty() {
            eprintln!("skipped: built with AYA_BUILD_SKIP, no kernel object");
            return None;
        }
        Some(
            aya::EbpfLoader::new()
                .map_max_entries(EXIP4, room)
                .load(EBPF_OBJECT)
                .expect("create the maps"),
        )
    }

    fn entries(n: u32) -> Vec<([u8; 4], Exempt)> {
        (0..n)
            .map(|i| {
                let v = Exempt {
                    expires_ns: i as u64 * 3,
                    origin: i % 5,
                    _pad: 0,
                };
                ((0x6440_0000 + i).to_be_bytes(), v)
            })
            .collect()
    }

    /// A write large enough to be split across threads puts every entry in, each with its
    /// own value, as the kernel reads them back.
    #[test]
    fn a_split_batch_write_puts_every_entry_in() {
        let Some(ebpf) = exip4(1 << 20) else { return };
        let map = ebpf.map(EXIP4).unwrap();
        let aya::maps::Map::HashMap(data) = map else {
            panic!("{EXIP4} is a hash map")
        };
        let want = entries(3 * PART_MIN as u32 + 17);
        update_batch(data, &want).expect("the batch write");
        let mut have = lookup_all::<[u8; 4], Exempt>(data).expect("read back");
        have.sort_unstable_by_key(|(k, _)| *k);
        assert_eq!(have.len(), want.len());
        assert!(have == want, "the map holds exactly the entries written");
    }

    /// A map too small for the write: the error is the kernel's "full" (E2BIG), and the
    /// count is how many went in across all the threads. That is the map's room, or a few
    /// more: the kernel checks the count of a large map, then adds to it, so writers on two
    /// CPUs can both pass the check at the last free place.
    #[test]
    fn a_split_batch_write_into_a_full_map_says_how_many_went_in() {
        let room = 2 * PART_MIN as u32 + 1000;
        let Some(ebpf) = exip4(room) else { return };
        let map = ebpf.map(EXIP4).unwrap();
        let aya::maps::Map::HashMap(data) = map else {
            panic!("{EXIP4} is a hash map")
        };
        let want = entries(4 * PART_MIN as u32);
        let Err((written, e)) = update_batch(data, &want) else {
            panic!("a write of {} into room for {room} fails", want.len())
        };
        assert_eq!(e.raw_os_error(), Some(libc::E2BIG), "{e}");
        let held = lookup_all::<[u8; 4], Exempt>(data).unwrap().len();
        assert_eq!(written, held, "the count is what the map holds");
        assert!(
            (room as usize..room as usize + 4).contains(&held),
            "{held} in room for {room}"
        );
    }
}
