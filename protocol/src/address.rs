//! Addresses of an envd endpoint, as written on command lines: `unix:PATH`, `vsock:CID:PORT`,
//! `hvsock:UDS_PATH:PORT` (Firecracker-style hybrid vsock over a Unix socket), and for listeners
//! `vsock:PORT`.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

/// The port envd listens on by default.
pub const DEFAULT_VSOCK_PORT: u32 = 49983;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Address {
    /// A Unix stream socket.
    Unix(PathBuf),
    /// AF_VSOCK. `cid` is `None` for a listener (any CID).
    Vsock { cid: Option<u32>, port: u32 },
    /// A Unix socket speaking the hybrid-vsock handshake (`CONNECT <port>\n` / `OK <n>\n`).
    HybridVsock { uds: PathBuf, port: u32 },
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("bad address {input:?}: {reason} (expected unix:PATH, vsock:CID:PORT, vsock:PORT or hvsock:UDS_PATH:PORT)")]
pub struct AddressError {
    input: String,
    reason: &'static str,
}

impl FromStr for Address {
    type Err = AddressError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = |reason| AddressError {
            input: s.to_string(),
            reason,
        };
        let (scheme, rest) = s.split_once(':').ok_or_else(|| err("missing scheme"))?;
        match scheme {
            "unix" if !rest.is_empty() => Ok(Address::Unix(PathBuf::from(rest))),
            "unix" => Err(err("empty path")),
            "vsock" => {
                let parse = |v: &str| {
                    v.parse::<u32>()
                        .map_err(|_| err("CID and port must be numbers"))
                };
                match rest.split_once(':') {
                    Some((cid, port)) => Ok(Address::Vsock {
                        cid: Some(parse(cid)?),
                        port: parse(port)?,
                    }),
                    None => Ok(Address::Vsock {
                        cid: None,
                        port: parse(rest)?,
                    }),
                }
            }
            "hvsock" => {
                // The path may itself contain ':', the port is after the last one.
                let (uds, port) = rest.rsplit_once(':').ok_or_else(|| err("missing port"))?;
                if uds.is_empty() {
                    return Err(err("empty path"));
                }
                let port = port.parse().map_err(|_| err("port must be a number"))?;
                Ok(Address::HybridVsock {
                    uds: PathBuf::from(uds),
                    port,
                })
            }
            _ => Err(err("unknown scheme")),
        }
    }
}

impl fmt::Display for Address {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Address::Unix(p) => write!(f, "unix:{}", p.display()),
            Address::Vsock {
                cid: Some(cid),
                port,
            } => write!(f, "vsock:{cid}:{port}"),
            Address::Vsock { cid: None, port } => write!(f, "vsock:{port}"),
            Address::HybridVsock { uds, port } => write!(f, "hvsock:{}:{port}", uds.display()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_form() {
        assert_eq!(
            "unix:/run/envd.sock".parse(),
            Ok(Address::Unix("/run/envd.sock".into()))
        );
        assert_eq!(
            "vsock:3:49983".parse(),
            Ok(Address::Vsock {
                cid: Some(3),
                port: 49983
            })
        );
        assert_eq!(
            "vsock:49983".parse(),
            Ok(Address::Vsock {
                cid: None,
                port: 49983
            })
        );
        assert_eq!(
            "hvsock:/tmp/a:b/v.sock:52".parse(),
            Ok(Address::HybridVsock {
                uds: "/tmp/a:b/v.sock".into(),
                port: 52
            })
        );
    }

    #[test]
    fn display_round_trips() {
        for s in ["unix:/x", "vsock:3:1", "vsock:9", "hvsock:/v.sock:49983"] {
            assert_eq!(s.parse::<Address>().unwrap().to_string(), s);
        }
    }

    #[test]
    fn rejects_malformed() {
        for s in [
            "",
            "unix:",
            "tcp:1.2.3.4:5",
            "vsock:x:1",
            "vsock:1:y",
            "hvsock:/p",
            "hvsock::5",
            "/path",
        ] {
            assert!(s.parse::<Address>().is_err(), "{s} should not parse");
        }
    }
}
