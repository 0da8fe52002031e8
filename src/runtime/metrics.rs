//! Prometheus metrics: one registry per process, into which each component registers its own metrics; one
//! `/metrics` handler encodes it.

use std::sync::Arc;

use axum::{http::header, routing::get};
use prometheus_client::encoding::{LabelValueEncoder, text::encode};
pub use prometheus_client::registry::Registry;

/// Encodes a label value from a typed value's wire string (for `EncodeLabelValue` of components' enums).
pub fn encode_label(value: &str, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
    use std::fmt::Write;
    encoder.write_str(value)
}

/// The registry as OpenMetrics text.
pub fn encode_text(registry: &Registry) -> String {
    let mut out = String::new();
    encode(&mut out, registry).expect("writing to a String cannot fail");
    out
}

/// `GET /metrics` for a process's registry.
pub fn router(registry: Arc<Registry>) -> axum::Router {
    axum::Router::new().route(
        "/metrics",
        get(move || {
            let text = encode_text(&registry);
            async move {
                (
                    [(
                        header::CONTENT_TYPE,
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    )],
                    text,
                )
            }
        }),
    )
}

/// Implements `EncodeLabelValue` for a type with a `const fn as_str(self) -> &'static str`: its wire string is
/// the label value.
#[macro_export]
macro_rules! label_value {
    ($($t:ty),+ $(,)?) => {$(
        impl prometheus_client::encoding::EncodeLabelValue for $t {
            fn encode(
                &self,
                encoder: &mut prometheus_client::encoding::LabelValueEncoder,
            ) -> Result<(), std::fmt::Error> {
                $crate::runtime::metrics::encode_label(self.as_str(), encoder)
            }
        }
    )+};
}
