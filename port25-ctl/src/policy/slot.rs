//! Keys of the exempt maps, and which one holds a prefix: the one place that choice is made.
//! An exempt entry's value ([`Exempt`]) and how two of them for one key merge ([`longer`]).

use std::net::IpAddr;

use port25_common::maps::{self as m, Exempt, NetKey6};

use crate::{
    bpf::{
        livemaps::{LiveMaps, Table},
        maps::{decl::*, map_list},
    },
    net::Prefix,
};

macro_rules! slots {
    (
        $sf:ident: $sn:ident = $st:ty;
        policy { $( $stage:ident { $( $f:ident: $n:ident = $t:ty, $cap:expr $(, $slot:ident)?; )* } )* }
        $cf:ident: $cn:ident = $ct:ty, $ccap:expr;
        abuse { $( $af:ident: $an:ident = $at:ty, $acap:expr; )* }
    ) => {
        /// One key in one of the exempt maps (the map list's entries with a slot variant).
        #[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub enum Slot {
            $( $( $( $slot(<$t as Table>::K), )? )* )*
        }

        impl Slot {
            /// The name of the map the key belongs to.
            pub fn map(&self) -> &'static str {
                match self {
                    $( $( $( Slot::$slot(_) => m::$n, )? )* )*
                }
            }

            /// That map's capacity.
            pub fn capacity(&self, live: &LiveMaps) -> u32 {
                match self {
                    $( $( $( Slot::$slot(_) => live.$f.capacity(), )? )* )*
                }
            }
        }
    };
}
map_list!(slots);

impl Slot {
    /// Where a prefix lives: exact addresses in the hashes, IPv6 session prefixes in the
    /// per-length hash, other prefixes in the LPM tries.
    pub fn of(p: &Prefix, session: bool) -> Slot {
        match (p.addr, p.is_host()) {
            (IpAddr::V4(a), true) => Slot::Ip4(a.octets()),
            (IpAddr::V6(a), true) => Slot::Ip6(a.octets()),
            (IpAddr::V4(a), false) => Slot::Pfx4((a.octets(), p.len as u32)),
            (IpAddr::V6(a), false) if session => Slot::Net6(NetKey6 {
                prefix_len: p.len as u32,
                addr: a.octets(),
            }),
            (IpAddr::V6(a), false) => Slot::Pfx6((a.octets(), p.len as u32)),
        }
    }

    /// Where a session's address or prefix lives. An IPv4 session prefix (a routed
    /// Framed-Route) is written as one exact entry per address: exact entries are read
    /// before the LPM, so another user's narrower binding inside it never decides for an
    /// address the session holds (README, "Subscribers and the helpdesk"); IPv4 has no
    /// per-length session hash.
    /// The registry keeps such prefixes at most [`crate::registry::MAX_SESSION_PREFIX4`] wide.
    pub fn of_session(p: &Prefix) -> Vec<Slot> {
        let mut out = Vec::new();
        Slot::each_of_session(p, |s| out.push(s));
        out
    }

    /// [`Slot::of_session`] without its Vec: the full build visits a million sessions.
    pub fn each_of_session(p: &Prefix, mut f: impl FnMut(Slot)) {
        match p.addr {
            IpAddr::V4(a) if !p.is_host() => {
                let base = u32::from(a);
                let count = 1u64 << (32 - p.len as u32);
                for i in 0..count {
                    f(Slot::Ip4((base.wrapping_add(i as u32)).to_be_bytes()));
                }
            }
            _ => f(Slot::of(p, true)),
        }
    }
}

pub use port25_common::maps::BLOCKED_NS;

/// An entry that closes its address: a session of a user who is not unblocked.
pub fn closes(e: &Exempt) -> bool {
    e.owns() && e.expires_ns == BLOCKED_NS
}

/// Of two entries for one key, the one that wins, as a maximum over one total order (so
/// the merge is commutative and associative: the result never depends on the order sources
/// are merged in). From the top:
/// 1. live session entries and the operator's own exempts (config, `exempt add`), the one
///    that lasts longer (0 = no expiry), the operator's on a tie: a session entry decides
///    for its address, but the operator's exempt is policy for the address whoever holds it;
/// 2. a blocked user's session entry ([`BLOCKED_NS`]): it beats every user's binding, so no
///    other user's prefix exempts the address;
/// 3. bindings, the one that lasts longer.
///
/// Two session entries for one key are not expected (an address has one holder).
pub fn longer(a: Exempt, b: Exempt) -> Exempt {
    let until = |e: &Exempt| {
        if e.expires_ns == 0 {
            u64::MAX
        } else {
            e.expires_ns
        }
    };
    let rank = |e: &Exempt| {
        let class = match (e.owns(), e.operator()) {
            (true, _) if e.expires_ns == BLOCKED_NS => 1,
            (true, _) | (false, true) => 2,
            (false, false) => 0,
        };
        (
            class,
            if class == 1 { 0 } else { until(e) },
            e.operator(),
            std::cmp::Reverse(e.origin),
        )
    };
    if rank(&a) >= rank(&b) {
        a
    } else {
        b
    }
}
