//! PostgreSQL's timestamps (`TimestampTz`): microseconds since 2000-01-01 00:00:00 UTC.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

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
}
