//! A run's data dir on a small tmpfs of its own, so that the plan's `disk-full` can fill the
//! filesystem under the components' stores without touching the machine's disk. Mounting
//! needs root; without it the item is skipped, and the run says so. The mount is taken off on
//! every way out of a run ([`Mounted`] unmounts when dropped), and a run that finds one left by
//! a run that was killed removes it first ([`remove_stale_mount`]).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context as _, bail};

/// How large the tmpfs is: room for the databases of a long chaos run, and a bound on the RAM
/// the filler takes.
pub const SIZE: &str = "256m";

/// A tmpfs mounted on a run's data dir.
#[derive(Debug, Clone)]
pub struct DataDirFs {
    dir: PathBuf,
}

/// The mount itself: taken off, keeping what the run left there, when dropped, so that no
/// error of a run leaves it behind (the next run could not clear the data dir: "Device or
/// resource busy").
#[derive(Debug)]
pub struct Mounted {
    fs: Option<DataDirFs>,
}

impl Mounted {
    /// Mount a tmpfs of [`SIZE`] on `dir` (empty, as a run's fresh data dir is); why not when
    /// this process may not.
    pub fn mount(dir: &Path) -> Result<Mounted, MountError> {
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={SIZE}"), "tmpfs"])
            .arg(dir)
            .output()
            .map_err(MountError::Spawn)?;
        if !out.status.success() {
            return Err(MountError::Refused(String::from_utf8_lossy(&out.stderr).trim().to_owned()));
        }
        Ok(Mounted { fs: Some(DataDirFs { dir: dir.to_owned() }) })
    }

    /// A handle on the mounted data dir, to fill it.
    pub fn fs(&self) -> DataDirFs {
        self.fs.clone().expect("mounted until dropped")
    }

    /// Unmount now, keeping the data dir's files; the error says why not.
    pub fn unmount_keeping(mut self) -> anyhow::Result<()> {
        self.fs.take().expect("mounted until dropped").unmount_keeping()
    }
}

/// Why the data dir could not get a tmpfs of its own: the run goes on without disk-full.
#[derive(Debug, thiserror::Error)]
pub enum MountError {
    #[error("cannot run mount: {0}")]
    Spawn(#[source] std::io::Error),
    /// What `mount` said (not root, no tmpfs).
    #[error("{0}")]
    Refused(String),
}

impl Drop for Mounted {
    fn drop(&mut self) {
        if let Some(fs) = self.fs.take() {
            let dir = fs.dir.clone();
            if let Err(e) = fs.unmount_keeping() {
                tracing::warn!(
                    error = format!("{e:#}"),
                    dir = %dir.display(),
                    "could not take the data dir off its tmpfs; run: umount {}",
                    dir.display()
                );
            }
        }
    }
}

/// Take off a tmpfs that a run killed before its clean-up left on `dir`; a mount there that is
/// not a tmpfs is not this program's, and is left alone with the command to run.
pub fn remove_stale_mount(dir: &Path) -> anyhow::Result<()> {
    let Ok(dir) = dir.canonicalize() else { return Ok(()) };
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    let Some(fstype) = mounted_at(&mounts, &dir) else { return Ok(()) };
    if fstype != "tmpfs" {
        bail!(
            "{} is a mount point ({fstype}), not a run's data dir; unmount it (umount {}) or pick another --out-dir",
            dir.display(),
            dir.display()
        );
    }
    tracing::warn!(dir = %dir.display(), "a tmpfs left by an earlier run that did not finish is mounted on the data dir; unmounting it");
    let out = Command::new("umount").arg(&dir).output().context("running umount")?;
    if !out.status.success() {
        bail!(
            "{} still holds the tmpfs of an earlier run and it cannot be unmounted ({}); run: umount {}",
            dir.display(),
            String::from_utf8_lossy(&out.stderr).trim(),
            dir.display()
        );
    }
    Ok(())
}

/// The type of the filesystem mounted at `dir` in `mounts` (the text of `/proc/self/mounts`),
/// the last one if several are stacked there.
fn mounted_at(mounts: &str, dir: &Path) -> Option<String> {
    let want = dir.to_str()?;
    mounts.lines().rev().find_map(|l| {
        let mut f = l.split(' ');
        let (_, at, fstype) = (f.next()?, f.next()?, f.next()?);
        // Spaces and the like are written octal-escaped (`\040`).
        (unescape(at) == want).then(|| fstype.to_owned())
    })
}

fn unescape(field: &str) -> String {
    let mut out = String::new();
    let mut rest = field;
    while let Some(i) = rest.find('\\') {
        out.push_str(&rest[..i]);
        let code = rest.get(i + 1..i + 4).and_then(|o| u8::from_str_radix(o, 8).ok());
        match code {
            Some(c) => {
                out.push(c as char);
                rest = &rest[i + 4..];
            }
            None => {
                out.push('\\');
                rest = &rest[i + 1..];
            }
        }
    }
    out.push_str(rest);
    out
}

impl DataDirFs {
    /// Write a file until the filesystem is full (blocking); its path, to free the space.
    pub fn fill(&self) -> std::io::Result<PathBuf> {
        let path = self.dir.join("disk-full.filler");
        let mut f = std::fs::File::create(&path)?;
        let chunk = vec![0u8; 1 << 20];
        loop {
            match f.write(&chunk) {
                Ok(0) => break,
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::StorageFull => break,
                Err(e) => return Err(e),
            }
        }
        Ok(path)
    }

