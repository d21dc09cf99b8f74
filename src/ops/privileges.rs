//! Socket file permissions and dropping root.
//!
//! vublk starts as root to open block devices, create its io_uring rings
//! and bind its sockets, then (with `--user`/`--group`) becomes an
//! unprivileged user. Queue rings are created later, one per queue each
//! time a frontend connects, so before committing to the new identity we
//! create a probe ring as that user: a kernel with
//! `kernel.io_uring_disabled=1` (only `kernel.io_uring_group` may create
//! rings) or, before Linux 5.12, a too small RLIMIT_MEMLOCK (rings were
//! charged to locked memory) fails here, at start-up, instead of at the
//! first connection.

use std::ffi::CString;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use crate::engine::uring::Uring;

#[derive(Debug, thiserror::Error)]
pub enum PrivilegeError {
    #[error("unknown user `{0}`")]
    UnknownUser(String),
    #[error("unknown group `{0}`")]
    UnknownGroup(String),
    #[error("cannot look up `{name}`: {source}")]
    Lookup { name: String, source: io::Error },
    #[error("cannot set mode {mode:o} on {path}: {source}")]
    Chmod {
        path: PathBuf,
        mode: u32,
        source: io::Error,
    },
    #[error("cannot give {path} to group {group}: {source}")]
    Chown {
        path: PathBuf,
        group: String,
        source: io::Error,
    },
    #[error("cannot drop privileges ({step}): {source}")]
    Drop {
        step: &'static str,
        source: io::Error,
    },
    #[error("privileges were not dropped: root can still be regained")]
    StillRoot,
    #[error(
        "io_uring does not work as uid {uid} gid {gid}: {source} \
         (kernel.io_uring_disabled={disabled}; with 1 the group must be kernel.io_uring_group, \
         before Linux 5.12 raise LimitMEMLOCK)"
    )]
    Uring {
        uid: u32,
        gid: u32,
        disabled: String,
        source: io::Error,
    },
}

/// The user and group to become.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Identity {
    pub uid: libc::uid_t,
    pub gid: libc::gid_t,
}

fn cstring(s: &str) -> Result<CString, PrivilegeError> {
    CString::new(s).map_err(|_| PrivilegeError::Lookup {
        name: s.to_string(),
        source: io::Error::from(io::ErrorKind::InvalidInput),
    })
}

/// (uid, primary gid) of a user name or number.
pub fn lookup_user(name: &str) -> Result<(libc::uid_t, libc::gid_t), PrivilegeError> {
    let c = cstring(name)?;
    let mut buf = vec![0u8; 16 << 10];
    // SAFETY: an all-zero passwd is a valid value of this plain C struct.
    let mut pwd: libc::passwd = unsafe { std::mem::zeroed() };
    let mut out: *mut libc::passwd = std::ptr::null_mut();
    // SAFETY: every pointer is valid for the call: `c` is NUL-terminated,
    // `buf` is writable for its length, `pwd`/`out` are ours.
    let rc = unsafe {
        libc::getpwnam_r(
            c.as_ptr(),
            &mut pwd,
            buf.as_mut_ptr().cast(),
            buf.len(),
            &mut out,
        )
    };
    if rc != 0 {
        return Err(PrivilegeError::Lookup {
            name: name.to_string(),
            source: io::Error::from_raw_os_error(rc),
        });
    }
    if !out.is_null() {
        return Ok((pwd.pw_uid, pwd.pw_gid));
    }
    match name.parse::<libc::uid_t>() {
        Ok(uid) => Ok((uid, uid)),
        Err(_) => Err(PrivilegeError::UnknownUser(name.to_string())),
    }
}

/// The gid of a group name or number.
pub fn lookup_group(name: &str) -> Result<libc::gid_t, PrivilegeError> {
    let c = cstring(name)?;
    let mut buf = vec![0u8; 16 << 10];
    // SAFETY: an all-zero group is a valid value of this plain C struct.
    let mut grp: libc::group = unsafe { std::mem::zeroed() };
    let mut out: *mut libc::group = std::ptr::null_mut();
    // SAFETY: as in `lookup_user`.
    let rc = unsafe {
        libc::getgrnam_r(
            c.as_ptr(),
            &mut grp,
            buf.as_mut_ptr().cast(),
            buf.len(),
            &mut out,
        )
    };
    if rc != 0 {
        return Err(PrivilegeError::Lookup {
            name: name.to_string(),
            source: io::Error::from_raw_os_error(rc),
        });
    }
    if !out.is_null() {
        return Ok(grp.gr_gid);
    }
    name.parse::<libc::gid_t>()
        .map_err(|_| PrivilegeError::UnknownGroup(name.to_string()))
}

