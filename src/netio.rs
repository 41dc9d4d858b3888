//! Stream I/O for payloads: gathered writes (headers and payloads in one `writev`, payloads never
//! copied into a staging buffer) and reads into fresh buffers that are not zeroed first.

use std::io::IoSlice;
use std::os::fd::AsRawFd;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Reads exactly `len` bytes into a new buffer. Zeroing a buffer that the read overwrites at
/// once would cost about as much as the copy out of the kernel.
pub async fn read_exact_vec<R: AsyncRead + Unpin>(r: &mut R, len: usize) -> std::io::Result<Vec<u8>> {
    let mut buf = Vec::with_capacity(len);
    while buf.len() < len {
        let mut limited = (&mut *r).take((len - buf.len()) as u64);
        if limited.read_buf(&mut buf).await? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
    }
    Ok(buf)
}

/// Caps what socket `s` sends at `bytes_per_second`, paced by the kernel packet by packet
/// (`SO_MAX_PACING_RATE`; TCP paces by itself once it is set, whatever the qdisc). A burst
/// written at once then leaves over time instead of filling the link's queue.
pub fn set_pacing_rate(s: &impl AsRawFd, bytes_per_second: u64) -> std::io::Result<()> {
    // The kernel reads an unsigned long where the value is that long (4.20 and later).
    let rate = libc::c_ulong::try_from(bytes_per_second).unwrap_or(libc::c_ulong::MAX);
    // SAFETY: a plain setsockopt on an open descriptor, with a value the call owns and its size.
    let rc = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_MAX_PACING_RATE,
            (&rate as *const libc::c_ulong).cast(),
            std::mem::size_of::<libc::c_ulong>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Most slices handed to one `writev` (Linux accepts 1024).
const MAX_SLICES: usize = 512;

/// Writes every byte of `bufs`, in order, with as few system calls as the socket allows.
pub async fn write_all_vectored<W: AsyncWrite + Unpin>(w: &mut W, bufs: &[&[u8]]) -> std::io::Result<()> {
    let mut slices: Vec<IoSlice<'_>> = bufs.iter().filter(|b| !b.is_empty()).map(|b| IoSlice::new(b)).collect();
    let mut rest = &mut slices[..];
    while !rest.is_empty() {
        let n = rest.len().min(MAX_SLICES);
        let wrote = w.write_vectored(&rest[..n]).await?;
        if wrote == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        IoSlice::advance_slices(&mut rest, wrote);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::pin::Pin;
    use std::task::{Context, Poll};

    #[tokio::test]
    async fn a_pacing_rate_is_set_on_the_socket() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let s = tokio::net::TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let read = |s: &tokio::net::TcpStream| {
            let mut v: libc::c_ulong = 0;
            let mut len = std::mem::size_of::<libc::c_ulong>() as libc::socklen_t;
            // SAFETY: getsockopt into a c_ulong the test owns, its size given.
            let rc = unsafe {
                libc::getsockopt(
                    s.as_raw_fd(),
                    libc::SOL_SOCKET,
                    libc::SO_MAX_PACING_RATE,
                    (&mut v as *mut libc::c_ulong).cast(),
                    &mut len,
                )
            };
            assert_eq!((rc, len as usize), (0, std::mem::size_of::<libc::c_ulong>()));
            v
        };
        assert_eq!(read(&s), libc::c_ulong::MAX, "unpaced at first");
        set_pacing_rate(&s, 12 << 20).unwrap();
        assert_eq!(read(&s), 12 << 20);
    }

    /// Takes at most `step` bytes per call, like a socket with a small send buffer.
    struct Trickle {
        out: Vec<u8>,
        step: usize,
    }

    impl AsyncWrite for Trickle {
        fn poll_write(mut self: Pin<&mut Self>, _: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
            let n = buf.len().min(self.step);
            self.out.extend_from_slice(&buf[..n]);
            Poll::Ready(Ok(n))
        }
        fn poll_write_vectored(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            bufs: &[IoSlice<'_>],
        ) -> Poll<std::io::Result<usize>> {
            let mut left = self.step;
            for b in bufs {
                let n = b.len().min(left);
                self.out.extend_from_slice(&b[..n]);
                left -= n;
                if left == 0 {
                    break;
                }
            }
            Poll::Ready(Ok(self.step - left))
        }
        fn is_write_vectored(&self) -> bool {
            true
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    #[tokio::test]
    async fn exact_reads() {
        let data: Vec<u8> = (0..100_000u32).map(|i| (i % 253) as u8).collect();
        let mut r = &data[..];
        assert_eq!(read_exact_vec(&mut r, 70_000).await.unwrap(), &data[..70_000]);
        assert_eq!(read_exact_vec(&mut r, 0).await.unwrap(), Vec::<u8>::new());
        let err = read_exact_vec(&mut r, 30_001).await.unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::UnexpectedEof);
    }

    #[tokio::test]
    async fn partial_writes_keep_order_and_bytes() {
        let parts: Vec<Vec<u8>> = (0..700u32).map(|i| vec![(i % 251) as u8; (i % 7) as usize]).collect();
        let want: Vec<u8> = parts.concat();
        for step in [1, 3, 64, 1 << 20] {
            let mut w = Trickle { out: Vec::new(), step };
            let bufs: Vec<&[u8]> = parts.iter().map(|p| &p[..]).collect();
            write_all_vectored(&mut w, &bufs).await.unwrap();
            assert_eq!(w.out, want, "step {step}");
        }
    }
}
