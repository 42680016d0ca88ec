//! Feeds arbitrary bytes to the frame splitter and the message decoders, as envd and the client see
//! them from the wire. Properties: nothing panics or allocates beyond the frame limit; whatever
//! decodes re-encodes to a frame that splits and decodes to the same message.

#![no_main]

use envd_protocol::frame::{decode_body, encode_frame, split_frame, HEADER_LEN, MAX_FRAME_LEN};
use envd_protocol::pb;
use libfuzzer_sys::fuzz_target;

fn round_trip<M: prost::Message + Default + PartialEq + std::fmt::Debug>(msg: &M) {
    let frame = encode_frame(msg).expect("a decoded message fits a frame");
    let (body, used) = split_frame(&frame).expect("valid").expect("whole");
    assert_eq!(used, frame.len());
    let back: M = decode_body(body).expect("re-decodes");
    assert_eq!(&back, msg);
}

fuzz_target!(|data: &[u8]| {
    let mut rest = data;
    loop {
        match split_frame(rest) {
            Ok(Some((body, used))) => {
                assert!(body.len() <= MAX_FRAME_LEN);
                assert_eq!(used, HEADER_LEN + body.len());
                if let Ok(req) = decode_body::<pb::Request>(body) {
                    round_trip(&req);
                }
                if let Ok(resp) = decode_body::<pb::Response>(body) {
                    round_trip(&resp);
                }
                rest = &rest[used..];
            }
            Ok(None) | Err(_) => break,
        }
    }
});
