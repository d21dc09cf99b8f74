//! `/proc/PID/maps` parsing and the choice of the guest-RAM mapping.

use std::fmt;

/// Errors while reading or choosing a mapping.
#[derive(Debug, thiserror::Error)]
pub enum MapsError {
    /// A line did not have the maps format.
    #[error("bad maps line {line}: {text:?}")]
    BadLine {
        /// 1-based line number.
        line: usize,
        /// The offending text.
        text: String,
    },
    /// No mapping matched the selector.
    #[error("no mapping matches {0}")]
    NotFound(String),
    /// The selected range is not one shared file mapping.
    #[error("range {0} is not covered by one shared file mapping")]
    NotShared(String),
    /// An address range argument could not be parsed.
    #[error("bad address range {0:?} (want START-END in hex)")]
    BadRange(String),
}

/// One line of `/proc/PID/maps`, possibly several adjacent lines merged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MapEntry {
    /// First address.
    pub start: u64,
    /// One past the last address.
    pub end: u64,
    /// The four permission characters, e.g. `rw-s`.
    pub perms: String,
    /// File offset of `start`.
    pub offset: u64,
    /// Device, `MAJ:MIN`.
    pub dev: String,
    /// Inode number of the file (0 for anonymous memory).
    pub inode: u64,
    /// Path column (may be empty).
    pub path: String,
    /// Start address of the first VMA (for `/proc/PID/map_files`).
    pub first_vma_end: u64,
}

impl MapEntry {
    /// Length in bytes.
    pub fn len(&self) -> u64 {
        self.end - self.start
    }

    /// Whether the entry is empty.
    pub fn is_empty(&self) -> bool {
        self.end == self.start
    }

    /// `MAP_SHARED` mapping.
    pub fn is_shared(&self) -> bool {
        self.perms.as_bytes().get(3) == Some(&b's')
    }

    /// A memfd (`/memfd:NAME (deleted)`).
    pub fn is_memfd(&self) -> bool {
        self.path.starts_with("/memfd:")
    }
}

impl fmt::Display for MapEntry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:x}-{:x} {} {} ({} MiB)",
            self.start,
            self.end,
            self.perms,
            self.path,
            self.len() >> 20
        )
    }
}

fn parse_line(line: &str, n: usize) -> Result<MapEntry, MapsError> {
    let bad = || MapsError::BadLine {
        line: n,
        text: line.to_string(),
    };
    let mut it = line.splitn(6, ' ');
    let range = it.next().ok_or_else(bad)?;
    let perms = it.next().ok_or_else(bad)?;
    let offset = it.next().ok_or_else(bad)?;
    let dev = it.next().ok_or_else(bad)?;
    let inode = it.next().ok_or_else(bad)?;
    let path = it.next().unwrap_or("").trim_start().to_string();
    let (s, e) = range.split_once('-').ok_or_else(bad)?;
    let start = u64::from_str_radix(s, 16).map_err(|_| bad())?;
    let end = u64::from_str_radix(e, 16).map_err(|_| bad())?;
    if end < start || perms.len() != 4 {
        return Err(bad());
    }
    Ok(MapEntry {
        start,
        end,
        perms: perms.to_string(),
        offset: u64::from_str_radix(offset, 16).map_err(|_| bad())?,
        dev: dev.to_string(),
        inode: inode.parse().map_err(|_| bad())?,
        path,
        first_vma_end: end,
    })
}

/// Parse the text of `/proc/PID/maps`, merging adjacent lines that map
/// consecutive offsets of the same file with the same permissions (a VMA
/// split by `madvise` or `mprotect` is still one guest-RAM region).
pub fn parse_maps(text: &str) -> Result<Vec<MapEntry>, MapsError> {
    let mut out: Vec<MapEntry> = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let e = parse_line(line, i + 1)?;
        if let Some(last) = out.last_mut() {
            if last.end == e.start
                && last.inode == e.inode
                && e.inode != 0
                && last.dev == e.dev
                && last.perms == e.perms
                && last.path == e.path
                && last.offset + last.len() == e.offset
            {
                last.end = e.end;
                continue;
            }
        }
        out.push(e);
    }
    Ok(out)
}

/// Which mapping of the target to manage.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Selector {
    /// The largest shared memfd mapping.
    #[default]
    Auto,
    /// The largest shared mapping whose path contains this text (a memory
    /// backend name such as `pc.ram`, or a file under /dev/shm or hugetlbfs).
    Name(String),
    /// Exactly the shared file mapping covering `[start, end)`.
    Range(u64, u64),
}

impl Selector {
    /// Parse `START-END` (hex, optional `0x`).
    pub fn parse_range(s: &str) -> Result<Self, MapsError> {
        let bad = || MapsError::BadRange(s.to_string());
        let (a, b) = s.split_once('-').ok_or_else(bad)?;
        let hex =
            |t: &str| u64::from_str_radix(t.trim().trim_start_matches("0x"), 16).map_err(|_| bad());
        let (a, b) = (hex(a)?, hex(b)?);
        if b <= a {
            return Err(bad());
        }
        Ok(Selector::Range(a, b))
    }
}

