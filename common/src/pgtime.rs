//! PostgreSQL's timestamps (`TimestampTz`): microseconds since 2000-01-01 00:00:00 UTC; and
//! times as people write them.
//!
//! [`parse`] takes a time the way an operator writes one for `--target-time`: RFC 3339, or
//! the forms PostgreSQL's own `recovery_target_time` takes (a `timestamp with time zone`).
//! A time must say its zone: one without is refused, since the zone it meant (this host's,
//! the server's, UTC) cannot be known. [`to_postgres`] writes a time back in the one form
//! PostgreSQL reads the same whatever its settings (UTC, `+00`), and [`to_rfc3339`] shows
//! one to people.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jiff::civil::DateTime;
use jiff::tz::TimeZone;
use jiff::{Timestamp, Unit};

/// Microseconds from the Unix epoch to PostgreSQL's.
pub const PG_EPOCH_OFFSET_US: i64 = 946_684_800_000_000;

/// `t` as a PostgreSQL timestamp (saturating far outside its range).
pub fn from_system(t: SystemTime) -> i64 {
    let unix_us = match t.duration_since(UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_micros()).unwrap_or(i64::MAX),
        Err(e) => i64::try_from(e.duration().as_micros()).map_or(i64::MIN, |us| -us),
    };
    unix_us.saturating_sub(PG_EPOCH_OFFSET_US)
}

/// A PostgreSQL timestamp as a `SystemTime` (times before 1970 become 1970).
pub fn to_system(pg: i64) -> SystemTime {
    let unix_us = pg.saturating_add(PG_EPOCH_OFFSET_US).max(0);
    UNIX_EPOCH + Duration::from_micros(unix_us as u64)
}

/// Now, as a PostgreSQL timestamp.
pub fn now() -> i64 {
    from_system(SystemTime::now())
}

/// Why a time was refused by [`parse`].
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum TimeError {
    #[error("{0:?} has no time zone; say which one, e.g. 2026-12-02T10:36:22Z (UTC) or 2026-12-02 10:36:22+02:00")]
    NoZone(String),
    #[error("{0:?} names the zone by an abbreviation, which is ambiguous; give an offset (+01:00) or a full zone name (Europe/Paris)")]
    Abbreviation(String),
    #[error("{0:?} is not a time PostgreSQL accepts as a recovery target (special values such as now are refused)")]
    Special(String),
    #[error("{0:?} is outside the years 1 to 9999 (UTC)")]
    OutOfRange(String),
    #[error("{given:?} is not a time: {why}; write it as 2026-12-02T10:36:22Z or 2026-12-02 10:36:22+02:00")]
    Invalid { given: String, why: String },
}

/// Parses a time that names its zone, as a PostgreSQL timestamp rounded to the microsecond
/// (PostgreSQL's resolution). Accepted:
///
/// - RFC 3339: `2026-12-02T10:36:22Z`, `2026-12-02T10:36:22.5+02:00` (`T` or a space);
/// - PostgreSQL's ISO forms: an offset of hours (`+02`), hours and minutes (`+02:00`,
///   `+0200`), after the time or a space after it; `UTC`, `GMT` or `Z` after a space;
/// - a full IANA zone name after a space (`2026-12-02 10:36:22 Europe/Helsinki`), or as an
///   RFC 9557 annotation (`2026-12-02T10:36:22+02:00[Europe/Helsinki]`).
///
/// Refused: a time without a zone, a zone abbreviation other than UTC and GMT (PostgreSQL
/// and the IANA database disagree on some, such as `CET` in summer), PostgreSQL's special
/// values (`now`, `today`...), and years outside 1 to 9999.
pub fn parse(given: &str) -> Result<i64, TimeError> {
    let s = given.trim();
    let invalid = |why: String| TimeError::Invalid {
        given: given.to_owned(),
        why,
    };
    if [
        "now",
        "today",
        "tomorrow",
        "yesterday",
        "epoch",
        "infinity",
        "-infinity",
    ]
    .iter()
    .any(|w| s.eq_ignore_ascii_case(w))
    {
        return Err(TimeError::Special(given.to_owned()));
    }
    let ts = match s.rsplit_once(char::is_whitespace) {
        // A zone or offset written after a space.
        Some((civil, zone)) if is_zone_like(zone) => {
            let civil = civil.trim_end();
            if zone.starts_with(['+', '-']) {
                format!("{civil}{zone}")
                    .parse::<Timestamp>()
                    .map_err(|e| invalid(e.to_string()))?
            } else {
                let dt: DateTime = civil
                    .parse()
                    .map_err(|e: jiff::Error| invalid(e.to_string()))?;
                let tz = if ["UTC", "GMT", "Z"]
                    .iter()
                    .any(|u| zone.eq_ignore_ascii_case(u))
                {
                    TimeZone::UTC
                } else if zone.contains('/') {
                    TimeZone::get(zone).map_err(|e| invalid(e.to_string()))?
                } else {
                    return Err(TimeError::Abbreviation(given.to_owned()));
                };
                dt.to_zoned_datetime(tz)
                    .map_err(|e| invalid(e.to_string()))?
                    .timestamp()
            }
        }
        _ => match s.parse::<Timestamp>() {
            Ok(ts) => ts,
            // Parses without a zone: it has none.
            Err(_) if s.parse::<DateTime>().is_ok() => {
                return Err(TimeError::NoZone(given.to_owned()))
            }
            Err(e) => return Err(invalid(e.to_string())),
        },
    };
    let ts = ts
        .round(Unit::Microsecond)
        .map_err(|_| TimeError::OutOfRange(given.to_owned()))?;
    let year = ts.to_zoned_datetime(TimeZone::UTC).year();
    if !(1..=9999).contains(&year) {
        return Err(TimeError::OutOfRange(given.to_owned()));
    }
    Ok(ts.as_microsecond() - PG_EPOCH_OFFSET_US)
}