fn path_cstring(path: &Path) -> Result<CString, io::Error> {
    CString::new(path.as_os_str().as_bytes()).map_err(|_| io::ErrorKind::InvalidInput.into())
}

/// `--socket-mode` and `--socket-group` on the bound socket file.
pub fn set_socket_access(
    path: &Path,
    mode: Option<u32>,
    group: Option<&str>,
) -> Result<(), PrivilegeError> {
    if let Some(group) = group {
        let gid = lookup_group(group)?;
        let chown_err = |source| PrivilegeError::Chown {
            path: path.to_owned(),
            group: group.to_string(),
            source,
        };
        let c = path_cstring(path).map_err(chown_err)?;
        // SAFETY: `c` is a NUL-terminated path; uid -1 leaves the owner.
        let rc = unsafe { libc::chown(c.as_ptr(), libc::uid_t::MAX, gid) };
        if rc != 0 {
            return Err(chown_err(io::Error::last_os_error()));
        }
    }
    if let Some(mode) = mode {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(
            |source| PrivilegeError::Chmod {
                path: path.to_owned(),
                mode,
                source,
            },
        )?;
    }
    Ok(())
}

fn last(step: &'static str) -> PrivilegeError {
    PrivilegeError::Drop {
        step,
        source: io::Error::last_os_error(),
    }
}

impl Identity {
    /// `--user` (its primary group unless `--group`), `--group` alone keeps
    /// the uid. `None` when neither is given.
    pub fn resolve(
        user: Option<&str>,
        group: Option<&str>,
    ) -> Result<Option<Identity>, PrivilegeError> {
        let (uid, primary) = match user {
            Some(u) => {
                let (uid, gid) = lookup_user(u)?;
                (uid, Some(gid))
            }
            // SAFETY: getuid cannot fail and touches no memory.
            None => (unsafe { libc::getuid() }, None),
        };
        let gid = match (group, primary) {
            (Some(g), _) => lookup_group(g)?,
            (None, Some(g)) => g,
            (None, None) => return Ok(None),
        };
        Ok(Some(Identity { uid, gid }))
    }

    /// setgroups, setgid, setuid (in that order: after setuid we could not
    /// change groups any more), then checks that root cannot be regained
    /// and that io_uring still works. Call before starting threads that
    /// install seccomp filters: glibc applies set*id to every thread with a
    /// signal, and those threads' filters need not allow it.
    pub fn drop_privileges(&self) -> Result<(), PrivilegeError> {
        let groups = [self.gid];
        // SAFETY: `groups` holds one valid gid for the duration of the call.
        if unsafe { libc::setgroups(1, groups.as_ptr()) } != 0 {
            return Err(last("setgroups"));
        }
        // SAFETY: plain syscall wrappers, no memory involved.
        if unsafe { libc::setgid(self.gid) } != 0 {
            return Err(last("setgid"));
        }
        // SAFETY: as above.
        if unsafe { libc::setuid(self.uid) } != 0 {
            return Err(last("setuid"));
        }
        // SAFETY: as above; a successful setuid(0) means the drop failed.
        if self.uid != 0 && unsafe { libc::setuid(0) } == 0 {
            return Err(PrivilegeError::StillRoot);
        }
        if let Err(source) = Uring::new(8, None) {
            return Err(PrivilegeError::Uring {
                uid: self.uid,
                gid: self.gid,
                disabled: std::fs::read_to_string("/proc/sys/kernel/io_uring_disabled")
                    .map(|s| s.trim().to_string())
                    .unwrap_or_else(|_| "?".into()),
                source,
            });
        }
        log::info!("running as uid {} gid {}", self.uid, self.gid);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_numbers_resolve() {
        assert_eq!(lookup_user("root").unwrap(), (0, 0));
        assert_eq!(lookup_group("root").unwrap(), 0);
        assert_eq!(lookup_user("4242").unwrap(), (4242, 4242));
        assert_eq!(lookup_group("4242").unwrap(), 4242);
        assert!(matches!(
            lookup_user("no-such-user-vublk"),
            Err(PrivilegeError::UnknownUser(_))
        ));
        assert!(matches!(
            lookup_group("no-such-group-vublk"),
            Err(PrivilegeError::UnknownGroup(_))
        ));
        assert_eq!(Identity::resolve(None, None).unwrap(), None);
        let id = Identity::resolve(Some("4242"), Some("root"))
            .unwrap()
            .unwrap();
        assert_eq!((id.uid, id.gid), (4242, 0));
    }

    #[test]
    fn socket_mode_is_applied() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("s");
        let _l = std::os::unix::net::UnixListener::bind(&p).unwrap();
        set_socket_access(&p, Some(0o640), Some("root")).unwrap();
        let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o640);
    }
}
