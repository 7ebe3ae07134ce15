//! Writes a set of secrets as one generation, the kubelet AtomicWriter way:
//!
//! ```text
//! DIR/..2026_11_26_10_00_00.123456789/<name>   real files, mode 0400 (0440 with a group)
//! DIR/..data -> ..2026_11_26_10_00_00.123456789 swapped with one rename
//! DIR/<name> -> ..data/<name>
//! ```
//!
//! An application never sees a half-written set: `..data` flips from one
//! complete generation to the next in a single `rename`. The writer refuses a
//! target that is not tmpfs/ramfs (unless told otherwise) and any file name
//! that could escape the directory.
//!
//! Each generation also holds `..lease-end` (mode 0400): the Unix time at
//! which the first of its secrets' leases ends, kept current on renewal. A
//! sidecar that restarts reads it ([`AtomicWriter::found`]) to know how long
//! what a predecessor left on disk may stay readable.

use std::ffi::OsStr;
use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, symlink};
use std::path::{Path, PathBuf};

const DATA: &str = "..data";
const DATA_TMP: &str = "..data_tmp";
/// In each generation: when its first lease ends (Unix seconds). A dot name,
/// so no secret file can take it.
pub const LEASE_END: &str = "..lease-end";
const TMPFS_MAGIC: u64 = 0x0102_1994;
const RAMFS_MAGIC: u64 = 0x8584_58f6;

/// Why a generation could not be written.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    /// The directory is on a persistent filesystem; secrets would reach a disk.
    #[error(
        "{0} is not on tmpfs/ramfs: secrets would be written to a persistent disk; mount an emptyDir with medium: Memory there (or set allow_non_tmpfs = true for local development)"
    )]
    NotTmpfs(PathBuf),
    /// A file name could escape the directory or collide with the writer's own entries.
    #[error("invalid secret file name {0:?}: {1}")]
    BadName(String, &'static str),
    /// A filesystem call failed.
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        source: io::Error,
    },
}

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> WriteError + 'a {
    move |source| WriteError::Io {
        op,
        path: path.to_owned(),
        source,
    }
}

/// Checks a file name for the secrets directory: one plain path component,
/// no leading dot (the writer's own entries start with `..`), no NUL.
pub fn validate_file_name(name: &str) -> Result<(), WriteError> {
    let bad = |why| Err(WriteError::BadName(name.to_owned(), why));
    if name.is_empty() {
        return bad("empty");
    }
    if name.len() > 255 {
        return bad("longer than 255 bytes");
    }
    if name.contains('\0') {
        return bad("contains NUL");
    }
    if name.contains('/') {
        return bad("contains '/'");
    }
    if name.starts_with('.') {
        return bad("starts with '.' ('..' and hidden names are reserved)");
    }
    if name.chars().any(char::is_control) {
        return bad("contains control characters");
    }
    Ok(())
}

/// Whether `dir` is on a memory-only filesystem.
pub fn is_memory_fs(dir: &Path) -> io::Result<bool> {
    let st = rustix::fs::statfs(dir)?;
    #[allow(clippy::unnecessary_cast, clippy::useless_conversion)]
    let magic = st.f_type as u64;
    Ok(magic == TMPFS_MAGIC || magic == RAMFS_MAGIC)
}

/// One file of a generation: its name, content, and optionally its own
/// mode and owner (templates may ask for them).
#[derive(Clone, Copy)]
pub struct OutFile<'a> {
    pub name: &'a str,
    pub content: &'a [u8],
    /// Default: 0400, or 0440 when the writer has a group.
    pub mode: Option<u32>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
}

impl<'a> OutFile<'a> {
    pub fn new(name: &'a str, content: &'a [u8]) -> OutFile<'a> {
        OutFile {
            name,
            content,
            mode: None,
            uid: None,
            gid: None,
        }
    }
}

/// What a writer finds in its directory at start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Found {
    /// No generation.
    Nothing,
    /// A generation whose first lease ends at this Unix time.
    Until(i64),
    /// A generation that does not say when its leases end (written by an
    /// older sidecar, or damaged).
    Unknown,
}

