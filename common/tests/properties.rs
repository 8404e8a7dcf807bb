//! Property tests (a fuzzing pass) for what walship reads from the network: the frame
//! decoder and the handshake and protocol messages; and from directories: WAL file names,
//! timeline history files.
//!
//! `scripts/test.sh` runs the default number of cases; `scripts/fuzz.sh` sets
//! `PROPTEST_CASES` much higher.

use proptest::prelude::*;
use walship_common::frame::{FrameDecoder, FrameEncoder, HEADER_LEN, MAX_RAW_LEN};
use walship_common::protocol::{ErrorCode, Message, Mode, CHUNK_LEN, PROTOCOL_VERSION};
use walship_common::timeline::History;
use walship_common::{Lsn, TimelineId, WalFileName, WalSegSize};

fn encode_all(msgs: &[Message]) -> Vec<u8> {
    let mut enc = FrameEncoder::new(1).unwrap();
    let mut out = Vec::new();
    for m in msgs {
        m.encode(&mut enc, &mut out).unwrap();
    }
    out
}

/// Decodes a stream of frames, as a receiver or sender would, until the first error.
fn decode_stream(bytes: &[u8]) -> (Vec<Message>, bool) {
    let mut dec = FrameDecoder::new().unwrap();
    let mut rest = bytes;
    let mut msgs = Vec::new();
    while !rest.is_empty() {
        let Ok(frame) = dec.decode_buf(rest) else {
            return (msgs, false);
        };
        // Decompression never produces more than the frame may carry.
        assert!(frame.payload.len() <= MAX_RAW_LEN as usize);
        rest = &rest[frame.wire_bytes as usize..];
        match Message::decode(&frame) {
            Ok(m) => msgs.push(m),
            Err(_) => return (msgs, false),
        }
    }
    (msgs, true)
}

fn lsn() -> impl Strategy<Value = Lsn> {
    any::<u64>().prop_map(Lsn)
}

fn text() -> impl Strategy<Value = String> {
    proptest::string::string_regex("[ -~]{0,80}").unwrap()
}

fn message() -> impl Strategy<Value = Message> {
    prop_oneof![
        (any::<u16>(), "[a-z0-9_]{1,20}", any::<bool>()).prop_map(|(version, name, b)| {
            Message::Hello {
                version,
                name,
                mode: if b { Mode::Bootstrap } else { Mode::Follow },
            }
        }),
        (
            any::<u64>(),
            any::<u32>(),
            any::<u32>(),
            lsn(),
            text(),
            any::<bool>()
        )
            .prop_map(
                |(system_id, timeline, seg_size, flush_lsn, server_version, in_recovery)| {
                    Message::ServerInfo {
                        version: PROTOCOL_VERSION,
                        system_id,
                        timeline,
                        seg_size,
                        flush_lsn,
                        server_version,
                        in_recovery,
                    }
                }
            ),
        any::<u32>().prop_map(|timeline| Message::GetHistory { timeline }),
        (any::<u32>(), proptest::collection::vec(any::<u8>(), 0..200))
            .prop_map(|(timeline, content)| Message::History { timeline, content }),
        (any::<u32>(), lsn()).prop_map(|(next_timeline, switch_lsn)| Message::EndOfTimeline {
            next_timeline,
            switch_lsn
        }),
        (lsn(), any::<u32>()).prop_map(|(start_lsn, timeline)| Message::StartStream {
            start_lsn,
            timeline
        }),
        (
            lsn(),
            lsn(),
            proptest::collection::vec(any::<u8>(), 0..4096)
        )
            .prop_map(|(start_lsn, server_flush_lsn, data)| Message::WalData {
                start_lsn,
                server_flush_lsn,
                data,
            }),
        lsn().prop_map(|server_flush_lsn| Message::Keepalive { server_flush_lsn }),
        // The decoder refuses an acknowledgement whose flush is past its write.
        (lsn(), lsn()).prop_map(|(a, b)| Message::Ack {
            write_lsn: a.max(b),
            flush_lsn: a.min(b),
        }),
        (
            lsn(),
            any::<u32>(),
            any::<u32>(),
            any::<u32>(),
            any::<u32>()
        )
            .prop_map(
                |(apply_lsn, xmin, xmin_epoch, catalog_xmin, catalog_xmin_epoch)| {
                    Message::StandbyFeedback {
                        apply_lsn,
                        xmin,
                        xmin_epoch,
                        catalog_xmin,
                        catalog_xmin_epoch,
                    }
                }
            ),
        (1u16..=6, text()).prop_map(|(c, message)| Message::Error {
            code: ErrorCode::from_u16(c),
            message
        }),
        (text(), proptest::collection::vec(any::<u64>(), 0..64))
            .prop_map(|(path, sums)| Message::Have { path, sums }),
        Just(Message::StartBackup),
        (
            lsn(),
            any::<u32>(),
            any::<u64>(),
            any::<u64>(),
            proptest::collection::vec((any::<u32>(), text()), 0..4)
        )
            .prop_map(
                |(start_lsn, timeline, total_bytes, file_count, tablespaces)| {
                    Message::BackupStart {
                        start_lsn,
                        timeline,
                        total_bytes,
                        file_count,
                        tablespaces,
                    }
                }
            ),
        (text(), any::<u32>()).prop_map(|(path, mode)| Message::Dir { path, mode }),
        (text(), any::<u64>(), any::<u32>()).prop_map(|(path, size, mode)| Message::FileBegin {
            path,
            size,
            mode
        }),
        (
            any::<u64>(),
            proptest::collection::vec(any::<u8>(), 0..4096)
        )
            .prop_map(|(offset, data)| Message::FileData { offset, data }),
        (any::<u64>(), 0..=CHUNK_LEN as u32)
            .prop_map(|(offset, len)| Message::FileSame { offset, len }),
        (any::<u64>(), any::<u32>()).prop_map(|(size, crc32c)| Message::FileEnd { size, crc32c }),
        (lsn(), text(), text()).prop_map(|(stop_lsn, backup_label, tablespace_map)| {
            Message::BackupEnd {
                stop_lsn,
                backup_label,
                tablespace_map,
            }
        }),
    ]
}

