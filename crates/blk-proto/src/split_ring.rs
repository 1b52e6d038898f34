//! A split virtqueue read straight through a [`GuestRegions`] snapshot: the avail index, the
//! avail ring entries and the descriptors (direct and indirect), each a volatile read at a
//! bounds-checked address; [`SplitRing::map`] translates the queue's tables once per drain,
//! an indirect table is translated once when entered. Every loop has a hard bound. It follows
//! virtio-queue's `DescriptorChain` rules, so a chain parses the same on either path (the
//! blk-proto tests check both on every chain they build); where virtio-queue ends a walk
//! silently, this one says why ([`ChainError`]):
//!
//! - a direct chain has at most `queue size` descriptors, an indirect table at most its length
//!   (a longer chain is a loop);
//! - `next` indexes the table being walked: the queue's, or the indirect table's once an
//!   INDIRECT descriptor switched to it (what follows the INDIRECT descriptor in the direct
//!   chain is ignored);
//! - an indirect table's length is a non-zero multiple of 16, at most 65535 entries, and it
//!   holds no INDIRECT descriptor;
//! - the chain's lengths add up to less than 4 GiB.
//!
//! One rule is stricter than virtio-queue's: a chain yields at most
//! [`MAX_CHAIN_DESCRIPTORS`] (1024, QEMU's VIRTQUEUE_MAX_SIZE: QEMU maps at most that many
//! buffers per chain) or the queue size if larger, direct and indirect together.
//! virtio-queue lets an indirect table yield up to 65535, so that a guest naming one looping
//! 1 MiB table from every avail entry made one drain of a 1024 queue walk 67 million
//! descriptors (about half a second of its iothread); now at most 1024 * 1024. The bound is
//! not the queue size itself: Linux builds indirect chains longer than the queue (its
//! requests have up to seg_max + 2 descriptors, and the parser accepts seg_max + 2 data
//! segments besides header and status).

use std::sync::atomic::{AtomicU16, Ordering};

use virtio_bindings::virtio_ring::{VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};

use crate::guest_regions::{read_volatile_le128, GuestRegions};

/// Most descriptors a chain may yield, direct and indirect together, when the queue is smaller
/// (see the module doc).
pub const MAX_CHAIN_DESCRIPTORS: u16 = 1024;

/// Size of one descriptor in a table.
pub const DESCRIPTOR_SIZE: u64 = 16;

/// One descriptor as the guest wrote it (little-endian fields decoded).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Descriptor {
    pub addr: u64,
    pub len: u32,
    pub flags: u16,
    pub next: u16,
}

impl Descriptor {
    /// Decodes the 16 bytes of a descriptor read as one little-endian u128.
    pub fn from_le_u128(v: u128) -> Self {
        Descriptor {
            addr: v as u64,
            len: (v >> 64) as u32,
            flags: (v >> 96) as u16,
            next: (v >> 112) as u16,
        }
    }

    pub fn from_le_bytes(b: &[u8; 16]) -> Self {
        Self::from_le_u128(u128::from_le_bytes(*b))
    }

    pub fn has_next(&self) -> bool {
        self.flags & VRING_DESC_F_NEXT as u16 != 0
    }

    pub fn is_write_only(&self) -> bool {
        self.flags & VRING_DESC_F_WRITE as u16 != 0
    }

    pub fn is_indirect(&self) -> bool {
        self.flags & VRING_DESC_F_INDIRECT as u16 != 0
    }
}

impl From<virtio_queue::desc::split::Descriptor> for Descriptor {
    fn from(d: virtio_queue::desc::split::Descriptor) -> Self {
        Descriptor {
            addr: d.addr().0,
            len: d.len(),
            flags: d.flags(),
            next: d.next(),
        }
    }
}

/// Why the avail ring cannot be read.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RingError {
    #[error("avail ring entry at {addr:#x} is not inside guest memory")]
    AvailNotInMemory { addr: u64 },
    #[error("avail index at {addr:#x} is not 2-byte aligned in the host")]
    AvailIndexMisaligned { addr: u64 },
    #[error("queue size is 0")]
    EmptyQueue,
}

