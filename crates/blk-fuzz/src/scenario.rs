//! Fuzzer bytes -> a hostile guest: a memory layout (one to six regions, adjacent or with
//! gaps, anywhere up to the top of the address space), a split ring (any size, tables and
//! avail ring anywhere, aligned or not), descriptor tables mixing request-shaped chains,
//! indirect tables and random descriptors, an avail ring whose index may be far ahead or wrap,
//! and a second round of guest writes after the first drain. Every choice is biased towards
//! the places where bugs live (region edges, gaps, the top of memory, lengths near u32::MAX),
//! and an exhausted input decodes to the simplest case, so short inputs are valid.

use arbitrary::{Result, Unstructured};
use blk_proto::{
    DeviceConfig, RawRange, RequestHeader, SplitRing, VIRTIO_BLK_T_BARRIER, VIRTIO_BLK_T_DISCARD,
    VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
    VIRTIO_BLK_T_WRITE_ZEROES,
};
use virtio_bindings::virtio_ring::{VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};

use crate::guest::{RegionSpec, PAGE};

/// A disk of 64 MiB: small enough that random sectors often fall outside it.
pub const CAPACITY_BYTES: u64 = 64 << 20;
/// The server's largest queue (`--queue-size` maximum).
pub const MAX_SERVER_QUEUE: u16 = 1024;
/// Descriptors written per table at most (larger tables keep what earlier writes left: zeros).
const MAX_TABLE_WRITES: u16 = 48;
/// Avail ring entries written per round at most.
const MAX_AVAIL_WRITES: u16 = 64;

/// Guest bytes to store at a guest address (partly or wholly outside memory is allowed: what
/// falls outside is not written).
#[derive(Clone, Debug)]
pub struct Write {
    pub addr: u64,
    pub bytes: Vec<u8>,
}

/// What the fuzz input asks for.
#[derive(Clone, Debug)]
pub struct Scenario {
    pub regions: Vec<RegionSpec>,
    pub ring: SplitRing,
    /// The queue's next_avail when the first drain starts.
    pub next_avail: u16,
    pub cfg: DeviceConfig,
    /// Requests the engine takes per drain before it throttles (>= 1).
    pub room: usize,
    /// The parsed request's iovec and range capacity (the server's pool uses the config's).
    pub capacities: Option<(usize, usize)>,
    /// Guest writes before each round of drains.
    pub rounds: Vec<Vec<Write>>,
    /// (addr, len) pairs to translate through the snapshot directly.
    pub probes: Vec<(u64, u64)>,
}

/// What to spend the input on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Focus {
    /// The parser: one avail entry on a server-shaped ring, one round.
    Chain,
    /// The whole drain: any ring, any avail index, two rounds.
    Drain,
}

impl Scenario {
    pub fn decode(u: &mut Unstructured<'_>, focus: Focus) -> Result<Self> {
        let regions = layout(u)?;
        let server_shaped = focus == Focus::Chain || u.ratio(7, 8)?;
        let size = if server_shaped {
            1u16 << pick(u, &[(6, 0..=4), (1, 5..=10)])?
        } else {
            u.arbitrary()?
        };
        let mut desc_table = place(u, &regions, 16 * u64::from(size))?;
        let mut avail_ring = place(u, &regions, 4 + 2 * u64::from(size))?;
        if server_shaped {
            // What virtio-queue lets a frontend set (vhost-user-backend refuses the rest).
            desc_table &= !15;
            avail_ring &= !1;
        }
        let ring = SplitRing {
            desc_table,
            avail_ring,
            size,
        };
        let next_avail = match u.int_in_range(0u8..=3)? {
            0 => 0,
            1 => u16::MAX - u.int_in_range(0..=8)?,
            _ => u.arbitrary()?,
        };
        let cfg = config(u, size)?;
        let room = match focus {
            Focus::Chain => 1,
            Focus::Drain if u.ratio(1, 2)? => usize::MAX,
            Focus::Drain => u.int_in_range(1..=usize::from(size.clamp(1, 64)))?,
        };
        let capacities = if u.ratio(1, 4)? {
            Some((u.int_in_range(0..=8)?, u.int_in_range(0..=4)?))
        } else {
            None
        };
        let mut rounds = Vec::new();
        let mut gen = Generator {
            u,
            regions: &regions,
            ring,
            heads: Vec::new(),
            writes: Vec::new(),
        };
        gen.tables()?;
        let count = match focus {
            Focus::Chain => 1,
            Focus::Drain => gen.avail_count()?,
        };
        gen.avail(next_avail, count)?;
        rounds.push(std::mem::take(&mut gen.writes));
        if focus == Focus::Drain && gen.u.ratio(1, 3)? {
            // The guest moves on: more chains, a new index (perhaps far ahead or behind),
            // some descriptors rewritten.
            for _ in 0..gen.u.int_in_range(0..=3)? {
                let index = gen.u.int_in_range(0..=size.saturating_sub(1))?;
                let desc = gen.random_descriptor(index, size)?;
                gen.put_descriptor(ring.desc_table, index, desc);
            }
            let start = next_avail.wrapping_add(gen.u.arbitrary::<u8>()?.into());
            let count = gen.avail_count()?;
            gen.avail(start, count)?;
            rounds.push(std::mem::take(&mut gen.writes));
        }
        let mut probes = Vec::new();
        if focus == Focus::Drain {
            for _ in 0..u.int_in_range(0..=4)? {
                probes.push((pointer(u, &regions)?, u64::from(length(u)?)));
            }
        }
        Ok(Scenario {
            regions,
            ring,
            next_avail,
            cfg,
            room,
            capacities,
            rounds,
            probes,
        })
    }

