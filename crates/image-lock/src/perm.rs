//! QEMU's block-layer permissions and where file-posix locks them in an image.
//!
//! For every permission bit `i` QEMU keeps two one-byte ranges: `PERM_BASE + i`, read-locked by
//! each opener that *uses* the permission, and `SHARED_BASE + i`, read-locked by each opener that
//! *does not share* it (forbids others to use it). Libvirt owns byte 0, hence the offsets.

/// First "uses permission i" byte (QEMU's RAW_LOCK_PERM_BASE).
pub const PERM_BASE: u64 = 100;
/// First "does not share permission i" byte (QEMU's RAW_LOCK_SHARED_BASE).
pub const SHARED_BASE: u64 = 200;

/// A set of QEMU permissions (BLK_PERM_* bits).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Perms(u64);

impl Perms {
    pub const NONE: Perms = Perms(0);
    /// Reads return what was written (BLK_PERM_CONSISTENT_READ).
    pub const CONSISTENT_READ: Perms = Perms(0x01);
    /// Guest-visible writes (BLK_PERM_WRITE).
    pub const WRITE: Perms = Perms(0x02);
    /// Writes that leave the data as it was, e.g. copy-on-read (BLK_PERM_WRITE_UNCHANGED).
    pub const WRITE_UNCHANGED: Perms = Perms(0x04);
    /// Changing the size (BLK_PERM_RESIZE).
    pub const RESIZE: Perms = Perms(0x08);
    /// Changing the block graph (BLK_PERM_GRAPH_MOD). QEMU 6.2 dropped it, but 6.1 and older
    /// still lock its bytes, so it stays in the set: nobody may give the bit a new meaning.
    pub const GRAPH_MOD: Perms = Perms(0x10);
    /// Every bit whose bytes QEMU (old or new) may lock.
    pub const ALL: Perms = Perms(0x1f);

    const NAMES: [(Perms, &'static str); 5] = [
        (Perms::CONSISTENT_READ, "consistent read"),
        (Perms::WRITE, "write"),
        (Perms::WRITE_UNCHANGED, "write unchanged"),
        (Perms::RESIZE, "resize"),
        (Perms::GRAPH_MOD, "change children"),
    ];

    pub const fn union(self, other: Perms) -> Perms {
        Perms(self.0 | other.0)
    }

    /// The permissions of `ALL` not in `self`.
    pub const fn complement(self) -> Perms {
        Perms(Perms::ALL.0 & !self.0)
    }

    pub const fn contains(self, other: Perms) -> bool {
        self.0 & other.0 == other.0
    }

    /// The single permissions in the set, lowest bit first.
    pub fn iter(self) -> impl Iterator<Item = Perm> {
        (0..Perms::NAMES.len() as u32)
            .filter(move |bit| self.0 & (1 << bit) != 0)
            .map(|bit| Perm { bit })
    }
}

/// One permission: a bit position of `Perms`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Perm {
    bit: u32,
}

impl Perm {
    /// The byte an opener that uses this permission read-locks.
    pub fn use_byte(self) -> u64 {
        PERM_BASE + u64::from(self.bit)
    }

    /// The byte an opener that does not share this permission read-locks.
    pub fn unshare_byte(self) -> u64 {
        SHARED_BASE + u64::from(self.bit)
    }

    /// QEMU's name for the permission, as in its "Failed to get \"write\" lock" messages.
    pub fn name(self) -> &'static str {
        Perms::NAMES[self.bit as usize].1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_follow_qemu_file_posix() {
        let write: Vec<Perm> = Perms::WRITE.iter().collect();
        assert_eq!(write.len(), 1);
        assert_eq!(write[0].use_byte(), 101);
        assert_eq!(write[0].unshare_byte(), 201);
        assert_eq!(write[0].name(), "write");
        let resize = Perms::RESIZE.iter().next().map(|p| p.unshare_byte());
        assert_eq!(resize, Some(203));
        let all: Vec<u64> = Perms::ALL.iter().map(|p| p.use_byte()).collect();
        assert_eq!(all, [100, 101, 102, 103, 104]);
    }

    #[test]
    fn complement_stays_within_the_known_bits() {
        let shared = Perms::CONSISTENT_READ.union(Perms::WRITE_UNCHANGED);
        let unshared = shared.complement();
        assert!(unshared.contains(Perms::WRITE.union(Perms::RESIZE).union(Perms::GRAPH_MOD)));
        assert!(!unshared.contains(Perms::CONSISTENT_READ));
        assert_eq!(unshared.iter().count(), 3);
    }
}
