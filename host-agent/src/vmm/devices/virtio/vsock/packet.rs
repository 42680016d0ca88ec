//! The virtio-vsock packet header (virtio spec 5.10.6) and moving packets between guest memory
//! descriptor chains and host buffers.
//!
//! The header is decoded from and encoded to plain bytes here, so the layout is tested without
//! guest memory; the chain helpers only add bounds checks around `virtio_queue::{Reader, Writer}`,
//! which already refuse descriptors that point outside guest memory.

use std::io::{Read, Write};

use virtio_queue::{DescriptorChain, Reader, Writer};
use vm_memory::GuestMemoryMmap;

/// Size of `struct virtio_vsock_hdr` on the wire (it is packed).
pub const HDR_SIZE: usize = 44;

/// The largest payload one packet may carry. Linux never sends more than 64 KiB per packet
/// (VIRTIO_VSOCK_MAX_PKT_BUF_SIZE); anything bigger is a malformed packet, not a reason to allocate.
pub const MAX_PKT_DATA: usize = 64 * 1024;

/// The well-known CID of the host.
pub const HOST_CID: u64 = 2;

/// `type`: only stream sockets exist for this device.
pub const TYPE_STREAM: u16 = 1;

pub const OP_REQUEST: u16 = 1;
pub const OP_RESPONSE: u16 = 2;
pub const OP_RST: u16 = 3;
pub const OP_SHUTDOWN: u16 = 4;
pub const OP_RW: u16 = 5;
pub const OP_CREDIT_UPDATE: u16 = 6;
pub const OP_CREDIT_REQUEST: u16 = 7;

/// SHUTDOWN flags: the sender will receive no more data / send no more data.
pub const SHUTDOWN_RCV: u32 = 1;
pub const SHUTDOWN_SEND: u32 = 2;

/// `struct virtio_vsock_event` id telling the driver to drop every connection.
pub const EVENT_TRANSPORT_RESET: u32 = 0;

/// `struct virtio_vsock_hdr`, decoded.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VsockHeader {
    pub src_cid: u64,
    pub dst_cid: u64,
    pub src_port: u32,
    pub dst_port: u32,
    pub len: u32,
    pub type_: u16,
    pub op: u16,
    pub flags: u32,
    pub buf_alloc: u32,
    pub fwd_cnt: u32,
}

impl VsockHeader {
    pub fn decode(b: &[u8; HDR_SIZE]) -> VsockHeader {
        // The ranges are constant and inside the 44-byte array, so the conversions cannot fail;
        // `field` keeps that in one place instead of a try_into().unwrap() per field.
        fn field<const N: usize>(b: &[u8; HDR_SIZE], at: usize) -> [u8; N] {
            let mut out = [0u8; N];
            out.copy_from_slice(&b[at..at + N]);
            out
        }
        VsockHeader {
            src_cid: u64::from_le_bytes(field(b, 0)),
            dst_cid: u64::from_le_bytes(field(b, 8)),
            src_port: u32::from_le_bytes(field(b, 16)),
            dst_port: u32::from_le_bytes(field(b, 20)),
            len: u32::from_le_bytes(field(b, 24)),
            type_: u16::from_le_bytes(field(b, 28)),
            op: u16::from_le_bytes(field(b, 30)),
            flags: u32::from_le_bytes(field(b, 32)),
            buf_alloc: u32::from_le_bytes(field(b, 36)),
            fwd_cnt: u32::from_le_bytes(field(b, 40)),
        }
    }

