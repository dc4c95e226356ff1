//! Wire errors: an [`ErrorCode`] from `schemas/node.capnp` plus text for people, carried in an
//! RPC exception's text as `"<code>: <text>"` (with `" (retry after <N> ms)"` at the end for
//! codes that ask the caller to come back). The server builds every error it sends with
//! [`WireError::into_rpc`]; the client parses what it receives with [`WireError::parse`], and
//! branches on the code, never on the text.

use std::fmt;

pub use super::node_capnp::ErrorCode;

/// Every code with its name on the wire (the schema's enumerant name).
const NAMES: &[(ErrorCode, &str)] = &[
    (ErrorCode::Unknown, "unknown"),
    (ErrorCode::BadRequest, "badRequest"),
    (ErrorCode::TooLarge, "tooLarge"),
    (ErrorCode::QueueFull, "queueFull"),
    (ErrorCode::NoKeyPackages, "noKeyPackages"),
    (ErrorCode::NoHybridKey, "noHybridKey"),
    (ErrorCode::RateLimited, "rateLimited"),
    (ErrorCode::OverQuota, "overQuota"),
    (ErrorCode::StaleKey, "staleKey"),
    (ErrorCode::AuthFailed, "authFailed"),
    (ErrorCode::ShuttingDown, "shuttingDown"),
    (ErrorCode::Busy, "busy"),
    (ErrorCode::PoolFull, "poolFull"),
    (ErrorCode::Internal, "internal"),
    (ErrorCode::Unavailable, "unavailable"),
];

/// The schema's name of `code`.
pub fn code_name(code: ErrorCode) -> &'static str {
    NAMES.iter().find(|(c, _)| *c == code).map(|(_, n)| *n).unwrap_or("unknown")
}

fn code_of(name: &str) -> Option<ErrorCode> {
    NAMES.iter().find(|(_, n)| *n == name).map(|(c, _)| *c)
}

/// One error as the wire carries it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WireError {
    pub code: ErrorCode,
    /// Lowercase text for people, without the code.
    pub message: String,
    /// How long the caller should wait before trying again, when the code asks for that.
    pub retry_after_ms: Option<u64>,
}

const RETRY_PREFIX: &str = " (retry after ";
const RETRY_SUFFIX: &str = " ms)";

impl WireError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> WireError {
        WireError { code, message: message.into(), retry_after_ms: None }
    }

    /// An error that asks the caller to wait `ms` before trying again.
    pub fn retry_after(code: ErrorCode, message: impl Into<String>, ms: u64) -> WireError {
        WireError { code, message: message.into(), retry_after_ms: Some(ms) }
    }

    /// The exception text: `"<code>: <message>[ (retry after N ms)]"`.
    pub fn encode(&self) -> String {
        match self.retry_after_ms {
            Some(ms) => format!("{}: {}{RETRY_PREFIX}{ms}{RETRY_SUFFIX}", code_name(self.code), self.message),
            None => format!("{}: {}", code_name(self.code), self.message),
        }
    }

    /// The RPC exception the server sends.
    pub fn into_rpc(self) -> capnp::Error {
        capnp::Error::failed(self.encode())
    }

    /// Reads an exception text; text without a known code prefix is [`ErrorCode::Unknown`] with
    /// the whole text as its message.
    pub fn parse(text: &str) -> WireError {
        let Some((code, message)) = text.split_once(": ").and_then(|(n, rest)| Some((code_of(n)?, rest)))
        else {
            return WireError::new(ErrorCode::Unknown, text);
        };
        let retry = message
            .strip_suffix(RETRY_SUFFIX)
            .and_then(|m| m.rsplit_once(RETRY_PREFIX))
            .and_then(|(m, n)| Some((m, n.parse::<u64>().ok()?)));
        match retry {
            Some((m, ms)) => WireError::retry_after(code, m, ms),
            None => WireError::new(code, message),
        }
    }
}

impl fmt::Display for WireError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)?;
        if let Some(ms) = self.retry_after_ms {
            write!(f, "{RETRY_PREFIX}{ms}{RETRY_SUFFIX}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_schema_code_has_one_name() {
        let mut n = 0u16;
        while let Ok(code) = ErrorCode::try_from(n) {
            assert!(NAMES.iter().filter(|(c, _)| *c == code).count() == 1, "code {n} named once");
            n += 1;
        }
        assert_eq!(usize::from(n), NAMES.len(), "the table names exactly the schema's codes");
    }

    #[test]
    fn errors_round_trip_through_their_text() {
        let e = WireError::retry_after(ErrorCode::RateLimited, "too many enqueues: 5/s", 1200);
        assert_eq!(e.encode(), "rateLimited: too many enqueues: 5/s (retry after 1200 ms)");
        assert_eq!(WireError::parse(&e.encode()), e);
        let plain = WireError::new(ErrorCode::TooLarge, "payload too large: 3 > 2 bytes");
        assert_eq!(WireError::parse(&plain.encode()), plain);
        assert_eq!(WireError::parse("queue full: x"), WireError::new(ErrorCode::Unknown, "queue full: x"));
        assert_eq!(plain.to_string(), "payload too large: 3 > 2 bytes");
    }
}
