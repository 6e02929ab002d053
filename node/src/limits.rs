//! Host-wide byte rates (`[limits]`): a token bucket each for what the node uploads to peers, what
//! it downloads from peers and seeds, and what it fetches from origins. Every task and connection
//! of the node draws from the same bucket, so `upload_rate = "50MiB/s"` caps the node's whole
//! data-plane uplink, whatever the number of peers.
//!
//! The buckets are `governor`'s GCRA limiters counting bytes. A bucket holds at most 1/20 s of its
//! rate (at least [`MIN_BURST`]), so a capped node moves its rate within a few percent over any
//! second and never bursts far above it. Bytes are taken in steps of at most [`STEP`]: a reader or
//! writer holds the connection's bytes back until the bucket has them, and TCP's flow control
//! slows the other side.

use std::fmt;
use std::num::NonZeroU32;
use std::str::FromStr;
use std::sync::Arc;

use bytesize::ByteSize;
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// The smallest bucket, in bytes.
pub const MIN_BURST: u32 = 16 << 10;
/// At most this many bytes are read or written per draw from a capped bucket.
pub const STEP: usize = 16 << 10;

/// A byte rate: a size per second, written like `"50MiB/s"`, `"800KB/s"` or `"1048576"` (bytes per
/// second). Units are bytesize's: `KB`/`MB`/`GB` are powers of 1000, `KiB`/`MiB`/`GiB` powers of
/// 1024; the `/s` is optional.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate(pub u64);

impl Rate {
    pub fn bytes_per_second(self) -> u64 {
        self.0
    }
}

/// Why a rate does not parse.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RateError {
    #[error("`{0}` is not a rate: expected a size per second such as \"50MiB/s\"")]
    Syntax(String),
    #[error("a rate of 0 bytes per second moves nothing: leave the key out for no limit")]
    Zero,
}

impl FromStr for Rate {
    type Err = RateError;

    fn from_str(s: &str) -> Result<Rate, RateError> {
        let t = s.trim();
        let t = t.strip_suffix("/s").unwrap_or(t).trim();
        let size: ByteSize = t.parse().map_err(|_| RateError::Syntax(s.to_owned()))?;
        if size.as_u64() == 0 {
            return Err(RateError::Zero);
        }
        Ok(Rate(size.as_u64()))
    }
}

impl fmt::Display for Rate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/s", ByteSize::b(self.0).display().iec())
    }
}

impl Serialize for Rate {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> Deserialize<'de> for Rate {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Rate, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Bytes(u64),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Bytes(0) => Err(serde::de::Error::custom(RateError::Zero)),
            Raw::Bytes(n) => Ok(Rate(n)),
            Raw::Text(s) => s.parse().map_err(serde::de::Error::custom),
        }
    }
}

/// `[limits]`: host-wide rates. Absent keys mean no limit.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LimitsConfig {
    /// Bytes per second this node sends to peers, all tasks together. Default: unlimited.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub upload_rate: Option<Rate>,
    /// Bytes per second this node receives from peers and seeds, all tasks together.
    /// Default: unlimited.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub download_rate: Option<Rate>,
    /// Bytes per second this node fetches from origins (back-to-source), all tasks together.
    /// Default: unlimited.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub origin_rate: Option<Rate>,
}

/// One token bucket of bytes, or none (unlimited). Clones share the bucket.
#[derive(Clone, Default)]
pub struct Limiter {
    bucket: Option<Arc<Bucket>>,
}

struct Bucket {
    limiter: DefaultDirectRateLimiter,
    burst: u32,
    rate: Rate,
}

impl fmt::Debug for Limiter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.bucket {
            Some(b) => write!(f, "Limiter(burst {})", b.burst),
            None => f.write_str("Limiter(unlimited)"),
        }
    }
}

impl Limiter {
    /// A bucket for `rate`, or an unlimited limiter for `None`. Rates above 4 GiB/s are treated as
    /// 4 GiB/s (the bucket counts bytes in 32 bits).
    pub fn new(rate: Option<Rate>) -> Limiter {
        let Some(rate) = rate else {
            return Limiter::default();
        };
        let per_second = u32::try_from(rate.0).unwrap_or(u32::MAX).max(1);
        let burst = (per_second / 20).max(MIN_BURST);
        let (Some(per_second), Some(burst_nz)) =
            (NonZeroU32::new(per_second), NonZeroU32::new(burst))
        else {
            return Limiter::default();
        };
        let quota = Quota::per_second(per_second).allow_burst(burst_nz);
        Limiter {
            bucket: Some(Arc::new(Bucket {
                limiter: RateLimiter::direct(quota),
                burst,
                rate,
            })),
        }
    }

    /// Whether this limiter caps anything.
    pub fn is_limited(&self) -> bool {
        self.bucket.is_some()
    }

    /// The rate it was made for (`None`: unlimited).
    pub fn rate(&self) -> Option<Rate> {
        self.bucket.as_ref().map(|b| b.rate)
    }

