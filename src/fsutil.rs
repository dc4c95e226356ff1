//! Crash-safe file writing and the home lock.
//!
//! qpq keeps its whole client state in one file that is rewritten after every change. A torn
//! write would lose the identity and every group membership, so files are replaced with the
//! classic write-temp / fsync / `rename(2)` / fsync-directory sequence: POSIX `rename` atomically
//! swaps the directory entry, the first fsync makes sure the new entry never points at
//! unwritten data, and the directory fsync makes the swap itself durable.
//!
//! Two processes on one home would each load the state, change it, and the later write would
//! silently drop the other's changes, forking the MLS group state. A home is therefore used by
//! one process at a time, enforced by an advisory lock on `<home>/LOCK` ([`HomeLock`]).

use std::ffi::{OsStr, OsString};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Name of the lock file inside a home directory.
pub const LOCK_FILE_NAME: &str = "LOCK";

/// Crash-safe replace: write to a temp file in the same directory (created with the given mode,
/// e.g. 0o600), write all, fsync the file, rename over `path`, fsync the directory. A kill at any
/// moment leaves the old or the new content, never a mix.
///
/// The temp name carries the pid and a random number, so two writers never share one and a
/// temp file left by a crashed writer is never reused; such leftovers are hidden (leading dot)
/// and harmless. `mode` is ignored outside unix.
pub fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> io::Result<()> {
    let file_name = path.file_name().ok_or_else(|| {
        io::Error::new(io::ErrorKind::InvalidInput, format!("not a file path: {}", path.display()))
    })?;
    let dir = match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent,
        _ => Path::new("."),
    };
    let tmp = dir.join(temp_name(file_name));

    if let Err(e) = write_and_rename(&tmp, path, bytes, mode) {
        // Best effort: the write already failed and that error is the one worth reporting; a
        // temp file that cannot be removed is as harmless as one from a crash.
        let _ = fs::remove_file(&tmp);
        return Err(e);
    }
    sync_dir(dir)
}

fn temp_name(file_name: &OsStr) -> OsString {
    let mut name = OsString::from(".");
    name.push(file_name);
    name.push(format!(".{}.{:016x}.tmp", std::process::id(), rand::random::<u64>()));
    name
}

fn write_and_rename(tmp: &Path, path: &Path, bytes: &[u8], mode: u32) -> io::Result<()> {
    let mut options = OpenOptions::new();
    // create_new: never follow or reuse whatever already sits at the temp name.
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        // The file is never more permissive than `mode`, not even before the chmod below.
        options.mode(mode);
    }
    let mut file = options.open(tmp)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        // The umask may have cleared bits of `mode`; the caller asked for exactly `mode`.
        file.set_permissions(fs::Permissions::from_mode(mode))?;
    }
    #[cfg(not(unix))]
    let _ = mode;
    file.write_all(bytes)?;
    file.sync_all()?;
    drop(file);
    fs::rename(tmp, path)
}

#[cfg(unix)]
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    match File::open(dir)?.sync_all() {
        // Some filesystems (certain FUSE and network ones) cannot fsync a directory; the rename
        // has happened and there is nothing stronger to fall back to.
        Err(e) if e.kind() == io::ErrorKind::InvalidInput || e.kind() == io::ErrorKind::Unsupported => Ok(()),
        other => other,
    }
}

#[cfg(not(unix))]
pub fn sync_dir(_dir: &Path) -> io::Result<()> {
    // Directories cannot be opened for fsync on Windows; the rename there is
    // `MoveFileExW(MOVEFILE_REPLACE_EXISTING)`, which needs no separate directory sync.
    Ok(())
}

/// Reads a file of at most `max` bytes; a bigger one is an error ("file too large: N > max
/// bytes"), not an allocation.
pub fn read_bounded(path: &Path, max: u64) -> io::Result<Vec<u8>> {
    let file = File::open(path)?;
    let len = file.metadata()?.len();
    if len > max {
        return Err(too_large(format!("file too large: {len} > {max} bytes")));
    }
    // The size can change between the stat and the read (or be meaningless, for special
    // files), so the read itself is bounded too.
    let mut buf = Vec::with_capacity(usize::try_from(len).unwrap_or(0));
    file.take(max.saturating_add(1)).read_to_end(&mut buf)?;
    if buf.len() as u64 > max {
        return Err(too_large(format!("file too large: more than {max} bytes")));
    }
    Ok(buf)
}

