//! Property tests (a fuzzing pass) for what the receiver reads from disk and from a
//! snapshot: the state file, the names of the files in a WAL store, and file names.
//!
//! `scripts/test.sh` runs the default number of cases; `scripts/fuzz.sh` sets
//! `PROPTEST_CASES` much higher.

use std::collections::HashMap;
use std::path::{Component, Path, PathBuf};

use proptest::prelude::*;
use wal_receiver::paths::{components, Target};
use wal_receiver::store::{StoreFile, StoreState, PARTIAL_SUFFIX, SEALED_SUFFIX, STATE_LEN};
use walship_common::{Lsn, TimelineId, WalFileName, WalSegSize};

fn state() -> impl Strategy<Value = StoreState> {
    (
        any::<u64>(),
        1u32..,
        20u32..=30,
        any::<u32>(),
        any::<u64>(),
        any::<u64>(),
        any::<u64>(),
    )
        .prop_map(
            |(system_id, tl, shift, pg_version, flush, raw_bytes, wire_bytes)| StoreState {
                system_id,
                timeline: TimelineId(tl),
                seg_size: WalSegSize::new(1 << shift).unwrap(),
                pg_version,
                flush_lsn: Lsn(flush),
                raw_bytes,
                wire_bytes,
            },
        )
}

/// Names that look like snapshot paths, with the pieces an attacker would use.
fn name() -> impl Strategy<Value = String> {
    let part = prop_oneof![
        Just("..".to_owned()),
        Just(".".to_owned()),
        Just(String::new()),
        Just("pg_tblspc".to_owned()),
        Just("16384".to_owned()),
        Just("C:".to_owned()),
        Just("a\\..".to_owned()),
        Just("x\0".to_owned()),
        "[a-z0-9_.]{1,12}",
    ];
    (any::<bool>(), proptest::collection::vec(part, 1..6)).prop_map(|(abs, parts)| {
        let joined = parts.join("/");
        if abs {
            format!("/{joined}")
        } else {
            joined
        }
    })
}

/// Names that look like those in a WAL store: 8 to 40 characters of hex digits and a few
/// multi-byte characters (a 24-byte such name once panicked `status`, `restore-wal` and
/// `follow`), with or without the suffixes a store holds.
fn store_like_name() -> impl Strategy<Value = String> {
    let ch = prop_oneof![
        8 => proptest::sample::select("0123456789ABCDEFabcdef".chars().collect::<Vec<_>>()),
        1 => proptest::sample::select(vec!['\u{e9}', '\u{20ac}', '\u{1f600}', '\u{fffd}', '.']),
    ];
    let suffix = proptest::sample::select(vec!["", ".partial", ".zst", ".history", ".tmp"]);
    (proptest::collection::vec(ch, 8..=40), suffix)
        .prop_map(|(chars, suffix)| chars.into_iter().collect::<String>() + suffix)
}

/// The name `f` has in a store.
fn store_name(f: StoreFile, seg: WalSegSize) -> String {
    match f {
        StoreFile::Sealed { timeline, segno } => {
            WalFileName::Segment { timeline, segno }.to_name(seg) + SEALED_SUFFIX
        }
        StoreFile::Partial { timeline, segno } => {
            WalFileName::Segment { timeline, segno }.to_name(seg) + PARTIAL_SUFFIX
        }
        StoreFile::History(t) => WalFileName::History(t).to_name(seg),
    }
}

fn seg_size() -> impl Strategy<Value = WalSegSize> {
    (20u32..=30).prop_map(|shift| WalSegSize::new(1 << shift).unwrap())
}

proptest! {
    /// Any name in a store's directory: no panic, and only the exact names of segments and
    /// history files are taken for them.
    #[test]
    fn any_name_in_a_store_is_known_or_ignored(name in any::<String>(), seg in seg_size()) {
        if let Some(f) = StoreFile::parse(&name, seg) {
            prop_assert_eq!(store_name(f, seg), name);
        }
    }

    /// Names close to a store's own, with multi-byte characters where they are cut.
    #[test]
    fn store_like_names_are_known_or_ignored(name in store_like_name(), seg in seg_size()) {
        if let Some(f) = StoreFile::parse(&name, seg) {
            prop_assert!(name.is_ascii());
            prop_assert_eq!(store_name(f, seg), name);
        }
    }

    /// Every name a store holds is known for what it is.
    #[test]
    fn store_names_parse_back(tli in 1u32.., segno in any::<u64>(), seg in seg_size(), kind in 0u8..3) {
        let (timeline, segno) = (TimelineId(tli), walship_common::SegmentNo(segno % (u64::MAX / seg.bytes())));
        let f = match kind {
            0 => StoreFile::Sealed { timeline, segno },
            1 => StoreFile::Partial { timeline, segno },
            _ => StoreFile::History(timeline),
        };
        prop_assert_eq!(StoreFile::parse(&store_name(f, seg), seg), Some(f));
    }

    /// Any 512 bytes: a refusal, or a state that encodes back to exactly those bytes.
    #[test]
    fn state_parser_accepts_only_canonical_records(bytes in proptest::collection::vec(any::<u8>(), STATE_LEN)) {
        if let Ok(st) = StoreState::decode(&bytes) {
            prop_assert_eq!(&st.encode()[..], &bytes[..]);
        }
    }

    /// Every valid state round-trips, and any single damaged byte is refused.
    #[test]
    fn state_damage_is_refused(st in state(), at in 0..STATE_LEN, xor in 1u8..) {
        let bytes = st.encode();
        prop_assert_eq!(StoreState::decode(&bytes).unwrap(), st);
        let mut bad = bytes;
        bad[at] ^= xor;
        prop_assert!(StoreState::decode(&bad).is_err());
    }

    /// A name that passes the checks has only plain components.
    #[test]
    fn accepted_names_are_plain(name in name()) {
        if let Ok(parts) = components(&name) {
            prop_assert!(!name.starts_with('/'));
            for p in parts {
                prop_assert!(!p.is_empty() && p != "." && p != "..");
                prop_assert!(!p.contains(['/', '\\', '\0']));
            }
        }
    }

    /// Whatever the name, a resolved path stays inside the data directory or an announced
    /// tablespace directory.
    #[test]
    fn resolved_paths_stay_inside(name in name()) {
        let target = Target {
            root: PathBuf::from("/target/data"),
            tablespaces: HashMap::from([(16384, PathBuf::from("/target/ts"))]),
        };
        if let Ok(p) = target.resolve(&name) {
            prop_assert!(
                p.starts_with("/target/data") || p.starts_with("/target/ts"),
                "{} escaped", p.display()
            );
            prop_assert!(!p.components().any(|c| matches!(c, Component::ParentDir)));
            prop_assert!(p != Path::new("/target/data") && p != Path::new("/target/ts"));
        }
    }
}
