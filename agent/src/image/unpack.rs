//! Unpacking one image layer into a directory of its own, in overlayfs's format, so that
//! layer directories stack as overlay lower directories:
//! - OCI whiteouts become overlay whiteouts: `.wh.<name>` a character device 0/0 named
//!   `<name>`, `.wh..wh..opq` the xattr `trusted.overlay.opaque=y` on its directory;
//! - regular files, directories, symlinks and hard links are unpacked by the `tar` crate,
//!   which refuses paths that leave the directory (`..`, or a parent that resolves outside
//!   it through a symlink); device nodes and fifos are made here with `mknod`;
//! - ownership, permissions, mtimes and extended attributes are kept.
//!
//! The layer may be an uncompressed, gzip or zstd tar; the uncompressed stream is hashed on
//! the way, and its digest (the layer's diff_id) returned for the caller to check.

use std::fs::File;
use std::io::{self, BufReader, Read};
use std::os::unix::fs::DirBuilderExt;
use std::path::{Component, Path, PathBuf};

use nix::sys::stat::{mknod, Mode, SFlag};
use sha2::{Digest, Sha256};

/// The opaque-directory marker of the OCI layer format.
const OPAQUE: &str = ".wh..wh..opq";
/// The whiteout prefix of the OCI layer format.
const WHITEOUT: &str = ".wh.";

/// How a layer blob is compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    None,
    Gzip,
    Zstd,
}

/// The compression a layer media type announces; `None` for a media type that is not a
/// tar layer.
pub fn compression_for(media_type: &str) -> Option<Compression> {
    match media_type {
        "application/vnd.oci.image.layer.v1.tar"
        | "application/vnd.oci.image.layer.nondistributable.v1.tar" => Some(Compression::None),
        "application/vnd.oci.image.layer.v1.tar+gzip"
        | "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip"
        | "application/vnd.docker.image.rootfs.diff.tar.gzip"
        | "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip" => Some(Compression::Gzip),
        "application/vnd.oci.image.layer.v1.tar+zstd"
        | "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd" => Some(Compression::Zstd),
        _ => None,
    }
}

/// A layer that could not be unpacked.
#[derive(Debug, thiserror::Error)]
pub enum UnpackError {
    #[error("open {}", .0.display())]
    Open(PathBuf, #[source] io::Error),
    #[error("start the {0:?} decoder")]
    Decoder(Compression, #[source] io::Error),
    #[error("read the archive")]
    Read(#[source] io::Error),
    #[error("entry {0:?} leaves the layer directory")]
    Escapes(String),
    #[error("entry {0:?}: a parent is not a directory")]
    NotDirectory(String),
    #[error("entry {path:?}: {what}")]
    Entry {
        path: String,
        what: &'static str,
        #[source]
        source: io::Error,
    },
}

/// What [`unpack`] produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unpacked {
    /// `sha256:<hex>` of the uncompressed tar stream.
    pub diff_id: String,
    /// Its length in bytes.
    pub tar_bytes: u64,
}

/// A reader that hashes and counts what passes through it.
struct Hashing<R> {
    inner: R,
    hasher: Sha256,
    count: u64,
}

impl<R: Read> Read for Hashing<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        self.count += n as u64;
        Ok(n)
    }
}

/// Unpacks the layer blob at `blob` into the directory `dest` (which must exist).
/// Blocking.
pub fn unpack(blob: &Path, compression: Compression, dest: &Path) -> Result<Unpacked, UnpackError> {
    let file = File::open(blob).map_err(|e| UnpackError::Open(blob.to_owned(), e))?;
    let file = BufReader::with_capacity(256 << 10, file);
    let reader: Box<dyn Read> = match compression {
        Compression::None => Box::new(file),
        Compression::Gzip => Box::new(flate2::read::MultiGzDecoder::new(file)),
        Compression::Zstd => Box::new(
            ruzstd::decoding::StreamingDecoder::new(file)
                .map_err(|e| UnpackError::Decoder(compression, io::Error::other(e)))?,
        ),
    };
    let mut hashing = Hashing {
        inner: reader,
        hasher: Sha256::new(),
        count: 0,
    };
    {
        let mut archive = tar::Archive::new(&mut hashing);
        archive.set_preserve_permissions(true);
        archive.set_preserve_ownerships(true);
        archive.set_preserve_mtime(true);
        archive.set_unpack_xattrs(true);
        archive.set_overwrite(true);
        for entry in archive.entries().map_err(UnpackError::Read)? {
            let entry = entry.map_err(UnpackError::Read)?;
            apply(entry, dest)?;
        }
    }
    // The digest covers the whole stream, the archive's end padding included.
    io::copy(&mut hashing, &mut io::sink()).map_err(UnpackError::Read)?;
    Ok(Unpacked {
        diff_id: format!("sha256:{}", hex::encode(hashing.hasher.finalize())),
        tar_bytes: hashing.count,
    })
}