/// Writes generations into one directory.
#[derive(Debug, Clone)]
pub struct AtomicWriter {
    dir: PathBuf,
    /// When set, files are 0440 and owned by this group (the pod's fsGroup).
    group: Option<u32>,
}

impl AtomicWriter {
    /// Prepares a writer for `dir` (created if missing), refusing a
    /// persistent filesystem unless `allow_non_tmpfs`.
    pub fn new(
        dir: &Path,
        allow_non_tmpfs: bool,
        group: Option<u32>,
    ) -> Result<AtomicWriter, WriteError> {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o750)
            .create(dir)
            .map_err(io_err("create directory", dir))?;
        if !allow_non_tmpfs && !is_memory_fs(dir).map_err(io_err("statfs", dir))? {
            return Err(WriteError::NotTmpfs(dir.to_owned()));
        }
        Ok(AtomicWriter {
            dir: dir.to_owned(),
            group,
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Writes `files` (name, content) as a new generation and makes it current
    /// with one rename; files absent from the set disappear from the directory.
    pub fn write(&self, files: &[(&str, &[u8])]) -> Result<PathBuf, WriteError> {
        let files: Vec<OutFile<'_>> = files.iter().map(|(n, c)| OutFile::new(n, c)).collect();
        self.write_files(&files, None)
    }

    /// Like [`AtomicWriter::write`], with per-file modes and owners, and the
    /// Unix time the first lease of these files ends (recorded in the
    /// generation). An empty `files` publishes an empty generation: the same
    /// one rename as any change, so `..data` never goes missing.
    pub fn write_files(
        &self,
        files: &[OutFile<'_>],
        lease_end: Option<i64>,
    ) -> Result<PathBuf, WriteError> {
        for f in files {
            validate_file_name(f.name)?;
        }
        let generation = self.new_generation_dir()?;
        // A generation that cannot be written whole (a full tmpfs: ENOSPC)
        // is removed, so it neither takes the space nor is ever swapped in:
        // the previous generation stays as it was.
        let filled = self
            .fill_generation(&generation, files)
            .and_then(|()| match lease_end {
                Some(end) => write_lease_end(&generation.join(LEASE_END), end),
                None => Ok(()),
            });
        if let Err(e) = filled {
            let _ = fs::remove_dir_all(&generation);
            return Err(e);
        }

        // The swap: ..data_tmp -> generation, renamed over ..data.
        let gen_name = generation.file_name().unwrap_or_default();
        let tmp = self.dir.join(DATA_TMP);
        let _ = fs::remove_file(&tmp);
        symlink(gen_name, &tmp).map_err(io_err("symlink", &tmp))?;
        fs::rename(&tmp, self.dir.join(DATA)).map_err(io_err("rename", &tmp))?;

        // User-visible links: DIR/<name> -> ..data/<name>.
        for spec in files {
            let name = spec.name;
            let link = self.dir.join(name);
            let target = Path::new(DATA).join(name);
            if fs::read_link(&link).ok().as_deref() != Some(target.as_path()) {
                let tmp_link = self.dir.join(format!("..{name}.tmp"));
                let _ = fs::remove_file(&tmp_link);
                symlink(&target, &tmp_link).map_err(io_err("symlink", &tmp_link))?;
                fs::rename(&tmp_link, &link).map_err(io_err("rename", &link))?;
            }
        }
        self.remove_stale(Some(gen_name), files)?;
        Ok(generation)
    }

    /// Writes every file of a new generation and opens its directory to the group.
    fn fill_generation(&self, generation: &Path, files: &[OutFile<'_>]) -> Result<(), WriteError> {
        let (file_mode, dir_mode) = if self.group.is_some() {
            (0o440, 0o750)
        } else {
            (0o400, 0o700)
        };
        for spec in files {
            let path = generation.join(spec.name);
            let mode = spec.mode.unwrap_or(file_mode);
            let mut f = fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(mode)
                .open(&path)
                .map_err(io_err("create", &path))?;
            f.write_all(spec.content).map_err(io_err("write", &path))?;
            // The umask may have narrowed the mode at creation.
            fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(mode))
                .map_err(io_err("chmod", &path))?;
            let gid = spec.gid.or(self.group);
            if spec.uid.is_some() || gid.is_some() {
                std::os::unix::fs::chown(&path, spec.uid, gid).map_err(io_err("chown", &path))?;
            }
        }
        // Only now may the directory become readable by the group.
        fs::set_permissions(
            generation,
            std::os::unix::fs::PermissionsExt::from_mode(dir_mode),
        )
        .map_err(io_err("chmod", generation))?;
        if let Some(gid) = self.group {
            std::os::unix::fs::chown(generation, None, Some(gid))
                .map_err(io_err("chown", generation))?;
        }
        Ok(())
    }

    /// Records a later lease end in the current generation (after a
    /// renewal), replacing the file with one rename.
    pub fn set_lease_end(&self, lease_end: i64) -> Result<(), WriteError> {
        let data = self.dir.join(DATA);
        if fs::symlink_metadata(&data).is_err() {
            return Ok(());
        }
        let tmp = data.join(format!("{LEASE_END}.tmp"));
        let _ = fs::remove_file(&tmp);
        write_lease_end(&tmp, lease_end)?;
        let path = data.join(LEASE_END);
        fs::rename(&tmp, &path).map_err(io_err("rename", &path))
    }

    /// What a predecessor left: no generation, one with its lease end, or
    /// one that cannot say.
    pub fn found(&self) -> Found {
        let data = self.dir.join(DATA);
        if fs::symlink_metadata(&data).is_err() {
            return Found::Nothing;
        }
        let read = fs::read_to_string(data.join(LEASE_END)).ok();
        match read.as_deref().map(str::trim).map(str::parse::<i64>) {
            Some(Ok(end)) => Found::Until(end),
            _ => Found::Unknown,
        }
    }

    /// Removes every secret and generation the writer made.
    pub fn remove_all(&self) -> Result<(), WriteError> {
        let _ = fs::remove_file(self.dir.join(DATA));
        self.remove_stale(None, &[])
    }

    fn new_generation_dir(&self) -> Result<PathBuf, WriteError> {
        let format =
            time::macros::format_description!("[year]_[month]_[day]_[hour]_[minute]_[second]");
        for _ in 0..100 {
            let now = time::OffsetDateTime::now_utc();
            let stamp = now.format(&format).unwrap_or_default();
            let path = self.dir.join(format!("..{stamp}.{:09}", now.nanosecond()));
            match fs::DirBuilder::new().mode(0o700).create(&path) {
                Ok(()) => return Ok(path),
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(io_err("create directory", &path)(e)),
            }
        }
        Err(io_err("create directory", &self.dir)(io::Error::other(
            "no free generation name",
        )))
    }

    /// Removes generations other than `keep`, and links to names not in `files`
    /// that point into `..data`.
    fn remove_stale(&self, keep: Option<&OsStr>, files: &[OutFile<'_>]) -> Result<(), WriteError> {
        let entries = fs::read_dir(&self.dir).map_err(io_err("read directory", &self.dir))?;
        for entry in entries.flatten() {
            let name = entry.file_name();
            let Some(text) = name.to_str() else { continue };
            let path = entry.path();
            let is_generation = text.starts_with("..")
                && text.as_bytes().get(2).is_some_and(u8::is_ascii_digit)
                && entry.file_type().is_ok_and(|t| t.is_dir());
            if is_generation {
                if Some(name.as_os_str()) != keep {
                    fs::remove_dir_all(&path).map_err(io_err("remove", &path))?;
                }
                continue;
            }
            let ours = fs::read_link(&path).is_ok_and(|t| t.starts_with(DATA));
            if ours && !files.iter().any(|f| f.name == text) {
                fs::remove_file(&path).map_err(io_err("remove", &path))?;
            }
        }
        Ok(())
    }
}

/// Replaces one file outside the generations (a token the sidecar hands to
/// the application) with one rename: `content` goes to the hidden sibling
/// `.<name>.tmp` (mode 0600 while it is written), which gets group `gid`
/// (when given) and `mode`, then takes the place of `path`. A reader finds
/// the old file or the new one, never a partial one.
pub fn replace_file(path: &Path, content: &[u8], mode: u32, gid: Option<u32>) -> io::Result<()> {
    let tmp = path.with_file_name(format!(
        ".{}.tmp",
        path.file_name().unwrap_or_default().to_string_lossy()
    ));
    let _ = fs::remove_file(&tmp);
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)?;
    f.write_all(content)?;
    drop(f);
    if let Some(g) = gid {
        std::os::unix::fs::chown(&tmp, None, Some(g))?;
    }
    fs::set_permissions(&tmp, std::os::unix::fs::PermissionsExt::from_mode(mode))?;
    fs::rename(&tmp, path)
}

fn write_lease_end(path: &Path, lease_end: i64) -> Result<(), WriteError> {
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o400)
        .open(path)
        .map_err(io_err("create", path))?;
    writeln!(f, "{lease_end}").map_err(io_err("write", path))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn writer() -> (tempfile::TempDir, AtomicWriter) {
        let dir = tempfile::tempdir().unwrap();
        let w = AtomicWriter::new(dir.path(), true, None).unwrap();
        (dir, w)
    }

    #[test]
    fn a_replaced_file_has_the_new_content_and_no_temporary_stays() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("token");
        replace_file(&p, b"one", 0o400, None).unwrap();
        replace_file(&p, b"two", 0o400, None).unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"two");
        let mode = fs::metadata(&p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o400);
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn layout_follows_the_kubelet_convention() {
        let (dir, w) = writer();
        let g1 = w.write(&[("a", b"1"), ("b", b"2")]).unwrap();
        let data = fs::read_link(dir.path().join("..data")).unwrap();
        assert_eq!(data, Path::new(g1.file_name().unwrap()));
        let name = data.to_str().unwrap();
        assert!(
            name.starts_with("..") && name.len() == "..2026_11_26_10_00_00.123456789".len(),
            "{name}"
        );
        assert_eq!(
            fs::read_link(dir.path().join("a")).unwrap(),
            Path::new("..data/a")
        );
        assert_eq!(fs::read(dir.path().join("a")).unwrap(), b"1");
        let mode = fs::metadata(g1.join("a")).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o400);

        // A new generation replaces the old one, and a dropped name disappears.
        let g2 = w.write(&[("a", b"3")]).unwrap();
        assert_ne!(g1, g2);
        assert!(!g1.exists());
        assert_eq!(fs::read(dir.path().join("a")).unwrap(), b"3");
        assert!(fs::symlink_metadata(dir.path().join("b")).is_err());

        w.remove_all().unwrap();
        let left: Vec<_> = fs::read_dir(dir.path()).unwrap().collect();
        assert!(left.is_empty(), "{left:?}");
    }

