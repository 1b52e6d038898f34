//! Guest memory as the iothread sees it: the current table, and the snapshots in-flight
//! requests still point into (pinned until nothing in flight can use them).

use std::sync::Arc;

use vm_memory::GuestAddressSpace;

use crate::iothread::IoThread;
use crate::{GuestMem, Mem};

impl IoThread {
    /// The current guest memory, pinned for the requests about to be parsed.
    pub(crate) fn current_memory(&mut self) -> Option<Arc<Mem>> {
        let mem = self.mem.as_ref()?.memory().into_inner();
        if self.engine.in_flight() == 0 {
            self.pinned.retain(|p| p.is_snapshot_of(&mem));
        }
        // Each pin is a region snapshot (it keeps its mapping alive), built once per memory
        // table; the last one is what drain translates guest addresses through.
        if !self.pinned.last().is_some_and(|p| p.is_snapshot_of(&mem)) {
            self.pinned.push(blk_proto::GuestRegions::new(mem.clone()));
        }
        Some(mem)
    }
}

/// Guest memory as (host address, length) per region, for the rings' fixed-buffer tables.
pub(crate) fn host_regions(mem: &GuestMem) -> Vec<(usize, usize)> {
    use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
    mem.memory()
        .iter()
        .map(|r| (r.as_ptr() as usize, r.len() as usize))
        .collect()
}
