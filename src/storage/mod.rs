//! Backing storage: opening a raw image, block device or null disk, and
//! learning its geometry (size, block sizes, alignment) once at start-up.

pub mod fault;
mod sys;

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::os::unix::io::{AsRawFd, RawFd};
use std::path::{Path, PathBuf};

use crate::config::{CacheMode, DiskSpec};

pub const SECTOR_SIZE: u64 = 512;

#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("cannot open disk {path}: {source}")]
    Open { path: PathBuf, source: io::Error },
    #[error("cannot create disk image {path}: {source}")]
    Create { path: PathBuf, source: io::Error },
    #[error("disk {path} is neither a regular file nor a block device")]
    NotADisk { path: PathBuf },
    #[error("cannot query disk {path}: {source}")]
    Query { path: PathBuf, source: io::Error },
    #[error("disk {path} has size {size}, which is not a multiple of 512 bytes")]
    OddSize { path: PathBuf, size: u64 },
    #[error("disk {path} exists with size {actual}, but --size asks for {wanted}")]
    SizeMismatch {
        path: PathBuf,
        actual: u64,
        wanted: u64,
    },
    #[error("disk {path}: {mode} is not supported by its file system")]
    Unsupported { path: PathBuf, mode: &'static str },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DiskKind {
    File,
    BlockDevice,
    Null,
}

/// What the guest is told about the disk and what the data path needs to
/// know to issue valid I/O.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Geometry {
    pub size: u64,
    /// Smallest addressable unit (the guest's logical block size).
    pub logical_block: u32,
    /// Physical block size (TOPOLOGY).
    pub physical_block: u32,
    pub min_io: u32,
    pub opt_io: u32,
    pub alignment_offset: u32,
    /// Memory alignment that O_DIRECT requires of each buffer; 1 when buffered.
    pub mem_align: u32,
}

/// An opened disk. Shared by all queue threads (I/O uses positioned calls).
#[derive(Debug)]
pub struct Disk {
    kind: DiskKind,
    file: Option<File>,
    path: PathBuf,
    geometry: Geometry,
    read_only: bool,
    direct: bool,
}

impl Disk {
    pub fn open(spec: &DiskSpec, cache: CacheMode, read_only: bool) -> Result<Disk, StorageError> {
        match spec {
            DiskSpec::Null { size } => Ok(Disk::null(*size, read_only)),
            DiskSpec::Path { path, create_size } => {
                Disk::open_path(path, *create_size, cache, read_only)
            }
        }
    }

    pub fn null(size: u64, read_only: bool) -> Disk {
        Disk {
            kind: DiskKind::Null,
            file: None,
            path: PathBuf::from(format!("null:{size}")),
            geometry: Geometry {
                size,
                logical_block: SECTOR_SIZE as u32,
                physical_block: SECTOR_SIZE as u32,
                min_io: 0,
                opt_io: 0,
                alignment_offset: 0,
                mem_align: 1,
            },
            read_only,
            direct: false,
        }
    }