/// Why a descriptor chain ended abnormally.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ChainError {
    #[error("head index {head} is not below the queue size {size}")]
    HeadOutOfRange { head: u16, size: u16 },
    #[error("descriptor at {addr:#x} is not inside guest memory")]
    DescriptorNotInMemory { addr: u64 },
    #[error("next index {next} is outside the table of {table_len} descriptors")]
    NextOutOfTable { next: u16, table_len: u16 },
    #[error("chain longer than its table of {table_len} descriptors (a loop)")]
    TooLong { table_len: u16 },
    #[error("indirect table of {len} bytes: not a non-zero multiple of 16 below 1 MiB")]
    BadIndirectLength { len: u32 },
    #[error("indirect descriptor inside an indirect table")]
    NestedIndirect,
    #[error("descriptor lengths add up to 4 GiB or more")]
    TooManyBytes,
    #[error("chain of more than {max} descriptors")]
    TooManyDescriptors { max: u16 },
}

/// Where a split virtqueue's descriptor table and avail ring live, and its size.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SplitRing {
    pub desc_table: u64,
    pub avail_ring: u64,
    pub size: u16,
}

impl SplitRing {
    /// The guest's avail index, read with Acquire ordering: the ring entries and descriptors
    /// the guest wrote before publishing it are visible after it.
    pub fn avail_idx(&self, regions: &GuestRegions) -> Result<u16, RingError> {
        let addr = self
            .avail_ring
            .checked_add(2)
            .ok_or(RingError::AvailNotInMemory {
                addr: self.avail_ring,
            })?;
        let host = regions
            .host(addr, 2)
            .ok_or(RingError::AvailNotInMemory { addr })?;
        if host as usize % 2 != 0 {
            return Err(RingError::AvailIndexMisaligned { addr });
        }
        // SAFETY: host() proved [host, host + 2) lies in a mapping the snapshot keeps alive,
        // and it is 2-byte aligned (checked above); the guest writes it concurrently, which an
        // atomic load tolerates.
        let idx = unsafe { AtomicU16::from_ptr(host.cast::<u16>()) }.load(Ordering::Acquire);
        Ok(u16::from_le(idx))
    }

    /// The head index in avail ring entry `position % size` (not checked against the size:
    /// [`SplitRing::chain`] does that).
    pub fn head(&self, regions: &GuestRegions, position: u16) -> Result<u16, RingError> {
        if self.size == 0 {
            return Err(RingError::EmptyQueue);
        }
        let offset = 4 + 2 * u64::from(position % self.size);
        let addr = self
            .avail_ring
            .checked_add(offset)
            .ok_or(RingError::AvailNotInMemory {
                addr: self.avail_ring,
            })?;
        let mut entry = [0u8; 2];
        match regions.host(addr, 2) {
            // SAFETY: host() proved [p, p + 2) lies in a mapping the snapshot keeps alive; a
            // byte array needs no alignment.
            Some(p) => entry = unsafe { p.cast::<[u8; 2]>().read_volatile() },
            None if regions.read(addr, &mut entry) => {}
            None => return Err(RingError::AvailNotInMemory { addr }),
        }
        Ok(u16::from_le_bytes(entry))
    }

    /// The ring with its descriptor table and avail ring translated once each (when each lies
    /// inside one region), so that reading them per request needs no region lookup: what a
    /// drain does, once per batch.
    pub fn map<'r>(&self, regions: &'r GuestRegions) -> MappedRing<'r> {
        let table_bytes = DESCRIPTOR_SIZE * u64::from(self.size);
        let desc_host = regions
            .host(self.desc_table, table_bytes)
            .unwrap_or(std::ptr::null_mut());
        // flags, idx and one entry per descriptor; the idx must be 2-byte aligned for its
        // atomic load, else the unmapped path reports it.
        let avail_bytes = 4 + 2 * u64::from(self.size);
        let avail_host = regions
            .host(self.avail_ring, avail_bytes)
            .filter(|&p| p as usize % 2 == 0)
            .unwrap_or(std::ptr::null_mut());
        MappedRing {
            ring: *self,
            regions,
            desc_host,
            avail_host,
        }
    }

    /// The chain that starts at descriptor `head` (a head not below the queue size makes
    /// the walk fail at once).
    pub fn chain<'r>(&self, regions: &'r GuestRegions, head: u16) -> DescriptorWalk<'r> {
        let error = (head >= self.size).then_some(ChainError::HeadOutOfRange {
            head,
            size: self.size,
        });
        DescriptorWalk {
            regions,
            head,
            table: self.desc_table,
            table_host: std::ptr::null(),
            table_len: self.size,
            next_index: head,
            ttl: self.size,
            budget: self.size.max(MAX_CHAIN_DESCRIPTORS),
            ring_size: self.size,
            in_indirect: false,
            finished: false,
            total_len: 0,
            error,
        }
    }
}

