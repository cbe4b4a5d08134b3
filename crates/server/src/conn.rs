//! A client connection that is plain TCP until STARTTLS/STLS, or TLS from
//! the start (ports 465/995).

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;

pub enum Conn {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
    /// Only while an upgrade is in progress (the stream has been moved out).
    Upgrading,
}

impl Conn {
    pub fn is_tls(&self) -> bool {
        matches!(self, Conn::Tls(_))
    }

    /// Writes `bytes` whole and flushes them, or fails (`TimedOut`) once
    /// the client has not taken them within `within`: a client that sends
    /// commands and never reads the replies fills the TCP window, and its
    /// connection is cut rather than waited for with its slot held.
    pub async fn write_within(&mut self, bytes: &[u8], within: Duration) -> io::Result<()> {
        let write = async {
            self.write_all(bytes).await?;
            self.flush().await
        };
        match tokio::time::timeout(within, write).await {
            Ok(result) => result,
            Err(_) => Err(io::Error::new(io::ErrorKind::TimedOut, "the client does not read its replies")),
        }
    }

    /// Performs the TLS handshake on a plain connection, within `timeout`:
    /// a client that connects to 465/995, or asks for STARTTLS/STLS, and
    /// then says nothing must not keep its slot (the connection is closed,
    /// `TimedOut`). Nothing read before this call survives it: the sessions
    /// discard their buffered input (CVE-2011-0411), and this layer keeps
    /// no buffer of its own.
    pub async fn upgrade(&mut self, acceptor: &TlsAcceptor, timeout: Duration) -> io::Result<()> {
        match std::mem::replace(self, Conn::Upgrading) {
            Conn::Plain(tcp) => {
                let peer = tcp.peer_addr().ok();
                match tokio::time::timeout(timeout, acceptor.accept(tcp)).await {
                    Ok(tls) => {
                        *self = Conn::Tls(Box::new(tls?));
                        Ok(())
                    }
                    Err(_) => {
                        tracing::info!(client = ?peer, "TLS handshake not done within {} s: connection closed", timeout.as_secs());
                        Err(io::Error::new(io::ErrorKind::TimedOut, "TLS handshake timed out"))
                    }
                }
            }
            other => {
                *self = other;
                Err(io::Error::other("TLS already active"))
            }
        }
    }
}

fn upgrading() -> io::Error {
    io::Error::new(io::ErrorKind::NotConnected, "connection lost during TLS upgrade")
}

impl AsyncRead for Conn {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
            Conn::Upgrading => Poll::Ready(Err(upgrading())),
        }
    }
}

impl AsyncWrite for Conn {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
            Conn::Upgrading => Poll::Ready(Err(upgrading())),
        }
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_flush(cx),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
            Conn::Upgrading => Poll::Ready(Err(upgrading())),
        }
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
            Conn::Upgrading => Poll::Ready(Ok(())),
        }
    }
}
