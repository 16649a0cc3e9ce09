//! Why a frame passed or was blocked: the verdict and the counter index in one value.

/// Every verdict carries its reason; the per-CPU counter array is indexed by it.
/// Values are part of the pinned counter map's meaning: append, never renumber.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Reason {
    /// Not IPv4/IPv6 (ARP, PPPoE discovery, LCP...).
    PassNotIp = 0,
    /// IP but not TCP.
    PassNotTcp = 1,
    /// TCP to a port that is not blocked.
    PassPortOpen = 2,
    /// Source outside the enforced subscriber ranges.
    PassNotSubscriber = 3,
    /// Destination is one of the ISP's mail servers.
    PassMailServer = 4,
    /// Source is an exempt exact address.
    PassExemptAddr = 5,
    /// Source is inside an exempt prefix (static ranges).
    PassExemptPrefix = 6,
    /// Source is inside an exempt per-session IPv6 prefix.
    PassExemptSession = 7,
    /// TCP to a blocked port from an enforced source: the rule doing its job.
    BlockPort = 8,
    /// IPv4/IPv6 header that cannot be right (IHL < 5, wrong version, length < header).
    BlockBadIpHeader = 9,
    /// A header or length that reaches past the end of the frame.
    BlockTruncated = 10,
    /// TCP data offset < 5.
    BlockBadTcpHeader = 11,
    /// IPv6 extension header chain longer than the parser walks.
    BlockExtChain = 12,
    /// A non-first fragment: its ports cannot be seen.
    BlockFragment = 13,
    /// VLAN/PPPoE nesting deeper than the parser walks.
    BlockEncap = 14,
    /// PPP multilink fragment (0x003d): reassembled by the kernel, opaque here.
    BlockPppMultilink = 15,
    /// PPP compressed datagram (0x00fd, 0x00fb): inflated by the kernel, opaque here.
    BlockPppCompressed = 16,
    /// PPP Van Jacobson compressed TCP/IP (0x002d): rebuilt from per-slot state.
    BlockPppVj = 17,
    /// MPLS (PPP 0x0281/0x0283, Ethernet or skb protocol 0x8847/0x8848): labels the stack
    /// may pop to route the IP packet inside.
    BlockMpls = 18,
    /// A tunnel inside the tunnel (IPIP, 6in4, GRE, VXLAN, GENEVE two levels deep): the
    /// parser looks one level in.
    BlockTunnelDepth = 19,
}

/// Entries of the per-CPU counter array: room to append reasons without a layout change.
/// Raising it changes the pinned counter map's layout; the daemon migrates at start.
pub const NUM_REASONS: u32 = 32;

impl Reason {
    pub const ALL: [Reason; 20] = [
        Reason::PassNotIp,
        Reason::PassNotTcp,
        Reason::PassPortOpen,
        Reason::PassNotSubscriber,
        Reason::PassMailServer,
        Reason::PassExemptAddr,
        Reason::PassExemptPrefix,
        Reason::PassExemptSession,
        Reason::BlockPort,
        Reason::BlockBadIpHeader,
        Reason::BlockTruncated,
        Reason::BlockBadTcpHeader,
        Reason::BlockExtChain,
        Reason::BlockFragment,
        Reason::BlockEncap,
        Reason::BlockPppMultilink,
        Reason::BlockPppCompressed,
        Reason::BlockPppVj,
        Reason::BlockMpls,
        Reason::BlockTunnelDepth,
    ];

    #[inline(always)]
    pub const fn is_pass(self) -> bool {
        (self as u32) < Reason::BlockPort as u32
    }

    /// `v` as a reason with one comparison, not one per reason (the verifier would walk the
    /// code after it once per value). Anything not a reason is a block (`BlockBadIpHeader`).
    #[inline(always)]
    pub fn from_u32_or_block(v: u32) -> Reason {
        if v < Reason::ALL.len() as u32 {
            // SAFETY: `Reason` is `repr(u32)` and its values are 0..ALL.len() without gaps
            // (`reasons_are_dense_and_fit_the_counter_map`).
            unsafe { core::mem::transmute::<u32, Reason>(v) }
        } else {
            Reason::BlockBadIpHeader
        }
    }

    pub fn from_u32(v: u32) -> Option<Reason> {
        Reason::ALL.iter().copied().find(|r| *r as u32 == v)
    }