    /// Whether the ring is one the server can be handed (and virtio-queue accepts): a power of
    /// two no larger than the server's maximum, tables aligned as the spec says, regions at
    /// page-aligned guest addresses (as every VMM maps them).
    pub fn server_shaped(&self) -> bool {
        let ring = &self.ring;
        ring.size.is_power_of_two()
            && ring.size <= MAX_SERVER_QUEUE
            && ring.desc_table % 16 == 0
            && ring.avail_ring % 2 == 0
            && ring.avail_ring != 0
            && self
                .regions
                .iter()
                .all(|r| r.guest_start % PAGE as u64 == 0)
    }
}

/// A weighted choice among integer ranges.
fn pick(u: &mut Unstructured<'_>, choices: &[(u32, std::ops::RangeInclusive<u16>)]) -> Result<u16> {
    let total: u32 = choices.iter().map(|c| c.0).sum();
    let mut x = u.int_in_range(0..=total - 1)?;
    for (weight, range) in choices {
        if x < *weight {
            return u.int_in_range(range.clone());
        }
        x -= weight;
    }
    Ok(*choices[0].1.start())
}

/// One to six regions of one to three pages, in guest order, each after a gap of nothing
/// (adjacent: ranges cross them), a few pages or a few odd bytes; placed low, anywhere, or
/// ending at the top of the 64-bit address space.
fn layout(u: &mut Unstructured<'_>) -> Result<Vec<RegionSpec>> {
    let count = pick(u, &[(4, 1..=1), (4, 2..=2), (2, 3..=4), (1, 5..=6)])? as usize;
    let mut offsets = Vec::with_capacity(count);
    let mut cursor = 0u64;
    for i in 0..count {
        let gap = match (i, u.int_in_range(0u8..=3)?) {
            (0, _) => 0,
            (_, 0 | 1) => 0,
            (_, 2) => u64::from(u.int_in_range(1u16..=4)?) * PAGE as u64,
            _ => u64::from(u.int_in_range(1u16..=64)?),
        };
        let pages = usize::from(u.int_in_range(1u8..=3)?);
        cursor += gap;
        offsets.push((cursor, pages));
        cursor += (pages * PAGE) as u64;
    }
    let span = cursor;
    let base = match u.int_in_range(0u8..=5)? {
        0..=2 => u64::from(u.int_in_range(0u8..=16)?) * PAGE as u64,
        3 => u64::from(u.arbitrary::<u32>()?),
        // The last region ends at the very top: [.., u64::MAX) (vm-memory needs start + len
        // to fit in a u64).
        4 => u64::MAX - span,
        _ => u.arbitrary::<u64>()? % (u64::MAX - span),
    };
    Ok(offsets
        .into_iter()
        .map(|(offset, pages)| RegionSpec {
            guest_start: base + offset,
            pages,
        })
        .collect())
}

/// A guest address: mostly inside or at the edges of a region, sometimes in a gap, past the
/// end of memory, near u64::MAX or anywhere.
pub fn pointer(u: &mut Unstructured<'_>, regions: &[RegionSpec]) -> Result<u64> {
    let r = regions[u.choose_index(regions.len())?];
    let len = r.len();
    let small = u64::from(u.int_in_range(0u8..=63)?);
    Ok(match u.int_in_range(0u8..=11)? {
        0..=2 => r.guest_start + small.min(len - 1),
        3..=5 => r.guest_start + u.int_in_range(0..=len - 1)?,
        6 => r.guest_start + len - 1 - small.min(len - 1),
        // Just past the region: a gap, the next region, or nothing.
        7 => (r.guest_start + len).wrapping_add(small),
        8 => r.guest_start.wrapping_sub(small + 1),
        9 => u64::MAX - small,
        _ => u.arbitrary()?,
    })
}

