//! What the CLI's integration tests share: the binary, child processes that die with the test,
//! free ports.

#![allow(dead_code, clippy::unwrap_used)]

use std::process::Child;

pub(crate) const DF: &str = env!("CARGO_BIN_EXE_df");

/// A child process, killed and reaped when dropped (a failing test leaves no node behind).
pub(crate) struct Daemon(pub(crate) Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A TCP port on 127.0.0.1 free a moment ago.
pub(crate) fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}
