//! CPUID for each vCPU: what KVM supports, with the topology and identity bits that must differ per
//! vCPU (initial APIC id, logical processor count), the hypervisor bit set, and the TSC-deadline
//! timer where KVM has one (it never reports that bit itself).

use kvm_bindings::CpuId;

/// CPUID.1:ECX bit 31: running under a hypervisor.
const ECX_HYPERVISOR: u32 = 1 << 31;
/// CPUID.1:EDX bit 28: hyper-threading / multi-core (logical processor count is valid).
const EDX_HTT: u32 = 1 << 28;
/// CPUID.1:ECX bit 24: the local APIC timer has TSC-deadline mode. KVM emulates it when it has
/// `KVM_CAP_TSC_DEADLINE_TIMER` but leaves the bit out of the supported CPUID; a VMM sets it (QEMU
/// and Firecracker do). Without it a Linux guest has no preset APIC timer rate and spends ~100 ms
/// of every boot measuring one (`calibrate_APIC_clock` spins for HZ/10 ticks).
const ECX_TSC_DEADLINE: u32 = 1 << 24;

/// Adjusts the supported CPUID for vCPU `id` of `count`; `tsc_deadline`: KVM has the TSC-deadline
/// timer.
pub fn for_vcpu(cpuid: &mut CpuId, id: u8, count: u8, tsc_deadline: bool) {
    for entry in cpuid.as_mut_slice() {
        match entry.function {
            0x1 => {
                entry.ebx =
                    (entry.ebx & 0x0000_ffff) | (u32::from(id) << 24) | (u32::from(count) << 16);
                entry.ecx |= ECX_HYPERVISOR;
                if tsc_deadline {
                    entry.ecx |= ECX_TSC_DEADLINE;
                }
                if count > 1 {
                    entry.edx |= EDX_HTT;
                }
            }
            // Extended topology: the x2APIC id of this vCPU.
            0xb | 0x1f => entry.edx = u32::from(id),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvm_bindings::kvm_cpuid_entry2;

    #[test]
    fn sets_apic_id_count_and_hypervisor_bit() {
        let mut cpuid = CpuId::from_entries(&[
            kvm_cpuid_entry2 {
                function: 1,
                ebx: 0xffff_0800,
                ..Default::default()
            },
            kvm_cpuid_entry2 {
                function: 0xb,
                ..Default::default()
            },
        ])
        .unwrap();
        for_vcpu(&mut cpuid, 3, 4, true);
        let e = cpuid.as_slice();
        assert_eq!(e[0].ebx >> 24, 3);
        assert_eq!((e[0].ebx >> 16) & 0xff, 4);
        assert_eq!(
            e[0].ebx & 0xffff,
            0x0800,
            "brand index and clflush size kept"
        );
        assert_ne!(e[0].ecx & ECX_HYPERVISOR, 0);
        assert_ne!(e[0].ecx & ECX_TSC_DEADLINE, 0);
        assert_eq!(e[1].edx, 3);

        let mut without = CpuId::from_entries(&[kvm_cpuid_entry2 {
            function: 1,
            ..Default::default()
        }])
        .unwrap();
        for_vcpu(&mut without, 0, 1, false);
        assert_eq!(without.as_slice()[0].ecx & ECX_TSC_DEADLINE, 0);
    }
}