/// A guest address for `len` bytes: mostly where they fit inside one region (near its start
/// or anywhere), sometimes straddling a region's end (into a gap or the next region), and
/// sometimes anything [`pointer`] makes.
pub fn place(u: &mut Unstructured<'_>, regions: &[RegionSpec], len: u64) -> Result<u64> {
    let r = regions[u.choose_index(regions.len())?];
    let choice = u.int_in_range(0u8..=15)?;
    Ok(match choice {
        0..=12 if len <= r.len() => {
            let room = r.len() - len;
            let offset = if choice < 5 {
                u.int_in_range(0..=room.min(63))?
            } else {
                u.int_in_range(0..=room)?
            };
            r.guest_start + offset
        }
        0..=13 => {
            let end = r.guest_start + r.len();
            end - u.int_in_range(1..=len.clamp(1, r.len()))?
        }
        _ => pointer(u, regions)?,
    })
}

/// A descriptor length: empty, tiny, a header, blocks, random, or near u32::MAX.
pub fn length(u: &mut Unstructured<'_>) -> Result<u32> {
    Ok(match u.int_in_range(0u8..=8)? {
        0 => 0,
        1 => 1,
        2 => 16,
        3 => u.int_in_range(0..=64)?,
        4 => 512 * u.int_in_range(1..=16)?,
        5 => u.int_in_range(0..=2 * PAGE as u32)?,
        6 => u32::MAX - u.int_in_range(0..=16)?,
        _ => u.arbitrary()?,
    })
}

/// The device: either block size, discard / write-zeroes on or off, read-only or not, small
/// segment limits (so the limits are hit) or the server's defaults.
fn config(u: &mut Unstructured<'_>, queue_size: u16) -> Result<DeviceConfig> {
    let lbs = if u.ratio(1, 4)? { 4096 } else { 512 };
    let mut cfg = DeviceConfig::new(CAPACITY_BYTES, lbs, 1, queue_size.max(3));
    cfg.discard = u.arbitrary()?;
    cfg.write_zeroes = u.arbitrary()?;
    cfg.read_only = u.ratio(1, 4)?;
    if u.arbitrary()? {
        cfg.seg_max = u.int_in_range(1..=6)?;
        cfg.max_discard_seg = u.int_in_range(1..=3)?;
        cfg.max_write_zeroes_seg = u.int_in_range(1..=3)?;
    }
    if u.ratio(1, 8)? {
        cfg.max_transfer_bytes = u.int_in_range(512..=64 * 1024)?;
    }
    Ok(cfg)
}

struct Generator<'a, 'b> {
    u: &'a mut Unstructured<'b>,
    regions: &'a [RegionSpec],
    ring: SplitRing,
    /// Heads of the request-shaped chains written so far (the avail ring favours them).
    heads: Vec<u16>,
    writes: Vec<Write>,
}

/// A descriptor as the guest writes it.
#[derive(Clone, Copy, Debug)]
struct Desc {
    addr: u64,
    len: u32,
    flags: u16,
    next: u16,
}

impl Desc {
    fn bytes(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(16);
        b.extend_from_slice(&self.addr.to_le_bytes());
        b.extend_from_slice(&self.len.to_le_bytes());
        b.extend_from_slice(&self.flags.to_le_bytes());
        b.extend_from_slice(&self.next.to_le_bytes());
        b
    }
}

const NEXT: u16 = VRING_DESC_F_NEXT as u16;
const WRITE: u16 = VRING_DESC_F_WRITE as u16;
const INDIRECT: u16 = VRING_DESC_F_INDIRECT as u16;

impl Generator<'_, '_> {
    fn put(&mut self, addr: u64, bytes: Vec<u8>) {
        self.writes.push(Write { addr, bytes });
    }

    fn put_descriptor(&mut self, table: u64, index: u16, desc: Desc) {
        self.put(table.wrapping_add(16 * u64::from(index)), desc.bytes());
    }

