//! x86_64: the zero page and e820 map, boot registers and page tables, CPUID and MSRs.

pub mod boot;
pub mod cpuid;
pub mod interrupts;
pub mod msr;
pub mod regs;
