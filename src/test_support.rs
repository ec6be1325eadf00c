//! Test-only helpers for the fuzz / property tests (`cargo test --lib fuzz_`):
//! a small seeded pseudo-random generator (SplitMix64), input generators and
//! mutators, and the iteration budget.
//!
//! Every `fuzz_<target>` test runs a bounded number of iterations so CI stays
//! fast; a developer runs longer with, for example,
//! `PSA_FUZZ_ITERATIONS=5000000 cargo test --release --lib fuzz_`.
//! `PSA_FUZZ_SEED=<u64>` explores another deterministic sequence; a failure
//! names the seed and the input that broke it.

use std::fmt::Debug;
use std::panic::{catch_unwind, AssertUnwindSafe};

/// The iteration count a cheap target runs by default (and the reference
/// `PSA_FUZZ_ITERATIONS` scales against).
pub const BASE_ITERATIONS: u64 = 20_000;

/// How many iterations a target runs: `default` unless `PSA_FUZZ_ITERATIONS`
/// is set. The variable gives the count for cheap targets (default
/// [`BASE_ITERATIONS`]); a costlier target, whose `default` is smaller, runs the
/// same fraction of it as by default (never less than one iteration).
pub fn iterations(default: u64) -> u64 {
    match std::env::var("PSA_FUZZ_ITERATIONS") {
        Ok(v) => {
            let n: u64 = v
                .trim()
                .parse()
                .expect("PSA_FUZZ_ITERATIONS must be a non-negative integer");
            let scaled = u128::from(n) * u128::from(default) / u128::from(BASE_ITERATIONS);
            u64::try_from(scaled).unwrap_or(u64::MAX).max(1)
        }
        Err(_) => default,
    }
}

/// The seed of a target: fixed (so runs repeat) unless `PSA_FUZZ_SEED` is set,
/// and different for every target name.
pub fn seed(target: &str) -> u64 {
    let base = match std::env::var("PSA_FUZZ_SEED") {
        Ok(v) => v
            .trim()
            .parse()
            .expect("PSA_FUZZ_SEED must be an unsigned integer"),
        Err(_) => 0x5053_415f_4655_5a5a, // "PSA_FUZZ"
    };
    // FNV-1a over the name, mixed with the base seed.
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    for b in target.bytes() {
        h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
    }
    base ^ h
}

/// Runs `body` `iterations(default)` times with a generator seeded for
/// `target`. A panic inside `body` is reported with the seed and iteration,
/// so the failing case can be replayed.
pub fn fuzz(target: &str, default: u64, mut body: impl FnMut(&mut Rng)) {
    let seed = seed(target);
    let mut rng = Rng::new(seed);
    let n = iterations(default);
    for i in 0..n {
        if let Err(e) = catch_unwind(AssertUnwindSafe(|| body(&mut rng))) {
            let msg = e
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| e.downcast_ref::<&str>().copied())
                .unwrap_or("(non-string panic)");
            panic!("{target}: failed at iteration {i} of {n} (seed {seed}): {msg}");
        }
    }
}

/// Calls `f`, turning a panic into a test failure that shows the input.
pub fn no_panic<R>(input: &impl Debug, f: impl FnOnce() -> R) -> R {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(r) => r,
        Err(e) => {
            let msg = e
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| e.downcast_ref::<&str>().copied())
                .unwrap_or("(non-string panic)");
            panic!("panicked on input {input:?}: {msg}");
        }
    }
}

