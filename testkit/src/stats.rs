//! Benchmark statistics.

use std::cmp::Ordering;

fn sorted<T: Copy + PartialOrd>(samples: &[T]) -> Vec<T> {
    let mut v = samples.to_vec();
    v.sort_by(|a, b| a.partial_cmp(b).unwrap_or(Ordering::Equal));
    v
}

/// The median (the upper one of an even count, as the benchmarks have always printed it);
/// `None` for no samples.
pub fn median<T: Copy + PartialOrd>(samples: &[T]) -> Option<T> {
    let v = sorted(samples);
    v.get(v.len() / 2).copied()
}

/// The `pct`th percentile by the nearest-rank rule; `None` for no samples.
pub fn percentile<T: Copy + PartialOrd>(samples: &[T], pct: usize) -> Option<T> {
    let v = sorted(samples);
    let rank = (v.len() * pct).div_ceil(100).max(1);
    v.get(rank - 1).copied()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_and_percentiles() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&[4, 1, 3, 2]), Some(3));
        assert_eq!(median::<f64>(&[]), None);
        assert_eq!(percentile(&[1, 2, 3, 4, 5, 6, 7, 8, 9, 10], 90), Some(9));
        assert_eq!(percentile(&[5], 90), Some(5));
        assert_eq!(percentile::<u8>(&[], 90), None);
    }
}
