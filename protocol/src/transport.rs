//! Connecting to an envd endpoint over any of the supported transports.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::UnixStream;
use tokio_vsock::{VsockAddr, VsockStream};

use crate::address::Address;

/// A connected byte stream to envd, whatever carries it.
pub enum Connection {
    Unix(UnixStream),
    Vsock(VsockStream),
}

/// How many times a vsock connect that timed out in the kernel is tried.
const VSOCK_CONNECT_ATTEMPTS: u32 = 3;

/// The longest reply line of a hybrid-vsock handshake we accept (`OK 4294967295\n` is 14 bytes).
const MAX_HANDSHAKE_REPLY: usize = 32;

/// Opens a connection to `addr`. For hybrid vsock this includes the `CONNECT` handshake.
pub async fn connect(addr: &Address) -> io::Result<Connection> {
    match addr {
        Address::Unix(path) => Ok(Connection::Unix(UnixStream::connect(path).await?)),
        Address::Vsock { cid, port } => {
            let cid = cid.ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "a vsock address to connect to needs a CID",
                )
            })?;
            let addr = VsockAddr::new(cid, *port);
            // The kernel gives up on a vsock connect the guest has not answered within its
            // connect timeout (2 s by default), which a busy guest (many connections at once, or
            // a nested VM) can miss while it is perfectly alive. Try again a few times before
            // reporting the timeout.
            let mut attempt = 1;
            loop {
                match VsockStream::connect(addr).await {
                    Ok(stream) => return Ok(Connection::Vsock(stream)),
                    Err(e)
                        if e.kind() == io::ErrorKind::TimedOut
                            && attempt < VSOCK_CONNECT_ATTEMPTS =>
                    {
                        attempt += 1;
                    }
                    Err(e) => return Err(e),
                }
            }
        }
        Address::HybridVsock { uds, port } => {
            let mut stream = UnixStream::connect(uds).await?;
            hybrid_handshake(&mut stream, *port).await?;
            Ok(Connection::Unix(stream))
        }
    }
}

/// Performs the host side of the Firecracker hybrid-vsock handshake. Reads the reply byte by byte so
/// that nothing after the newline (the first bytes from the guest) is consumed here.
async fn hybrid_handshake(stream: &mut UnixStream, port: u32) -> io::Result<()> {
    stream
        .write_all(format!("CONNECT {port}\n").as_bytes())
        .await?;
    let mut line = Vec::with_capacity(16);
    loop {
        let byte = match stream.read_u8().await {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                return Err(io::Error::new(
                    io::ErrorKind::ConnectionRefused,
                    format!("hybrid vsock: connection to port {port} closed during the handshake (nothing listening?)"),
                ))
            }
            Err(e) => return Err(e),
        };
        if byte == b'\n' {
            break;
        }
        line.push(byte);
        if line.len() > MAX_HANDSHAKE_REPLY {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "hybrid vsock: handshake reply too long",
            ));
        }
    }
    let reply = String::from_utf8_lossy(&line);
    match reply.strip_prefix("OK ") {
        Some(n) if n.trim().parse::<u32>().is_ok() => Ok(()),
        _ => Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("hybrid vsock: unexpected handshake reply {reply:?}"),
        )),
    }
}

impl AsyncRead for Connection {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Connection::Unix(s) => Pin::new(s).poll_read(cx, buf),
            Connection::Vsock(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Connection {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Connection::Unix(s) => Pin::new(s).poll_write(cx, buf),
            Connection::Vsock(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Connection::Unix(s) => Pin::new(s).poll_flush(cx),
            Connection::Vsock(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Connection::Unix(s) => Pin::new(s).poll_shutdown(cx),
            Connection::Vsock(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::UnixListener;

    async fn fake_hybrid_server(reply: &'static [u8]) -> (tempfile::TempDir, Address) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v.sock");
        let listener = UnixListener::bind(&path).unwrap();
        tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut buf = [0u8; 64];
            let n = s.read(&mut buf).await.unwrap();
            assert_eq!(&buf[..n], b"CONNECT 49983\n");
            s.write_all(reply).await.unwrap();
            // Keep the socket open until the client is done.
            let _ = s.read(&mut buf).await;
        });
        (
            dir,
            Address::HybridVsock {
                uds: path,
                port: 49983,
            },
        )
    }

    #[tokio::test]
    async fn hybrid_handshake_accepts_ok_and_keeps_following_bytes() {
        let (_dir, addr) = fake_hybrid_server(b"OK 1073741824\nhello").await;
        let mut conn = connect(&addr).await.unwrap();
        let mut rest = [0u8; 5];
        conn.read_exact(&mut rest).await.unwrap();
        assert_eq!(&rest, b"hello");
    }

    #[tokio::test]
    async fn hybrid_handshake_rejects_other_replies() {
        let (_dir, addr) = fake_hybrid_server(b"NOPE\n").await;
        let err = connect(&addr).await.err().unwrap();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
    }
}
