//! Crash-safe file writes.
//!
//! [`write_atomic`] writes the new bytes to a temporary file in the target's directory, syncs it,
//! and renames it over the target (then syncs the directory where the platform allows). A rename
//! within one directory replaces the target atomically on POSIX file systems and on NTFS, so a
//! process killed at any point leaves either the old file or the new one, never a mixture; a
//! stale temporary file (named `.NAME.tmp-PID-N`, the name cut to keep it under file-system
//! limits) is all a crash can leave behind. The target is replaced, not written through: a symlink
//! at `path` becomes a regular file, and the new file has the default permissions.

#[cfg(unix)]
use std::fs::File;
use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// Replaces `path` with `bytes` atomically (see the module docs). O(bytes.len()).
///
/// # Errors
/// Any I/O error of creating, writing, syncing or renaming; the temporary file is removed on
/// failure and `path` keeps its old contents.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let name = path
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "the path names no file"))?;
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let mut tmp_name = std::ffi::OsString::from(".");
    let short: String = name.to_string_lossy().chars().take(200).collect();
    tmp_name.push(short);
    tmp_name.push(format!(".tmp-{}-{n}", std::process::id()));
    let tmp = dir.join(tmp_name);
    let result = (|| {
        let mut f = OpenOptions::new().write(true).create_new(true).open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        drop(f);
        fs::rename(&tmp, path)?;
        sync_dir(&dir);
        Ok(())
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// Makes the rename durable where directories can be synced (Unix); elsewhere a no-op.
#[cfg(unix)]
fn sync_dir(dir: &Path) {
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
}

#[cfg(not(unix))]
fn sync_dir(_dir: &Path) {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replaces_the_file_and_leaves_no_temporary() {
        let dir = std::env::temp_dir().join(format!("tq-fsio-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let p = dir.join("a.bin");
        write_atomic(&p, b"old").unwrap();
        write_atomic(&p, b"new contents").unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"new contents");
        let names: Vec<_> = fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("a.bin")]);
        // A target in a missing directory fails and creates nothing.
        assert!(write_atomic(&dir.join("no/such/dir.bin"), b"x").is_err());
        fs::remove_dir_all(&dir).unwrap();
    }
}
