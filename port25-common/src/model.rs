//! The reference model: the policy maps as plain collections, answered by linear search.
//!
//! Deliberately simple (no tries, no hashing tricks) so that the kernel's maps can be checked
//! against it frame by frame.

use std::collections::{BTreeMap, BTreeSet};

use crate::{
    addr::{contains, mask},
    maps::{Exempt, NetKey6, Settings},
    verdict::Maps,
};

#[derive(Clone, Debug, Default)]
pub struct Model {
    pub settings: Option<Settings>,
    pub ports: BTreeSet<u16>,
    pub ranges4: Vec<([u8; 4], u32)>,
    pub ranges6: Vec<([u8; 16], u32)>,
    pub mail4: Vec<([u8; 4], u32)>,
    pub mail6: Vec<([u8; 16], u32)>,
    pub exip4: BTreeMap<[u8; 4], Exempt>,
    pub exip6: BTreeMap<[u8; 16], Exempt>,
    pub expfx4: Vec<([u8; 4], u32, Exempt)>,
    pub expfx6: Vec<([u8; 16], u32, Exempt)>,
    pub exnet6: Vec<(NetKey6, Exempt)>,
    pub now_ns: u64,
}

fn any_match<const N: usize>(list: &[([u8; N], u32)], a: [u8; N]) -> bool {
    list.iter().any(|(net, len)| contains(*net, *len, a))
}

/// The longest matching prefix's value, as an LPM trie answers.
fn longest<const N: usize>(list: &[([u8; N], u32, Exempt)], a: [u8; N]) -> Option<Exempt> {
    list.iter()
        .filter(|(net, len, _)| contains(*net, *len, a))
        .max_by_key(|(_, len, _)| *len)
        .map(|(_, _, e)| *e)
}

impl Maps for Model {
    type Settings<'a> = &'a Settings;
    fn settings(&self) -> Option<&Settings> {
        self.settings.as_ref()
    }
    fn port_blocked(&self, port: u16) -> bool {
        self.ports.contains(&port)
    }
    fn in_ranges4(&self, a: [u8; 4]) -> bool {
        any_match(&self.ranges4, a)
    }
    fn in_ranges6(&self, a: [u8; 16]) -> bool {
        any_match(&self.ranges6, a)
    }
    fn mail_server4(&self, a: [u8; 4]) -> bool {
        any_match(&self.mail4, a)
    }
    fn mail_server6(&self, a: [u8; 16]) -> bool {
        any_match(&self.mail6, a)
    }
    fn exempt_ip4(&self, a: [u8; 4]) -> Option<Exempt> {
        self.exip4.get(&a).copied()
    }
    fn exempt_ip6(&self, a: [u8; 16]) -> Option<Exempt> {
        self.exip6.get(&a).copied()
    }
    fn exempt_prefix4(&self, a: [u8; 4]) -> Option<Exempt> {
        longest(&self.expfx4, a)
    }
    fn exempt_prefix6(&self, a: [u8; 16]) -> Option<Exempt> {
        longest(&self.expfx6, a)
    }
    fn exempt_net6(&self, key: &NetKey6) -> Option<Exempt> {
        self.exnet6
            .iter()
            .find(|(k, _)| k.prefix_len == key.prefix_len && k.addr == mask(key.addr, k.prefix_len))
            .map(|(_, e)| *e)
    }
    /// No filter: every lookup is made, which is what a filter holding every key's bit
    /// decides (the kernel tables check that the daemon's filter does).
    fn filter_word(&self, _: u32) -> Option<u64> {
        None
    }
    fn now_ns(&self) -> u64 {
        self.now_ns
    }
}