    fn open_path(
        path: &Path,
        create_size: Option<u64>,
        cache: CacheMode,
        read_only: bool,
    ) -> Result<Disk, StorageError> {
        if !path.exists() {
            let size = create_size.ok_or_else(|| StorageError::Open {
                path: path.to_owned(),
                source: io::ErrorKind::NotFound.into(),
            })?;
            create_sparse(path, size)?;
        }
        let direct = cache == CacheMode::None;
        let mut flags = libc::O_CLOEXEC;
        if direct {
            flags |= libc::O_DIRECT;
        }
        let file = OpenOptions::new()
            .read(true)
            .write(!read_only)
            .custom_flags(flags)
            .open(path)
            .map_err(|source| match source.raw_os_error() {
                Some(libc::EINVAL) if direct => StorageError::Unsupported {
                    path: path.to_owned(),
                    mode: "O_DIRECT (use --cache writeback)",
                },
                _ => StorageError::Open {
                    path: path.to_owned(),
                    source,
                },
            })?;
        let query = |source| StorageError::Query {
            path: path.to_owned(),
            source,
        };
        let meta = file.metadata().map_err(query)?;
        let (kind, geometry) = if meta.file_type().is_block_device() {
            (
                DiskKind::BlockDevice,
                sys::block_device_geometry(&file, direct).map_err(query)?,
            )
        } else if meta.file_type().is_file() {
            (
                DiskKind::File,
                sys::file_geometry(&file, &meta, direct).map_err(query)?,
            )
        } else {
            return Err(StorageError::NotADisk {
                path: path.to_owned(),
            });
        };
        if geometry.size % SECTOR_SIZE != 0 {
            return Err(StorageError::OddSize {
                path: path.to_owned(),
                size: geometry.size,
            });
        }
        if let Some(wanted) = create_size.filter(|w| *w != geometry.size) {
            return Err(StorageError::SizeMismatch {
                path: path.to_owned(),
                actual: geometry.size,
                wanted,
            });
        }
        Ok(Disk {
            kind,
            file: Some(file),
            path: path.to_owned(),
            geometry,
            read_only,
            direct,
        })
    }

    pub fn kind(&self) -> DiskKind {
        self.kind
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn geometry(&self) -> &Geometry {
        &self.geometry
    }

    pub fn size(&self) -> u64 {
        self.geometry.size
    }

    pub fn read_only(&self) -> bool {
        self.read_only
    }

    pub fn direct(&self) -> bool {
        self.direct
    }

    /// The descriptor the engines submit I/O on; `None` for the null disk.
    pub fn raw_fd(&self) -> Option<RawFd> {
        self.file.as_ref().map(AsRawFd::as_raw_fd)
    }

    /// Makes completed writes durable; used at shutdown.
    pub fn sync(&self) -> io::Result<()> {
        match &self.file {
            Some(f) if !self.read_only => f.sync_data(),
            _ => Ok(()),
        }
    }
}

fn create_sparse(path: &Path, size: u64) -> Result<(), StorageError> {
    let err = |source| StorageError::Create {
        path: path.to_owned(),
        source,
    };
    let file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(err)?;
    file.set_len(size).map_err(err)?;
    log::info!("created sparse image {} of {} bytes", path.display(), size);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn creates_sparse_image_and_reads_geometry() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d.img");
        let spec = DiskSpec::Path {
            path: path.clone(),
            create_size: Some(64 << 20),
        };
        let disk = Disk::open(&spec, CacheMode::Writeback, false).unwrap();
        assert_eq!(disk.kind(), DiskKind::File);
        assert_eq!(disk.size(), 64 << 20);
        let meta = std::fs::metadata(&path).unwrap();
        use std::os::unix::fs::MetadataExt;
        assert!(meta.blocks() * 512 < 1 << 20, "image is not sparse");
        assert!(disk.geometry().logical_block >= 512);
        assert!(disk.geometry().logical_block.is_power_of_two());
        drop(disk);
        // Reopening with another size is an error, not a silent resize.
        let spec = DiskSpec::Path {
            path,
            create_size: Some(32 << 20),
        };
        let err = Disk::open(&spec, CacheMode::Writeback, false).unwrap_err();
        assert!(matches!(err, StorageError::SizeMismatch { .. }), "{err}");
    }

    #[test]
    fn odd_sized_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("odd.img");
        std::fs::write(&path, vec![0u8; 1000]).unwrap();
        let spec = DiskSpec::Path {
            path,
            create_size: None,
        };
        let err = Disk::open(&spec, CacheMode::Writeback, true).unwrap_err();
        assert!(matches!(err, StorageError::OddSize { .. }), "{err}");
    }

    #[test]
    fn directory_is_not_a_disk() {
        let dir = tempfile::tempdir().unwrap();
        let spec = DiskSpec::Path {
            path: dir.path().to_owned(),
            create_size: None,
        };
        assert!(Disk::open(&spec, CacheMode::Writeback, true).is_err());
    }
}
