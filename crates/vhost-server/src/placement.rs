//! Which iothread serves which queue: contiguous runs of queues, spread evenly.

/// Spreads `queues` over `threads` as evenly as possible, contiguous runs per thread.
pub fn queue_masks(queues: usize, threads: usize) -> Vec<u64> {
    let mut masks = vec![0u64; threads];
    for q in 0..queues {
        masks[q * threads / queues] |= 1 << q;
    }
    masks
}

/// Per global queue: (iothread, index among that thread's vrings).
pub(crate) fn placement(masks: &[u64], queues: usize) -> Vec<(usize, usize)> {
    let mut placement = vec![(0, 0); queues];
    for (t, m) in masks.iter().enumerate() {
        let mut local = 0;
        for (q, p) in placement.iter_mut().enumerate() {
            if m & (1 << q) != 0 {
                *p = (t, local);
                local += 1;
            }
        }
    }
    placement
}
