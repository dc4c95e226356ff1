//! Times for people: a message's time in the local time zone, short when it is today.
//!
//! The zone is the system's (`TZ`, else `/etc/localtime`), read by `jiff`, which parses the
//! zone's rules itself: unlike libc's `localtime_r` behind the `time` crate's local offset it is
//! safe in a process with several threads (the shell has an input and a printer thread), and it
//! gives each instant its own offset, so a message from before a DST change shows the hour it
//! had then. When no zone can be found the times are shown in UTC, marked with a trailing `Z`.
//!
//! "Today" is judged against a [`Clock`](crate::clock::Clock) reading the caller passes in, never
//! the system clock, so tests can move it.

use std::sync::OnceLock;

use jiff::Timestamp;
use jiff::tz::TimeZone;

/// The system time zone, looked up once; None when the system has none we can read.
fn system_zone() -> &'static Option<TimeZone> {
    static ZONE: OnceLock<Option<TimeZone>> = OnceLock::new();
    ZONE.get_or_init(|| {
        let tz = std::env::var_os("TZ");
        if tz.as_deref().is_some_and(|v| !tz_is_safe_to_read(&v.to_string_lossy())) {
            return None;
        }
        TimeZone::try_system().ok()
    })
}

/// Largest zone file read: real TZif files are a few KiB.
const MAX_TZ_FILE_BYTES: u64 = 1 << 20;

/// False for a `TZ` that names a file jiff would read whole without a bound (`/dev/zero`,
/// `:/dev/stdin`, a FIFO, a huge file) or climbs out of the zone directory (`..`): such a
/// value shows times in UTC instead of hanging or exhausting memory.
fn tz_is_safe_to_read(tz: &str) -> bool {
    let name = tz.strip_prefix(':').unwrap_or(tz);
    if name.split('/').any(|part| part == "..") {
        return false;
    }
    if !name.starts_with('/') {
        return true; // a zone name, looked up in the system's zone directory
    }
    std::fs::metadata(name).is_ok_and(|m| m.is_file() && m.len() <= MAX_TZ_FILE_BYTES)
}

/// `14:03` when `at_ms` falls on the same local day as `now_ms`, else `2026-11-29 14:03`
/// (both ms since the Unix epoch). In UTC, with a `Z` suffix, when there is no local zone.
pub fn short(at_ms: u64, now_ms: u64) -> String {
    match system_zone() {
        Some(tz) => short_in(tz, at_ms, now_ms, ""),
        None => short_in(&TimeZone::UTC, at_ms, now_ms, "Z"),
    }
}

fn short_in(tz: &TimeZone, at_ms: u64, now_ms: u64, suffix: &str) -> String {
    let at = timestamp(at_ms).to_zoned(tz.clone());
    let now = timestamp(now_ms).to_zoned(tz.clone());
    if at.date() == now.date() {
        format!("{}{suffix}", at.strftime("%H:%M"))
    } else {
        format!("{}{suffix}", at.strftime("%Y-%m-%d %H:%M"))
    }
}

/// `at_ms` as RFC 3339 in UTC with milliseconds (`2026-11-29T14:03:07.123Z`), for JSON.
pub fn rfc3339(at_ms: u64) -> String {
    format!("{:.3}", timestamp(at_ms))
}

/// A time a person types, in the local zone (UTC without one), as ms since the Unix epoch:
/// `2026-11-30 14:00` (or with seconds, or a `T`), `2026-11-30` (its midnight), `14:00` (today),
/// `today` and `yesterday` (their midnights), or RFC 3339 with an offset (`2026-11-30T14:00Z`).
/// `now_ms` decides what today is. None when it is none of these.
pub fn parse_local(text: &str, now_ms: u64) -> Option<u64> {
    let tz = system_zone().clone().unwrap_or(TimeZone::UTC);
    parse_in(&tz, text, now_ms)
}

fn parse_in(tz: &TimeZone, text: &str, now_ms: u64) -> Option<u64> {
    let text = text.trim();
    let today = timestamp(now_ms).to_zoned(tz.clone()).date();
    let at: Timestamp = match text {
        "today" => today.to_zoned(tz.clone()).ok()?.timestamp(),
        "yesterday" => today.yesterday().ok()?.to_zoned(tz.clone()).ok()?.timestamp(),
        _ => {
            if let Ok(t) = text.parse::<Timestamp>() {
                t
            } else if let Ok(dt) = text.parse::<jiff::civil::DateTime>() {
                dt.to_zoned(tz.clone()).ok()?.timestamp()
            } else if let Ok(d) = text.parse::<jiff::civil::Date>() {
                d.to_zoned(tz.clone()).ok()?.timestamp()
            } else if let Ok(t) = text.parse::<jiff::civil::Time>() {
                today.to_datetime(t).to_zoned(tz.clone()).ok()?.timestamp()
            } else {
                return None;
            }
        }
    };
    u64::try_from(at.as_millisecond()).ok()
}

