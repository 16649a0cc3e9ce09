//! `action: reject`: the TCP RST that answers a blocked segment, so that the sender fails at
//! once ("connection refused") instead of retrying into a silent drop.
//!
//! Only simple, well-formed segments are answered: Ethernet with at most two VLAN tags, or raw
//! IP; IPv4 without options or IPv6 without extension headers. Everything else (PPPoE, IP
//! options, extension headers, every parse doubt) is dropped as with `action: drop`; a RST is
//! a courtesy, never a condition of the block.

use crate::parse::{
    Frame, Link, ETH_P_8021AD, ETH_P_8021Q, ETH_P_IPV4, ETH_P_IPV6, ETH_P_QINQ_OLD, IPPROTO_TCP,
    MAX_VLAN_TAGS,
};

/// Where the IP header of an answerable segment starts, and whether it is IPv6.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Located {
    pub l3: usize,
    pub v6: bool,
}

/// Frame length of the RST that answers the segment at `at`.
pub const fn rst_len(at: Located) -> usize {
    at.l3 + if at.v6 { 40 } else { 20 } + 20
}

#[inline(always)]
pub fn locate<F: Frame + ?Sized>(frame: &F, link: Link) -> Option<Located> {
    let (proto, l3) = match link {
        // Only a `BlockPort` verdict is answered, so a raw frame's protocol and nibble agree.
        Link::RawProto(_) => match frame.bytes::<1>(0)?[0] >> 4 {
            4 => (ETH_P_IPV4, 0),
            6 => (ETH_P_IPV6, 0),
            _ => return None,
        },
        Link::Ethernet => {
            let mut proto = u16::from_be_bytes(frame.bytes::<2>(12)?);
            let mut off = 14;
            for _ in 0..MAX_VLAN_TAGS {
                if !(proto == ETH_P_8021Q || proto == ETH_P_8021AD || proto == ETH_P_QINQ_OLD) {
                    break;
                }
                proto = u16::from_be_bytes(frame.bytes::<2>(off + 2)?);
                off += 4;
            }
            (proto, off)
        }
    };
    match proto {
        ETH_P_IPV4 => {
            let [vihl, _, _, _, _, _, _, _, _, p] = frame.bytes::<10>(l3)?;
            (vihl == 0x45 && p == IPPROTO_TCP).then_some(Located { l3, v6: false })
        }
        ETH_P_IPV6 => {
            let h = frame.bytes::<7>(l3)?;
            (h[0] >> 4 == 6 && h[6] == IPPROTO_TCP).then_some(Located { l3, v6: true })
        }
        _ => None,
    }
}

const TCP_FIN: u8 = 0x01;
const TCP_SYN: u8 = 0x02;
const TCP_RST: u8 = 0x04;
const TCP_ACK: u8 = 0x10;

#[inline(always)]
fn sum16(acc: u32, b: &[u8]) -> u32 {
    let mut acc = acc;
    let mut i = 0;
    while i + 1 < b.len() {
        acc += u16::from_be_bytes([b[i], b[i + 1]]) as u32;
        i += 2;
    }
    acc
}

#[inline(always)]
fn fold(mut acc: u32) -> u16 {
    acc = (acc & 0xffff) + (acc >> 16);
    acc = (acc & 0xffff) + (acc >> 16);
    !(acc as u16)
}

/// The RST's TCP header (RFC 9293 3.10.7.1), without its checksum; `None` for a RST (a RST
/// is never answered). `payload` is the incoming segment's data length.
#[inline(always)]
fn rst_tcp(t: &[u8; 20], payload: u32) -> Option<[u8; 20]> {
    let flags = t[13];
    if flags & TCP_RST != 0 {
        return None;
    }
    let mut r = [0u8; 20];
    r[0..2].copy_from_slice(&t[2..4]);
    r[2..4].copy_from_slice(&t[0..2]);
    if flags & TCP_ACK != 0 {
        // <SEQ=SEG.ACK><CTL=RST>
        r[4..8].copy_from_slice(&t[8..12]);
        r[13] = TCP_RST;
    } else {
        // <SEQ=0><ACK=SEG.SEQ+SEG.LEN><CTL=RST,ACK>; SYN and FIN count in SEG.LEN.
        let seq = u32::from_be_bytes([t[4], t[5], t[6], t[7]]);
        let len = payload + (flags & TCP_SYN != 0) as u32 + (flags & TCP_FIN != 0) as u32;
        r[8..12].copy_from_slice(&seq.wrapping_add(len).to_be_bytes());
        r[13] = TCP_RST | TCP_ACK;
    }
    r[12] = 5 << 4;
    Some(r)
}