    /// How many bytes to move per draw: [`STEP`] when capped (so bytes trickle rather than burst),
    /// `unlimited` otherwise.
    pub fn step(&self, unlimited: usize) -> usize {
        if self.is_limited() {
            STEP.min(unlimited)
        } else {
            unlimited
        }
    }

    /// Waits until `bytes` may pass.
    pub async fn take(&self, bytes: usize) {
        let Some(b) = &self.bucket else {
            return;
        };
        let mut left = bytes;
        while left > 0 {
            let n = left.min(b.burst as usize);
            left -= n;
            if let Some(n) = NonZeroU32::new(n as u32) {
                // `n` never exceeds the burst, so the bucket can always hold it.
                let _ = b.limiter.until_n_ready(n).await;
            }
        }
    }
}

/// The node's three buckets.
#[derive(Clone, Debug, Default)]
pub struct Limiters {
    pub upload: Limiter,
    pub download: Limiter,
    pub origin: Limiter,
}

impl Limiters {
    pub fn new(config: &LimitsConfig) -> Limiters {
        Limiters {
            upload: Limiter::new(config.upload_rate),
            download: Limiter::new(config.download_rate),
            origin: Limiter::new(config.origin_rate),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    #[test]
    fn rates_parse_with_units_and_refuse_nonsense() {
        assert_eq!("50MiB/s".parse::<Rate>(), Ok(Rate(50 << 20)));
        assert_eq!("50 MiB/s".parse::<Rate>(), Ok(Rate(50 << 20)));
        assert_eq!("800KB/s".parse::<Rate>(), Ok(Rate(800_000)));
        assert_eq!("1MB".parse::<Rate>(), Ok(Rate(1_000_000)));
        assert_eq!("4096".parse::<Rate>(), Ok(Rate(4096)));
        assert_eq!("0MiB/s".parse::<Rate>(), Err(RateError::Zero));
        assert!(matches!("fast".parse::<Rate>(), Err(RateError::Syntax(_))));
        assert!(matches!(
            "-5MiB/s".parse::<Rate>(),
            Err(RateError::Syntax(_))
        ));
    }

    #[test]
    fn limits_read_from_toml_and_default_to_none() {
        let c: LimitsConfig =
            toml::from_str("upload_rate = \"50MiB/s\"\ndownload_rate = 1048576\n").unwrap();
        assert_eq!(c.upload_rate, Some(Rate(50 << 20)));
        assert_eq!(c.download_rate, Some(Rate(1 << 20)));
        assert_eq!(c.origin_rate, None);
        assert!(toml::from_str::<LimitsConfig>("upload_rate = 0").is_err());
        assert!(toml::from_str::<LimitsConfig>("upload_rate = \"lots\"").is_err());
        assert!(toml::from_str::<LimitsConfig>("uplaod_rate = \"1MiB/s\"").is_err());
        let round: LimitsConfig = toml::from_str(&toml::to_string(&c).unwrap()).unwrap();
        assert_eq!(round.upload_rate, c.upload_rate);
    }

    #[tokio::test]
    async fn an_unlimited_limiter_never_waits() {
        let l = Limiter::new(None);
        assert!(!l.is_limited());
        assert_eq!(l.rate(), None);
        assert_eq!(l.step(1 << 20), 1 << 20);
        let t = Instant::now();
        l.take(usize::MAX / 2).await;
        assert!(t.elapsed().as_millis() < 100);
    }

    #[tokio::test]
    async fn a_capped_limiter_paces_bytes_at_its_rate() {
        // 4 MiB/s: the first burst (1/20 s) passes at once, the remaining 1 MiB - burst take
        // about 0.24 s. Bounds are loose on the slow side (a loaded machine only adds time) and
        // tight on the fast side (the cap must hold).
        let l = Limiter::new(Some(Rate(4 << 20)));
        assert_eq!(l.step(1 << 20), STEP);
        assert_eq!(l.rate(), Some(Rate(4 << 20)));
        let t = Instant::now();
        for _ in 0..64 {
            l.take(16 << 10).await;
        }
        let s = t.elapsed().as_secs_f64();
        let burst = f64::from((4u32 << 20) / 20);
        let floor = (f64::from(1u32 << 20) - burst) / f64::from(4u32 << 20);
        assert!(
            s >= floor * 0.95,
            "1 MiB at 4 MiB/s took {s:.3} s, below {floor:.3} s"
        );
        assert!(s < floor + 2.0, "1 MiB at 4 MiB/s took {s:.3} s");
    }

    #[tokio::test]
    async fn a_take_larger_than_the_bucket_is_split() {
        let l = Limiter::new(Some(Rate(1 << 20)));
        let t = Instant::now();
        // 128 KiB with a 52 KiB bucket: three draws, ~76 KiB after the first burst.
        l.take(128 << 10).await;
        let s = t.elapsed().as_secs_f64();
        assert!(s >= 0.06, "took {s:.3} s");
    }
}