/// A [`SplitRing`] whose descriptor table and avail ring are mapped (see [`SplitRing::map`]).
/// Same results as the unmapped ring's methods, with fewer lookups.
#[derive(Debug)]
pub struct MappedRing<'r> {
    ring: SplitRing,
    regions: &'r GuestRegions,
    /// Host address of the whole descriptor table, or null (then each read is translated).
    desc_host: *mut u8,
    /// Host address of the avail ring's flags, idx and entries (idx 2-aligned), or null.
    avail_host: *mut u8,
}

impl<'r> MappedRing<'r> {
    pub fn size(&self) -> u16 {
        self.ring.size
    }

    /// As [`SplitRing::avail_idx`].
    pub fn avail_idx(&self) -> Result<u16, RingError> {
        if self.avail_host.is_null() {
            return self.ring.avail_idx(self.regions);
        }
        // SAFETY: map() proved the avail ring's first 4 + 2 * size bytes lie in a mapping the
        // snapshot keeps alive, and that avail_host (so avail_host + 2) is 2-byte aligned; the
        // guest writes the index concurrently, which an atomic load tolerates.
        let idx = unsafe { AtomicU16::from_ptr(self.avail_host.add(2).cast::<u16>()) }
            .load(Ordering::Acquire);
        Ok(u16::from_le(idx))
    }

    /// As [`SplitRing::head`].
    pub fn head(&self, position: u16) -> Result<u16, RingError> {
        if self.avail_host.is_null() || self.ring.size == 0 {
            return self.ring.head(self.regions, position);
        }
        let offset = 4 + 2 * usize::from(position % self.ring.size);
        // SAFETY: offset + 2 <= 4 + 2 * size, inside the range map() proved mapped; a byte
        // array needs no alignment.
        let entry = unsafe {
            self.avail_host
                .add(offset)
                .cast::<[u8; 2]>()
                .read_volatile()
        };
        Ok(u16::from_le_bytes(entry))
    }

    /// As [`SplitRing::chain`].
    pub fn chain(&self, head: u16) -> DescriptorWalk<'r> {
        let mut walk = self.ring.chain(self.regions, head);
        // The whole queue table (table_len == size entries) is mapped here, or null.
        walk.table_host = self.desc_host;
        walk
    }
}

/// The descriptors of one chain, in order; see the module doc for the rules.
#[derive(Debug)]
pub struct DescriptorWalk<'r> {
    regions: &'r GuestRegions,
    head: u16,
    /// The table being walked (the queue's or an indirect one) and its length in descriptors.
    table: u64,
    /// Host address of the whole table (all table_len entries) when it lies in one region;
    /// null: each descriptor is translated on its own.
    table_host: *const u8,
    table_len: u16,
    next_index: u16,
    /// Descriptors this table may still yield: the bound that ends loops.
    ttl: u16,
    /// Descriptors the whole chain may still yield (direct and indirect).
    budget: u16,
    ring_size: u16,
    in_indirect: bool,
    finished: bool,
    total_len: u32,
    error: Option<ChainError>,
}

impl<'r> DescriptorWalk<'r> {
    pub fn head(&self) -> u16 {
        self.head
    }