    /// The queue's descriptor table: request-shaped chains, indirect tables and random
    /// descriptors, then perhaps one entry damaged.
    fn tables(&mut self) -> Result<()> {
        let size = self.ring.size;
        let limit = size.min(MAX_TABLE_WRITES);
        let mut index = 0u16;
        while index < limit && !self.u.is_empty() {
            let used = match self.u.int_in_range(0u8..=5)? {
                0..=2 => {
                    let table = self.ring.desc_table;
                    let descs = self.shaped_chain(index, limit - index, size)?;
                    self.heads.push(index);
                    self.write_table(table, index, &descs)
                }
                3 => {
                    let desc = self.indirect()?;
                    self.heads.push(index);
                    self.put_descriptor(self.ring.desc_table, index, desc);
                    1
                }
                _ => {
                    let desc = self.random_descriptor(index, size)?;
                    self.put_descriptor(self.ring.desc_table, index, desc);
                    1
                }
            };
            index += used;
        }
        if size > 0 && self.u.ratio(1, 4)? {
            let index = self.u.int_in_range(0..=size - 1)?;
            let desc = self.random_descriptor(index, size)?;
            self.put_descriptor(self.ring.desc_table, index, desc);
        }
        Ok(())
    }

    fn write_table(&mut self, table: u64, first: u16, descs: &[Desc]) -> u16 {
        for (i, desc) in descs.iter().enumerate() {
            self.put_descriptor(table, first + i as u16, *desc);
        }
        descs.len() as u16
    }

    /// A chain laid out like a request from `first` on (at most `room` descriptors, indexes
    /// in a table of `table_len`): header, payload or data, status; the header and any
    /// discard segments written to guest memory; sometimes one link or flag damaged.
    fn shaped_chain(&mut self, first: u16, room: u16, table_len: u16) -> Result<Vec<Desc>> {
        let request_type = match self.u.int_in_range(0u8..=9)? {
            0 | 1 => VIRTIO_BLK_T_IN,
            2 | 3 => VIRTIO_BLK_T_OUT,
            4 => VIRTIO_BLK_T_FLUSH,
            5 => VIRTIO_BLK_T_GET_ID,
            6 => VIRTIO_BLK_T_DISCARD,
            7 => VIRTIO_BLK_T_WRITE_ZEROES,
            8 => VIRTIO_BLK_T_IN | VIRTIO_BLK_T_BARRIER,
            _ => self.u.arbitrary()?,
        };
        let sector = match self.u.int_in_range(0u8..=3)? {
            0 => 0,
            1 | 2 => u64::from(self.u.int_in_range(0u32..=0x2_0000)?) & !7,
            _ => self.u.arbitrary()?,
        };
        let header_addr = place(self.u, self.regions, 16)?;
        let header = RequestHeader {
            request_type,
            ioprio: 0,
            sector,
        };
        self.put(header_addr, header.to_le_bytes().to_vec());
        let header_len = match self.u.int_in_range(0u8..=7)? {
            0 => self.u.int_in_range(0..=15)?,
            1 => 16 + 512,
            _ => 16,
        };
        let mut descs = vec![(header_addr, header_len, 0u16)];
        let device_writes = matches!(request_type & !VIRTIO_BLK_T_BARRIER, 0 | 8);
        for _ in 0..self.u.int_in_range(0u8..=3)? {
            let ranges = matches!(
                request_type,
                VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES
            );
            let segments = u32::from(pick(self.u, &[(3, 1..=1), (1, 2..=3)])?);
            let len = match self.u.int_in_range(0u8..=3)? {
                0 => length(self.u)?,
                _ if ranges => 16 * segments,
                _ => 512 * self.u.int_in_range(1..=8)?,
            };
            let addr = place(self.u, self.regions, u64::from(len))?;
            let mut flags = if device_writes { WRITE } else { 0 };
            if self.u.ratio(1, 8)? {
                flags ^= WRITE;
            }
            if ranges {
                for k in 0..u64::from(segments) {
                    let range = self.range()?;
                    self.put(addr.wrapping_add(16 * k), range.to_le_bytes().to_vec());
                }
            }
            descs.push((addr, len, flags));
        }
        let status = if self.u.ratio(3, 4)? {
            (place(self.u, self.regions, 1)?, 1)
        } else {
            let len = length(self.u)?;
            (place(self.u, self.regions, u64::from(len))?, len)
        };
        descs.push((status.0, status.1, WRITE));
        descs.truncate(usize::from(room.max(1)));
        let count = descs.len();
        let mut out: Vec<Desc> = descs
            .into_iter()
            .enumerate()
            .map(|(i, (addr, len, flags))| {
                let last = i + 1 == count;
                Desc {
                    addr,
                    len,
                    flags: if last { flags } else { flags | NEXT },
                    next: if last { 0 } else { first + i as u16 + 1 },
                }
            })
            .collect();
        if self.u.ratio(1, 6)? {
            let i = self.u.choose_index(out.len())?;
            out[i] = self.random_descriptor(first + i as u16, table_len)?;
        }
        Ok(out)
    }