/// The IPv4 and TCP headers of the RST answering `ip` (20 bytes, no options) and `tcp`.
#[inline(always)]
pub fn rst_v4(ip: &[u8; 20], tcp: &[u8; 20]) -> Option<([u8; 20], [u8; 20])> {
    let tot = u16::from_be_bytes([ip[2], ip[3]]) as u32;
    let doff = (tcp[12] >> 4) as u32 * 4;
    let payload = tot.checked_sub(20 + doff)?;
    let mut t = rst_tcp(tcp, payload)?;
    let mut h = [0u8; 20];
    h[0] = 0x45;
    h[2..4].copy_from_slice(&40u16.to_be_bytes());
    h[6] = 0x40; // DF
    h[8] = 64;
    h[9] = IPPROTO_TCP;
    h[12..16].copy_from_slice(&ip[16..20]);
    h[16..20].copy_from_slice(&ip[12..16]);
    let c = fold(sum16(0, &h));
    h[10..12].copy_from_slice(&c.to_be_bytes());
    // Pseudo header: addresses, protocol, TCP length.
    let acc = sum16(sum16(0, &h[12..20]), &t) + IPPROTO_TCP as u32 + 20;
    t[16..18].copy_from_slice(&fold(acc).to_be_bytes());
    Some((h, t))
}