    /// 1,000 generation swaps while a reader hammers the directory: it
    /// always finds both files, whole, and from the same generation.
    #[test]
    fn readers_never_see_a_partial_generation() {
        let (dir, w) = writer();
        let payload = |i: usize, part: &str| format!("{i:05}{part}{}", "x".repeat(2000));
        w.write(&[
            ("a", payload(0, "a").as_bytes()),
            ("b", payload(0, "b").as_bytes()),
        ])
        .unwrap();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let reader = {
            let (stop, dir) = (stop.clone(), dir.path().to_owned());
            std::thread::spawn(move || {
                let mut reads = 0;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    // Resolve ..data once, as kubelet-aware readers do, then read both.
                    let data = dir.join(fs::read_link(dir.join("..data")).unwrap());
                    let (Ok(a), Ok(b)) = (
                        fs::read_to_string(data.join("a")),
                        fs::read_to_string(data.join("b")),
                    ) else {
                        continue; // that generation was just cleaned up: resolve again
                    };
                    assert_eq!(a.len(), 2006, "partial file");
                    assert_eq!(a[..5], b[..5], "files from two generations");
                    // And through the user-visible links, each file is always whole.
                    if let Ok(a) = fs::read_to_string(dir.join("a")) {
                        assert_eq!(a.len(), 2006);
                    }
                    reads += 1;
                }
                reads
            })
        };
        for i in 1..=1000 {
            w.write(&[
                ("a", payload(i, "a").as_bytes()),
                ("b", payload(i, "b").as_bytes()),
            ])
            .unwrap();
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let reads = reader.join().expect("reader saw a partial generation");
        assert!(reads > 0);
        assert!(
            fs::read_to_string(dir.path().join("a"))
                .unwrap()
                .starts_with("01000")
        );
    }

