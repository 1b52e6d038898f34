//! Where each I/O goes. Random patterns pick uniformly among the block-aligned offsets of the
//! whole region (every queue shares the region, like fio's `numjobs` on one file). Sequential
//! patterns give each queue its own contiguous slice so that queues do not interleave into one
//! stream (like fio's `offset_increment`), and wrap at the end of the slice.

use crate::LoadgenError;

#[derive(Debug)]
pub struct OffsetGenerator {
    random: bool,
    /// First byte of this queue's range.
    start: u64,
    block_size: u64,
    /// Number of whole blocks in this queue's range.
    blocks: u64,
    next_block: u64,
    rng: fastrand::Rng,
}

impl OffsetGenerator {
    /// `region_size` bytes from offset 0 are shared by `queues` queues; this is queue `queue`.
    pub fn new(
        random: bool,
        region_size: u64,
        block_size: u64,
        queue: u32,
        queues: u32,
        seed: u64,
    ) -> Result<Self, LoadgenError> {
        if block_size == 0 || queues == 0 || queue >= queues {
            return Err(LoadgenError::InvalidArgument(format!(
                "bad offset generator parameters: block size {block_size}, queue {queue} of {queues}"
            )));
        }
        let (start, len) = if random {
            (0, region_size)
        } else {
            let slice = region_size / u64::from(queues);
            (slice * u64::from(queue), slice)
        };
        let blocks = len / block_size;
        if blocks == 0 {
            return Err(LoadgenError::InvalidArgument(format!(
                "region of {region_size} bytes holds no {block_size}-byte block per queue \
                 ({queues} queues)"
            )));
        }
        Ok(OffsetGenerator {
            random,
            start,
            block_size,
            blocks,
            next_block: 0,
            // Distinct streams per queue, yet repeatable for a given seed.
            rng: fastrand::Rng::with_seed(seed ^ (u64::from(queue) << 32 | u64::from(queue))),
        })
    }

    /// Byte offset of the next I/O.
    pub fn next_offset(&mut self) -> u64 {
        let block = if self.random {
            self.rng.u64(0..self.blocks)
        } else {
            let block = self.next_block;
            self.next_block = (self.next_block + 1) % self.blocks;
            block
        };
        self.start + block * self.block_size
    }

    /// True with probability `percent`/100: whether the next I/O of a mixed job is a read.
    pub fn roll_read(&mut self, percent: u8) -> bool {
        match percent {
            0 => false,
            100.. => true,
            _ => self.rng.u8(0..100) < percent,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sequential_slices_are_disjoint_and_wrap() {
        let mut q0 = OffsetGenerator::new(false, 4 * 4096, 4096, 0, 2, 7).unwrap();
        let mut q1 = OffsetGenerator::new(false, 4 * 4096, 4096, 1, 2, 7).unwrap();
        let a: Vec<u64> = (0..3).map(|_| q0.next_offset()).collect();
        let b: Vec<u64> = (0..3).map(|_| q1.next_offset()).collect();
        assert_eq!(a, vec![0, 4096, 0]);
        assert_eq!(b, vec![8192, 12288, 8192]);
    }

    #[test]
    fn random_offsets_are_aligned_and_inside_the_region() {
        let region = 1 << 20;
        let mut gen = OffsetGenerator::new(true, region, 4096, 1, 2, 42).unwrap();
        let mut seen = std::collections::HashSet::new();
        for _ in 0..10_000 {
            let off = gen.next_offset();
            assert_eq!(off % 4096, 0);
            assert!(off + 4096 <= region);
            seen.insert(off);
        }
        // 256 blocks, 10k draws: a uniform generator hits nearly all of them.
        assert!(seen.len() > 200, "only {} distinct offsets", seen.len());
    }

    #[test]
    fn partial_trailing_block_is_never_used() {
        let mut gen = OffsetGenerator::new(true, 4096 * 2 + 100, 4096, 0, 1, 1).unwrap();
        for _ in 0..1000 {
            assert!(gen.next_offset() <= 4096);
        }
    }

    #[test]
    fn region_too_small_is_an_error() {
        assert!(OffsetGenerator::new(false, 4096, 4096, 0, 2, 1).is_err());
        assert!(OffsetGenerator::new(true, 100, 4096, 0, 1, 1).is_err());
        assert!(OffsetGenerator::new(true, 1 << 20, 4096, 2, 2, 1).is_err());
    }

    #[test]
    fn read_mix_matches_percentage() {
        let mut gen = OffsetGenerator::new(true, 1 << 20, 4096, 0, 1, 3).unwrap();
        let reads = (0..10_000).filter(|_| gen.roll_read(70)).count();
        assert!((6_500..7_500).contains(&reads), "{reads} reads of 10000");
        assert!((0..100).all(|_| gen.roll_read(100)));
        assert!((0..100).all(|_| !gen.roll_read(0)));
    }
}
