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
