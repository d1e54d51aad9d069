//! The page parser must never panic, whatever Graph (or a broken proxy) sends: anything
//! that is not a page is `GraphError::Malformed`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(page) = calsync_graph::parse_page(data) {
        // A parsed page is usable: ids and the link are there to read.
        for item in &page.items {
            let _ = item.id().len();
        }
        let _ = format!("{:?}", page.link);
    }
});
