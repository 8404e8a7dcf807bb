//! Checks on file names that come from the network.
//!
//! A snapshot names its files with relative `/`-separated paths. Before any file is touched
//! a name must be relative, free of `..`, `.`, empty components, drive prefixes, backslashes
//! and NUL, and it must not lead through a symbolic link. The only links followed are the
//! tablespace links `pg_tblspc/<oid>`, which the receiver creates itself: a path under one
//! is resolved into that tablespace's (mapped) directory instead.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// Why a name from the sender was refused.
#[derive(Debug, thiserror::Error)]
#[error("the sender sent an unsafe file name {name:?}: {why}")]
pub struct UnsafePath {
    pub name: String,
    pub why: &'static str,
}

fn unsafe_path(name: &str, why: &'static str) -> UnsafePath {
    UnsafePath {
        name: name.chars().take(200).collect(),
        why,
    }
}

/// Splits and checks a wire path. Returns its components.
pub fn components(name: &str) -> Result<Vec<&str>, UnsafePath> {
    if name.is_empty() {
        return Err(unsafe_path(name, "empty"));
    }
    if name.len() > 1024 {
        return Err(unsafe_path(name, "longer than 1024 bytes"));
    }
    if name.contains('\0') {
        return Err(unsafe_path(name, "contains NUL"));
    }
    if name.starts_with('/') {
        return Err(unsafe_path(name, "absolute"));
    }
    if name.contains('\\') {
        return Err(unsafe_path(name, "contains a backslash"));
    }
    let parts: Vec<&str> = name.split('/').collect();
    if parts
        .first()
        .is_some_and(|p| p.len() >= 2 && p.as_bytes()[1] == b':')
    {
        return Err(unsafe_path(name, "has a drive prefix"));
    }
    for p in &parts {
        match *p {
            "" => return Err(unsafe_path(name, "has an empty component")),
            "." | ".." => return Err(unsafe_path(name, "has a '.' or '..' component")),
            _ => {}
        }
    }
    Ok(parts)
}

/// Where wire paths land: the data directory, and the directory of each tablespace.
pub struct Target {
    pub root: PathBuf,
    /// Tablespace oid -> the directory its files go to.
    pub tablespaces: HashMap<u32, PathBuf>,
}

impl Target {
    /// The local path for a wire path, checked as described in the module documentation.
    pub fn resolve(&self, name: &str) -> Result<PathBuf, UnsafePath> {
        let parts = components(name)?;
        let (base, rest) = if parts[0] == "pg_tblspc" && parts.len() >= 2 {
            let oid: u32 = parts[1]
                .parse()
                .map_err(|_| unsafe_path(name, "names a tablespace that is not a number"))?;
            if parts.len() == 2 {
                // The tablespace link itself is the receiver's business, never a file.
                return Err(unsafe_path(name, "names a tablespace link"));
            }
            let dir = self.tablespaces.get(&oid).ok_or_else(|| {
                unsafe_path(name, "names a tablespace the backup did not announce")
            })?;
            (dir.clone(), &parts[2..])
        } else {
            (self.root.clone(), &parts[..])
        };
        let mut path = base;
        for p in rest {
            path.push(p);
            if is_symlink(&path) {
                return Err(unsafe_path(name, "leads through a symbolic link"));
            }
        }
        Ok(path)
    }
}

fn is_symlink(p: &Path) -> bool {
    std::fs::symlink_metadata(p)
        .map(|m| m.file_type().is_symlink())
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_escapes() {
        let root = std::env::temp_dir().join(format!("walship-paths-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(root.join("base")).unwrap();
        std::os::unix::fs::symlink("/etc", root.join("base/evil")).unwrap();
        let t = Target {
            root: root.clone(),
            tablespaces: [(16384, root.join("ts"))].into_iter().collect(),
        };
        for bad in [
            "",
            "/etc/passwd",
            "../x",
            "base/../../x",
            "base/./x",
            "base//x",
            "base/x\0y",
            "C:/x",
            "c:x",
            "base\\x",
            "base/evil/passwd",
            "pg_tblspc/99/x",
            "pg_tblspc/abc/x",
            "pg_tblspc/16384",
        ] {
            assert!(t.resolve(bad).is_err(), "{bad:?} accepted");
        }
        assert_eq!(t.resolve("base/5/1259").unwrap(), root.join("base/5/1259"));
        assert_eq!(
            t.resolve("pg_tblspc/16384/PG_15_1/5/16385").unwrap(),
            root.join("ts/PG_15_1/5/16385")
        );
        assert_eq!(
            t.resolve("global/pg_control").unwrap(),
            root.join("global/pg_control")
        );
        std::fs::remove_dir_all(&root).unwrap();
    }
}