    #[test]
    fn unrelated_files_are_left_alone() {
        let (dir, w) = writer();
        fs::write(dir.path().join("app.sock"), b"").unwrap();
        w.write(&[("a", b"1")]).unwrap();
        w.remove_all().unwrap();
        assert!(dir.path().join("app.sock").exists());
    }

    #[test]
    fn names_that_could_escape_are_refused() {
        for bad in [
            "", ".", "..", "../x", "a/b", ".hidden", "..data", "a\0b", "x\n",
        ] {
            assert!(validate_file_name(bad).is_err(), "{bad:?}");
        }
        let (_dir, w) = writer();
        assert!(w.write(&[("../evil", b"x")]).is_err());
        assert!(validate_file_name("db-password").is_ok());
    }

    #[test]
    fn a_generation_records_its_lease_end_and_a_renewal_moves_it() {
        let (dir, w) = writer();
        assert_eq!(w.found(), Found::Nothing);
        let f = [OutFile::new("a", b"1")];
        w.write_files(&f, Some(1_900_000_000)).unwrap();
        assert_eq!(w.found(), Found::Until(1_900_000_000));
        let meta = dir.path().join("..data").join(LEASE_END);
        assert_eq!(
            fs::metadata(&meta).unwrap().permissions().mode() & 0o777,
            0o400
        );
        w.set_lease_end(1_900_000_060).unwrap();
        assert_eq!(w.found(), Found::Until(1_900_000_060));
        // No link in DIR names it: an app sees only its files.
        assert!(fs::symlink_metadata(dir.path().join(LEASE_END)).is_err());
        // A generation without it (an older sidecar's) cannot say.
        w.write_files(&f, None).unwrap();
        assert_eq!(w.found(), Found::Unknown);
        w.remove_all().unwrap();
        assert_eq!(w.found(), Found::Nothing);
    }