/// Out-of-range times (a peer's clock claims the year 300000) clamp to the last instant jiff
/// represents rather than failing: a bad clock must not hide the message.
fn timestamp(ms: u64) -> Timestamp {
    let ms = i64::try_from(ms).unwrap_or(i64::MAX);
    Timestamp::from_millisecond(ms).unwrap_or(Timestamp::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Review: `TZ=/dev/zero` (or `:/dev/stdin`) made jiff read without end: a hang, then
    /// memory exhausted, before the first time was shown.
    #[test]
    fn a_tz_naming_a_device_or_climbing_out_is_not_read() {
        for bad in ["/dev/zero", ":/dev/zero", ":/dev/stdin", "/dev", "/no/such/zone", "../../../dev/zero"] {
            assert!(!tz_is_safe_to_read(bad), "{bad}");
        }
        for good in ["Europe/Paris", "UTC", ":Europe/Paris", "EST5EDT"] {
            assert!(tz_is_safe_to_read(good), "{good}");
        }
        if std::path::Path::new("/etc/localtime").is_file() {
            assert!(tz_is_safe_to_read("/etc/localtime"));
        }
    }

    const DAY_MS: u64 = 24 * 3600 * 1000;
    /// 2026-11-29T14:03:07.123Z
    const AT: u64 = 1_795_960_987_123;

    #[test]
    fn today_shows_the_time_and_other_days_the_date_too() {
        let utc = TimeZone::UTC;
        assert_eq!(short_in(&utc, AT, AT + 60_000, ""), "14:03");
        assert_eq!(short_in(&utc, AT, AT + DAY_MS, ""), "2026-11-29 14:03");
        assert_eq!(short_in(&utc, AT, AT, "Z"), "14:03Z");
    }

    #[test]
    fn the_local_zone_decides_the_hour_and_the_day() {
        let tokyo = TimeZone::fixed(jiff::tz::offset(9));
        // 14:03 UTC is 23:03 in UTC+9, and ten minutes later it is the next day there.
        assert_eq!(short_in(&tokyo, AT, AT, ""), "23:03");
        assert_eq!(short_in(&tokyo, AT, AT + 60 * 60_000, ""), "2026-11-29 23:03");
    }

    #[test]
    fn typed_times_read_in_the_local_zone() {
        let utc = TimeZone::UTC;
        let at_1400 = AT - (3 * 60 + 7) * 1000 - 123;
        assert_eq!(parse_in(&utc, "2026-11-29 14:00", AT), Some(at_1400));
        assert_eq!(parse_in(&utc, "2026-11-29T14:00:00", AT), Some(at_1400));
        assert_eq!(parse_in(&utc, "14:00", AT), Some(at_1400));
        assert_eq!(parse_in(&utc, "2026-11-29T14:00:00Z", AT + DAY_MS), Some(at_1400));
        let midnight = at_1400 - 14 * 3600 * 1000;
        assert_eq!(parse_in(&utc, "2026-11-29", AT), Some(midnight));
        assert_eq!(parse_in(&utc, "today", AT), Some(midnight));
        assert_eq!(parse_in(&utc, "yesterday", AT), Some(midnight - DAY_MS));
        let tokyo = TimeZone::fixed(jiff::tz::offset(9));
        assert_eq!(parse_in(&tokyo, "2026-11-29 23:00", AT), Some(at_1400));
        for junk in ["", "soon", "2026-13-01", "25:00", "2026-11-29 14:00 extra"] {
            assert_eq!(parse_in(&utc, junk, AT), None, "{junk:?}");
        }
    }

    #[test]
    fn rfc3339_is_utc_with_milliseconds_and_absurd_times_clamp() {
        assert_eq!(rfc3339(AT), "2026-11-29T14:03:07.123Z");
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00.000Z");
        assert!(rfc3339(u64::MAX).starts_with("9999-12-"), "{}", rfc3339(u64::MAX));
    }
}