/// The entry's path as normal components only (leading `/` and `.` dropped); `..` refused.
fn relative(raw: &str) -> Result<PathBuf, UnpackError> {
    let mut out = PathBuf::new();
    for c in Path::new(raw).components() {
        match c {
            Component::Normal(p) => out.push(p),
            Component::RootDir | Component::CurDir | Component::Prefix(_) => {}
            Component::ParentDir => return Err(UnpackError::Escapes(raw.to_owned())),
        }
    }
    Ok(out)
}

/// Makes `dest/<rel>` a real directory chain: every existing component must be a directory
/// (never a symlink), missing ones are created.
fn real_dir(dest: &Path, rel: &Path, raw: &str) -> Result<PathBuf, UnpackError> {
    let mut dir = dest.to_path_buf();
    for c in rel.components() {
        dir.push(c);
        match std::fs::symlink_metadata(&dir) {
            Ok(m) if m.is_dir() => {}
            Ok(_) => return Err(UnpackError::NotDirectory(raw.to_owned())),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                std::fs::DirBuilder::new()
                    .mode(0o755)
                    .create(&dir)
                    .map_err(|source| UnpackError::Entry {
                        path: raw.to_owned(),
                        what: "create parent directory",
                        source,
                    })?;
            }
            Err(source) => {
                return Err(UnpackError::Entry {
                    path: raw.to_owned(),
                    what: "inspect parent",
                    source,
                })
            }
        }
    }
    Ok(dir)
}

/// Removes whatever is at `path` (file, symlink or directory tree); absent is fine.
fn remove_any(path: &Path) -> io::Result<()> {
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => std::fs::remove_dir_all(path),
        Ok(_) => std::fs::remove_file(path),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

fn apply<R: Read>(mut entry: tar::Entry<'_, R>, dest: &Path) -> Result<(), UnpackError> {
    let raw = String::from_utf8_lossy(&entry.path_bytes()).into_owned();
    let rel = relative(&raw)?;
    let Some(name) = rel.file_name().map(|n| n.to_string_lossy().into_owned()) else {
        return Ok(()); // the layer root itself
    };
    let parent_rel = rel.parent().unwrap_or(Path::new(""));
    let entry_err = |what: &'static str| {
        let raw = raw.clone();
        move |source: io::Error| UnpackError::Entry {
            path: raw,
            what,
            source,
        }
    };
    if name == OPAQUE {
        let dir = real_dir(dest, parent_rel, &raw)?;
        return xattr_set(&dir, "trusted.overlay.opaque", b"y")
            .map_err(entry_err("mark directory opaque"));
    }
    if let Some(hidden) = name.strip_prefix(WHITEOUT) {
        if hidden.is_empty() || hidden == "." || hidden == ".." {
            return Err(UnpackError::Escapes(raw));
        }
        let target = real_dir(dest, parent_rel, &raw)?.join(hidden);
        remove_any(&target).map_err(entry_err("remove before whiteout"))?;
        return mknod(&target, SFlag::S_IFCHR, Mode::empty(), 0)
            .map_err(|e| entry_err("make whiteout")(e.into()));
    }
    let kind = entry.header().entry_type();
    if kind.is_character_special() || kind.is_block_special() || kind.is_fifo() {
        let dir = real_dir(dest, parent_rel, &raw)?;
        let target = dir.join(&name);
        let header = entry.header();
        let mode = header.mode().map_err(entry_err("read mode"))?;
        let major = header.device_major().ok().flatten().unwrap_or(0);
        let minor = header.device_minor().ok().flatten().unwrap_or(0);
        let kind_flag = if kind.is_character_special() {
            SFlag::S_IFCHR
        } else if kind.is_block_special() {
            SFlag::S_IFBLK
        } else {
            SFlag::S_IFIFO
        };
        remove_any(&target).map_err(entry_err("replace"))?;
        mknod(
            &target,
            kind_flag,
            Mode::from_bits_truncate(mode & 0o7777),
            nix::sys::stat::makedev(u64::from(major), u64::from(minor)),
        )
        .map_err(|e| entry_err("make device node")(e.into()))?;
        let uid = header.uid().map_err(entry_err("read owner"))?;
        let gid = header.gid().map_err(entry_err("read group"))?;
        return nix::unistd::chown(
            &target,
            Some(nix::unistd::Uid::from_raw(uid as u32)),
            Some(nix::unistd::Gid::from_raw(gid as u32)),
        )
        .map_err(|e| entry_err("set owner")(e.into()));
    }
    // A directory entry replacing a non-directory, or the reverse, from the same layer.
    let target = dest.join(&rel);
    if let Ok(m) = std::fs::symlink_metadata(&target) {
        if m.is_dir() != kind.is_dir() {
            remove_any(&target).map_err(entry_err("replace"))?;
        }
    }
    match entry.unpack_in(dest) {
        Ok(true) => Ok(()),
        Ok(false) => Err(UnpackError::Escapes(raw)),
        Err(e) => Err(entry_err("unpack")(e)),
    }
}

