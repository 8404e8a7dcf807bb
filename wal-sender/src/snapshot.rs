//! The snapshot service: a consistent copy of the primary's data directory.
//!
//! Order (see postgres15-notes §1-2): the receiver's slot reserves WAL *before*
//! `pg_backup_start`, so no segment the backup needs can be recycled; `pg_backup_start` and
//! `pg_backup_stop` run in one SQL session that stays open for the whole copy; the data
//! directory is walked with PostgreSQL's base-backup exclusion rules, tablespaces included,
//! and `global/pg_control` goes last. Files that change while they are copied are fine: WAL
//! replay from the start LSN repairs them from full-page images.
//!
//! Wire paths are relative and use `/`: files of the main directory as they are
//! (`base/5/1259`), files of tablespace `oid` under `pg_tblspc/<oid>/`.

use std::collections::{HashMap, HashSet};
use std::fs;
use std::io::{self, Read};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use tracing::{info, warn};
use walship_common::conninfo::Settings;
use walship_common::pgclient;
use walship_common::protocol::{chunk_sum, CHUNK_LEN};

/// Directories whose contents are not copied (the directory itself is).
const EXCLUDE_DIR_CONTENTS: &[&str] = &[
    "pg_stat_tmp",
    "pg_replslot",
    "pg_dynshmem",
    "pg_notify",
    "pg_serial",
    "pg_snapshots",
    "pg_subtrans",
    "pg_wal",
    "pg_tblspc",
];
/// Files never copied, in any directory.
const EXCLUDE_FILES: &[&str] = &[
    "postgresql.auto.conf.tmp",
    "current_logfiles.tmp",
    "backup_label",
    "tablespace_map",
    "backup_manifest",
    "postmaster.pid",
    "postmaster.opts",
];
pub const PG_CONTROL: &str = "global/pg_control";

/// One thing to send.
#[derive(Debug, Clone)]
pub enum Entry {
    Dir {
        rel: String,
        mode: u32,
    },
    File {
        rel: String,
        abs: PathBuf,
        size: u64,
        mode: u32,
    },
}

impl Entry {
    pub fn size(&self) -> u64 {
        match self {
            Entry::Dir { .. } => 0,
            Entry::File { size, .. } => *size,
        }
    }
}

/// Walks the data directory and each tablespace. Directories come before their contents,
/// `global/pg_control` comes last.
pub fn walk(pgdata: &Path, tablespaces: &[(u32, PathBuf)]) -> Result<Vec<Entry>> {
    let mut out = Vec::new();
    walk_dir(pgdata, "", true, &mut out).with_context(|| format!("walk {}", pgdata.display()))?;
    // pg_wal/archive_status is kept empty, as pg_basebackup does; so is pg_wal/summaries
    // (WAL summaries, PostgreSQL 17 and later), where the primary has it.
    if out
        .iter()
        .any(|e| matches!(e, Entry::Dir { rel, .. } if rel == "pg_wal"))
    {
        out.push(Entry::Dir {
            rel: "pg_wal/archive_status".into(),
            mode: 0o700,
        });
        if pgdata.join("pg_wal/summaries").is_dir() {
            out.push(Entry::Dir {
                rel: "pg_wal/summaries".into(),
                mode: 0o700,
            });
        }
    }
    for (oid, location) in tablespaces {
        let prefix = format!("pg_tblspc/{oid}");
        walk_dir(location, &prefix, false, &mut out)
            .with_context(|| format!("walk tablespace {}", location.display()))?;
    }
    // pg_control last: it must describe a state no older than any file copied.
    if let Some(i) = out
        .iter()
        .position(|e| matches!(e, Entry::File { rel, .. } if rel == PG_CONTROL))
    {
        let e = out.remove(i);
        out.push(e);
    } else {
        bail!(
            "{} has no {PG_CONTROL}: is it a PostgreSQL data directory?",
            pgdata.display()
        );
    }
    Ok(out)
}

fn join_rel(prefix: &str, name: &str) -> String {
    if prefix.is_empty() {
        name.to_owned()
    } else {
        format!("{prefix}/{name}")
    }
}

