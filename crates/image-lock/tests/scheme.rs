//! QEMU's locking scheme, checked inside one process: OFD locks of two open file descriptions
//! conflict even in the same process, so each `ImageLock` here stands for another opener. The
//! bytes are read back through a third descriptor, as another process would see them.

use image_lock::{Access, Conflict, ImageLock, LockError, Perms};
use std::os::fd::AsRawFd;
use std::path::Path;

/// The bytes QEMU's file-posix may lock: "uses" 100..=104, "does not share" 200..=204.
const QEMU_BYTES: [u64; 10] = [100, 101, 102, 103, 104, 200, 201, 202, 203, 204];

fn image() -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("disk.img");
    std::fs::File::create(&path)
        .and_then(|f| f.set_len(1 << 20))
        .expect("create image");
    (dir, path)
}

/// Whether any open file description other than a fresh one holds a lock on `byte`.
fn locked(path: &Path, byte: u64) -> bool {
    let file = std::fs::File::open(path).expect("open for probing");
    // SAFETY: all-zero is a valid flock; the fields that matter are set below.
    let mut lock: libc::flock = unsafe { std::mem::zeroed() };
    lock.l_type = libc::F_WRLCK as libc::c_short;
    lock.l_whence = libc::SEEK_SET as libc::c_short;
    lock.l_start = byte as libc::off_t;
    lock.l_len = 1;
    // SAFETY: F_OFD_GETLK on an open descriptor with a flock that outlives the call.
    let ret = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_GETLK, &mut lock) };
    assert_eq!(ret, 0, "F_OFD_GETLK: {}", std::io::Error::last_os_error());
    lock.l_type != libc::F_UNLCK as libc::c_short
}

fn locked_bytes(path: &Path) -> Vec<u64> {
    QEMU_BYTES
        .into_iter()
        .filter(|&b| locked(path, b))
        .collect()
}

fn conflict(result: Result<ImageLock, LockError>) -> Conflict {
    match result {
        Err(LockError::Conflict { conflict, .. }) => conflict,
        Err(e) => panic!("expected a lock conflict, got {e}"),
        Ok(_) => panic!("expected a lock conflict, the lock was granted"),
    }
}

fn write_perm() -> image_lock::Perm {
    Perms::WRITE.iter().next().expect("one bit")
}

// What QEMU 7.2's tools take (seen with strace): qemu-io opens share everything; qemu-img
// convert shares only reads and unchanged writes (BDRV_O_NO_SHARE).
const QEMU_IO_RW: (Perms, Perms) = (Perms::CONSISTENT_READ.union(Perms::WRITE), Perms::ALL);
const QEMU_IO_RO: (Perms, Perms) = (Perms::CONSISTENT_READ, Perms::ALL);
const QEMU_IMG_READER: (Perms, Perms) = (
    Perms::CONSISTENT_READ,
    Perms::CONSISTENT_READ.union(Perms::WRITE_UNCHANGED),
);

fn qemu(path: &Path, (uses, shares): (Perms, Perms)) -> Result<ImageLock, LockError> {
    ImageLock::acquire_perms(path, uses, shares)
}

#[test]
fn read_write_export_holds_read_write_and_the_unshare_bytes_of_write_and_resize() {
    let (_dir, path) = image();
    let lock = ImageLock::acquire(&path, Access::ReadWrite).expect("lock");
    assert_eq!(locked_bytes(&path), [100, 101, 201, 203]);
    drop(lock);
    assert_eq!(
        locked_bytes(&path),
        Vec::<u64>::new(),
        "drop releases every byte"
    );
}

#[test]
fn read_only_export_holds_read_and_the_unshare_bytes_of_write_and_resize() {
    let (_dir, path) = image();
    let _lock = ImageLock::acquire(&path, Access::ReadOnly).expect("lock");
    assert_eq!(locked_bytes(&path), [100, 201, 203]);
}

#[test]
fn two_writers_exclude_each_other_and_a_reader_excludes_a_writer() {
    let (_dir, path) = image();
    let first = ImageLock::acquire(&path, Access::ReadWrite).expect("first writer");
    assert_eq!(
        conflict(ImageLock::acquire(&path, Access::ReadWrite)),
        Conflict::Forbids(write_perm())
    );
    assert_eq!(
        conflict(ImageLock::acquire(&path, Access::ReadOnly)),
        Conflict::Uses(write_perm())
    );
    drop(first);
    let reader = ImageLock::acquire(&path, Access::ReadOnly).expect("reader after the writer");
    assert_eq!(
        conflict(ImageLock::acquire(&path, Access::ReadWrite)),
        Conflict::Forbids(write_perm())
    );
    drop(reader);
    ImageLock::acquire(&path, Access::ReadWrite).expect("writer once alone");
}

#[test]
fn read_only_exports_share() {
    let (_dir, path) = image();
    let _a = ImageLock::acquire(&path, Access::ReadOnly).expect("first reader");
    let _b = ImageLock::acquire(&path, Access::ReadOnly).expect("second reader");
    let _c = qemu(&path, QEMU_IO_RO).expect("qemu-io -r beside them");
}

#[test]
fn a_failed_acquire_leaves_no_bytes_behind() {
    let (_dir, path) = image();
    let qemu_writer = qemu(&path, QEMU_IO_RW).expect("qemu-io writer");
    let before = locked_bytes(&path);
    assert!(ImageLock::acquire(&path, Access::ReadWrite).is_err());
    assert_eq!(locked_bytes(&path), before);
    drop(qemu_writer);
    assert_eq!(locked_bytes(&path), Vec::<u64>::new());
}

#[test]
fn qemu_openers_and_exports_see_each_other() {
    let (_dir, path) = image();
    // A QEMU writer first: the export sees its "write" byte.
    let writer = qemu(&path, QEMU_IO_RW).expect("qemu-io writer");
    assert_eq!(
        conflict(ImageLock::acquire(&path, Access::ReadWrite)),
        Conflict::Uses(write_perm())
    );
    assert_eq!(
        conflict(ImageLock::acquire(&path, Access::ReadOnly)),
        Conflict::Uses(write_perm())
    );
    drop(writer);
    // The export first: QEMU writers and no-share readers see its "unshare write" byte,
    // plain readers go ahead.
    let _export = ImageLock::acquire(&path, Access::ReadWrite).expect("export");
    assert_eq!(
        conflict(qemu(&path, QEMU_IO_RW)),
        Conflict::Forbids(write_perm())
    );
    assert_eq!(
        conflict(qemu(&path, QEMU_IMG_READER)),
        Conflict::Uses(write_perm())
    );
    qemu(&path, QEMU_IO_RO).expect("qemu-io -r reads beside a writer");
}

#[test]
fn a_missing_image_is_an_open_error_naming_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("absent.img");
    match ImageLock::acquire(&path, Access::ReadOnly) {
        Err(e @ LockError::Open { .. }) => assert!(e.to_string().contains("absent.img"), "{e}"),
        other => panic!("expected an open error, got {other:?}"),
    }
}
