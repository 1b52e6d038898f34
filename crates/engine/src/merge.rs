//! Which drained reads and writes travel together: requests of the same direction whose sector
//! ranges touch are issued as one vectored op, bounded by IOV_MAX and a maximum transfer.
//! Pure planning over plain values, so the rules are testable without a ring.

/// One read or write of a batch, as the planner sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RwItem {
    pub write: bool,
    /// First 512-byte sector.
    pub sector: u64,
    /// Length in bytes (a multiple of the logical block size).
    pub len: u32,
    /// How many iovecs the request brings.
    pub iovecs: u32,
    /// The caller's handle for the request.
    pub key: usize,
    /// False for requests that must go alone (e.g. through a bounce buffer).
    pub mergeable: bool,
}

#[derive(Clone, Copy, Debug)]
pub struct MergeLimits {
    /// Largest merged transfer in bytes.
    pub max_bytes: u64,
    /// Most iovecs one op may carry (IOV_MAX is 1024).
    pub max_iovecs: usize,
}

impl Default for MergeLimits {
    fn default() -> Self {
        MergeLimits {
            max_bytes: 1 << 20,
            max_iovecs: 1024,
        }
    }
}

/// Sorts `items` by direction and sector, then fills `groups` with half-open index ranges into
/// `items`, one per op to issue. Allocation-free once `groups` has grown to the batch size.
pub fn plan(items: &mut [RwItem], limits: &MergeLimits, groups: &mut Vec<(usize, usize)>) {
    groups.clear();
    items.sort_unstable_by_key(|it| (it.write, it.sector, it.key));
    let mut start = 0;
    while start < items.len() {
        let first = items[start];
        let mut end = start + 1;
        let mut bytes = u64::from(first.len);
        let mut iovecs = first.iovecs as usize;
        let mut next_sector = first.sector + u64::from(first.len >> 9);
        if first.mergeable {
            while end < items.len() {
                let it = items[end];
                let fits = it.mergeable
                    && it.write == first.write
                    && it.sector == next_sector
                    && bytes + u64::from(it.len) <= limits.max_bytes
                    && iovecs + it.iovecs as usize <= limits.max_iovecs;
                if !fits {
                    break;
                }
                bytes += u64::from(it.len);
                iovecs += it.iovecs as usize;
                next_sector += u64::from(it.len >> 9);
                end += 1;
            }
        }
        groups.push((start, end));
        start = end;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(write: bool, sector: u64, len: u32, key: usize) -> RwItem {
        RwItem {
            write,
            sector,
            len,
            iovecs: 1,
            key,
            mergeable: true,
        }
    }

    fn run(items: &mut [RwItem], limits: MergeLimits) -> Vec<Vec<usize>> {
        let mut groups = Vec::new();
        plan(items, &limits, &mut groups);
        groups
            .iter()
            .map(|&(s, e)| items[s..e].iter().map(|i| i.key).collect())
            .collect()
    }

    #[test]
    fn contiguous_same_direction_requests_merge_in_sector_order() {
        let mut items = [
            item(false, 16, 4096, 0),
            item(false, 0, 4096, 1),
            item(false, 8, 4096, 2),
        ];
        assert_eq!(run(&mut items, MergeLimits::default()), vec![vec![1, 2, 0]]);
    }

    #[test]
    fn a_gap_splits_the_op() {
        let mut items = [item(false, 0, 4096, 0), item(false, 9, 4096, 1)];
        assert_eq!(
            run(&mut items, MergeLimits::default()),
            vec![vec![0], vec![1]]
        );
    }

    #[test]
    fn reads_and_writes_never_merge() {
        let mut items = [item(false, 0, 4096, 0), item(true, 8, 4096, 1)];
        assert_eq!(
            run(&mut items, MergeLimits::default()),
            vec![vec![0], vec![1]]
        );
    }

    #[test]
    fn overlapping_requests_do_not_merge() {
        let mut items = [item(true, 0, 4096, 0), item(true, 0, 4096, 1)];
        assert_eq!(
            run(&mut items, MergeLimits::default()),
            vec![vec![0], vec![1]]
        );
    }

    #[test]
    fn max_bytes_bounds_a_merge() {
        let mut items: Vec<RwItem> = (0..4)
            .map(|i| item(true, i * 8, 4096, i as usize))
            .collect();
        let limits = MergeLimits {
            max_bytes: 8192,
            max_iovecs: 1024,
        };
        assert_eq!(run(&mut items, limits), vec![vec![0, 1], vec![2, 3]]);
    }

    #[test]
    fn max_iovecs_bounds_a_merge() {
        let mut items: Vec<RwItem> = (0..3)
            .map(|i| RwItem {
                iovecs: 600,
                ..item(false, i * 8, 4096, i as usize)
            })
            .collect();
        assert_eq!(
            run(&mut items, MergeLimits::default()),
            vec![vec![0], vec![1], vec![2]]
        );
    }

    #[test]
    fn unmergeable_requests_go_alone() {
        let mut items = [
            item(false, 0, 4096, 0),
            RwItem {
                mergeable: false,
                ..item(false, 8, 4096, 1)
            },
            item(false, 16, 4096, 2),
        ];
        assert_eq!(
            run(&mut items, MergeLimits::default()),
            vec![vec![0], vec![1], vec![2]]
        );
    }
}
