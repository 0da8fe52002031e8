//! Listen addresses given on the command line.

use std::net::SocketAddr;

/// A listen address that can be turned off: an empty value means "do not listen".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionalListen(pub Option<SocketAddr>);

/// Parses `host:port`, or an empty string for none.
pub fn optional_listen(value: &str) -> Result<OptionalListen, String> {
    if value.trim().is_empty() {
        return Ok(OptionalListen(None));
    }
    value
        .parse()
        .map(|addr| OptionalListen(Some(addr)))
        .map_err(|e| format!("{e}: expected host:port, or empty to disable"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_turns_listening_off() {
        assert_eq!(optional_listen(" "), Ok(OptionalListen(None)));
        assert_eq!(
            optional_listen("127.0.0.1:9090"),
            Ok(OptionalListen(Some("127.0.0.1:9090".parse().unwrap())))
        );
        assert!(optional_listen("nowhere").is_err());
    }
}