proptest! {
    /// Every message survives the wire unchanged, alone and in a stream that shares one
    /// compression context.
    #[test]
    fn messages_round_trip(msgs in proptest::collection::vec(message(), 1..8)) {
        let bytes = encode_all(&msgs);
        let (got, ok) = decode_stream(&bytes);
        prop_assert!(ok);
        prop_assert_eq!(got, msgs);
    }

    /// Arbitrary bytes never panic the decoder and never yield a message.
    #[test]
    fn garbage_is_refused_without_panic(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
        let (msgs, _) = decode_stream(&bytes);
        // Without the magic and both checksums, garbage cannot pass as a frame.
        prop_assert!(msgs.is_empty() || bytes.starts_with(b"WS"));
    }

    /// A damaged stream never yields a message that was not sent: either an error comes
    /// first, or what was decoded is a prefix of what was sent.
    #[test]
    fn damage_never_yields_a_wrong_message(
        msgs in proptest::collection::vec(message(), 1..6),
        flips in proptest::collection::vec((any::<prop::sample::Index>(), 0u8..8), 1..4),
    ) {
        let mut bytes = encode_all(&msgs);
        for (at, bit) in &flips {
            let i = at.index(bytes.len());
            bytes[i] ^= 1 << bit;
        }
        let (got, ok) = decode_stream(&bytes);
        prop_assert!(!ok || got == msgs, "damage went unnoticed");
        prop_assert!(got.len() <= msgs.len());
        prop_assert_eq!(&got[..], &msgs[..got.len()]);
    }

    /// Truncation anywhere is noticed: the decoded messages are a strict prefix.
    #[test]
    fn truncation_is_noticed(msgs in proptest::collection::vec(message(), 1..6), cut in any::<prop::sample::Index>()) {
        let bytes = encode_all(&msgs);
        let len = cut.index(bytes.len());
        let (got, ok) = decode_stream(&bytes[..len]);
        prop_assert!(got.len() < msgs.len());
        prop_assert_eq!(&got[..], &msgs[..got.len()]);
        // Only a cut exactly between frames decodes cleanly.
        prop_assert!(!ok || encode_all(&msgs[..got.len()]).len() == len);
    }

    /// A frame header with any lengths is refused or accepted before the body is read,
    /// and a refused one never makes the decoder allocate what it announces.
    #[test]
    fn any_header_is_handled(header in proptest::array::uniform20(any::<u8>()), body in proptest::collection::vec(any::<u8>(), 0..256)) {
        let mut bytes = header.to_vec();
        bytes[0..2].copy_from_slice(b"WS");
        bytes.extend_from_slice(&body);
        let mut dec = FrameDecoder::new().unwrap();
        if let Ok(frame) = dec.decode_buf(&bytes) {
            prop_assert!(frame.wire_bytes as usize <= bytes.len());
            prop_assert!(frame.wire_bytes as usize >= HEADER_LEN);
            prop_assert!(frame.payload.len() <= MAX_RAW_LEN as usize);
        }
    }
}

/// Names that look like WAL file names: 8 to 40 characters of upper- and lower-case hex
/// digits and a few multi-byte characters (which once made a 24-byte name panic the
/// parser), with or without a suffix a WAL directory holds.
fn wal_like_name() -> impl Strategy<Value = String> {
    let ch = prop_oneof![
        8 => proptest::sample::select("0123456789ABCDEFabcdef".chars().collect::<Vec<_>>()),
        1 => proptest::sample::select(vec!['\u{e9}', '\u{20ac}', '\u{1f600}', '\u{fffd}', '\0', '/', '.']),
    ];
    let suffix = proptest::sample::select(vec!["", ".partial", ".zst", ".history", ".tmp"]);
    (proptest::collection::vec(ch, 8..=40), suffix)
        .prop_map(|(chars, suffix)| chars.into_iter().collect::<String>() + suffix)
}