/// Whether the last word of a time is meant as its zone: an offset (`+02`, `-05:30`), or
/// a name (`UTC`, `Europe/Paris`, `CET`), but not a time of day (`10:36:22`).
fn is_zone_like(word: &str) -> bool {
    match word.strip_prefix(['+', '-']) {
        Some(rest) => !rest.is_empty() && rest.bytes().all(|b| b.is_ascii_digit() || b == b':'),
        None => {
            word.bytes().next().is_some_and(|b| b.is_ascii_alphabetic())
                && word
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"/_+-".contains(&b))
        }
    }
}

/// A PostgreSQL timestamp in UTC.
fn utc(pg: i64) -> Option<jiff::ZonedDateTime> {
    let ts = Timestamp::from_microsecond(pg.checked_add(PG_EPOCH_OFFSET_US)?).ok()?;
    Some(ts.to_zoned_datetime(TimeZone::UTC))
}

/// A PostgreSQL timestamp as PostgreSQL reads it unambiguously, whatever its `TimeZone` and
/// `DateStyle`: ISO 8601 in UTC with an explicit `+00`, e.g. `2026-12-02 08:36:22.5+00`.
/// `None` outside jiff's range (years -9999 to 9999).
pub fn to_postgres(pg: i64) -> Option<String> {
    let t = utc(pg)?;
    let us = pg.rem_euclid(1_000_000);
    let frac = if us == 0 {
        String::new()
    } else {
        format!(".{us:06}").trim_end_matches('0').to_owned()
    };
    Some(format!(
        "{:04}-{:02}-{:02} {:02}:{:02}:{:02}{frac}+00",
        t.year(),
        t.month(),
        t.day(),
        t.hour(),
        t.minute(),
        t.second()
    ))
}

/// A PostgreSQL timestamp in RFC 3339, UTC, e.g. `2026-12-02T08:36:22.5Z`; as `pg` (a
/// number of microseconds) outside jiff's range.
pub fn to_rfc3339(pg: i64) -> String {
    match pg
        .checked_add(PG_EPOCH_OFFSET_US)
        .and_then(|us| Timestamp::from_microsecond(us).ok())
    {
        Some(ts) => ts.to_string(),
        None => format!("{pg} (microseconds since 2000-01-01 UTC)"),
    }
}

