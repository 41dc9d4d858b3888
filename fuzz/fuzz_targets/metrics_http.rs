//! Fuzzes the metrics endpoint's request classification (`metrics::http::classify`) with
//! arbitrary request heads. Asserts: no panic, and a head that is not a GET or HEAD is never
//! routed to a page.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vmthunder::metrics::http::{classify, Route};

fuzz_target!(|data: &[u8]| {
    let head = String::from_utf8_lossy(data);
    let route = classify(&head);
    let method = head.lines().next().unwrap_or("").split(' ').next().unwrap_or("");
    if method != "GET" && method != "HEAD" {
        assert_eq!(route, Route::BadMethod);
    }
});