    /// An INDIRECT descriptor and the table it points at (request-shaped or random, its
    /// length right or wrong).
    fn indirect(&mut self) -> Result<Desc> {
        let entries = self.u.int_in_range(1u16..=6)?;
        let mut addr = place(self.u, self.regions, 16 * u64::from(entries))?;
        if self.u.ratio(3, 4)? {
            addr &= !15;
        }
        let descs = if self.u.ratio(3, 4)? {
            self.shaped_chain(0, entries, entries)?
        } else {
            let mut d = Vec::new();
            for i in 0..entries {
                d.push(self.random_descriptor(i, entries)?);
            }
            d
        };
        let len = match self.u.int_in_range(0u8..=5)? {
            0 => length(self.u)?,
            1 => 16 * u32::from(entries) + 16 * self.u.int_in_range(1..=4)?,
            _ => 16 * descs.len() as u32,
        };
        self.write_table(addr, 0, &descs);
        let mut flags = INDIRECT;
        if self.u.ratio(1, 8)? {
            flags |= self.u.arbitrary::<u16>()?;
        }
        Ok(Desc {
            addr,
            len,
            flags,
            next: self.u.arbitrary()?,
        })
    }

    /// Anything: any flags (NEXT, WRITE, INDIRECT or undefined bits), next inside, just
    /// outside or far outside the table, a loop back.
    fn random_descriptor(&mut self, index: u16, table_len: u16) -> Result<Desc> {
        let addr = pointer(self.u, self.regions)?;
        let len = length(self.u)?;
        let flags = if self.u.ratio(7, 8)? {
            self.u.int_in_range(0u16..=7)?
        } else {
            self.u.arbitrary()?
        };
        let next = match self.u.int_in_range(0u8..=4)? {
            0 => index.wrapping_add(1),
            1 => index,
            2 => self.u.int_in_range(0..=table_len.saturating_add(1))?,
            3 => table_len,
            _ => self.u.arbitrary()?,
        };
        Ok(Desc {
            addr,
            len,
            flags,
            next,
        })
    }

    fn range(&mut self) -> Result<RawRange> {
        Ok(RawRange {
            sector: match self.u.int_in_range(0u8..=3)? {
                0 => 0,
                1 | 2 => u64::from(self.u.int_in_range(0u32..=0x2_0000)?) & !7,
                _ => self.u.arbitrary()?,
            },
            num_sectors: match self.u.int_in_range(0u8..=3)? {
                0 => 0,
                1 | 2 => self.u.int_in_range(1..=64)? * 8,
                _ => self.u.arbitrary()?,
            },
            flags: match self.u.int_in_range(0u8..=3)? {
                0 | 1 => 0,
                2 => blk_proto::VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
                _ => self.u.arbitrary()?,
            },
        })
    }

    /// How far ahead of next_avail the guest puts its index: a few, exactly a queue, one more
    /// than a queue (which stops the queue), nothing, or anything.
    fn avail_count(&mut self) -> Result<u16> {
        let size = self.ring.size;
        let count = match self.u.int_in_range(0u8..=7)? {
            0 => 0,
            1 => size,
            2 => size.wrapping_add(1),
            3 => self.u.arbitrary()?,
            _ => self.u.int_in_range(1..=size.clamp(1, 8))?,
        };
        // Queues larger than the server's (the walker takes any size, and each chain may walk
        // the whole table) pop a few chains: more only costs time.
        Ok(if count <= size && size > MAX_SERVER_QUEUE {
            count % 17
        } else {
            count
        })
    }

    /// The avail ring: flags, idx = start + count, and entries for the positions in between
    /// (heads of the shaped chains mostly, any index sometimes).
    fn avail(&mut self, start: u16, count: u16) -> Result<()> {
        let ring = self.ring;
        let idx = start.wrapping_add(count);
        let mut header = vec![0u8, 0];
        header.extend_from_slice(&idx.to_le_bytes());
        self.put(ring.avail_ring, header);
        if ring.size == 0 {
            return Ok(());
        }
        for k in 0..count.min(ring.size).min(MAX_AVAIL_WRITES) {
            let position = start.wrapping_add(k) % ring.size;
            let head = match self.u.int_in_range(0u8..=5)? {
                0..=3 if !self.heads.is_empty() => {
                    self.heads[self.u.choose_index(self.heads.len())?]
                }
                0..=4 => self.u.int_in_range(0..=ring.size - 1)?,
                _ => self.u.arbitrary()?,
            };
            let addr = ring
                .avail_ring
                .wrapping_add(4)
                .wrapping_add(2 * u64::from(position));
            self.put(addr, head.to_le_bytes().to_vec());
        }
        Ok(())
    }
}