fn too_large(message: String) -> io::Error {
    io::Error::new(io::ErrorKind::FileTooLarge, message)
}

#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error("another qpq process holds the home (lock file {})", path.display())]
    Busy { path: PathBuf },
    #[error(
        "another qpq process has held the home for {secs} s (lock file {}); is one stopped (ctrl-z) or stuck?",
        path.display()
    )]
    Held { path: PathBuf, secs: u64 },
    #[error("cannot lock {}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// Exclusive advisory lock on `<dir>/LOCK` held for the guard's lifetime.
///
/// The lock belongs to the open file (an `flock` on unix), so two acquires conflict even within
/// one process, and a crashed process releases it automatically. The file is never deleted:
/// deleting it would let a later process lock a fresh inode while another still holds the old one.
#[derive(Debug)]
pub struct HomeLock {
    file: File,
    path: PathBuf,
}

impl HomeLock {
    /// `wait=false`: fail at once with [`LockError::Busy`] if another qpq process holds the home;
    /// `wait=true`: wait until it is free, at most [`crate::limits::HOME_LOCK_WAIT_MS`]
    /// ([`LockError::Held`]): operations hold it briefly, so a longer hold is a process that
    /// was stopped (ctrl-z) or is stuck, and waiting for it for ever hung the caller (a shell
    /// blocked in the wait does not even see ctrl-c).
    pub fn acquire(dir: &Path, wait: bool) -> Result<HomeLock, LockError> {
        let within = Duration::from_millis(if wait { crate::limits::HOME_LOCK_WAIT_MS } else { 0 });
        HomeLock::acquire_within(dir, within)
    }