fn seg_size() -> impl Strategy<Value = WalSegSize> {
    (20u32..=30).prop_map(|shift| WalSegSize::new(1 << shift).unwrap())
}

/// Every name the parser accepts is exactly the name it builds back.
fn check_wal_name(name: &str, seg: WalSegSize) -> Result<(), TestCaseError> {
    if let Some(parsed) = WalFileName::parse(name, seg) {
        prop_assert!(name.is_ascii());
        prop_assert_eq!(parsed.to_name(seg), name);
    }
    Ok(())
}

proptest! {
    /// Any string, as a directory or a command line may hold: no panic, and only exact
    /// names are accepted.
    #[test]
    fn any_string_is_a_wal_file_name_or_refused(name in any::<String>(), seg in seg_size()) {
        check_wal_name(&name, seg)?;
    }

    /// Names close to WAL file names, with multi-byte characters where the name is cut
    /// into fields.
    #[test]
    fn wal_like_names_are_parsed_or_refused(name in wal_like_name(), seg in seg_size()) {
        check_wal_name(&name, seg)?;
        for suffix in [".partial", ".zst"] {
            if let Some(base) = name.strip_suffix(suffix) {
                check_wal_name(base, seg)?;
            }
        }
    }

    /// Every valid name is accepted.
    #[test]
    fn built_names_parse_back(tli in 1u32.., segno in any::<u64>(), seg in seg_size()) {
        let segno = walship_common::SegmentNo(segno % (u64::MAX / seg.bytes()));
        for f in [WalFileName::Segment { timeline: TimelineId(tli), segno }, WalFileName::History(TimelineId(tli))] {
            prop_assert_eq!(WalFileName::parse(&f.to_name(seg), seg), Some(f));
        }
    }

    /// Positions and history files read from disk: any text is parsed or refused.
    #[test]
    fn any_text_is_a_position_or_a_history_or_refused(text in any::<String>(), tli in 1u32..) {
        if let Ok(lsn) = text.parse::<Lsn>() {
            prop_assert_eq!(lsn.to_string().parse::<Lsn>().unwrap(), lsn);
        }
        let _ = WalSegSize::parse_setting(&text);
        let _ = History::parse(TimelineId(tli), text.as_bytes());
    }

    /// Times from a command line: parsed or refused, never a panic; an accepted time is
    /// written for PostgreSQL and read back to the same microsecond.
    #[test]
    fn any_string_is_a_time_or_refused(text in any::<String>()) {
        if let Ok(t) = walship_common::pgtime::parse(&text) {
            let written = walship_common::pgtime::to_postgres(t).unwrap();
            prop_assert_eq!(walship_common::pgtime::parse(&written), Ok(t));
        }
    }

    /// Times in the forms people write, with any offset and fraction: the form PostgreSQL
    /// is given names the same instant.
    #[test]
    fn written_times_name_the_same_instant(
        secs in 0i64..253_402_300_799,
        micros in 0i64..1_000_000,
        offset_min in -15 * 60i64..=15 * 60,
        form in 0usize..4,
    ) {
        let pg = (secs * 1_000_000 + micros) - walship_common::pgtime::PG_EPOCH_OFFSET_US;
        let local = civil_from_unix(secs + offset_min * 60);
        let sign = if offset_min < 0 { '-' } else { '+' };
        let (oh, om) = (offset_min.abs() / 60, offset_min.abs() % 60);
        let frac = format!(".{micros:06}");
        let text = match form {
            0 => format!("{}T{}{frac}{sign}{oh:02}:{om:02}", local.0, local.1),
            1 => format!("{} {}{frac}{sign}{oh:02}{om:02}", local.0, local.1),
            2 => format!("{} {}{frac} {sign}{oh:02}:{om:02}", local.0, local.1),
            _ => format!("{} {}{frac}{sign}{oh:02}:{om:02}", local.0, local.1),
        };
        if (1..=9999).contains(&local.2) {
            prop_assert_eq!(walship_common::pgtime::parse(&text), Ok(pg), "{}", text);
        }
    }
}

/// A Unix time as `(YYYY-MM-DD, HH:MM:SS, year)`, computed without a date library (Howard
/// Hinnant's civil-from-days), to check the parser against an independent oracle.
fn civil_from_unix(unix: i64) -> (String, String, i64) {
    let days = unix.div_euclid(86_400);
    let rem = unix.rem_euclid(86_400);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    (
        format!("{y:04}-{m:02}-{d:02}"),
        format!("{:02}:{:02}:{:02}", rem / 3600, rem % 3600 / 60, rem % 60),
        y,
    )
}