/// `setxattr(2)` on `path` (following no symlink: the directory was checked).
fn xattr_set(path: &Path, name: &str, value: &[u8]) -> io::Result<()> {
    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt;
    let p = CString::new(path.as_os_str().as_bytes()).map_err(io::Error::other)?;
    let n = CString::new(name).map_err(io::Error::other)?;
    // SAFETY: both strings are NUL-terminated and live across the call; value is a valid
    // slice of the given length.
    let rc = unsafe {
        libc::lsetxattr(
            p.as_ptr(),
            n.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{FileTypeExt, MetadataExt};

    fn tar_of(build: impl FnOnce(&mut tar::Builder<Vec<u8>>)) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        build(&mut b);
        b.into_inner().unwrap()
    }

    fn add_file(b: &mut tar::Builder<Vec<u8>>, path: &str, data: &[u8], uid: u64) {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o640);
        h.set_uid(uid);
        h.set_gid(uid);
        h.set_entry_type(tar::EntryType::Regular);
        b.append_data(&mut h, path, data).unwrap();
    }

    fn add_link(b: &mut tar::Builder<Vec<u8>>, path: &str, target: &str, kind: tar::EntryType) {
        let mut h = tar::Header::new_gnu();
        h.set_size(0);
        h.set_mode(0o777);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(0);
        h.set_entry_type(kind);
        b.append_link(&mut h, path, target).unwrap();
    }

    fn sha(data: &[u8]) -> String {
        format!("sha256:{}", hex::encode(Sha256::digest(data)))
    }

    #[test]
    fn media_types() {
        assert_eq!(
            compression_for("application/vnd.oci.image.layer.v1.tar+gzip"),
            Some(Compression::Gzip)
        );
        assert_eq!(
            compression_for("application/vnd.docker.image.rootfs.diff.tar.gzip"),
            Some(Compression::Gzip)
        );
        assert_eq!(
            compression_for("application/vnd.oci.image.layer.v1.tar+zstd"),
            Some(Compression::Zstd)
        );
        assert_eq!(
            compression_for("application/vnd.oci.image.layer.v1.tar"),
            Some(Compression::None)
        );
        assert_eq!(
            compression_for("application/vnd.oci.image.config.v1+json"),
            None
        );
    }

    /// Files keep their owner and mode, whiteouts become overlay whiteouts, opaque markers
    /// an xattr, and the diff_id is the digest of the tar stream. (Needs root: mknod and
    /// trusted xattrs.)
    #[test]
    fn whiteouts_and_files_in_overlay_format() {
        let t = tempfile::tempdir().unwrap();
        let layer = tar_of(|b| {
            add_file(b, "etc/motd", b"hello", 1000);
            add_file(b, "etc/.wh.passwd", b"", 0);
            add_file(b, "var/cache/.wh..wh..opq", b"", 0);
            add_link(b, "bin/sh", "busybox", tar::EntryType::Symlink);
            add_link(b, "etc/motd2", "etc/motd", tar::EntryType::Link);
        });
        let blob = t.path().join("blob");
        std::fs::write(&blob, &layer).unwrap();
        let dest = t.path().join("layer");
        std::fs::create_dir(&dest).unwrap();
        let u = unpack(&blob, Compression::None, &dest).unwrap();
        assert_eq!(u.diff_id, sha(&layer));
        assert_eq!(u.tar_bytes, layer.len() as u64);

        let motd = std::fs::metadata(dest.join("etc/motd")).unwrap();
        assert_eq!(std::fs::read(dest.join("etc/motd")).unwrap(), b"hello");
        assert_eq!(motd.uid(), 1000);
        assert_eq!(motd.mode() & 0o777, 0o640);
        assert_eq!(
            motd.ino(),
            std::fs::metadata(dest.join("etc/motd2")).unwrap().ino()
        );
        let wh = std::fs::symlink_metadata(dest.join("etc/passwd")).unwrap();
        assert!(wh.file_type().is_char_device());
        assert_eq!(wh.rdev(), 0);
        assert!(!dest.join("etc/.wh.passwd").exists());
        let mut buf = [0u8; 4];
        let p = std::ffi::CString::new(dest.join("var/cache").to_str().unwrap()).unwrap();
        // SAFETY: valid NUL-terminated strings and a buffer of the given length.
        let n = unsafe {
            libc::lgetxattr(
                p.as_ptr(),
                c"trusted.overlay.opaque".as_ptr(),
                buf.as_mut_ptr().cast(),
                buf.len(),
            )
        };
        assert_eq!(n, 1);
        assert_eq!(&buf[..1], b"y");
        assert_eq!(
            std::fs::read_link(dest.join("bin/sh")).unwrap(),
            Path::new("busybox")
        );
    }

    #[test]
    fn gzip_and_zstd_layers_hash_the_uncompressed_stream() {
        let t = tempfile::tempdir().unwrap();
        let layer = tar_of(|b| add_file(b, "a", b"x", 0));
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        io::Write::write_all(&mut gz, &layer).unwrap();
        let gz = gz.finish().unwrap();
        std::fs::write(t.path().join("gz"), gz).unwrap();
        let dest = t.path().join("d1");
        std::fs::create_dir(&dest).unwrap();
        let u = unpack(&t.path().join("gz"), Compression::Gzip, &dest).unwrap();
        assert_eq!(u.diff_id, sha(&layer));
        assert_eq!(std::fs::read(dest.join("a")).unwrap(), b"x");

        let zst = ruzstd::encoding::compress_to_vec(
            &layer[..],
            ruzstd::encoding::CompressionLevel::Fastest,
        );
        std::fs::write(t.path().join("zst"), zst).unwrap();
        let dest = t.path().join("d2");
        std::fs::create_dir(&dest).unwrap();
        let u = unpack(&t.path().join("zst"), Compression::Zstd, &dest).unwrap();
        assert_eq!(u.diff_id, sha(&layer));
    }

    /// Nothing lands outside the layer directory: not through `..`, not through a symlink
    /// the layer itself planted, not through a whiteout below such a symlink.
    #[test]
    fn escapes_are_refused() {
        let t = tempfile::tempdir().unwrap();
        let outside = t.path().join("outside");
        std::fs::create_dir(&outside).unwrap();
        for (i, layer) in [
            tar_of(|b| {
                let mut h = tar::Header::new_old();
                h.set_size(1);
                h.set_entry_type(tar::EntryType::Regular);
                h.as_old_mut().name[..9].copy_from_slice(b"../evil\0\0");
                h.set_cksum();
                b.append(&h, &b"x"[..]).unwrap();
            }),
            tar_of(|b| {
                add_link(b, "out", outside.to_str().unwrap(), tar::EntryType::Symlink);
                add_file(b, "out/evil", b"x", 0);
            }),
            tar_of(|b| {
                add_link(b, "out", outside.to_str().unwrap(), tar::EntryType::Symlink);
                add_file(b, "out/.wh.evil", b"", 0);
            }),
        ]
        .into_iter()
        .enumerate()
        {
            let blob = t.path().join(format!("blob{i}"));
            std::fs::write(&blob, &layer).unwrap();
            let dest = t.path().join(format!("layer{i}"));
            std::fs::create_dir(&dest).unwrap();
            assert!(
                unpack(&blob, Compression::None, &dest).is_err(),
                "layer {i}"
            );
            assert!(
                std::fs::read_dir(&outside).unwrap().next().is_none(),
                "layer {i} wrote outside"
            );
        }
    }
}
