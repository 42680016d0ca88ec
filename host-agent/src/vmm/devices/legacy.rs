//! Legacy platform bits a stock kernel uses to stop the machine: the i8042 controller's reset line
//! (`reboot=k`, and a fallback on any reboot) and the hardware-reduced ACPI sleep registers (power-off
//! through `\_S5_`).

use std::sync::mpsc::Sender;

use super::bus::BusDevice;
use crate::vmm::acpi::S5_SLEEP_TYPE;
use crate::vmm::VmStop;

/// i8042 at ports 0x60-0x64: only the command that pulses the CPU reset line does anything.
pub struct I8042 {
    stop: Sender<VmStop>,
}

const I8042_COMMAND_OFFSET: u64 = 4;
const I8042_CMD_RESET: u8 = 0xfe;

impl I8042 {
    pub fn new(stop: Sender<VmStop>) -> Self {
        I8042 { stop }
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        // Status 0: no data, input buffer empty; the kernel finds no keyboard and moves on.
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset == I8042_COMMAND_OFFSET && data.first() == Some(&I8042_CMD_RESET) {
            tracing::info!("the guest pulsed the i8042 reset line");
            let _ = self.stop.send(VmStop::Reset);
        }
    }
}

/// The sleep control (offset 0) and status (offset 1) registers named in the FADT.
pub struct AcpiSleep {
    stop: Sender<VmStop>,
}

const SLP_EN: u8 = 1 << 5;

impl AcpiSleep {
    pub fn new(stop: Sender<VmStop>) -> Self {
        AcpiSleep { stop }
    }
}

impl BusDevice for AcpiSleep {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let Some(&value) = data.first() else { return };
        if offset == 0 && value & SLP_EN != 0 && (value >> 2) & 0x7 == S5_SLEEP_TYPE {
            let _ = self.stop.send(VmStop::PowerOff);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn s5_with_slp_en_powers_off_and_reset_command_resets() {
        let (tx, rx) = std::sync::mpsc::channel();
        let mut sleep = AcpiSleep::new(tx.clone());
        sleep.write(0, &[S5_SLEEP_TYPE << 2]); // no SLP_EN
        sleep.write(0, &[(3 << 2) | SLP_EN]); // S3: ignored
        assert!(rx.try_recv().is_err());
        sleep.write(0, &[(S5_SLEEP_TYPE << 2) | SLP_EN]);
        assert_eq!(rx.try_recv(), Ok(VmStop::PowerOff));

        let mut kbd = I8042::new(tx);
        kbd.write(0, &[I8042_CMD_RESET]);
        assert!(rx.try_recv().is_err());
        kbd.write(4, &[I8042_CMD_RESET]);
        assert_eq!(rx.try_recv(), Ok(VmStop::Reset));
    }
}
