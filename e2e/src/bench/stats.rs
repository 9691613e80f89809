//! Percentiles of samples.

/// How a sample is spread: count, p50, p90, p99 and max, in the samples' unit (NaN when
/// there are none).
#[derive(Debug, Clone, Copy)]
pub struct Spread {
    /// Number of samples.
    pub n: usize,
    /// Median.
    pub p50: f64,
    /// 90th percentile.
    pub p90: f64,
    /// 99th percentile.
    pub p99: f64,
    /// Largest.
    pub max: f64,
}

impl Spread {
    /// The spread of `samples`.
    pub fn of(mut samples: Vec<f64>) -> Spread {
        samples.sort_by(f64::total_cmp);
        Spread {
            n: samples.len(),
            p50: percentile(&samples, 0.50),
            p90: percentile(&samples, 0.90),
            p99: percentile(&samples, 0.99),
            max: samples.last().copied().unwrap_or(f64::NAN),
        }
    }
}

/// Nearest-rank percentile (`p` in 0..=1) of sorted samples; NaN when empty.
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = (p * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank() {
        let s: Vec<f64> = (1..=100).map(f64::from).collect();
        let spread = Spread::of(s);
        assert_eq!(
            (spread.p50, spread.p90, spread.p99, spread.max),
            (50.0, 90.0, 99.0, 100.0)
        );
        assert!(Spread::of(Vec::new()).p50.is_nan());
    }
}