impl fmt::Display for Selector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Selector::Auto => write!(f, "the largest shared memfd mapping"),
            Selector::Name(n) => write!(f, "a shared mapping named like {n:?}"),
            Selector::Range(a, b) => write!(f, "range {a:x}-{b:x}"),
        }
    }
}

/// Choose the mapping to manage among parsed (merged) entries.
pub fn select(entries: &[MapEntry], sel: &Selector) -> Result<MapEntry, MapsError> {
    let pick_largest = |f: &dyn Fn(&MapEntry) -> bool| {
        entries
            .iter()
            .filter(|e| e.is_shared() && e.inode != 0 && !e.is_empty() && f(e))
            .max_by_key(|e| e.len())
            .cloned()
            .ok_or_else(|| MapsError::NotFound(sel.to_string()))
    };
    match sel {
        Selector::Auto => pick_largest(&|e| e.is_memfd()),
        Selector::Name(n) => pick_largest(&|e| e.path.contains(n.as_str())),
        Selector::Range(a, b) => {
            let e = entries
                .iter()
                .find(|e| e.start <= *a && *a < e.end)
                .ok_or_else(|| MapsError::NotFound(sel.to_string()))?;
            if !e.is_shared() || e.inode == 0 || *b > e.end {
                return Err(MapsError::NotShared(sel.to_string()));
            }
            let mut r = e.clone();
            r.offset += a - e.start;
            r.start = *a;
            r.end = *b;
            r.first_vma_end = r.first_vma_end.min(*b);
            Ok(r)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAPS: &str = "\
55d0c0a00000-55d0c0b00000 r-xp 00000000 fd:01 123 /usr/bin/qemu-system-x86_64
7f0000000000-7f0010000000 rw-s 00000000 00:01 4242 /memfd:pc.ram (deleted)
7f0010000000-7f0040000000 rw-s 10000000 00:01 4242 /memfd:pc.ram (deleted)
7f0040000000-7f0041000000 rw-s 00000000 00:01 4343 /memfd:vga.vram (deleted)
7f0050000000-7f0060000000 rw-p 00000000 00:00 0 
7f0060000000-7f0061000000 rw-s 00000000 00:05 99 /dev/shm/other
7ffd00000000-7ffd00021000 rw-p 00000000 00:00 0                          [stack]
";

    #[test]
    fn parses_and_merges_split_vmas() {
        let e = parse_maps(MAPS).unwrap();
        assert_eq!(e.len(), 6, "{e:#?}");
        let ram = &e[1];
        assert_eq!(ram.start, 0x7f0000000000);
        assert_eq!(ram.end, 0x7f0040000000);
        assert_eq!(ram.first_vma_end, 0x7f0010000000);
        assert_eq!(ram.len(), 1 << 30);
        assert!(ram.is_shared() && ram.is_memfd());
        assert_eq!(ram.path, "/memfd:pc.ram (deleted)");
        assert_eq!(e[5].path, "[stack]");
        assert_eq!(e[3].path, "");
    }

    #[test]
    fn does_not_merge_noncontiguous_offsets() {
        let text = "\
7f0000000000-7f0010000000 rw-s 00000000 00:01 7 /memfd:a (deleted)
7f0010000000-7f0020000000 rw-s 20000000 00:01 7 /memfd:a (deleted)
";
        assert_eq!(parse_maps(text).unwrap().len(), 2);
    }

    #[test]
    fn auto_picks_largest_shared_memfd() {
        let e = parse_maps(MAPS).unwrap();
        let s = select(&e, &Selector::Auto).unwrap();
        assert_eq!(s.inode, 4242);
        let n = select(&e, &Selector::Name("vga".into())).unwrap();
        assert_eq!(n.inode, 4343);
        let shm = select(&e, &Selector::Name("/dev/shm".into())).unwrap();
        assert_eq!(shm.inode, 99);
        assert!(matches!(
            select(&e, &Selector::Name("nope".into())),
            Err(MapsError::NotFound(_))
        ));
    }

    #[test]
    fn range_selects_a_sub_range() {
        let e = parse_maps(MAPS).unwrap();
        let r = Selector::parse_range("0x7f0020000000-7f0030000000").unwrap();
        let s = select(&e, &r).unwrap();
        assert_eq!(s.start, 0x7f0020000000);
        assert_eq!(s.offset, 0x20000000);
        assert_eq!(s.len(), 0x10000000);
        let anon = Selector::parse_range("7f0050000000-7f0051000000").unwrap();
        assert!(matches!(select(&e, &anon), Err(MapsError::NotShared(_))));
        assert!(Selector::parse_range("10-5").is_err());
        assert!(Selector::parse_range("zz").is_err());
    }

    #[test]
    fn rejects_garbage() {
        assert!(parse_maps("hello world\n").is_err());
        assert!(parse_maps("").unwrap().is_empty());
    }

    #[test]
    fn no_memfd_means_not_found() {
        let e =
            parse_maps("7f0060000000-7f0061000000 rw-p 00000000 00:05 99 /dev/shm/x\n").unwrap();
        assert!(select(&e, &Selector::Auto).is_err());
    }
}