/// The IPv6 and TCP headers of the RST answering `ip` (no extension headers) and `tcp`.
#[inline(always)]
pub fn rst_v6(ip: &[u8; 40], tcp: &[u8; 20]) -> Option<([u8; 40], [u8; 20])> {
    let plen = u16::from_be_bytes([ip[4], ip[5]]) as u32;
    let doff = (tcp[12] >> 4) as u32 * 4;
    let payload = plen.checked_sub(doff)?;
    let mut t = rst_tcp(tcp, payload)?;
    let mut h = [0u8; 40];
    h[0] = 0x60;
    h[4..6].copy_from_slice(&20u16.to_be_bytes());
    h[6] = IPPROTO_TCP;
    h[7] = 64;
    h[8..24].copy_from_slice(&ip[24..40]);
    h[24..40].copy_from_slice(&ip[8..24]);
    let acc = sum16(sum16(0, &h[8..40]), &t) + IPPROTO_TCP as u32 + 20;
    t[16..18].copy_from_slice(&fold(acc).to_be_bytes());
    Some((h, t))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tcp(sport: u16, dport: u16, seq: u32, ack: u32, flags: u8) -> [u8; 20] {
        let mut t = [0u8; 20];
        t[0..2].copy_from_slice(&sport.to_be_bytes());
        t[2..4].copy_from_slice(&dport.to_be_bytes());
        t[4..8].copy_from_slice(&seq.to_be_bytes());
        t[8..12].copy_from_slice(&ack.to_be_bytes());
        t[12] = 5 << 4;
        t[13] = flags;
        t
    }

    fn v4(src: [u8; 4], dst: [u8; 4], tot: u16) -> [u8; 20] {
        let mut h = [0u8; 20];
        h[0] = 0x45;
        h[2..4].copy_from_slice(&tot.to_be_bytes());
        h[8] = 63;
        h[9] = 6;
        h[12..16].copy_from_slice(&src);
        h[16..20].copy_from_slice(&dst);
        h
    }

    /// A header with a correct checksum sums to 0xffff (RFC 1071).
    fn valid(acc: u32) -> bool {
        fold(acc) == 0
    }

    #[test]
    fn rst_for_a_syn_acks_it() {
        let (h, t) = rst_v4(
            &v4([100, 64, 0, 2], [203, 0, 113, 80], 40),
            &tcp(40000, 25, 1000, 0, TCP_SYN),
        )
        .unwrap();
        assert_eq!(&h[12..16], &[203, 0, 113, 80]);
        assert_eq!(&h[16..20], &[100, 64, 0, 2]);
        assert!(valid(sum16(0, &h)), "IPv4 header checksum");
        assert_eq!(u16::from_be_bytes([t[0], t[1]]), 25);
        assert_eq!(u16::from_be_bytes([t[2], t[3]]), 40000);
        assert_eq!(u32::from_be_bytes([t[4], t[5], t[6], t[7]]), 0);
        assert_eq!(u32::from_be_bytes([t[8], t[9], t[10], t[11]]), 1001);
        assert_eq!(t[13], TCP_RST | TCP_ACK);
        assert!(
            valid(sum16(sum16(0, &h[12..20]), &t) + 6 + 20),
            "TCP checksum"
        );
    }

    #[test]
    fn rst_for_an_ack_takes_its_sequence_from_the_ack() {
        let (_, t) = rst_v4(
            &v4([100, 64, 0, 2], [203, 0, 113, 80], 40 + 100),
            &tcp(40000, 25, 5000, 777, TCP_ACK | 0x08),
        )
        .unwrap();
        assert_eq!(u32::from_be_bytes([t[4], t[5], t[6], t[7]]), 777);
        assert_eq!(t[13], TCP_RST);
    }

    #[test]
    fn data_and_fin_count_in_the_ack() {
        let (_, t) = rst_v4(
            &v4([100, 64, 0, 2], [203, 0, 113, 80], 40 + 10),
            &tcp(1, 25, 0xffff_fff0, 0, TCP_FIN),
        )
        .unwrap();
        assert_eq!(
            u32::from_be_bytes([t[8], t[9], t[10], t[11]]),
            0xffff_fff0u32.wrapping_add(11)
        );
    }

    #[test]
    fn a_rst_or_a_bad_length_is_not_answered() {
        assert!(rst_v4(&v4([1; 4], [2; 4], 40), &tcp(1, 25, 0, 0, TCP_RST)).is_none());
        assert!(rst_v4(&v4([1; 4], [2; 4], 39), &tcp(1, 25, 0, 0, TCP_SYN)).is_none());
    }

    #[test]
    fn ipv6_rst() {
        let mut ip = [0u8; 40];
        ip[0] = 0x60;
        ip[4..6].copy_from_slice(&20u16.to_be_bytes());
        ip[6] = 6;
        ip[8..24].copy_from_slice(&[0x20, 1, 0xd, 0xb8, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2]);
        ip[24..40].copy_from_slice(&[0x20, 1, 0xd, 0xb8, 0, 0xff, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x80]);
        let (h, t) = rst_v6(&ip, &tcp(40000, 25, 9, 0, TCP_SYN)).unwrap();
        assert_eq!(&h[8..24], &ip[24..40]);
        assert_eq!(&h[24..40], &ip[8..24]);
        assert_eq!(u32::from_be_bytes([t[8], t[9], t[10], t[11]]), 10);
        assert!(
            valid(sum16(sum16(0, &h[8..40]), &t) + 6 + 20),
            "TCP checksum"
        );
    }

    #[test]
    fn only_simple_segments_are_located() {
        let mut f = [0u8; 60];
        f[12..14].copy_from_slice(&ETH_P_IPV4.to_be_bytes());
        f[14] = 0x45;
        f[23] = 6;
        assert_eq!(
            locate(&f[..], Link::Ethernet),
            Some(Located { l3: 14, v6: false })
        );
        f[14] = 0x46; // IP options
        assert_eq!(locate(&f[..], Link::Ethernet), None);
        f[12..14].copy_from_slice(&0x8864u16.to_be_bytes()); // PPPoE
        assert_eq!(locate(&f[..], Link::Ethernet), None);
        let mut raw = [0u8; 40];
        raw[0] = 0x45;
        raw[9] = 6;
        assert_eq!(
            locate(&raw[..], Link::RawProto(ETH_P_IPV4)),
            Some(Located { l3: 0, v6: false })
        );
    }
}
