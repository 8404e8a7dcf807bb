//! Property tests (a fuzzing pass) for what the receiver reads from disk and from a
//! snapshot: the state file and file names.
//!
//! `scripts/test.sh` runs the default number of cases; `scripts/fuzz.sh` sets
//! `PROPTEST_CASES` much higher.

use std::collections::HashMap;
use std::path::{Component, Path, PathBuf};

use proptest::prelude::*;
use wal_receiver::paths::{components, Target};
use wal_receiver::store::{StoreState, STATE_LEN};
use walship_common::{Lsn, TimelineId, WalSegSize};

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

proptest! {
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
