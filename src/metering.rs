//! Where a second is billed: the arithmetic that turns a session's devices
//! and a stretch of wall-clock time into usage records. Pure; the ledger
//! writes what this computes in the same transaction as the rest of a
//! checkpoint or a session's end.
//!
//! Records are cut at millisecond boundaries of the instants given (Docker's
//! StartedAt, each checkpoint, Docker's FinishedAt), so consecutive records
//! add up to exactly `ms(FinishedAt) - ms(StartedAt)` per device: nothing is
//! counted twice or dropped between cuts.

use std::fmt;

use crate::clock::UnixNanos;
use crate::gpu::{DeviceUuid, GpuWeight};

/// An amount of credits in billionths, so sums are exact.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Credits(pub i64);

impl Credits {
    pub const ZERO: Self = Self(0);
    pub const NANOS_PER_CREDIT: i64 = 1_000_000_000;

    /// From a decimal amount as written in a policy file (rounded to the
    /// nearest nano-credit).
    pub fn from_f64(credits: f64) -> Self {
        Self((credits * Self::NANOS_PER_CREDIT as f64).round() as i64)
    }

    pub fn as_f64(self) -> f64 {
        self.0 as f64 / Self::NANOS_PER_CREDIT as f64
    }
}

impl std::ops::Add for Credits {
    type Output = Self;
    fn add(self, other: Self) -> Self {
        Self(self.0.saturating_add(other.0))
    }
}

impl std::ops::Sub for Credits {
    type Output = Self;
    fn sub(self, other: Self) -> Self {
        Self(self.0.saturating_sub(other.0))
    }
}

impl std::ops::Neg for Credits {
    type Output = Self;
    fn neg(self) -> Self {
        Self(self.0.saturating_neg())
    }
}

impl std::iter::Sum for Credits {
    fn sum<I: Iterator<Item = Self>>(iter: I) -> Self {
        iter.fold(Self::ZERO, |a, b| a + b)
    }
}

impl fmt::Display for Credits {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:.6}", self.as_f64())
    }
}

/// Credits per device-second of a device class.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Rate(pub Credits);

/// A device of a session as metering sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct MeteredDevice {
    pub uuid: DeviceUuid,
    pub class: String,
    pub weight: GpuWeight,
    pub rate: Rate,
}

/// One device's usage over one period.
#[derive(Debug, Clone, PartialEq)]
pub struct UsageCut {
    pub device_uuid: DeviceUuid,
    pub device_class: String,
    pub period_start: UnixNanos,
    pub period_end: UnixNanos,
    pub device_ms: i64,
    pub gpu_seconds: f64,
    pub cost: Credits,
}

/// Milliseconds between two instants, cut at millisecond boundaries; never
/// negative.
pub fn device_ms(from: UnixNanos, to: UnixNanos) -> i64 {
    (to.millis() - from.millis()).max(0)
}

/// GPU-seconds of `ms` milliseconds on a device of `weight`.
pub fn gpu_seconds(ms: i64, weight: GpuWeight) -> f64 {
    ms as f64 / 1000.0 * weight.as_f64()
}

/// The cost of `ms` milliseconds at `rate`, rounded down to the nano-credit.
/// A cost past what a ledger can hold (9.2 billion credits in one record)
/// saturates, with an error logged: never a wrapped value, which would turn
/// a debit into a credit.
pub fn cost(ms: i64, rate: Rate) -> Credits {
    let exact = i128::from(rate.0.0) * i128::from(ms) / 1000;
    Credits(i64::try_from(exact).unwrap_or_else(|_| {
        tracing::error!(
            device_ms = ms,
            rate_nano_credits = rate.0.0,
            "a usage record's cost is past what the ledger can hold; recorded at the limit"
        );
        if exact < 0 { i64::MIN } else { i64::MAX }
    }))
}