    #[test]
    fn an_empty_set_is_an_empty_generation_swapped_in_like_any_other() {
        let (dir, w) = writer();
        w.write(&[("a", b"1"), ("b", b"2")]).unwrap();
        let g = w.write_files(&[], None).unwrap();
        assert_eq!(
            fs::read_link(dir.path().join("..data")).unwrap(),
            Path::new(g.file_name().unwrap())
        );
        assert_eq!(fs::read_dir(&g).unwrap().count(), 0);
        assert!(fs::symlink_metadata(dir.path().join("a")).is_err());
        assert!(fs::symlink_metadata(dir.path().join("b")).is_err());
    }

    #[test]
    fn persistent_disk_is_refused_and_tmpfs_accepted() {
        // The working directory of a test is on the build disk, not tmpfs.
        let dir = tempfile::tempdir_in(env!("CARGO_MANIFEST_DIR")).unwrap();
        if !is_memory_fs(dir.path()).unwrap() {
            let err = AtomicWriter::new(dir.path(), false, None).unwrap_err();
            assert!(matches!(err, WriteError::NotTmpfs(_)), "{err}");
        }
        if Path::new("/dev/shm").exists() && is_memory_fs(Path::new("/dev/shm")).unwrap() {
            let shm = tempfile::tempdir_in("/dev/shm").unwrap();
            AtomicWriter::new(shm.path(), false, None).unwrap();
        }
    }

    proptest::proptest! {
        /// Any name the writer accepts is one plain component inside the directory.
        #[test]
        fn accepted_names_stay_inside(name in "\\PC{0,40}") {
            if validate_file_name(&name).is_ok() {
                let joined = Path::new("/secrets").join(&name);
                let parts: Vec<_> = joined.strip_prefix("/secrets").unwrap().components().collect();
                proptest::prop_assert_eq!(parts.len(), 1);
                proptest::prop_assert!(matches!(parts[0], std::path::Component::Normal(_)));
                proptest::prop_assert!(!name.starts_with('.'));
            }
        }
    }
}