    pub fn encode(&self) -> [u8; HDR_SIZE] {
        let mut b = [0u8; HDR_SIZE];
        b[0..8].copy_from_slice(&self.src_cid.to_le_bytes());
        b[8..16].copy_from_slice(&self.dst_cid.to_le_bytes());
        b[16..20].copy_from_slice(&self.src_port.to_le_bytes());
        b[20..24].copy_from_slice(&self.dst_port.to_le_bytes());
        b[24..28].copy_from_slice(&self.len.to_le_bytes());
        b[28..30].copy_from_slice(&self.type_.to_le_bytes());
        b[30..32].copy_from_slice(&self.op.to_le_bytes());
        b[32..36].copy_from_slice(&self.flags.to_le_bytes());
        b[36..40].copy_from_slice(&self.buf_alloc.to_le_bytes());
        b[40..44].copy_from_slice(&self.fwd_cnt.to_le_bytes());
        b
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PacketError {
    #[error("descriptor chain is not valid guest memory: {0}")]
    Chain(#[from] virtio_queue::Error),
    #[error("descriptor chain holds {0} bytes, less than the {HDR_SIZE}-byte header")]
    ShortHeader(usize),
    #[error("packet claims {claimed} data bytes but the chain holds {available}")]
    ShortData { claimed: u32, available: usize },
    #[error("packet claims {0} data bytes, more than the {MAX_PKT_DATA}-byte limit")]
    TooBig(u32),
    #[error("packet of {need} bytes does not fit the {have}-byte rx buffer")]
    NoRoom { need: usize, have: usize },
    #[error("guest memory access failed: {0}")]
    Io(#[from] std::io::Error),
}

/// A packet the guest sent on the tx queue, copied out of guest memory. Copying (at most 64 KiB)
/// keeps guest memory borrows out of the muxer and lets a connection buffer data it cannot write
/// to its host socket right away.
#[derive(Debug)]
pub struct TxPacket {
    pub hdr: VsockHeader,
    pub data: Vec<u8>,
}

/// Reads a tx packet from the device-readable part of `chain`. Header and data may be spread over
/// any number of descriptors.
pub fn read_tx_packet(
    mem: &GuestMemoryMmap,
    chain: DescriptorChain<&GuestMemoryMmap>,
) -> Result<TxPacket, PacketError> {
    let mut reader: Reader<'_> = Reader::new(mem, chain)?;
    let available = reader.available_bytes();
    if available < HDR_SIZE {
        return Err(PacketError::ShortHeader(available));
    }
    let mut raw = [0u8; HDR_SIZE];
    reader.read_exact(&mut raw)?;
    let hdr = VsockHeader::decode(&raw);
    if hdr.len as usize > MAX_PKT_DATA {
        return Err(PacketError::TooBig(hdr.len));
    }
    let available = reader.available_bytes();
    if hdr.len as usize > available {
        return Err(PacketError::ShortData {
            claimed: hdr.len,
            available,
        });
    }
    let mut data = vec![0u8; hdr.len as usize];
    reader.read_exact(&mut data)?;
    Ok(TxPacket { hdr, data })
}

/// A device-writable rx buffer from the guest, ready to take one packet.
pub struct RxBuffer<'a> {
    writer: Writer<'a>,
}

impl<'a> RxBuffer<'a> {
    pub fn new(
        mem: &'a GuestMemoryMmap,
        chain: DescriptorChain<&GuestMemoryMmap>,
    ) -> Result<Self, PacketError> {
        let writer: Writer<'a> = Writer::new(mem, chain)?;
        if writer.available_bytes() < HDR_SIZE {
            return Err(PacketError::ShortHeader(writer.available_bytes()));
        }
        Ok(RxBuffer { writer })
    }

    /// How many data bytes fit after the header.
    pub fn data_capacity(&self) -> usize {
        self.writer
            .available_bytes()
            .saturating_sub(HDR_SIZE)
            .min(MAX_PKT_DATA)
    }

    /// Writes the header (its `len` set from `data`) and the data; returns the bytes written, the
    /// length the used ring reports.
    pub fn write(mut self, hdr: &VsockHeader, data: &[u8]) -> Result<u32, PacketError> {
        if data.len() > self.data_capacity() {
            return Err(PacketError::NoRoom {
                need: HDR_SIZE + data.len(),
                have: self.writer.available_bytes(),
            });
        }
        let hdr = VsockHeader {
            len: data.len() as u32,
            ..*hdr
        };
        self.writer.write_all(&hdr.encode())?;
        self.writer.write_all(data)?;
        Ok((HDR_SIZE + data.len()) as u32)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Bytes, GuestAddress};

    const F_WRITE: u16 = virtio_bindings::bindings::virtio_ring::VRING_DESC_F_WRITE as u16;

    pub(crate) fn sample_header() -> VsockHeader {
        VsockHeader {
            src_cid: 3,
            dst_cid: HOST_CID,
            src_port: 1024,
            dst_port: 52,
            len: 5,
            type_: TYPE_STREAM,
            op: OP_RW,
            flags: 0,
            buf_alloc: 65536,
            fwd_cnt: 17,
        }
    }

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap()
    }

    fn desc(addr: u64, len: u32, flags: u16) -> RawDescriptor {
        RawDescriptor::from(SplitDescriptor::new(addr, len, flags, 0))
    }

    #[test]
    fn header_layout_is_little_endian_and_packed() {
        let hdr = sample_header();
        let b = hdr.encode();
        assert_eq!(&b[0..8], &3u64.to_le_bytes());
        assert_eq!(&b[8..16], &2u64.to_le_bytes());
        assert_eq!(&b[16..20], &1024u32.to_le_bytes());
        assert_eq!(&b[20..24], &52u32.to_le_bytes());
        assert_eq!(&b[24..28], &5u32.to_le_bytes());
        assert_eq!(&b[28..30], &1u16.to_le_bytes());
        assert_eq!(&b[30..32], &5u16.to_le_bytes());
        assert_eq!(&b[36..40], &65536u32.to_le_bytes());
        assert_eq!(&b[40..44], &17u32.to_le_bytes());
        assert_eq!(VsockHeader::decode(&b), hdr);
    }

    #[test]
    fn reads_header_and_data_from_one_descriptor() {
        let m = mem();
        let hdr = sample_header();
        m.write_slice(&hdr.encode(), GuestAddress(0x8000)).unwrap();
        m.write_slice(b"hello", GuestAddress(0x8000 + HDR_SIZE as u64))
            .unwrap();
        let q = MockSplitQueue::new(&m, 16);
        let chain = q
            .build_desc_chain(&[desc(0x8000, HDR_SIZE as u32 + 5, 0)])
            .unwrap();
        let pkt = read_tx_packet(&m, chain).unwrap();
        assert_eq!(pkt.hdr, hdr);
        assert_eq!(pkt.data, b"hello");
    }

    #[test]
    fn reads_header_and_data_split_across_descriptors() {
        let m = mem();
        let hdr = sample_header();
        let raw = hdr.encode();
        // The header itself straddles two descriptors, the data a third and fourth.
        m.write_slice(&raw[..10], GuestAddress(0x8000)).unwrap();
        m.write_slice(&raw[10..], GuestAddress(0x9000)).unwrap();
        m.write_slice(b"he", GuestAddress(0xa000)).unwrap();
        m.write_slice(b"llo", GuestAddress(0xb000)).unwrap();
        let q = MockSplitQueue::new(&m, 16);
        let chain = q
            .build_desc_chain(&[
                desc(0x8000, 10, 0),
                desc(0x9000, HDR_SIZE as u32 - 10, 0),
                desc(0xa000, 2, 0),
                desc(0xb000, 3, 0),
            ])
            .unwrap();
        let pkt = read_tx_packet(&m, chain).unwrap();
        assert_eq!(pkt.hdr, hdr);
        assert_eq!(pkt.data, b"hello");
    }

    #[test]
    fn malformed_tx_chains_are_errors() {
        let m = mem();
        let q = MockSplitQueue::new(&m, 16);

        // Too short for a header.
        let chain = q.build_desc_chain(&[desc(0x8000, 20, 0)]).unwrap();
        assert!(matches!(
            read_tx_packet(&m, chain),
            Err(PacketError::ShortHeader(20))
        ));

        // len larger than what the chain holds.
        let mut hdr = sample_header();
        hdr.len = 100;
        m.write_slice(&hdr.encode(), GuestAddress(0x8000)).unwrap();
        let chain = q
            .build_desc_chain(&[desc(0x8000, HDR_SIZE as u32 + 5, 0)])
            .unwrap();
        assert!(matches!(
            read_tx_packet(&m, chain),
            Err(PacketError::ShortData { claimed: 100, .. })
        ));

        // len over the packet limit.
        hdr.len = u32::MAX;
        m.write_slice(&hdr.encode(), GuestAddress(0x8000)).unwrap();
        let chain = q
            .build_desc_chain(&[desc(0x8000, HDR_SIZE as u32, 0)])
            .unwrap();
        assert!(matches!(
            read_tx_packet(&m, chain),
            Err(PacketError::TooBig(_))
        ));

        // A descriptor pointing outside guest memory.
        let chain = q
            .build_desc_chain(&[desc(0xff_fff0, HDR_SIZE as u32, 0)])
            .unwrap();
        assert!(matches!(
            read_tx_packet(&m, chain),
            Err(PacketError::Chain(_))
        ));

        // Only device-writable descriptors: nothing to read.
        let chain = q.build_desc_chain(&[desc(0x8000, 64, F_WRITE)]).unwrap();
        assert!(matches!(
            read_tx_packet(&m, chain),
            Err(PacketError::ShortHeader(0))
        ));
    }

    #[test]
    fn writes_rx_packet_across_descriptors() {
        let m = mem();
        let q = MockSplitQueue::new(&m, 16);
        let chain = q
            .build_desc_chain(&[desc(0x8000, 30, F_WRITE), desc(0x9000, 100, F_WRITE)])
            .unwrap();
        let buf = RxBuffer::new(&m, chain).unwrap();
        assert_eq!(buf.data_capacity(), 130 - HDR_SIZE);
        let hdr = sample_header();
        let n = buf.write(&hdr, b"abc").unwrap();
        assert_eq!(n as usize, HDR_SIZE + 3);

        let mut raw = [0u8; HDR_SIZE];
        m.read_slice(&mut raw[..30], GuestAddress(0x8000)).unwrap();
        m.read_slice(&mut raw[30..], GuestAddress(0x9000)).unwrap();
        let got = VsockHeader::decode(&raw);
        assert_eq!(got, VsockHeader { len: 3, ..hdr });
        let mut data = [0u8; 3];
        m.read_slice(&mut data, GuestAddress(0x9000 + 14)).unwrap();
        assert_eq!(&data, b"abc");
    }

    #[test]
    fn rx_buffer_bounds() {
        let m = mem();
        let q = MockSplitQueue::new(&m, 16);
        let chain = q.build_desc_chain(&[desc(0x8000, 40, F_WRITE)]).unwrap();
        assert!(matches!(
            RxBuffer::new(&m, chain),
            Err(PacketError::ShortHeader(40))
        ));

        let chain = q.build_desc_chain(&[desc(0x8000, 50, F_WRITE)]).unwrap();
        let buf = RxBuffer::new(&m, chain).unwrap();
        assert!(matches!(
            buf.write(&sample_header(), &[0u8; 7]),
            Err(PacketError::NoRoom { .. })
        ));
    }
}
