//! A minimal QMP client (QEMU's JSON control protocol over a Unix socket), for the harness watchdog:
//! read the state of a test host that went silent, and poke it.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use serde_json::{json, Value};

#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    #[error("QMP socket: {0}")]
    Io(#[from] std::io::Error),
    #[error("QMP sent something that is not JSON: {0}")]
    Json(#[from] serde_json::Error),
    #[error("QMP closed the connection")]
    Closed,
    #[error("QMP refused {command}: {error}")]
    Refused { command: String, error: Value },
}

pub struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Qmp {
    /// Connects, reads the greeting and leaves capability negotiation mode. Every read and write
    /// gives up after `timeout`, so a wedged QEMU cannot hang the harness.
    pub fn connect(path: &Path, timeout: Duration) -> Result<Qmp, QmpError> {
        let stream = UnixStream::connect(path)?;
        stream.set_read_timeout(Some(timeout))?;
        stream.set_write_timeout(Some(timeout))?;
        let mut qmp = Qmp {
            reader: BufReader::new(stream.try_clone()?),
            writer: stream,
        };
        qmp.read_message()?;
        qmp.execute("qmp_capabilities", None)?;
        Ok(qmp)
    }

    fn read_message(&mut self) -> Result<Value, QmpError> {
        let mut line = String::new();
        if self.reader.read_line(&mut line)? == 0 {
            return Err(QmpError::Closed);
        }
        Ok(serde_json::from_str(&line)?)
    }

    /// Runs one command and returns its `return` value (asynchronous events in between are skipped).
    pub fn execute(&mut self, command: &str, arguments: Option<Value>) -> Result<Value, QmpError> {
        let mut request = json!({ "execute": command });
        if let Some(args) = arguments {
            request["arguments"] = args;
        }
        self.writer.write_all(format!("{request}\n").as_bytes())?;
        loop {
            let mut reply = self.read_message()?;
            if let Some(ret) = reply.get_mut("return") {
                return Ok(ret.take());
            }
            if let Some(error) = reply.get_mut("error") {
                return Err(QmpError::Refused {
                    command: command.to_string(),
                    error: error.take(),
                });
            }
        }
    }

    /// A human monitor command (`info registers`, ...); returns its text.
    pub fn hmp(&mut self, command_line: &str) -> Result<String, QmpError> {
        let ret = self.execute(
            "human-monitor-command",
            Some(json!({ "command-line": command_line })),
        )?;
        Ok(ret.as_str().unwrap_or_default().to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;

    /// A scripted QMP peer on a real socket: greeting, then one reply per request line.
    fn serve(
        replies: Vec<&'static str>,
    ) -> (tempfile::TempDir, std::thread::JoinHandle<Vec<String>>) {
        let dir = tempfile::tempdir().unwrap();
        let listener = UnixListener::bind(dir.path().join("qmp.sock")).unwrap();
        let handle = std::thread::spawn(move || {
            let (stream, _) = listener.accept().unwrap();
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut writer = stream;
            writer.write_all(b"{\"QMP\": {\"version\": {}}}\n").unwrap();
            let mut seen = Vec::new();
            for reply in replies {
                let mut line = String::new();
                if reader.read_line(&mut line).unwrap() == 0 {
                    break;
                }
                seen.push(line.trim().to_string());
                writer.write_all(reply.as_bytes()).unwrap();
            }
            seen
        });
        (dir, handle)
    }

    #[test]
    fn commands_return_their_value_past_events_and_errors_are_reported() {
        let (dir, peer) = serve(vec![
            "{\"return\": {}}\n",
            "{\"event\": \"STOP\"}\n{\"return\": \"RAX=0\\r\\n\"}\n",
            "{\"error\": {\"class\": \"GenericError\", \"desc\": \"no\"}}\n",
        ]);
        let mut qmp = Qmp::connect(&dir.path().join("qmp.sock"), Duration::from_secs(5)).unwrap();
        assert_eq!(qmp.hmp("info registers").unwrap(), "RAX=0\r\n");
        let err = qmp.execute("inject-nmi", None).unwrap_err();
        assert!(err.to_string().contains("inject-nmi"), "{err}");
        let seen = peer.join().unwrap();
        assert_eq!(seen[0], "{\"execute\":\"qmp_capabilities\"}");
        assert!(
            seen[1].contains("\"command-line\":\"info registers\""),
            "{}",
            seen[1]
        );
    }

    #[test]
    fn a_silent_peer_times_out() {
        let dir = tempfile::tempdir().unwrap();
        let _listener = UnixListener::bind(dir.path().join("qmp.sock")).unwrap();
        // Accepted by the kernel's backlog, never greeted.
        let err = Qmp::connect(&dir.path().join("qmp.sock"), Duration::from_millis(200))
            .err()
            .expect("timeout");
        assert!(matches!(err, QmpError::Io(_)), "{err}");
    }
}