    /// Unmount, keeping what the run left in the data dir (databases, logs) for the report
    /// and for whoever looks at them afterwards: copied aside, unmounted, copied back.
    pub fn unmount_keeping(self) -> anyhow::Result<()> {
        let aside = self.dir.with_extension("kept");
        if aside.exists() {
            std::fs::remove_dir_all(&aside).with_context(|| format!("clearing {}", aside.display()))?;
        }
        copy_tree(&self.dir, &aside)?;
        let out = Command::new("umount").arg(&self.dir).output().context("running umount")?;
        if !out.status.success() {
            bail!("umount {}: {}", self.dir.display(), String::from_utf8_lossy(&out.stderr).trim());
        }
        copy_tree(&aside, &self.dir)?;
        std::fs::remove_dir_all(&aside).with_context(|| format!("removing {}", aside.display()))?;
        Ok(())
    }
}

fn copy_tree(from: &Path, to: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(to).with_context(|| format!("creating {}", to.display()))?;
    for entry in std::fs::read_dir(from).with_context(|| format!("reading {}", from.display()))? {
        let entry = entry?;
        let (src, dst) = (entry.path(), to.join(entry.file_name()));
        if entry.file_type()?.is_dir() {
            copy_tree(&src, &dst)?;
        } else {
            std::fs::copy(&src, &dst).with_context(|| format!("copying {}", src.display()))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const MOUNTS: &str = "proc /proc proc rw,nosuid 0 0
/dev/sda1 / ext4 rw,relatime 0 0
tmpfs /work/data/chaos/workflow tmpfs rw,relatime,size=262144k 0 0
tmpfs /work/my\\040dir tmpfs rw 0 0
";

    #[test]
    fn a_tmpfs_on_the_data_dir_is_found_and_nothing_elsewhere() {
        assert_eq!(mounted_at(MOUNTS, Path::new("/work/data/chaos/workflow")).as_deref(), Some("tmpfs"));
        assert_eq!(mounted_at(MOUNTS, Path::new("/work/data/chaos")), None);
        assert_eq!(mounted_at(MOUNTS, Path::new("/")).as_deref(), Some("ext4"));
        assert_eq!(mounted_at(MOUNTS, Path::new("/work/my dir")).as_deref(), Some("tmpfs"));
    }

    fn is_mounted(dir: &Path) -> bool {
        let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap();
        mounted_at(&mounts, &dir.canonicalize().unwrap()).is_some()
    }

    /// As root (mounting needs it; skipped otherwise): a run that returns early drops its
    /// mount and the data dir is off the tmpfs, its files kept; a mount left by a killed run is
    /// removed by the next.
    #[test]
    fn a_dropped_mount_is_taken_off_and_a_stale_one_is_removed() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("workflow");
        std::fs::create_dir_all(&data).unwrap();
        let Ok(mounted) = Mounted::mount(&data) else {
            eprintln!("skipped: mounting a tmpfs needs root");
            return;
        };
        assert!(is_mounted(&data));
        std::fs::write(data.join("records.db"), b"kept").unwrap();
        drop(mounted);
        assert!(!is_mounted(&data), "still mounted after the drop");
        assert_eq!(std::fs::read(data.join("records.db")).unwrap(), b"kept");
        // Killed before any clean-up: the mount stays, and the next run takes it off.
        std::mem::forget(Mounted::mount(&data).unwrap());
        assert!(is_mounted(&data));
        remove_stale_mount(&data).unwrap();
        assert!(!is_mounted(&data));
        std::fs::remove_dir_all(&data).expect("the data dir can be cleared");
    }
}