/// Seconds since the Unix epoch in RFC 3339, UTC, e.g. `2026-12-02T08:36:22Z`.
pub fn unix_to_rfc3339(secs: u64) -> String {
    match i64::try_from(secs)
        .ok()
        .and_then(|s| Timestamp::from_second(s).ok())
    {
        Some(ts) => ts.to_string(),
        None => format!("{secs} (seconds since 1970-01-01 UTC)"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn converts_both_ways() {
        assert_eq!(from_system(UNIX_EPOCH), -PG_EPOCH_OFFSET_US);
        let pg_epoch = UNIX_EPOCH + Duration::from_secs(946_684_800);
        assert_eq!(from_system(pg_epoch), 0);
        assert_eq!(to_system(0), pg_epoch);
        let t = pg_epoch + Duration::from_micros(123_456_789);
        assert_eq!(to_system(from_system(t)), t);
        assert_eq!(to_system(i64::MIN), UNIX_EPOCH);
    }

    /// 2026-12-02 08:36:22 UTC as a PostgreSQL timestamp.
    const AT: i64 = 849_515_782_000_000;

    #[test]
    fn every_form_with_a_zone_gives_the_same_time() {
        assert_eq!(to_postgres(AT).unwrap(), "2026-12-02 08:36:22+00");
        for s in [
            "2026-12-02T08:36:22Z",
            "2026-12-02t08:36:22z",
            "2026-12-02T08:36:22+00:00",
            "2026-12-02T10:36:22+02:00",
            "2026-12-02T03:06:22-05:30",
            "2026-12-02 10:36:22+02",
            "2026-12-02 10:36:22+02:00",
            "2026-12-02 10:36:22+0200",
            "2026-12-02 10:36:22 +02",
            "2026-12-02 10:36:22 +02:00",
            "2026-12-02 08:36:22 UTC",
            "2026-12-02 08:36:22 utc",
            "2026-12-02 08:36:22 GMT",
            "2026-12-02 08:36:22 Z",
            "  2026-12-02 08:36:22+00  ",
            "2026-12-02 10:36:22 Europe/Helsinki",
            "2026-12-02T10:36:22+02:00[Europe/Helsinki]",
            "2026-12-02 03:36:22 America/New_York",
        ] {
            assert_eq!(parse(s), Ok(AT), "{s}");
        }
    }

    #[test]
    fn fractions_are_kept_to_the_microsecond() {
        let t = parse("2026-12-02 10:36:22.123456+02:00").unwrap();
        assert_eq!(t, AT + 123_456);
        assert_eq!(to_postgres(t).unwrap(), "2026-12-02 08:36:22.123456+00");
        assert_eq!(to_rfc3339(t), "2026-12-02T08:36:22.123456Z");
        let t = parse("2026-12-02T08:36:22.5Z").unwrap();
        assert_eq!(to_postgres(t).unwrap(), "2026-12-02 08:36:22.5+00");
        // Beyond PostgreSQL's resolution: rounded.
        assert_eq!(parse("2026-12-02T08:36:22.0000004Z"), Ok(AT));
        assert_eq!(parse("2026-12-02T08:36:22.0000006Z"), Ok(AT + 1));
        // Before 2000, and so before PostgreSQL's epoch.
        let t = parse("1999-12-31T23:59:59.75Z").unwrap();
        assert_eq!(t, -250_000);
        assert_eq!(to_postgres(t).unwrap(), "1999-12-31 23:59:59.75+00");
    }

    #[test]
    fn a_time_without_a_zone_is_refused() {
        for s in [
            "2026-12-02 10:36:22",
            "2026-12-02T10:36:22",
            "2026-12-02 10:36:22.5",
            "2026-12-02 10:36",
        ] {
            assert_eq!(parse(s), Err(TimeError::NoZone(s.into())), "{s}");
            assert!(parse(s).unwrap_err().to_string().contains("no time zone"));
        }
    }

    #[test]
    fn other_input_is_refused_with_a_reason() {
        assert!(matches!(
            parse("2026-12-02 10:36:22 CET"),
            Err(TimeError::Abbreviation(_))
        ));
        assert!(matches!(parse("now"), Err(TimeError::Special(_))));
        assert!(matches!(parse("Today"), Err(TimeError::Special(_))));
        for s in [
            "",
            "yesterday at noon",
            "2026-13-02T10:36:22Z",
            "2026-02-30T10:36:22Z",
            "2026-12-02T25:36:22Z",
            "2026-12-02 10:36:22 Mars/Olympus_Mons",
            "2026-12-02T10:36:22+2:0",
            "1700000000",
            "2026-12-02T10:36:22Z\u{e9}",
        ] {
            assert!(
                matches!(parse(s), Err(TimeError::Invalid { .. })),
                "{s}: {:?}",
                parse(s)
            );
        }
        assert!(matches!(
            parse("0000-06-01T00:00:00Z"),
            Err(TimeError::OutOfRange(_))
        ));
    }

    #[test]
    fn shown_in_rfc3339() {
        assert_eq!(to_rfc3339(AT), "2026-12-02T08:36:22Z");
        assert_eq!(to_rfc3339(0), "2000-01-01T00:00:00Z");
        assert!(to_rfc3339(i64::MAX).contains("microseconds"));
        assert_eq!(unix_to_rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(unix_to_rfc3339(1_796_200_582), "2026-12-02T08:36:22Z");
        assert!(unix_to_rfc3339(u64::MAX).contains("seconds"));
        assert_eq!(to_postgres(i64::MAX), None);
    }
}
