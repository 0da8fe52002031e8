//! Output of the benchmarks: one aligned row per figure, so runs compare line by line.

/// Prints `label` and `value` as one row of a benchmark's report.
pub fn row(label: &str, value: impl std::fmt::Display) {
    println!("{label:<48} {:>12}", value.to_string());
}

/// A duration row, in milliseconds.
pub fn millis(label: &str, elapsed: std::time::Duration) {
    row(label, format!("{:.1} ms", elapsed.as_secs_f64() * 1e3));
}