/// SplitMix64 (Steele, Lea, Flood 2014): tiny, fast, and good enough to
/// drive a fuzzer. Not for anything cryptographic.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (`n` > 0; the modulo bias is irrelevant here).
    pub fn below(&mut self, n: usize) -> usize {
        assert!(n > 0, "below(0)");
        (self.next_u64() % n as u64) as usize
    }

    /// Uniform in `lo..=hi`.
    pub fn range(&mut self, lo: usize, hi: usize) -> usize {
        lo + self.below(hi - lo + 1)
    }

    /// True with probability 1/n.
    pub fn one_in(&mut self, n: usize) -> bool {
        self.below(n) == 0
    }

    pub fn coin(&mut self) -> bool {
        self.next_u64() & 1 == 1
    }

    pub fn byte(&mut self) -> u8 {
        self.next_u64() as u8
    }

    pub fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }

    pub fn fill(&mut self, buf: &mut [u8]) {
        for b in buf {
            *b = self.byte();
        }
    }

    pub fn bytes(&mut self, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        self.fill(&mut v);
        v
    }

    pub fn array<const N: usize>(&mut self) -> [u8; N] {
        let mut a = [0u8; N];
        self.fill(&mut a);
        a
    }

    /// A length that is usually small, sometimes zero, sometimes up to `max`.
    pub fn len(&mut self, max: usize) -> usize {
        match self.below(8) {
            0 => 0,
            1 => self.range(0, max),
            _ => self.range(0, max.min(16)),
        }
    }

    /// A valid UTF-8 string mixing ASCII, control characters, multi-byte
    /// characters (2, 3 and 4 bytes) and `extra` characters that matter to the
    /// parser under test.
    pub fn text(&mut self, max_chars: usize, extra: &[char]) -> String {
        const ALPHABET: &[char] = &[
            'a',
            'Z',
            '0',
            '9',
            'f',
            'F',
            ' ',
            '\t',
            '\n',
            '\0',
            '\u{1}',
            '\u{7f}',
            'é',
            'ß',
            '€',
            '\u{2028}',
            '\u{feff}',
            '日',
            '😀',
            '\u{10ffff}',
        ];
        let n = self.len(max_chars);
        (0..n)
            .map(|_| {
                if !extra.is_empty() && self.coin() {
                    *self.pick(extra)
                } else if self.one_in(4) {
                    // Any scalar value at all.
                    loop {
                        if let Some(c) = char::from_u32(self.next_u64() as u32 % 0x11_0000) {
                            break c;
                        }
                    }
                } else {
                    *self.pick(ALPHABET)
                }
            })
            .collect()
    }

    /// Applies one random corruption to `bytes`: a bit flip, an overwritten,
    /// inserted or deleted byte, a truncation, appended bytes, or a swap.
    pub fn mutate(&mut self, bytes: &mut Vec<u8>) {
        let len = bytes.len();
        match self.below(8) {
            0 | 1 if len > 0 => {
                let i = self.below(len);
                bytes[i] ^= 1 << self.below(8);
            }
            2 if len > 0 => {
                let i = self.below(len);
                let random = self.byte();
                bytes[i] = *self.pick(&[0x00, 0x01, 0x02, 0x7f, 0x80, 0xff, random]);
            }
            3 => {
                let i = self.range(0, len);
                let b = self.byte();
                bytes.insert(i, b);
            }
            4 if len > 0 => {
                bytes.remove(self.below(len));
            }
            5 if len > 0 => bytes.truncate(self.below(len)),
            6 => {
                let n = self.range(1, 8);
                let extra = self.bytes(n);
                bytes.extend_from_slice(&extra);
            }
            7 if len > 1 => {
                let (i, j) = (self.below(len), self.below(len));
                bytes.swap(i, j);
            }
            _ => {
                let b = self.byte();
                bytes.push(b);
            }
        }
    }

    /// Like [`Rng::mutate`] on the bytes of a string, keeping the result only
    /// if it is still UTF-8 (otherwise a character is inserted instead).
    pub fn mutate_text(&mut self, text: &mut String, extra: &[char]) {
        let mut bytes = std::mem::take(text).into_bytes();
        let backup = bytes.clone();
        self.mutate(&mut bytes);
        *text = match String::from_utf8(bytes) {
            Ok(s) => s,
            Err(_) => {
                let mut s = String::from_utf8(backup).expect("was UTF-8");
                let mut at = self.range(0, s.len());
                while !s.is_char_boundary(at) {
                    at -= 1;
                }
                let c = self.text(1, extra).chars().next().unwrap_or('é');
                s.insert(at, c);
                s
            }
        };
    }
}

/// Lower-case hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generator_is_deterministic_and_spread() {
        let a: Vec<u64> = {
            let mut r = Rng::new(1);
            (0..4).map(|_| r.next_u64()).collect()
        };
        let b: Vec<u64> = {
            let mut r = Rng::new(1);
            (0..4).map(|_| r.next_u64()).collect()
        };
        assert_eq!(a, b);
        // SplitMix64 reference value for seed 1 (first output).
        assert_eq!(a[0], 0x910a_2dec_8902_5cc1);
        let mut r = Rng::new(7);
        let mut seen = [0u32; 16];
        for _ in 0..16_000 {
            seen[r.below(16)] += 1;
        }
        assert!(seen.iter().all(|&n| (800..1200).contains(&n)), "{seen:?}");
    }
}
