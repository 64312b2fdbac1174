//! A datagram on the DHCP client's socket: decoded, matched to the exchange, and an ACK
//! turned into the lease and routes the client installs.
#![no_main]

use dhcproto::v4::MessageType;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // The exchange the datagram answers: its own xid and client hardware address, so that
    // the fuzzer reaches what comes after the match.
    let xid = data
        .get(4..8)
        .map_or(0, |b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]));
    let mut mac = [0u8; 6];
    if let Some(b) = data.get(28..34) {
        mac.copy_from_slice(b);
    }
    let kinds = [MessageType::Offer, MessageType::Ack, MessageType::Nak];
    let Some(m) = keelson_net::dhcp::reply(data, xid, &mac, &kinds) else {
        return;
    };
    if let Some(lease) = keelson_net::dhcp::lease_of(&m) {
        let _ = lease.routes();
        let _ = lease.remaining_secs();
    }
});