/// The usage of every device of a session from `from` to `to`.
pub fn cut(devices: &[MeteredDevice], from: UnixNanos, to: UnixNanos) -> Vec<UsageCut> {
    let ms = device_ms(from, to);
    devices
        .iter()
        .map(|device| UsageCut {
            device_uuid: device.uuid.clone(),
            device_class: device.class.clone(),
            period_start: from,
            period_end: to,
            device_ms: ms,
            gpu_seconds: gpu_seconds(ms, device.weight),
            cost: cost(ms, device.rate),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn device(uuid: &str, slices: u32, rate: f64) -> MeteredDevice {
        MeteredDevice {
            uuid: DeviceUuid::new(uuid),
            class: "c".into(),
            weight: GpuWeight { slices, of: 7 },
            rate: Rate(Credits::from_f64(rate)),
        }
    }

    const SECOND: i64 = 1_000_000_000;

    #[test]
    fn consecutive_cuts_add_up_to_the_whole_session() {
        let start = UnixNanos(1_700_000_000 * SECOND + 123_456_789);
        let finish = UnixNanos(start.0 + 3_723 * SECOND + 987_654_321);
        let devices = [device("MIG-a", 1, 0.00015), device("MIG-b", 3, 0.00045)];
        // Checkpoints at uneven instants, as a real clock gives them.
        let mut cuts = vec![start];
        let mut at = start.0;
        while at + 61 * SECOND + 7 < finish.0 {
            at += 61 * SECOND + 7;
            cuts.push(UnixNanos(at));
        }
        cuts.push(finish);
        let records: Vec<UsageCut> = cuts
            .windows(2)
            .flat_map(|w| cut(&devices, w[0], w[1]))
            .collect();
        let per_device_ms: i64 = records
            .iter()
            .filter(|r| r.device_uuid.as_str() == "MIG-a")
            .map(|r| r.device_ms)
            .sum();
        assert_eq!(per_device_ms, finish.millis() - start.millis());
        let exact_ns = finish.0 - start.0;
        assert!((per_device_ms * 1_000_000 - exact_ns).abs() < 1_000_000);
        let gpu: f64 = records.iter().map(|r| r.gpu_seconds).sum();
        let expected = per_device_ms as f64 / 1000.0 * (1.0 + 3.0) / 7.0;
        assert!((gpu - expected).abs() < 1e-6, "{gpu} vs {expected}");
    }

    #[test]
    fn a_1g_instance_of_an_a100_counts_one_seventh() {
        let records = cut(
            &[device("MIG-a", 1, 0.0)],
            UnixNanos(0),
            UnixNanos(7 * SECOND),
        );
        assert_eq!(records[0].device_ms, 7000);
        assert!((records[0].gpu_seconds - 1.0).abs() < 1e-12);
    }

    #[test]
    fn cost_is_device_seconds_times_the_rate() {
        // One hour of a full A100 at 0.001 credits per second is 3.6 credits.
        let full = MeteredDevice {
            weight: GpuWeight::FULL,
            ..device("GPU-a", 7, 0.001)
        };
        let records = cut(&[full], UnixNanos(0), UnixNanos(3600 * SECOND));
        assert_eq!(records[0].cost, Credits::from_f64(3.6));
        assert_eq!(cost(1, Rate(Credits::from_f64(0.00015))), Credits(150));
    }

    #[test]
    fn a_cost_past_the_limit_saturates_and_never_wraps_into_a_credit() {
        // A year-long record at a million credits a second.
        let rate = Rate(Credits::from_f64(1_000_000.0));
        let year_ms = 365 * 86_400_000;
        assert_eq!(cost(year_ms, rate), Credits(i64::MAX));
        // Just under the limit is exact.
        let at_limit = i64::MAX / 1_000_000_000_000_000 * 1000;
        assert_eq!(
            cost(at_limit, Rate(Credits(1_000_000_000_000_000))).0,
            at_limit / 1000 * 1_000_000_000_000_000
        );
        assert!(cost(i64::MAX, Rate(Credits(i64::MAX))).0 > 0);
    }

    #[test]
    fn time_running_backwards_bills_nothing() {
        assert_eq!(device_ms(UnixNanos(5 * SECOND), UnixNanos(SECOND)), 0);
    }

    #[test]
    fn credits_print_as_decimals() {
        assert_eq!(Credits::from_f64(40.0).to_string(), "40.000000");
        assert_eq!(Credits::from_f64(0.00015).0, 150_000);
    }
}