    /// Stable snake_case name, used in counters, JSON and logs.
    pub const fn name(self) -> &'static str {
        match self {
            Reason::PassNotIp => "pass_not_ip",
            Reason::PassNotTcp => "pass_not_tcp",
            Reason::PassPortOpen => "pass_port_open",
            Reason::PassNotSubscriber => "pass_not_subscriber",
            Reason::PassMailServer => "pass_mail_server",
            Reason::PassExemptAddr => "pass_exempt_addr",
            Reason::PassExemptPrefix => "pass_exempt_prefix",
            Reason::PassExemptSession => "pass_exempt_session",
            Reason::BlockPort => "block_port",
            Reason::BlockBadIpHeader => "block_bad_ip_header",
            Reason::BlockTruncated => "block_truncated",
            Reason::BlockBadTcpHeader => "block_bad_tcp_header",
            Reason::BlockExtChain => "block_ext_chain",
            Reason::BlockFragment => "block_fragment",
            Reason::BlockEncap => "block_encap",
            Reason::BlockPppMultilink => "block_ppp_multilink",
            Reason::BlockPppCompressed => "block_ppp_compressed",
            Reason::BlockPppVj => "block_ppp_vj",
            Reason::BlockMpls => "block_mpls",
            Reason::BlockTunnelDepth => "block_tunnel_depth",
        }
    }

    /// One line for the helpdesk.
    pub const fn explain(self) -> &'static str {
        match self {
            Reason::PassNotIp => "not an IP packet",
            Reason::PassNotTcp => "not TCP",
            Reason::PassPortOpen => "the destination port is not blocked",
            Reason::PassNotSubscriber => "the source is outside the enforced subscriber ranges",
            Reason::PassMailServer => "the destination is one of the ISP's mail servers",
            Reason::PassExemptAddr => "the source address is exempt (unblocked)",
            Reason::PassExemptPrefix => "the source is inside an exempt prefix",
            Reason::PassExemptSession => "the source is inside an exempt session prefix",
            Reason::BlockPort => {
                "blocked port from an enforced subscriber source to a server that is not the ISP's"
            }
            Reason::BlockBadIpHeader => "malformed IP header from an enforced source (fail closed)",
            Reason::BlockTruncated => "header cut short from an enforced source (fail closed)",
            Reason::BlockBadTcpHeader => {
                "malformed TCP header from an enforced source (fail closed)"
            }
            Reason::BlockExtChain => "IPv6 extension chain too long to inspect (fail closed)",
            Reason::BlockFragment => "fragment that hides the TCP ports (fail closed)",
            Reason::BlockEncap => "encapsulation too deep to inspect (fail closed)",
            Reason::BlockPppMultilink => {
                "PPP multilink fragment, reassembled only by the kernel (fail closed; enforce with TC on ppp*)"
            }
            Reason::BlockPppCompressed => {
                "PPP compressed datagram, inflated only by the kernel (fail closed; enforce with TC on ppp*)"
            }
            Reason::BlockPppVj => {
                "PPP VJ-compressed TCP, rebuilt only by the kernel (fail closed; enforce with TC on ppp*)"
            }
            Reason::BlockMpls => "MPLS whose inner packet cannot be told (fail closed)",
            Reason::BlockTunnelDepth => "tunnel inside a tunnel, too deep to inspect (fail closed)",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_are_dense_and_fit_the_counter_map() {
        for (i, r) in Reason::ALL.iter().enumerate() {
            assert_eq!(*r as u32, i as u32);
            assert_eq!(Reason::from_u32(i as u32), Some(*r));
        }
        assert!((Reason::ALL.len() as u32) <= NUM_REASONS);
        assert!(Reason::PassExemptSession.is_pass());
        assert!(!Reason::BlockPort.is_pass());
        assert!(!Reason::BlockEncap.is_pass());
        assert!(!Reason::BlockMpls.is_pass());
        // Appended, never renumbered: these values are the pinned counter map's indices.
        assert_eq!(Reason::BlockEncap as u32, 14);
        assert_eq!(Reason::BlockPppMultilink as u32, 15);
        assert_eq!(Reason::BlockMpls as u32, 18);
        assert_eq!(Reason::BlockTunnelDepth as u32, 19);
    }
}
