//! Packaging: systemd units verified by systemd-analyze, the .deb built and
//! listed, the .rpm built when rpmbuild can be had, generated man pages and
//! completions, and the example config.

mod ops_support;

use std::path::{Path, PathBuf};
use std::process::Command;

use ops_support::*;

const TIER: &str = env!("CARGO_BIN_EXE_vublk-tier");

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn have(cmd: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {cmd}")])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// `cmd` on PATH, installing Debian package `pkg` if missing and possible.
fn ensure(cmd: &str, pkg: &str) -> Result<(), String> {
    if have(cmd) {
        return Ok(());
    }
    // SAFETY: getuid has no failure modes.
    if !have("apt-get") || unsafe { libc::getuid() } != 0 {
        return Err(format!(
            "{cmd} missing and cannot install {pkg} (no apt-get or not root)"
        ));
    }
    let ok = Command::new("apt-get")
        .args(["install", "-y", "-qq", "--no-install-recommends", pkg])
        .env("DEBIAN_FRONTEND", "noninteractive")
        .output()
        .is_ok_and(|o| o.status.success());
    if ok && have(cmd) {
        Ok(())
    } else {
        Err(format!("{cmd} missing and `apt-get install {pkg}` failed"))
    }
}

/// The units as instances, with ExecStart pointing at the built binaries.
fn instance_units(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for (src, inst) in [
        ("vublk@.service", "vublk@disk0.service"),
        ("vublk@.socket", "vublk@disk0.socket"),
        ("vublk-tier@.service", "vublk-tier@vm0.service"),
    ] {
        let text = std::fs::read_to_string(repo().join("packaging/systemd").join(src)).unwrap();
        let text = text
            .replace("/usr/bin/vublk-tier", TIER)
            .replace("/usr/bin/vublk ", &format!("{VUBLK} "));
        let p = dir.join(inst);
        std::fs::write(&p, text).unwrap();
        out.push(p);
    }
    out
}

#[test]
fn systemd_units_verify() {
    if let Err(why) = ensure("systemd-analyze", "systemd") {
        eprintln!("skipped: {why}");
        return;
    }
    let dir = tmp();
    let units = instance_units(dir.path());
    let out = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .args(&units)
        .current_dir(dir.path())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    // Complaints about our units name them; others (the host's) do not matter.
    let ours: Vec<&str> = stderr.lines().filter(|l| l.contains("vublk")).collect();
    assert!(out.status.success() && ours.is_empty(), "{stderr}");

    // The checks can fail: a broken directive is reported.
    let bad = dir.path().join("vublk@bad.service");
    let text = std::fs::read_to_string(&units[0]).unwrap();
    std::fs::write(&bad, text.replace("Type=notify", "Type=notifyy")).unwrap();
    let out = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(&bad)
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("notifyy"),
        "systemd-analyze did not notice a bad Type="
    );
}

fn bin_dir() -> PathBuf {
    Path::new(VUBLK).parent().unwrap().to_owned()
}

#[test]
fn deb_package_holds_binaries_units_docs_and_completions() {
    if !have("dpkg-deb") {
        eprintln!("skipped: no dpkg-deb");
        return;
    }
    let out_dir = tmp();
    let out = Command::new(repo().join("packaging/debian/build-deb.sh"))
        .arg("--bin-dir")
        .arg(bin_dir())
        .arg("--out")
        .arg(out_dir.path())
        .arg("--fast")
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let deb = String::from_utf8(out.stdout).unwrap().trim().to_string();
    let list = Command::new("dpkg-deb")
        .args(["-c", &deb])
        .output()
        .unwrap();
    let list = String::from_utf8(list.stdout).unwrap();
    for want in [
        "./usr/bin/vublk",
        "./usr/bin/vublk-tier",
        "./lib/systemd/system/vublk@.service",
        "./lib/systemd/system/vublk@.socket",
        "./lib/systemd/system/vublk-tier@.service",
        "./usr/share/doc/vublk/examples/vublk.toml.example",
        "./usr/share/doc/vublk/copyright",
        "./usr/share/man/man1/vublk.1.gz",
        "./usr/share/man/man1/vublk-stat.1.gz",
        "./usr/share/man/man1/vublk-top.1.gz",
        "./usr/share/bash-completion/completions/vublk",
        "./usr/share/zsh/vendor-completions/_vublk",
        "./usr/share/fish/vendor_completions.d/vublk.fish",
        "./etc/vublk/",
        "./var/lib/vublk/",
    ] {
        assert!(
            list.lines().any(|l| l.ends_with(&format!(" {want}"))),
            "{want} not in the .deb:\n{list}"
        );
    }
    assert!(
        list.contains("root/root"),
        "files must belong to root:\n{list}"
    );
    let field = |f: &str| {
        let o = Command::new("dpkg-deb")
            .args(["-f", &deb, f])
            .output()
            .unwrap();
        String::from_utf8(o.stdout).unwrap().trim().to_string()
    };
    assert_eq!(field("Package"), "vublk");
    assert_eq!(field("Version"), env!("CARGO_PKG_VERSION"));
}