fn walk_dir(dir: &Path, rel: &str, top: bool, out: &mut Vec<Entry>) -> Result<()> {
    let mut names = Vec::new();
    let rd = match fs::read_dir(dir) {
        Ok(rd) => rd,
        // A directory dropped while we walk (DROP DATABASE) is not an error.
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e).with_context(|| format!("list {}", dir.display())),
    };
    for entry in rd {
        let entry = entry?;
        match entry.file_name().into_string() {
            Ok(n) => names.push(n),
            Err(n) => warn!("skipping {:?} in {}: not UTF-8", n, dir.display()),
        }
    }
    names.sort();
    let is_db_dir = !rel.is_empty()
        && rel
            .rsplit('/')
            .next()
            .is_some_and(|n| n.bytes().all(|b| b.is_ascii_digit()));
    let init_forks: HashSet<String> = if is_db_dir {
        names
            .iter()
            .filter_map(|n| n.strip_suffix("_init"))
            .map(str::to_owned)
            .collect()
    } else {
        HashSet::new()
    };
    for name in names {
        if EXCLUDE_FILES.contains(&name.as_str())
            || name.starts_with("pg_internal.init")
            || name.starts_with("pgsql_tmp")
        {
            continue;
        }
        if is_db_dir && skip_relation_file(&name, &init_forks) {
            continue;
        }
        let path = dir.join(&name);
        let rel_path = join_rel(rel, &name);
        let meta = match fs::symlink_metadata(&path) {
            Ok(m) => m,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e).with_context(|| format!("stat {}", path.display())),
        };
        let mode = meta.permissions().mode() & 0o7777;
        let ft = meta.file_type();
        if ft.is_symlink() {
            // pg_wal may be a symlink (initdb -X): send it as an empty directory.
            if top && name == "pg_wal" {
                out.push(Entry::Dir {
                    rel: rel_path,
                    mode: 0o700,
                });
            } else if !(top && name == "pg_tblspc") {
                warn!("skipping symbolic link {}", path.display());
            }
            continue;
        }
        if ft.is_dir() {
            out.push(Entry::Dir {
                rel: rel_path.clone(),
                mode,
            });
            if top && EXCLUDE_DIR_CONTENTS.contains(&name.as_str()) {
                continue;
            }
            walk_dir(&path, &rel_path, false, out)?;
        } else if ft.is_file() {
            out.push(Entry::File {
                rel: rel_path,
                abs: path,
                size: meta.len(),
                mode,
            });
        }
    }
    Ok(())
}

/// Temporary relations (`t<backend>_<relfilenode>...`) and every fork but `_init` of an
/// unlogged relation (one that has an `_init` fork) are not copied.
fn skip_relation_file(name: &str, init_forks: &HashSet<String>) -> bool {
    if let Some(rest) = name.strip_prefix('t') {
        if let Some((backend, _)) = rest.split_once('_') {
            if !backend.is_empty() && backend.bytes().all(|b| b.is_ascii_digit()) {
                return true;
            }
        }
    }
    let relfilenode: String = name.chars().take_while(|c| c.is_ascii_digit()).collect();
    !relfilenode.is_empty() && init_forks.contains(&relfilenode) && !name.ends_with("_init")
}

/// Reads a file chunk by chunk. The size noted during the walk is the most that is sent:
/// a file that grew is cut there (WAL replay brings the rest), a file that shrank ends early.
pub struct ChunkReader {
    file: Option<fs::File>,
    remaining: u64,
    pub offset: u64,
}

impl ChunkReader {
    /// `Ok(None)` when the file disappeared since the walk (a dropped relation).
    pub fn open(abs: &Path, size: u64) -> Result<ChunkReader> {
        let file = match fs::File::open(abs) {
            Ok(f) => Some(f),
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            Err(e) => return Err(e).with_context(|| format!("open {}", abs.display())),
        };
        Ok(ChunkReader {
            file,
            remaining: size,
            offset: 0,
        })
    }

    /// The next chunk, empty at the end.
    pub fn next_chunk(&mut self) -> Result<Vec<u8>> {
        let Some(f) = self.file.as_mut() else {
            return Ok(Vec::new());
        };
        let want = self.remaining.min(CHUNK_LEN) as usize;
        let mut buf = vec![0u8; want];
        let mut got = 0;
        while got < want {
            let n = f.read(&mut buf[got..])?;
            if n == 0 {
                break;
            }
            got += n;
        }
        buf.truncate(got);
        if got < want {
            self.remaining = 0;
        } else {
            self.remaining -= got as u64;
        }
        self.offset += got as u64;
        Ok(buf)
    }
}

/// The receiver's staged chunks from an earlier attempt, by wire path.
#[derive(Default)]
pub struct Have {
    sums: HashMap<String, Vec<u64>>,
    total: usize,
}

/// Most staged chunk checksums a receiver may announce (4 TiB of data at 1 MiB chunks).
pub const MAX_HAVE_CHUNKS: usize = 4 << 20;

impl Have {
    pub fn add(&mut self, path: String, sums: Vec<u64>) -> Result<()> {
        self.total = self.total.saturating_add(sums.len());
        if self.total > MAX_HAVE_CHUNKS {
            bail!("receiver announced more than {MAX_HAVE_CHUNKS} staged chunks");
        }
        self.sums.entry(path).or_default().extend(sums);
        Ok(())
    }

    /// Whether the receiver already holds exactly `data` at chunk `index` of `path`.
    pub fn holds(&self, path: &str, index: u64, data: &[u8]) -> bool {
        self.sums
            .get(path)
            .and_then(|s| s.get(index as usize))
            .is_some_and(|&sum| sum == chunk_sum(data))
    }

    pub fn is_empty(&self) -> bool {
        self.sums.is_empty()
    }
}

/// The database of the snapshot's SQL session when the connection string names none: one
/// that exists in every cluster, as pg_basebackup's connections need none.
pub const DEFAULT_DBNAME: &str = "postgres";

