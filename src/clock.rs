//! Wall-clock time as metering needs it: nanoseconds since the Unix epoch,
//! the precision Docker records StartedAt and FinishedAt with. The clock is
//! a trait so tests can drive time.

use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// An instant in nanoseconds since 1970-01-01T00:00:00Z (UTC).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct UnixNanos(pub i64);

impl UnixNanos {
    pub fn from_system_time(at: SystemTime) -> Self {
        match at.duration_since(UNIX_EPOCH) {
            Ok(after) => Self(i64::try_from(after.as_nanos()).unwrap_or(i64::MAX)),
            Err(before) => Self(-i64::try_from(before.duration().as_nanos()).unwrap_or(i64::MAX)),
        }
    }

    pub fn to_system_time(self) -> SystemTime {
        if self.0 >= 0 {
            UNIX_EPOCH + Duration::from_nanos(self.0 as u64)
        } else {
            UNIX_EPOCH - Duration::from_nanos(self.0.unsigned_abs())
        }
    }

    /// Parses an RFC 3339 UTC timestamp as Docker writes them
    /// (`2026-11-22T22:09:53.509047326Z`). Docker's "never" (year 1) and
    /// anything else before the epoch give `None`.
    pub fn parse_rfc3339(text: &str) -> Option<Self> {
        let at = humantime::parse_rfc3339(text).ok()?;
        let nanos = Self::from_system_time(at);
        (nanos.0 > 0).then_some(nanos)
    }

    /// As a protobuf timestamp (the wire form of the APIs).
    pub fn to_timestamp(self) -> prost_types::Timestamp {
        prost_types::Timestamp {
            seconds: self.0.div_euclid(1_000_000_000),
            nanos: i32::try_from(self.0.rem_euclid(1_000_000_000)).unwrap_or_default(),
        }
    }

    /// From a protobuf timestamp, saturating far outside the i64 range.
    pub fn from_timestamp(at: &prost_types::Timestamp) -> Self {
        Self(
            at.seconds
                .saturating_mul(1_000_000_000)
                .saturating_add(i64::from(at.nanos)),
        )
    }

    /// Whole milliseconds since the epoch, rounded down.
    pub fn millis(self) -> i64 {
        self.0.div_euclid(1_000_000)
    }
}

impl fmt::Display for UnixNanos {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&prost_types::Timestamp::from(self.to_system_time()), f)
    }
}

/// Where "now" comes from.
pub trait Clock: Send + Sync + fmt::Debug + 'static {
    fn now(&self) -> UnixNanos;
}

/// The host's real-time clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> UnixNanos {
        UnixNanos::from_system_time(SystemTime::now())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn docker_timestamps_parse_to_the_nanosecond() {
        let at = UnixNanos::parse_rfc3339("2026-11-22T22:09:53.509047326Z").unwrap();
        assert_eq!(at.0 % 1_000_000_000, 509_047_326);
        assert_eq!(at.to_string(), "2026-11-22T22:09:53.509047326Z");
        assert_eq!(at.millis() % 1000, 509);
    }

    #[test]
    fn dockers_zero_time_means_never() {
        assert_eq!(UnixNanos::parse_rfc3339("0001-01-01T00:00:00Z"), None);
        assert_eq!(UnixNanos::parse_rfc3339("yesterday"), None);
    }

    #[test]
    fn system_times_round_trip() {
        let now = SystemTime::now();
        assert_eq!(UnixNanos::from_system_time(now).to_system_time(), now);
    }
}
