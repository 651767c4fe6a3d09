//! Room on the disk of a data dir: a reserve file kept aside while the disk has room, given back
//! the moment a write finds the disk full, so that the work already in flight can finish while
//! new work is refused (the gateway answers 507 at once instead of letting requests wait out
//! their deadline). The reserve is made again once the disk has room for it and more.
//!
//! Only the SQLite backend has a disk of its own to watch; a PostgreSQL server answers a full
//! disk with an error the gateway turns into a 503.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

/// Bytes each component keeps aside. The work of the requests in flight (16 sagas write a few
/// kilobytes each, the WAL a few pages) fits in one component's reserve many times over.
pub const RESERVE_BYTES: u64 = 1 << 20;

/// Below this much free space, new work is refused: two reserves, so that a full disk is
/// noticed before the reserves are needed.
pub const LOW_BYTES: u64 = 2 * RESERVE_BYTES;

/// A component's reserve on its data dir's disk.
#[derive(Debug)]
pub struct Room {
    dir: PathBuf,
    file: PathBuf,
    /// Whether the reserve is given back (or could not be made): the disk was full.
    released: AtomicBool,
}

impl Room {
    /// The reserve of `component` in `dir` (`.<component>.reserve`), made now if the disk has
    /// room for it.
    pub fn keep(dir: &Path, component: &str) -> Room {
        let room = Room {
            dir: dir.to_owned(),
            file: dir.join(format!(".{component}.reserve")),
            released: AtomicBool::new(true),
        };
        room.renew();
        room
    }

    /// Free bytes on the disk of the data dir, for an unprivileged writer.
    pub fn free(&self) -> Option<u64> {
        let s = rustix::fs::statvfs(&self.dir).ok()?;
        Some(s.f_bavail.saturating_mul(s.f_frsize))
    }

    /// Why no new work should be taken, if the disk is (nearly) full: less than [`LOW_BYTES`]
    /// free, or this reserve given back and not made again yet.
    pub fn short(&self) -> Option<String> {
        let free = self.free()?;
        if free < LOW_BYTES || self.released.load(Ordering::Acquire) {
            return Some(format!(
                "the disk of {} has {} KiB free, under the {} KiB kept for the work in flight; free some space",
                self.dir.display(),
                free / 1024,
                LOW_BYTES / 1024
            ));
        }
        None
    }

    /// A write found the disk full: give the reserve back, once, so that the work in flight
    /// can go on.
    pub fn release(&self) {
        if self.released.swap(true, Ordering::AcqRel) {
            return;
        }
        match std::fs::remove_file(&self.file) {
            Ok(()) => tracing::warn!(
                dir = %self.dir.display(),
                reserve_kib = RESERVE_BYTES / 1024,
                "the disk is full: gave back this component's reserve so that the work in flight can finish; new requests are refused until there is room"
            ),
            Err(e) => tracing::debug!(error = %e, file = %self.file.display(), "no reserve to give back"),
        }
    }

    /// Make the reserve again if it was given back and the disk has room for it and for
    /// [`LOW_BYTES`] more. Cheap when there is nothing to do (one `statvfs`).
    pub fn renew(&self) {
        if !self.released.load(Ordering::Acquire) {
            return;
        }
        if self.free().is_none_or(|free| free < LOW_BYTES + 2 * RESERVE_BYTES) {
            return;
        }
        // Written, not only sized: a sparse file would hold no room at all.
        let zeros = vec![0u8; RESERVE_BYTES as usize];
        match std::fs::write(&self.file, &zeros) {
            Ok(()) => {
                if self.released.swap(false, Ordering::AcqRel) {
                    tracing::debug!(file = %self.file.display(), "disk reserve in place");
                }
            }
            Err(e) => {
                let _ = std::fs::remove_file(&self.file);
                tracing::debug!(error = %e, file = %self.file.display(), "the disk reserve could not be made yet");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reserve_is_made_given_back_once_and_made_again() {
        let dir = tempfile::tempdir().unwrap();
        let room = Room::keep(dir.path(), "records");
        let file = dir.path().join(".records.reserve");
        assert_eq!(std::fs::metadata(&file).unwrap().len(), RESERVE_BYTES);
        assert!(room.short().is_none(), "a disk with room takes work");
        room.release();
        assert!(!file.exists(), "given back");
        room.release();
        room.renew();
        assert_eq!(std::fs::metadata(&file).unwrap().len(), RESERVE_BYTES, "made again once there is room");
    }
}