#[test]
fn rpm_package_when_rpmbuild_is_available() {
    if let Err(why) = ensure("rpmbuild", "rpm") {
        eprintln!("skipped: {why}");
        return;
    }
    let top = tmp();
    let work = tmp();
    let out = Command::new("rpmbuild")
        .args(["-bb", "--nodeps", "--with", "prebuilt"])
        .arg("--define")
        .arg(format!("_topdir {}", top.path().display()))
        .arg("--define")
        .arg(format!("prebuilt_dir {}", bin_dir().display()))
        .arg("--define")
        .arg(format!("srcdir {}", repo().display()))
        .arg("--define")
        .arg(format!("_builddir {}", work.path().display()))
        .arg("--define")
        .arg("__strip /bin/true")
        .arg(repo().join("packaging/rpm/vublk.spec"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "rpmbuild: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rpms: Vec<PathBuf> = walk(&top.path().join("RPMS"))
        .into_iter()
        .filter(|p| p.extension().is_some_and(|e| e == "rpm"))
        .collect();
    assert_eq!(rpms.len(), 1, "{rpms:?}");
    let list = Command::new("rpm")
        .arg("-qlp")
        .arg(&rpms[0])
        .output()
        .unwrap();
    let list = String::from_utf8(list.stdout).unwrap();
    for want in [
        "/usr/bin/vublk",
        "/usr/bin/vublk-tier",
        "/vublk@.service",
        "/vublk@.socket",
        "/vublk-tier@.service",
        "/man1/vublk.1",
        "/completions/vublk",
        "/examples/vublk.toml.example",
    ] {
        assert!(list.contains(want), "{want} not in the .rpm:\n{list}");
    }
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

#[test]
fn man_pages_and_completions_follow_the_flags() {
    let dir = tmp();
    let out = run(&["gen-assets", path_str(dir.path())]);
    assert!(out.status.success(), "{out:?}");
    let man = std::fs::read_to_string(dir.path().join("man/vublk.1")).unwrap();
    assert!(man.contains(".TH vublk 1"), "{man}");
    for flag in ["control", "seccomp", "socket\\-mode", "qos\\-iops"] {
        assert!(man.contains(flag), "man page lacks {flag}");
    }
    let stat = std::fs::read_to_string(dir.path().join("man/vublk-stat.1")).unwrap();
    assert!(stat.contains("control"));
    let bash = std::fs::read_to_string(dir.path().join("completions/vublk.bash")).unwrap();
    assert!(bash.contains("--seccomp") && bash.contains("stat") && bash.contains("top"));
}

#[test]
fn example_config_holds_only_known_keys() {
    let text = std::fs::read_to_string(repo().join("packaging/vublk.toml.example")).unwrap();
    let s: vublk::config::Settings = toml::from_str(&text).unwrap();
    assert_eq!(
        s.control.as_deref(),
        Some(Path::new("/run/vublk/disk0.ctl"))
    );
    // Every commented-out key is a real one too.
    let uncommented: String = text
        .lines()
        .map(|l| {
            l.strip_prefix("# ")
                .filter(|r| {
                    r.split_once(" = ")
                        .is_some_and(|(k, _)| k.chars().all(|c| c.is_ascii_lowercase() || c == '-'))
                })
                .unwrap_or(l)
        })
        .collect::<Vec<_>>()
        .join("\n");
    let all: Result<vublk::config::Settings, _> = toml::from_str(&uncommented);
    assert!(all.is_ok(), "{:?}", all.err());
}