    pub fn regions(&self) -> &'r GuestRegions {
        self.regions
    }

    /// Why the walk failed, once [`DescriptorWalk::next_descriptor`] returned an error.
    pub fn error(&self) -> Option<ChainError> {
        self.error
    }

    /// The next descriptor, `Ok(None)` after the last one (the one without NEXT), or why the
    /// chain is malformed (then the walk stays failed).
    // Inlined into the parser's loop: a call per descriptor costs more than the walk step.
    #[inline(always)]
    pub fn next_descriptor(&mut self) -> Result<Option<Descriptor>, ChainError> {
        if let Some(e) = self.error {
            return Err(e);
        }
        if self.finished {
            return Ok(None);
        }
        match self.step() {
            Ok(desc) => Ok(Some(desc)),
            Err(e) => {
                self.error = Some(e);
                Err(e)
            }
        }
    }

    #[inline(always)]
    fn step(&mut self) -> Result<Descriptor, ChainError> {
        // At most two passes: the second one only after switching to an indirect table, and
        // an indirect descriptor inside that table is an error.
        loop {
            if self.ttl == 0 {
                return Err(ChainError::TooLong {
                    table_len: self.table_len,
                });
            }
            if self.next_index >= self.table_len {
                return Err(ChainError::NextOutOfTable {
                    next: self.next_index,
                    table_len: self.table_len,
                });
            }
            let desc = self.read(self.next_index)?;
            if desc.is_indirect() {
                self.enter_indirect(desc)?;
                continue;
            }
            if self.budget == 0 {
                return Err(ChainError::TooManyDescriptors {
                    max: self.ring_size.max(MAX_CHAIN_DESCRIPTORS),
                });
            }
            self.budget -= 1;
            self.total_len = self
                .total_len
                .checked_add(desc.len)
                .ok_or(ChainError::TooManyBytes)?;
            if desc.has_next() {
                self.next_index = desc.next;
                self.ttl -= 1;
            } else {
                self.finished = true;
            }
            return Ok(desc);
        }
    }

    fn enter_indirect(&mut self, desc: Descriptor) -> Result<(), ChainError> {
        if self.in_indirect {
            return Err(ChainError::NestedIndirect);
        }
        let entries = u64::from(desc.len) / DESCRIPTOR_SIZE;
        let table_len = u16::try_from(entries)
            .ok()
            .filter(|&n| n > 0 && u64::from(desc.len) % DESCRIPTOR_SIZE == 0)
            .ok_or(ChainError::BadIndirectLength { len: desc.len })?;
        self.table = desc.addr;
        // One lookup for the whole table (desc.len = 16 * table_len bytes).
        self.table_host = self
            .regions
            .host(desc.addr, u64::from(desc.len))
            .unwrap_or(std::ptr::null_mut());
        self.table_len = table_len;
        self.next_index = 0;
        self.ttl = table_len;
        self.in_indirect = true;
        Ok(())
    }

    /// Descriptor `index` of the current table (index < table_len, checked by the caller).
    #[inline(always)]
    fn read(&self, index: u16) -> Result<Descriptor, ChainError> {
        if !self.table_host.is_null() {
            let offset = usize::from(index) * DESCRIPTOR_SIZE as usize;
            // SAFETY: index < table_len, and table_host maps all table_len descriptors of
            // the table in a mapping the snapshot keeps alive (see the field).
            let v = unsafe { read_volatile_le128(self.table_host.add(offset)) };
            return Ok(Descriptor::from_le_u128(v));
        }
        // index * 16 < 2^20: no overflow; the addition is checked.
        let addr = self
            .table
            .checked_add(u64::from(index) * DESCRIPTOR_SIZE)
            .ok_or(ChainError::DescriptorNotInMemory { addr: self.table })?;
        if let Some(p) = self.regions.host(addr, DESCRIPTOR_SIZE) {
            // SAFETY: host() proved [p, p + 16) lies in a mapping the snapshot keeps alive;
            // read_volatile_le128 copes with an unaligned table.
            return Ok(Descriptor::from_le_u128(unsafe { read_volatile_le128(p) }));
        }
        // A descriptor straddling two adjacent regions (only an unaligned table can).
        let mut bytes = [0u8; DESCRIPTOR_SIZE as usize];
        if !self.regions.read(addr, &mut bytes) {
            return Err(ChainError::DescriptorNotInMemory { addr });
        }
        Ok(Descriptor::from_le_bytes(&bytes))
    }
}
