//! KVM plumbing against the local /dev/kvm with a tiny real-mode payload (no kernel): VM creation
//! with irqchip and PIT, memory slots, vCPU run loop, port-I/O dispatch to the serial console and to
//! the ACPI sleep register that powers the VM off.

use std::sync::mpsc::channel;
use std::sync::{Arc, Mutex};

use host_agent::vmm::devices::bus::Bus;
use host_agent::vmm::devices::legacy::AcpiSleep;
use host_agent::vmm::devices::serial::{ConsoleOutput, PanicWatch, SerialDevice};
use host_agent::vmm::layout::{ACPI_SLEEP_CONTROL_PORT, SERIAL_PORT, SERIAL_PORT_LEN};
use host_agent::vmm::vstate::memory;
use host_agent::vmm::vstate::vcpu::Vcpu;
use host_agent::vmm::vstate::vm::Vm;
use host_agent::vmm::VmStop;
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

const LOAD_ADDR: u64 = 0x1000;

/// mov dx, 0x3f8; mov al, 'o'; out dx, al; mov al, 'k'; out dx, al;
/// mov dx, 0x600; mov al, (5 << 2) | 0x20; out dx, al; hlt
const PAYLOAD: &[u8] = &[
    0xba, 0xf8, 0x03, 0xb0, b'o', 0xee, 0xb0, b'k', 0xee, 0xba, 0x00, 0x06, 0xb0, 0x34, 0xee, 0xf4,
];

/// vCPU 0 in real mode with CS at 0, about to run the payload at `LOAD_ADDR`.
fn real_mode_vcpu(vm: &Vm) -> Vcpu {
    let vcpu = Vcpu::new(vm, 0).expect("vCPU");
    let mut sregs = vcpu.fd.get_sregs().unwrap();
    sregs.cs.base = 0;
    sregs.cs.selector = 0;
    vcpu.fd.set_sregs(&sregs).unwrap();
    let mut regs = vcpu.fd.get_regs().unwrap();
    regs.rip = LOAD_ADDR;
    regs.rflags = 2;
    vcpu.fd.set_regs(&regs).unwrap();
    vcpu
}

#[test]
fn a_real_mode_payload_prints_on_the_serial_port_and_powers_off() {
    if !std::path::Path::new("/dev/kvm").exists() {
        eprintln!("skipped: no /dev/kvm");
        return;
    }
    let vm = Vm::new().expect("create VM");
    let (mem, _mappings) = memory::create(64).expect("memory");
    vm.register_memory(&mem).expect("memory slots");
    mem.write_slice(PAYLOAD, GuestAddress(LOAD_ADDR)).unwrap();

    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("console.log");
    let (stop_tx, stop_rx) = channel();
    let serial = Arc::new(Mutex::new(SerialDevice::new(
        EventFd::new(libc::EFD_NONBLOCK).unwrap(),
        ConsoleOutput::new(
            Some(std::fs::File::create(&log).unwrap()),
            PanicWatch::default(),
        ),
    )));
    let mut io = Bus::default();
    io.insert(
        u64::from(SERIAL_PORT),
        u64::from(SERIAL_PORT_LEN),
        serial.clone(),
    )
    .unwrap();
    io.insert(
        u64::from(ACPI_SLEEP_CONTROL_PORT),
        2,
        Arc::new(Mutex::new(AcpiSleep::new(stop_tx.clone()))),
    )
    .unwrap();

    let vcpu = real_mode_vcpu(&vm);
    let _handle = vcpu
        .spawn(
            Arc::new(io),
            Arc::new(Bus::default()),
            stop_tx,
            Arc::new(Vec::new()),
        )
        .unwrap();

    let stop = stop_rx
        .recv_timeout(std::time::Duration::from_secs(60))
        .expect("the payload stops the VM");
    assert_eq!(stop, VmStop::PowerOff);
    std::io::Write::flush(serial.lock().unwrap().0.writer_mut()).unwrap();
    assert_eq!(std::fs::read_to_string(&log).unwrap(), "ok");
}

/// `jmp $`: spins until the VMM pauses it.
const SPIN: &[u8] = &[0xeb, 0xfe];

#[test]
fn a_spinning_vcpu_pauses_saves_its_state_and_resumes() {
    if !std::path::Path::new("/dev/kvm").exists() {
        eprintln!("skipped: no /dev/kvm");
        return;
    }
    let vm = Vm::new().expect("create VM");
    let (mem, _mappings) = memory::create(64).expect("memory");
    vm.register_memory(&mem).expect("memory slots");
    mem.write_slice(SPIN, GuestAddress(LOAD_ADDR)).unwrap();
    let vcpu = real_mode_vcpu(&vm);
    let msrs = Arc::new(vm.kvm.get_msr_index_list().unwrap().as_slice().to_vec());
    let (stop_tx, stop_rx) = channel();
    let handle = vcpu
        .spawn(
            Arc::new(Bus::default()),
            Arc::new(Bus::default()),
            stop_tx,
            msrs,
        )
        .unwrap();
    for _ in 0..3 {
        handle.pause().expect("pause");
        let state = handle.save().expect("save");
        assert_eq!(state.regs.rip, LOAD_ADDR, "parked on the spin loop");
        assert!(!state.msrs.is_empty());
        handle.resume().expect("resume");
    }
    assert!(
        stop_rx.try_recv().is_err(),
        "the vCPU never stopped on its own"
    );
    handle.pause().expect("pause");
}

#[test]
fn stopping_a_vcpu_ends_its_thread_whether_it_runs_or_is_paused() {
    if !std::path::Path::new("/dev/kvm").exists() {
        eprintln!("skipped: no /dev/kvm");
        return;
    }
    for pause_first in [false, true] {
        let vm = Vm::new().expect("create VM");
        let (mem, _mappings) = memory::create(64).expect("memory");
        vm.register_memory(&mem).expect("memory slots");
        mem.write_slice(SPIN, GuestAddress(LOAD_ADDR)).unwrap();
        let (stop_tx, stop_rx) = channel();
        let handle = real_mode_vcpu(&vm)
            .spawn(
                Arc::new(Bus::default()),
                Arc::new(Bus::default()),
                stop_tx,
                Arc::new(Vec::new()),
            )
            .unwrap();
        if pause_first {
            handle.pause().expect("pause");
        }
        assert!(
            handle.stop(),
            "the vCPU thread ended (paused first: {pause_first})"
        );
        match stop_rx.recv_timeout(std::time::Duration::from_secs(10)) {
            Ok(VmStop::Failed(why)) => assert!(why.contains("VMM went away"), "{why}"),
            other => panic!("unexpected stop report: {other:?}"),
        }
    }
}
