//! The benchmark image: a regular file filled with data. A freshly allocated file would not do:
//! reads of unwritten extents return zeroes without touching the disk, which flatters every
//! target's read figures.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::Path;

use crate::BenchError;

const CHUNK: usize = 1 << 20;

/// Makes sure `path` is a `size`-byte file of data. An existing file of the right size is reused
/// (its content is whatever earlier runs left, which is data); anything else is rewritten.
/// Returns whether the file was (re)written.
pub fn ensure_image(
    path: &Path,
    size: u64,
    progress: &mut dyn FnMut(u64),
) -> Result<bool, BenchError> {
    if size == 0 || size % CHUNK as u64 != 0 {
        return Err(BenchError::Usage(format!(
            "image size {size} must be a positive multiple of 1 MiB"
        )));
    }
    if let Ok(meta) = std::fs::metadata(path) {
        if meta.is_file() && meta.len() == size {
            return Ok(false);
        }
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| BenchError::io(dir, e))?;
    }
    let mut file: File = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)
        .map_err(|e| BenchError::io(path, e))?;
    let mut rng = fastrand::Rng::with_seed(0x1_6d61_6765);
    let mut chunk = vec![0u8; CHUNK];
    rng.fill(&mut chunk);
    let mut written = 0u64;
    while written < size {
        // Vary every chunk a little so that no two are identical (no dedup, no compression).
        chunk[..8].copy_from_slice(&written.to_le_bytes());
        file.write_all(&chunk)
            .map_err(|e| BenchError::io(path, e))?;
        written += CHUNK as u64;
        if written % (256 * CHUNK as u64) == 0 {
            progress(written);
        }
    }
    file.sync_all().map_err(|e| BenchError::io(path, e))?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_data_once_and_reuses_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/bench.img");
        assert!(ensure_image(&path, 2 * CHUNK as u64, &mut |_| {}).unwrap());
        let data = std::fs::read(&path).unwrap();
        assert_eq!(data.len(), 2 * CHUNK);
        assert!(data.iter().filter(|&&b| b == 0).count() < data.len() / 64);
        assert_ne!(data[..CHUNK], data[CHUNK..]);
        assert!(!ensure_image(&path, 2 * CHUNK as u64, &mut |_| {}).unwrap());
        // A different size is rewritten.
        assert!(ensure_image(&path, CHUNK as u64, &mut |_| {}).unwrap());
        assert_eq!(std::fs::metadata(&path).unwrap().len(), CHUNK as u64);
    }

    #[test]
    fn size_must_be_whole_mebibytes() {
        let dir = tempfile::tempdir().unwrap();
        assert!(ensure_image(&dir.path().join("x"), 1000, &mut |_| {}).is_err());
        assert!(ensure_image(&dir.path().join("x"), 0, &mut |_| {}).is_err());
    }
}
