//! Man pages and shell completions generated from the clap definition, so
//! they always match the flags (`vublk gen-assets DIR`, used by packaging).
//!
//! DIR/man/vublk.1, vublk-stat.1, vublk-top.1;
//! DIR/completions/vublk.bash, _vublk (zsh), vublk.fish.

use std::fs::{self, File};
use std::io;
use std::path::{Path, PathBuf};

use clap::CommandFactory;
use clap_complete::Shell;

use crate::config::Args;

#[derive(Debug, thiserror::Error)]
pub enum AssetError {
    #[error("cannot write {path}: {source}")]
    Write { path: PathBuf, source: io::Error },
}

fn create(path: PathBuf) -> Result<(File, PathBuf), AssetError> {
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir).map_err(|source| AssetError::Write {
            path: dir.to_owned(),
            source,
        })?;
    }
    File::create(&path)
        .map(|f| (f, path.clone()))
        .map_err(|source| AssetError::Write { path, source })
}

/// Writes every asset under `dir`; returns the files written.
pub fn generate(dir: &Path) -> Result<Vec<PathBuf>, AssetError> {
    let mut cmd = Args::command();
    cmd.build();
    let mut written = Vec::new();
    let mut pages = vec![("vublk".to_string(), cmd.clone())];
    for sub in cmd
        .get_subcommands()
        .filter(|s| !s.is_hide_set() && s.get_name() != "help")
    {
        let name = format!("vublk-{}", sub.get_name());
        // A one-shot generator: leaking the few page names is fine.
        let page_name: &'static str = Box::leak(name.clone().into_boxed_str());
        pages.push((name, sub.clone().name(page_name)));
    }
    for (name, page) in pages {
        let (mut f, path) = create(dir.join("man").join(format!("{name}.1")))?;
        clap_mangen::Man::new(page)
            .render(&mut f)
            .map_err(|source| AssetError::Write {
                path: path.clone(),
                source,
            })?;
        written.push(path);
    }
    for (shell, file) in [
        (Shell::Bash, "vublk.bash"),
        (Shell::Zsh, "_vublk"),
        (Shell::Fish, "vublk.fish"),
    ] {
        let (mut f, path) = create(dir.join("completions").join(file))?;
        clap_complete::generate(shell, &mut cmd, "vublk", &mut f);
        written.push(path);
    }
    Ok(written)
}
