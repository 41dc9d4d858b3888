//! Stream I/O for payloads: gathered writes (headers and payloads in one `writev`, payloads never
//! copied into a staging buffer) and reads into fresh buffers that are not zeroed first.

use std::io::IoSlice;

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
