//! A run's data dir on a small tmpfs of its own, so that the plan's `disk-full` can fill the
//! filesystem under the components' stores without touching the machine's disk. Mounting
//! needs root; without it the item is skipped, and the run says so.

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

impl DataDirFs {
    /// Mount a tmpfs of [`SIZE`] on `dir` (empty, as a run's fresh data dir is); why not when
    /// this process may not.
    pub fn mount(dir: &Path) -> Result<DataDirFs, String> {
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={SIZE}"), "tmpfs"])
            .arg(dir)
            .output()
            .map_err(|e| format!("cannot run mount: {e}"))?;
        if !out.status.success() {
            return Err(String::from_utf8_lossy(&out.stderr).trim().to_owned());
        }
        Ok(DataDirFs { dir: dir.to_owned() })
    }

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
