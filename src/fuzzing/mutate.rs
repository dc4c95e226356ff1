//! A small seeded mutator for the stable smoke run: no coverage feedback, just the usual byte
//! edits (flip, set to an interesting value, insert, delete, duplicate a range, truncate, splice
//! two inputs) applied a few at a time to corpus entries. Not a substitute for `cargo fuzz`; it
//! catches regressions near the seeds on machines that only have a stable toolchain.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Byte values that tend to hit edge cases in length and tag fields.
const INTERESTING: [u8; 8] = [0x00, 0x01, 0x7f, 0x80, 0xfe, 0xff, 0x40, 0x20];

/// Longest input the mutator makes, so a smoke run stays fast and bounded.
const MAX_INPUT: usize = 64 * 1024;

/// Produces mutated inputs from a corpus, reproducibly from a seed.
pub struct Mutator {
    rng: StdRng,
}

impl Mutator {
    pub fn new(seed: u64) -> Mutator {
        Mutator { rng: StdRng::seed_from_u64(seed) }
    }

    /// A mutation of a random corpus entry (or of the empty input if there is none).
    pub fn next_input(&mut self, corpus: &[Vec<u8>]) -> Vec<u8> {
        let pick = |rng: &mut StdRng| -> Vec<u8> {
            match corpus.len() {
                0 => Vec::new(),
                n => corpus.get(rng.gen_range(0..n)).cloned().unwrap_or_default(),
            }
        };
        let mut data = pick(&mut self.rng);
        let edits = self.rng.gen_range(1..=4);
        for _ in 0..edits {
            let other = pick(&mut self.rng);
            self.edit(&mut data, &other);
        }
        data.truncate(MAX_INPUT);
        data
    }

    fn edit(&mut self, data: &mut Vec<u8>, other: &[u8]) {
        let len = data.len();
        let at = |rng: &mut StdRng, n: usize| if n == 0 { 0 } else { rng.gen_range(0..n) };
        match self.rng.gen_range(0..7) {
            0 if len > 0 => {
                let i = at(&mut self.rng, len);
                data[i] ^= 1 << self.rng.gen_range(0..8);
            }
            1 if len > 0 => {
                let i = at(&mut self.rng, len);
                data[i] = INTERESTING[self.rng.gen_range(0..INTERESTING.len())];
            }
            2 => {
                let i = at(&mut self.rng, len + 1);
                let n = self.rng.gen_range(1..=16);
                let bytes: Vec<u8> = (0..n).map(|_| self.rng.r#gen()).collect();
                data.splice(i..i, bytes);
            }
            3 if len > 0 => {
                let i = at(&mut self.rng, len);
                let n = self.rng.gen_range(1..=(len - i).min(64));
                data.drain(i..i + n);
            }
            4 if len > 0 => {
                let i = at(&mut self.rng, len);
                let n = self.rng.gen_range(1..=(len - i).min(256));
                let copy = data[i..i + n].to_vec();
                let to = at(&mut self.rng, len + 1);
                data.splice(to..to, copy);
            }
            5 => {
                let keep = at(&mut self.rng, len + 1);
                data.truncate(keep);
            }
            _ => {
                // Splice: our head, the other input's tail.
                let head = at(&mut self.rng, len + 1);
                let tail = at(&mut self.rng, other.len() + 1);
                data.truncate(head);
                data.extend_from_slice(other.get(tail..).unwrap_or_default());
            }
        }
    }
}
