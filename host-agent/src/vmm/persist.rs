//! The whole VM's saved state, as plain serde structs (Firecracker's `MicrovmState` shape).

use kvm_bindings::CpuId;
use serde::{Deserialize, Serialize};

use super::devices::serial::SerialSnapshot;
use super::devices::virtio::mmio::MmioTransportState;
use super::snapshot::SnapshotKind;
use super::vstate::vcpu::VcpuState;
use super::vstate::vm::VmState;

/// The CPU a snapshot was taken on: vendor string and family/model/stepping. Restoring on another
/// model would hand the guest CPUID and MSRs the host cannot honour.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CpuModel {
    pub vendor: String,
    /// CPUID.1:EAX (stepping, model, family, extended model and family).
    pub signature: u32,
}

impl CpuModel {
    pub fn from_cpuid(cpuid: &CpuId) -> CpuModel {
        let mut vendor = String::new();
        let mut signature = 0;
        for e in cpuid.as_slice() {
            match e.function {
                0 => {
                    for reg in [e.ebx, e.edx, e.ecx] {
                        vendor.push_str(&String::from_utf8_lossy(&reg.to_le_bytes()));
                    }
                }
                1 => signature = e.eax,
                _ => {}
            }
        }
        CpuModel { vendor, signature }
    }
}

impl std::fmt::Display for CpuModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} signature {:#x}", self.vendor, self.signature)
    }
}

/// The vsock device: where it sits and its transport's state. The host side (the Unix socket) is
/// chosen again at restore.
#[derive(Serialize, Deserialize)]
pub struct VsockDeviceState {
    pub guest_cid: u64,
    pub mmio_base: u64,
    pub irq: u32,
    pub transport: MmioTransportState,
}

#[derive(Serialize, Deserialize)]
pub struct MicrovmState {
    pub kind: SnapshotKind,
    pub cpu: CpuModel,
    pub mem_mib: u64,
    pub vm: VmState,
    pub vcpus: Vec<VcpuState>,
    pub serial: SerialSnapshot,
    pub vsock: Option<VsockDeviceState>,
}
