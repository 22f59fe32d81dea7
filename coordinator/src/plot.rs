//! (being written)

/// Placeholder until the plotting branch lands.
pub fn write_reward_curve(
    _path: &std::path::Path,
    _title: &str,
    _series: &[(String, Vec<f64>)],
) -> Result<(), String> {
    Ok(())
}
