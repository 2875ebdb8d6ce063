//! A small deterministic generator (xorshift64) for randomized tests and benchmark registries:
//! the same seed gives the same sequence, with no dependency.

pub struct Rng(pub u64);

impl Rng {
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

impl Rng {
    /// An address next to `near` (its bits flipped from a random position on), or (IPv4, half
    /// the time) anywhere in `10.0.0.0/8`'s clusters the random registries use.
    pub fn address_near(&mut self, near: &ipnet::IpNet) -> std::net::IpAddr {
        match near {
            ipnet::IpNet::V4(net) if self.next_u64().is_multiple_of(2) => {
                let bits = u32::from(net.network())
                    ^ (u32::try_from(self.next_u64() >> 32).expect("32 bits")
                        >> (self.next_u64() % 33).min(31));
                std::net::Ipv4Addr::from(bits).into()
            }
            ipnet::IpNet::V4(_) => std::net::Ipv4Addr::from(
                u32::try_from(self.next_u64() & 0x0F0F_FFFF | 0x0A00_0000).expect("32 bits"),
            )
            .into(),
            ipnet::IpNet::V6(net) => {
                let bits = u128::from(net.network())
                    ^ (u128::from(self.next_u64()) << 64 | u128::from(self.next_u64()))
                        >> (self.next_u64() % 128).max(20);
                std::net::Ipv6Addr::from(bits).into()
            }
        }
    }
}