    /// [`HomeLock::acquire`] waiting at most `within` (zero: not at all).
    pub fn acquire_within(dir: &Path, within: Duration) -> Result<HomeLock, LockError> {
        let path = dir.join(LOCK_FILE_NAME);
        let io_error = |source| LockError::Io { path: path.clone(), source };
        let mut options = OpenOptions::new();
        options.read(true).write(true).create(true).truncate(false);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            options.mode(0o600);
        }
        let file = options.open(&path).map_err(io_error)?;
        match file.try_lock() {
            Ok(()) => return Ok(HomeLock { file, path }),
            Err(fs::TryLockError::WouldBlock) if within.is_zero() => return Err(LockError::Busy { path }),
            Err(fs::TryLockError::WouldBlock) => {}
            Err(fs::TryLockError::Error(source)) => return Err(io_error(source)),
        }
        // A blocking flock, woken at the release like any waiter (polling with try_lock lost
        // to a process that takes the lock again at once, say `recv --follow` draining a
        // backlog), on a duplicate of our descriptor in a thread we stop waiting for at the
        // bound. The lock belongs to the open file description both share; if the thread gets
        // it after we gave up, it goes when the thread drops the last descriptor.
        let waiter = file.try_clone().map_err(io_error)?;
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::Builder::new()
            .name("qpq-home-lock".into())
            .spawn(move || {
                let _ = tx.send(waiter.lock());
            })
            .map_err(io_error)?;
        match rx.recv_timeout(within) {
            Ok(Ok(())) => Ok(HomeLock { file, path }),
            Ok(Err(source)) => Err(io_error(source)),
            Err(_) => Err(LockError::Held { path, secs: within.as_secs() }),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for HomeLock {
    fn drop(&mut self) {
        // Closing the file would release the lock too, unless a forked child shares the open
        // file description; an explicit unlock releases it regardless. Nothing useful can be
        // done with a failure while dropping.
        let _ = self.file.unlock();
    }
}

/// Creates `dir` (and missing parents) and makes it private to the user (0700 on unix).
///
/// Only `dir` itself is restricted: parents such as `~/.local/share` keep their usual modes.
pub fn ensure_private_dir(dir: &Path) -> io::Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
        if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
            fs::create_dir_all(parent)?;
        }
        // Created as 0700 from the start, so it is never briefly readable by others.
        match fs::DirBuilder::new().mode(0o700).create(dir) {
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists && dir.is_dir() => {
                // A directory others may write to (sticky or not: /tmp, /var/tmp, a shared
                // drop) is not ours to take: making it 0700 would break every other user of
                // it (a `--data-dir /tmp` run as root), and anyone could have planted files in it.
                let mode = fs::metadata(dir)?.permissions().mode();
                if mode & 0o1002 != 0 {
                    return Err(io::Error::new(
                        io::ErrorKind::PermissionDenied,
                        format!("it is shared (mode {:o}): give qpq a directory of its own", mode & 0o7777),
                    ));
                }
            }
            other => other?,
        }
        // An existing directory, or one created under a restrictive umask, gets exactly 0700.
        fs::set_permissions(dir, fs::Permissions::from_mode(0o700))
    }
    #[cfg(not(unix))]
    {
        fs::create_dir_all(dir)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::Duration;

    use super::*;

    #[cfg(unix)]
    fn mode_of(path: &Path) -> u32 {
        use std::os::unix::fs::PermissionsExt;
        fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    fn entries(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn write_atomic_creates_and_replaces_content() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("qpq-state.bin");
        write_atomic(&path, b"first", 0o600).unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"first");
        write_atomic(&path, b"second, longer content", 0o600).unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"second, longer content");
        write_atomic(&path, b"", 0o600).unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"");
    }

    #[cfg(unix)]
    #[test]
    fn write_atomic_sets_the_requested_mode() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("qpq-state.bin");
        fs::write(&path, b"old").unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        write_atomic(&path, b"new", 0o600).unwrap();
        assert_eq!(mode_of(&path), 0o600);
        write_atomic(&path, b"newer", 0o640).unwrap();
        assert_eq!(mode_of(&path), 0o640);
    }

    #[test]
    fn write_atomic_leaves_no_temp_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("qpq-state.bin");
        for i in 0..5 {
            write_atomic(&path, format!("version {i}").as_bytes(), 0o600).unwrap();
        }
        assert_eq!(entries(dir.path()), ["qpq-state.bin"]);
    }

    #[test]
    fn write_atomic_failure_leaves_no_temp_file_and_keeps_old_content() {
        let dir = tempfile::tempdir().unwrap();
        // Renaming a file over a non-empty directory fails after the temp file was written.
        let path = dir.path().join("occupied");
        fs::create_dir(&path).unwrap();
        fs::write(path.join("inside"), b"x").unwrap();
        assert!(write_atomic(&path, b"data", 0o600).is_err());
        assert_eq!(entries(dir.path()), ["occupied"]);
        assert_eq!(fs::read(path.join("inside")).unwrap(), b"x");
    }

    #[test]
    fn stale_temp_files_are_harmless() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("qpq-state.bin");
        write_atomic(&path, b"old", 0o600).unwrap();
        // What a writer killed mid-write leaves behind, including one with our own pid.
        let stale = [
            format!(".qpq-state.bin.{}.00000000deadbeef.tmp", std::process::id()),
            ".qpq-state.bin.1.0123456789abcdef.tmp".to_owned(),
        ];
        for name in &stale {
            fs::write(dir.path().join(name), b"half-writ").unwrap();
        }
        write_atomic(&path, b"new", 0o600).unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"new");
        assert_eq!(entries(dir.path()).len(), 1 + stale.len());
    }

    #[test]
    fn write_atomic_rejects_unusable_paths() {
        assert!(write_atomic(Path::new(""), b"x", 0o600).is_err());
        assert!(write_atomic(Path::new("/"), b"x", 0o600).is_err());
        let dir = tempfile::tempdir().unwrap();
        assert!(write_atomic(&dir.path().join("missing/file"), b"x", 0o600).is_err());
    }

    #[test]
    fn temp_names_are_unique_and_hidden() {
        let a = temp_name("qpq-state.bin".as_ref());
        let b = temp_name("qpq-state.bin".as_ref());
        assert_ne!(a, b);
        let a = a.to_string_lossy();
        assert!(a.starts_with(".qpq-state.bin."), "{a}");
        assert!(a.contains(&std::process::id().to_string()), "{a}");
    }

    #[test]
    fn read_bounded_enforces_the_limit() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        fs::write(&path, [7u8; 100]).unwrap();
        assert_eq!(read_bounded(&path, 100).unwrap(), [7u8; 100]);
        assert_eq!(read_bounded(&path, u64::MAX).unwrap().len(), 100);
        let err = read_bounded(&path, 99).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::FileTooLarge);
        assert_eq!(err.to_string(), "file too large: 100 > 99 bytes");
        let missing = read_bounded(&dir.path().join("missing"), 10).unwrap_err();
        assert_eq!(missing.kind(), io::ErrorKind::NotFound);
    }

    #[test]
    fn second_non_waiting_acquire_fails_while_held() {
        let dir = tempfile::tempdir().unwrap();
        let first = HomeLock::acquire(dir.path(), false).unwrap();
        assert_eq!(first.path(), dir.path().join("LOCK"));

        let err = HomeLock::acquire(dir.path(), false).unwrap_err();
        assert!(matches!(err, LockError::Busy { .. }));
        let message = err.to_string();
        assert!(message.starts_with("another qpq process holds the home"), "{message}");
        assert!(message.contains(&dir.path().join("LOCK").display().to_string()));

        // Another thread counts as another holder too.
        let path = dir.path().to_owned();
        let from_thread = std::thread::spawn(move || HomeLock::acquire(&path, false).is_err());
        assert!(from_thread.join().unwrap());

        drop(first);
        let again = HomeLock::acquire(dir.path(), false).unwrap();
        drop(again);
        assert!(dir.path().join("LOCK").exists(), "the lock file is kept");
    }

    #[test]
    fn waiting_acquire_blocks_until_released() {
        let dir = tempfile::tempdir().unwrap();
        let first = HomeLock::acquire(dir.path(), false).unwrap();
        let released = Arc::new(AtomicBool::new(false));

        let path = dir.path().to_owned();
        let released_seen = Arc::clone(&released);
        let waiter = std::thread::spawn(move || {
            let lock = HomeLock::acquire(&path, true).unwrap();
            let was_released = released_seen.load(Ordering::SeqCst);
            drop(lock);
            was_released
        });
        std::thread::sleep(Duration::from_millis(200));
        released.store(true, Ordering::SeqCst);
        drop(first);
        assert!(waiter.join().unwrap(), "waiter got the lock before it was released");
    }

    /// Review: a waiting acquire blocked in flock for as long as the holder held: a process
    /// stopped with ctrl-z hung every other qpq process on the home, a shell included (blocked
    /// in the call, it did not see ctrl-c). The wait is now bounded and says why it ended.
    #[test]
    fn a_waiting_acquire_gives_up_after_its_bound_and_names_the_holder() {
        let dir = tempfile::tempdir().unwrap();
        let first = HomeLock::acquire(dir.path(), false).unwrap();
        let err = HomeLock::acquire_within(dir.path(), Duration::from_millis(30)).unwrap_err();
        assert!(matches!(err, LockError::Held { .. }), "{err}");
        assert!(err.to_string().starts_with("another qpq process has held the home for 0 s"), "{err}");
        // The waiter thread may take it later; dropping its descriptor lets it go.
        drop(first);
        drop(HomeLock::acquire_within(dir.path(), Duration::from_millis(30)).unwrap());
    }

    #[test]
    fn lock_in_missing_dir_is_an_io_error_naming_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nope");
        let err = HomeLock::acquire(&missing, false).unwrap_err();
        assert!(matches!(err, LockError::Io { .. }));
        assert!(err.to_string().contains("nope"), "{err}");
    }

    #[test]
    fn ensure_private_dir_creates_nested_private_dirs() {
        let dir = tempfile::tempdir().unwrap();
        let home = dir.path().join("a/b/qpq");
        ensure_private_dir(&home).unwrap();
        assert!(home.is_dir());
        ensure_private_dir(&home).unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            assert_eq!(mode_of(&home), 0o700);
            fs::set_permissions(&home, fs::Permissions::from_mode(0o755)).unwrap();
            ensure_private_dir(&home).unwrap();
            assert_eq!(mode_of(&home), 0o700);
        }
        let file = dir.path().join("file");
        fs::write(&file, b"").unwrap();
        assert!(ensure_private_dir(&file).is_err());
    }

    /// Review: an existing directory was made 0700 whatever it was, so `--data-dir /tmp` (or a
    /// config typo) run as root took /tmp away from everyone else. A directory others may
    /// write to is refused and left as it was. Fails without the check.
    #[cfg(unix)]
    #[test]
    fn a_shared_directory_is_refused_and_left_as_it_was() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        for mode in [0o1777, 0o777, 0o1700] {
            let shared = dir.path().join(format!("shared-{mode:o}"));
            fs::create_dir(&shared).unwrap();
            fs::set_permissions(&shared, fs::Permissions::from_mode(mode)).unwrap();
            let e = ensure_private_dir(&shared).unwrap_err();
            assert!(e.to_string().contains("it is shared"), "{e}");
            assert_eq!(fs::metadata(&shared).unwrap().permissions().mode() & 0o7777, mode);
        }
    }
}