/// Opens the SQL session that starts and stops a backup, on the connection string's
/// `dbname` (or `PGDATABASE`), else [`DEFAULT_DBNAME`].
pub async fn sql_session(pg: &Settings, receiver: &str) -> Result<pgclient::SqlSession> {
    Ok(pgclient::connect_sql(
        pg,
        DEFAULT_DBNAME,
        Some(&format!("walship_{receiver}_snapshot")),
    )
    .await?)
}

/// The data directory cannot be read here: a setting retrying cannot fix.
#[derive(Debug, thiserror::Error)]
#[error("cannot read {}/{PG_CONTROL}: run wal-sender on the primary's host as a user that can read its data directory, or pass --pgdata", .0.display())]
pub struct DataDirUnreadable(pub PathBuf);

/// Resolves the data directory: `--pgdata`, or the server's `data_directory`.
pub async fn data_directory(
    sql: &tokio_postgres::Client,
    configured: Option<&Path>,
) -> Result<PathBuf> {
    let dir = match configured {
        Some(d) => d.to_owned(),
        None => {
            let row = sql
                .query_one("SHOW data_directory", &[])
                .await
                .context("SHOW data_directory")?;
            PathBuf::from(row.get::<_, String>(0))
        }
    };
    if !dir.join(PG_CONTROL).exists() {
        return Err(DataDirUnreadable(dir).into());
    }
    Ok(dir)
}

/// The primary's tablespaces other than pg_default and pg_global.
pub async fn tablespaces(sql: &tokio_postgres::Client) -> Result<Vec<(u32, PathBuf)>> {
    let rows = sql
        .query("SELECT oid::int8, pg_tablespace_location(oid) FROM pg_tablespace WHERE spcname NOT IN ('pg_default', 'pg_global') ORDER BY oid", &[])
        .await
        .context("list tablespaces")?;
    Ok(rows
        .iter()
        .map(|r| {
            (
                r.get::<_, i64>(0) as u32,
                PathBuf::from(r.get::<_, String>(1)),
            )
        })
        .collect())
}

pub fn log_walk(entries: &[Entry]) {
    let files = entries
        .iter()
        .filter(|e| matches!(e, Entry::File { .. }))
        .count();
    let bytes: u64 = entries.iter().map(Entry::size).sum();
    info!(files, bytes, "data directory walked");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relation_file_rules() {
        let init: HashSet<String> = ["16390".to_string()].into_iter().collect();
        assert!(skip_relation_file("t3_16400", &init));
        assert!(skip_relation_file("t12_16400.1", &init));
        assert!(!skip_relation_file("tx", &init));
        assert!(skip_relation_file("16390", &init));
        assert!(skip_relation_file("16390_fsm", &init));
        assert!(skip_relation_file("16390.2", &init));
        assert!(!skip_relation_file("16390_init", &init));
        assert!(!skip_relation_file("16391", &init));
        assert!(!skip_relation_file("PG_VERSION", &init));
    }

    #[test]
    fn walk_applies_exclusions_and_puts_pg_control_last() {
        let d = std::env::temp_dir().join(format!("walship-walk-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        for sub in [
            "global",
            "base/5",
            "pg_wal/archive_status",
            "pg_wal/summaries",
            "pg_stat_tmp",
            "pg_tblspc",
            "base/5/pgsql_tmp",
        ] {
            fs::create_dir_all(d.join(sub)).unwrap();
        }
        for f in [
            "global/pg_control",
            "global/1262",
            "PG_VERSION",
            "postmaster.pid",
            "backup_label",
            "pg_wal/000000010000000000000001",
            "pg_wal/summaries/0000000100000000010000280000000001000100.summary",
            "pg_stat_tmp/x.stat",
            "base/5/1259",
            "base/5/pg_internal.init",
            "base/5/t3_99",
            "base/5/700",
            "base/5/700_init",
            "base/5/700_fsm",
            "base/5/pgsql_tmp/pgsql_tmp1.0",
        ] {
            fs::write(d.join(f), b"x").unwrap();
        }
        let entries = walk(&d, &[]).unwrap();
        let rels: Vec<String> = entries
            .iter()
            .map(|e| match e {
                Entry::Dir { rel, .. } => format!("{rel}/"),
                Entry::File { rel, .. } => rel.clone(),
            })
            .collect();
        assert_eq!(rels.last().unwrap(), PG_CONTROL);
        for want in [
            "PG_VERSION",
            "global/1262",
            "base/5/1259",
            "base/5/700_init",
            "pg_wal/",
            "pg_wal/archive_status/",
            "pg_wal/summaries/",
            "pg_stat_tmp/",
        ] {
            assert!(
                rels.contains(&want.to_string()),
                "{want} missing from {rels:?}"
            );
        }
        for unwanted in [
            "postmaster.pid",
            "backup_label",
            "pg_wal/000000010000000000000001",
            "pg_wal/summaries/0000000100000000010000280000000001000100.summary",
            "pg_stat_tmp/x.stat",
            "base/5/pg_internal.init",
            "base/5/t3_99",
            "base/5/700",
            "base/5/700_fsm",
            "base/5/pgsql_tmp/",
        ] {
            assert!(
                !rels.contains(&unwanted.to_string()),
                "{unwanted} copied: {rels:?}"
            );
        }
        fs::remove_dir_all(&d).unwrap();
    }
}
