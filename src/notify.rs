//! systemd's readiness protocol (`sd_notify(3)`), by hand: a datagram of `KEY=value` lines sent
//! to the Unix socket named by `$NOTIFY_SOCKET` (a path, or `@name` for a Linux abstract
//! socket). With `Type=notify` (`dist/ferroblk.service`) systemd considers the daemon started
//! once `READY=1` arrives, which `serve` sends after every export listens, and `STOPPING=1` when
//! it begins to shut down. Without `$NOTIFY_SOCKET` nothing is sent.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::UnixDatagram;

/// Sends `state` (`READY=1`, `STOPPING=1`) to the service manager, if one asked for it. A
/// failure is logged, never fatal: the daemon serves either way.
pub fn notify(state: &str) {
    let Some(socket) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    match notify_to(&socket, state) {
        Ok(()) => tracing::debug!(state, "sent to the service manager"),
        Err(e) => tracing::warn!(socket = %socket.to_string_lossy(), state, error = %e,
            "cannot notify the service manager"),
    }
}

/// Sends `state` as one datagram to `socket`: an absolute path, or `@name` for the abstract
/// socket `name`.
pub fn notify_to(socket: &OsStr, state: &str) -> std::io::Result<()> {
    let dgram = UnixDatagram::unbound()?;
    let bytes = socket.as_bytes();
    let sent = match bytes.first() {
        Some(b'@') => {
            use std::os::linux::net::SocketAddrExt;
            let addr = std::os::unix::net::SocketAddr::from_abstract_name(&bytes[1..])?;
            dgram.send_to_addr(state.as_bytes(), &addr)?
        }
        Some(b'/') => dgram.send_to(state.as_bytes(), socket)?,
        _ => {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "NOTIFY_SOCKET is neither an absolute path nor an @abstract name",
            ));
        }
    };
    if sent != state.len() {
        return Err(std::io::Error::other("short datagram"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sends_to_a_path_and_to_an_abstract_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify.sock");
        let rx = UnixDatagram::bind(&path).unwrap();
        notify_to(path.as_os_str(), "READY=1").unwrap();
        let mut buf = [0u8; 64];
        let n = rx.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1");

        use std::os::linux::net::SocketAddrExt;
        let name = format!("ferroblk-notify-test-{}", std::process::id());
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let rx = UnixDatagram::bind_addr(&addr).unwrap();
        notify_to(OsStr::new(&format!("@{name}")), "STOPPING=1").unwrap();
        let n = rx.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"STOPPING=1");

        assert!(notify_to(OsStr::new("relative.sock"), "READY=1").is_err());
    }
}
