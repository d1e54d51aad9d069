//! Error bodies and `Retry-After` values come from the network too: classifying them must
//! never panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::time::{Duration, SystemTime};

fuzz_target!(|data: &[u8]| {
    if data.len() < 2 {
        return;
    }
    let status = u16::from_le_bytes([data[0], data[1]]) % 1000;
    let rest = &data[2..];
    let split = rest.iter().position(|b| *b == b'\n').unwrap_or(rest.len());
    let retry_after = std::str::from_utf8(&rest[..split])
        .ok()
        .and_then(|v| calsync_graph::parse_retry_after(v, SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000)));
    let body = rest.get(split + 1..).unwrap_or(&[]);
    let e = calsync_graph::classify(status, retry_after, body);
    let _ = (e.class(), e.code().len(), e.to_string().len());
});
