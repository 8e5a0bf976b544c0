//! The numeric options of a call, checked wherever they arrive (the SDK's native module, the server), so that an
//! out-of-range value is a clear error naming its range, never a panic or an overflow.

use std::time::Duration;

/// The most seconds `keep_alive` and a call's `timeout` may be: what the wire's `keep_alive` (an int32) carries, about
/// 68 years. A server may keep workers warm for less (`[limits] max_keep_alive_seconds`).
pub const MAX_SECONDS: u32 = i32::MAX as u32;

/// A number of seconds outside its option's range.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{option} must be a number of seconds {}, got {value}", range(*zero_allowed))]
pub struct OutOfRange {
    pub option: &'static str,
    /// The value as given.
    pub value: String,
    pub zero_allowed: bool,
}

fn range(zero_allowed: bool) -> String {
    if zero_allowed {
        format!("from 0 to {MAX_SECONDS}")
    } else {
        format!("above 0 and at most {MAX_SECONDS}")
    }
}

/// `keep_alive`: from 0 to [`MAX_SECONDS`].
pub fn keep_alive(seconds: f64) -> Result<Duration, OutOfRange> {
    checked("keep_alive", seconds, true)
}

/// `keep_alive` in whole seconds, as the wire carries it (an int32, so at most [`MAX_SECONDS`] already).
pub fn whole_keep_alive(seconds: i32) -> Result<Duration, OutOfRange> {
    u64::try_from(seconds).map(Duration::from_secs).map_err(|_| OutOfRange {
        option: "keep_alive",
        value: seconds.to_string(),
        zero_allowed: true,
    })
}

/// A call's `timeout`: above 0, at most [`MAX_SECONDS`].
pub fn timeout(seconds: f64) -> Result<Duration, OutOfRange> {
    checked("timeout", seconds, false)
}

fn checked(option: &'static str, seconds: f64, zero_allowed: bool) -> Result<Duration, OutOfRange> {
    // NaN fails every comparison, so it is refused with the infinities and the negatives.
    let in_range = seconds <= f64::from(MAX_SECONDS) && if zero_allowed { seconds >= 0.0 } else { seconds > 0.0 };
    if !in_range {
        return Err(OutOfRange { option, value: format!("{seconds:?}"), zero_allowed });
    }
    Ok(Duration::from_secs_f64(seconds))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seconds_in_range_pass_and_the_rest_name_the_range() {
        assert_eq!(keep_alive(0.0), Ok(Duration::ZERO));
        assert_eq!(keep_alive(2.5), Ok(Duration::from_millis(2500)));
        assert_eq!(keep_alive(f64::from(MAX_SECONDS)), Ok(Duration::from_secs(MAX_SECONDS.into())));
        assert_eq!(timeout(0.001), Ok(Duration::from_millis(1)));
        for bad in [1e20, -1.0, f64::NAN, f64::INFINITY, f64::NEG_INFINITY, f64::from(MAX_SECONDS) + 1.0] {
            let error = keep_alive(bad).unwrap_err().to_string();
            assert!(error.starts_with("keep_alive must be a number of seconds from 0 to 2147483647, got "), "{error}");
            assert!(timeout(bad).is_err());
        }
        assert_eq!(keep_alive(1e20).unwrap_err().to_string().rsplit(' ').next(), Some("1e20"));
        assert_eq!(whole_keep_alive(i32::MAX), Ok(Duration::from_secs(MAX_SECONDS.into())));
        assert_eq!(
            whole_keep_alive(-1).unwrap_err().to_string(),
            "keep_alive must be a number of seconds from 0 to 2147483647, got -1"
        );
        assert_eq!(
            timeout(0.0).unwrap_err().to_string(),
            "timeout must be a number of seconds above 0 and at most 2147483647, got 0.0"
        );
    }
}
