//! The 8250 serial console (vm-superio), its interrupt through an irqfd, and its output written to
//! a log file while watching for a kernel panic.

use std::io::{self, Write};
use std::sync::{Arc, Mutex};

use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use super::bus::BusDevice;

/// Raises the serial interrupt by signalling the irqfd KVM injects from.
pub struct IrqTrigger(pub EventFd);

impl Trigger for IrqTrigger {
    type E = io::Error;
    fn trigger(&self) -> io::Result<()> {
        self.0.write(1)
    }
}

/// The first line of a kernel panic, once one has been printed.
pub type PanicWatch = Arc<Mutex<Option<String>>>;

/// Console output: to a file (or nowhere), line by line, noting a kernel panic and stopping the
/// VM on one (a guest booted with `panic=0` would otherwise hang there forever).
pub struct ConsoleOutput {
    sink: Option<io::LineWriter<std::fs::File>>,
    line: Vec<u8>,
    panic: PanicWatch,
    stop: Option<std::sync::mpsc::Sender<crate::vmm::VmStop>>,
}

const MAX_LINE: usize = 4096;

impl ConsoleOutput {
    pub fn new(file: Option<std::fs::File>, panic: PanicWatch) -> Self {
        ConsoleOutput {
            sink: file.map(io::LineWriter::new),
            line: Vec::new(),
            panic,
            stop: None,
        }
    }

    /// Stops the VM (through `stop`) as soon as a kernel panic is printed.
    pub fn stop_on_panic(mut self, stop: std::sync::mpsc::Sender<crate::vmm::VmStop>) -> Self {
        self.stop = Some(stop);
        self
    }

    fn end_line(&mut self) {
        let text = String::from_utf8_lossy(&self.line);
        if text.contains("Kernel panic - not syncing") {
            let first = {
                let mut panic = self.panic.lock().unwrap_or_else(|e| e.into_inner());
                let first = panic.is_none();
                panic.get_or_insert_with(|| text.trim().to_string());
                first
            };
            if first {
                if let Some(stop) = &self.stop {
                    let _ = stop.send(crate::vmm::VmStop::Reset);
                }
            }
        }
        self.line.clear();
    }
}

impl Write for ConsoleOutput {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        for b in buf {
            if *b == b'\n' || self.line.len() >= MAX_LINE {
                self.end_line();
            } else {
                self.line.push(*b);
            }
        }
        if let Some(sink) = &mut self.sink {
            // A full disk must not stop the guest: the console is best effort.
            let _ = sink.write_all(buf);
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        match &mut self.sink {
            Some(s) => s.flush(),
            None => Ok(()),
        }
    }
}

pub struct SerialDevice(pub Serial<IrqTrigger, vm_superio::serial::NoEvents, ConsoleOutput>);

/// The UART registers, as saved in a snapshot (vm-superio's `SerialState`, made serializable).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SerialSnapshot {
    pub baud_divisor_low: u8,
    pub baud_divisor_high: u8,
    pub interrupt_enable: u8,
    pub interrupt_identification: u8,
    pub line_control: u8,
    pub line_status: u8,
    pub modem_control: u8,
    pub modem_status: u8,
    pub scratch: u8,
    pub in_buffer: Vec<u8>,
}

impl SerialDevice {
    pub fn new(irq: EventFd, out: ConsoleOutput) -> Self {
        SerialDevice(Serial::new(IrqTrigger(irq), out))
    }

    pub fn save_state(&self) -> SerialSnapshot {
        let s = self.0.state();
        SerialSnapshot {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer,
        }
    }

    pub fn restore(irq: EventFd, out: ConsoleOutput, s: &SerialSnapshot) -> io::Result<Self> {
        let state = vm_superio::serial::SerialState {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer.clone(),
        };
        Serial::from_state(&state, IrqTrigger(irq), vm_superio::serial::NoEvents, out)
            .map(SerialDevice)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("serial state: {e:?}")))
    }
}

impl BusDevice for SerialDevice {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if let (Some(first), Ok(off)) = (data.first_mut(), u8::try_from(offset)) {
            *first = self.0.read(off);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let (Some(value), Ok(off)) = (data.first(), u8::try_from(offset)) {
            if let Err(e) = self.0.write(off, *value) {
                tracing::debug!(error = ?e, "serial write");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notes_a_kernel_panic_line_and_stops_the_vm_once() {
        let watch = PanicWatch::default();
        let (tx, rx) = std::sync::mpsc::channel();
        let mut out = ConsoleOutput::new(None, watch.clone()).stop_on_panic(tx);
        out.write_all(b"[    1.0] booting\n[    2.0] Kernel panic - not syncing: VFS: Unable to mount root fs\n")
            .unwrap();
        let seen = watch.lock().unwrap().clone().unwrap();
        assert!(seen.contains("Unable to mount root fs"));
        out.write_all(b"Kernel panic - not syncing: again\n")
            .unwrap();
        assert_eq!(rx.try_recv(), Ok(crate::vmm::VmStop::Reset));
        assert!(rx.try_recv().is_err(), "one stop per panic");
    }

    #[test]
    fn transmits_through_the_thr_register() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("console.log");
        let file = std::fs::File::create(&path).unwrap();
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut dev = SerialDevice::new(irq, ConsoleOutput::new(Some(file), PanicWatch::default()));
        for b in b"hi\n" {
            dev.write(0, &[*b]);
        }
        dev.0.writer_mut().flush().unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "hi\n");
    }
}
