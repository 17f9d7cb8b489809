//! Property tests: every encoder/decoder pair and every rewrite round-trips, and a rewrite
//! changes exactly what it says and nothing else.

mod common;

use bytes::BytesMut;
use common::*;
use fnmesh_codec::{
    encode_exception, exception_type, ExceptionType, Frame, FrameDecoder, Limits, MessageType,
    Protocol, ReplyTarget, TTHeaderBuilder, Transport, FNMESH_ERROR_KEY,
};
use proptest::prelude::*;

fn decode(bytes: &[u8]) -> Frame {
    let mut buf = BytesMut::from(bytes);
    let f = FrameDecoder::new(Limits::default())
        .decode(&mut buf)
        .expect("decodes")
        .expect("whole");
    assert!(buf.is_empty());
    f
}

fn name() -> impl Strategy<Value = String> {
    "[A-Za-z_][A-Za-z0-9_]{0,24}"
}

fn kind() -> impl Strategy<Value = MessageType> {
    prop_oneof![
        Just(MessageType::Call),
        Just(MessageType::Reply),
        Just(MessageType::Exception),
        Just(MessageType::Oneway)
    ]
}

fn protocol() -> impl Strategy<Value = Protocol> {
    prop_oneof![Just(Protocol::Binary), Just(Protocol::Compact)]
}

fn transport() -> impl Strategy<Value = Transport> {
    prop_oneof![
        Just(Transport::TTHeader),
        Just(Transport::Framed),
        Just(Transport::Unframed)
    ]
}

#[derive(Debug, Clone)]
struct Header {
    flags: u16,
    seqid: u32,
    str_kvs: Vec<(Vec<u8>, Vec<u8>)>,
    int_kvs: Vec<(u16, Vec<u8>)>,
    acl: Option<Vec<u8>>,
    inner_framed: bool,
}

fn header() -> impl Strategy<Value = Header> {
    let bytes = || proptest::collection::vec(any::<u8>(), 0..40);
    (
        any::<u16>(),
        any::<u32>(),
        proptest::collection::vec((bytes(), bytes()), 0..6),
        proptest::collection::vec((any::<u16>(), bytes()), 0..8),
        proptest::option::of(bytes()),
        any::<bool>(),
    )
        .prop_map(
            |(flags, seqid, str_kvs, int_kvs, acl, inner_framed)| Header {
                flags,
                seqid,
                str_kvs,
                int_kvs,
                acl,
                inner_framed,
            },
        )
}

impl Header {
    fn builder(&self) -> TTHeaderBuilder<'_> {
        TTHeaderBuilder {
            flags: self.flags,
            seqid: self.seqid,
            protocol: None,
            transforms: &[],
            str_kvs: self.str_kvs.iter().map(|(k, v)| (&k[..], &v[..])).collect(),
            int_kvs: self.int_kvs.iter().map(|(k, v)| (*k, &v[..])).collect(),
            acl_token: self.acl.as_deref(),
            inner_framed: self.inner_framed,
        }
    }
}

fn str_kvs(f: &Frame) -> Vec<(Vec<u8>, Vec<u8>)> {
    f.ttheader()
        .map(|h| {
            h.str_kvs(f.head())
                .map(|(k, v)| (k.to_vec(), v.to_vec()))
                .collect()
        })
        .unwrap_or_default()
}

fn int_kvs(f: &Frame) -> Vec<(u16, Vec<u8>)> {
    f.ttheader()
        .map(|h| h.int_kvs(f.head()).map(|(k, v)| (k, v.to_vec())).collect())
        .unwrap_or_default()
}

/// A message in any transport/protocol with a TTHeader from `h` when it is a TTHeader frame.
#[allow(clippy::too_many_arguments)]
fn build(
    t: Transport,
    p: Protocol,
    strict: bool,
    k: MessageType,
    n: &str,
    seqid: i32,
    h: &Header,
    body: &[u8],
) -> Vec<u8> {
    // Framed means a 0x8001 or 0x82 marker after the length (docs/design.md), so the old non-strict
    // form is only generated unframed or inside a TTHeader.
    let strict = strict || p == Protocol::Compact || t == Transport::Framed;
    let b = h.builder();
    frame(t, p, strict, k, n, seqid, Some(&b), body)
}

proptest! {
    #[test]
    fn frames_round_trip(
        t in transport(), p in protocol(), strict in any::<bool>(), k in kind(), n in name(),
        seqid in any::<i32>(), h in header(), text in proptest::collection::vec(any::<u8>(), 0..300),
    ) {
        let body = echo_args(p, &text);
        let bytes = build(t, p, strict, k, &n, seqid, &h, &body);
        let f = decode(&bytes);
        prop_assert_eq!(f.transport(), t);
        prop_assert_eq!(f.protocol(), p);
        prop_assert_eq!(f.name(), n.as_str());
        prop_assert_eq!(f.kind(), k);
        prop_assert_eq!(f.seqid(), seqid);
        prop_assert_eq!(f.payload(), &body[..]);
        prop_assert_eq!(f.to_vec(), bytes.clone());
        // Read in place, as forwarding does; the old non-strict Binary form reads as no exception.
        let versioned = strict || p == Protocol::Compact || t == Transport::Framed;
        prop_assert_eq!(
            fnmesh_codec::is_exception(&bytes),
            k == MessageType::Exception && versioned
        );
        if t == Transport::TTHeader {
            let tt = f.ttheader().unwrap();
            prop_assert_eq!(tt.flags, h.flags);
            prop_assert_eq!(tt.seqid, h.seqid);
            prop_assert_eq!(tt.inner_framed, h.inner_framed);
            prop_assert_eq!(tt.acl_token(f.head()), h.acl.as_deref());
            prop_assert_eq!(str_kvs(&f), h.str_kvs.clone());
            prop_assert_eq!(int_kvs(&f), h.int_kvs.clone());
        }
    }

    #[test]
    fn set_seqid_changes_only_the_seqids(
        t in transport(), p in protocol(), k in kind(), n in name(), old in any::<i32>(),
        new in any::<i32>(), h in header(),
    ) {
        let body = echo_args(p, b"payload");
        let bytes = build(t, p, true, k, &n, old, &h, &body);
        let mut f = decode(&bytes);
        f.set_seqid(new).unwrap();
        let g = decode(&f.to_vec());
        prop_assert_eq!(g.seqid(), new);
        prop_assert_eq!(g.name(), n.as_str());
        prop_assert_eq!(g.kind(), k);
        prop_assert_eq!(g.payload(), &body[..]);
        prop_assert_eq!(str_kvs(&g), str_kvs(&decode(&bytes)));
        prop_assert_eq!(int_kvs(&g), int_kvs(&decode(&bytes)));
        if let Some(tt) = g.ttheader() {
            prop_assert_eq!(tt.seqid, new as u32);
            prop_assert_eq!(tt.flags, h.flags);
            prop_assert_eq!(tt.inner_framed, h.inner_framed, "inner Framed length kept in step");
        }
        // Binary seqids, and compact ones that fit the old varint, are rewritten in place.
        let in_place = p == Protocol::Binary
            || varint_width(new as u32) <= varint_width(old as u32);
        if in_place {
            prop_assert_eq!(f.to_vec().len(), bytes.len());
        }
    }

    #[test]
    fn strip_service_prefix_leaves_the_method(
        t in transport(), p in protocol(), strict in any::<bool>(), service in name(),
        method in name(), seqid in any::<i32>(), h in header(),
    ) {
        let body = echo_args(p, b"payload");
        let full = format!("{service}:{method}");
        let bytes = build(t, p, strict, MessageType::Call, &full, seqid, &h, &body);
        let mut f = decode(&bytes);
        prop_assert_eq!(f.strip_service_prefix().unwrap(), Some(service.clone()));
        let g = decode(&f.to_vec());
        prop_assert_eq!(g.name(), method.as_str());
        prop_assert_eq!(g.seqid(), seqid);
        prop_assert_eq!(g.payload(), &body[..]);
        prop_assert_eq!(g.len(), bytes.len() - service.len() - 1);
        if let Some(tt) = g.ttheader() {
            prop_assert_eq!(tt.inner_framed, h.inner_framed, "inner Framed length kept in step");
        }
        prop_assert_eq!(str_kvs(&g), str_kvs(&decode(&bytes)));
        prop_assert_eq!(int_kvs(&g), int_kvs(&decode(&bytes)));
        // A name without a prefix is left alone.
        let mut again = decode(&g.to_vec());
        prop_assert_eq!(again.strip_service_prefix().unwrap(), None);
    }

    #[test]
    fn set_int_key_replaces_or_adds_one_key(
        p in protocol(), n in name(), seqid in any::<i32>(), h in header(),
        key in prop_oneof![Just(12u16), Just(6u16), any::<u16>()],
        value in proptest::collection::vec(any::<u8>(), 0..40),
    ) {
        let body = echo_args(p, b"payload");
        let bytes = build(Transport::TTHeader, p, true, MessageType::Call, &n, seqid, &h, &body);
        let before = decode(&bytes);
        let mut f = decode(&bytes);
        f.set_int_key(key, &value).unwrap();
        let g = decode(&f.to_vec());
        prop_assert_eq!(g.ttheader().unwrap().int_value(g.head(), key), Some(&value[..]));
        // Every other int key survives, in order; the key appears once.
        let others = |kvs: Vec<(u16, Vec<u8>)>| kvs.into_iter().filter(|(k, _)| *k != key).collect::<Vec<_>>();
        prop_assert_eq!(others(int_kvs(&g)), others(int_kvs(&before)));
        prop_assert_eq!(int_kvs(&g).iter().filter(|(k, _)| *k == key).count(), 1);
        prop_assert_eq!(str_kvs(&g), str_kvs(&before));
        prop_assert_eq!(g.ttheader().unwrap().acl_token(g.head()), h.acl.as_deref());
        prop_assert_eq!(g.ttheader().unwrap().seqid, h.seqid);
        prop_assert_eq!(g.ttheader().unwrap().flags, h.flags);
        prop_assert_eq!(g.ttheader().unwrap().inner_framed, h.inner_framed);
        prop_assert_eq!((g.name(), g.seqid()), (n.as_str(), seqid));
        prop_assert_eq!(g.payload(), &body[..]);
    }

    #[test]
    fn add_str_key_adds_one_and_keeps_every_other_byte_of_meaning(
        p in protocol(), n in name(), seqid in any::<i32>(), h in header(),
        value in proptest::collection::vec(any::<u8>(), 0..80),
    ) {
        let body = echo_args(p, b"payload");
        let bytes = build(Transport::TTHeader, p, true, MessageType::Call, &n, seqid, &h, &body);
        let before = decode(&bytes);
        let mut f = decode(&bytes);
        f.add_str_key(b"RPC_TRANSIT_traceparent", &value).unwrap();
        let g = decode(&f.to_vec());
        let mut want = str_kvs(&before);
        want.push((b"RPC_TRANSIT_traceparent".to_vec(), value.clone()));
        prop_assert_eq!(str_kvs(&g), want);
        prop_assert_eq!(int_kvs(&g), int_kvs(&before));
        prop_assert_eq!(g.ttheader().unwrap().acl_token(g.head()), h.acl.as_deref());
        prop_assert_eq!(g.ttheader().unwrap().inner_framed, h.inner_framed);
        prop_assert_eq!((g.name(), g.seqid()), (n.as_str(), seqid));
        prop_assert_eq!(g.payload(), &body[..]);
        // In place, once added: the same length.
        let mut again = decode(&f.to_vec());
        let other = vec![b'z'; value.len()];
        prop_assert!(again.overwrite_str_value(|k| k == b"RPC_TRANSIT_traceparent", &other));
        let g = decode(&again.to_vec());
        prop_assert_eq!(g.ttheader().unwrap().str_value(g.head(), b"RPC_TRANSIT_traceparent"), Some(&other[..]));
        prop_assert_eq!(g.len(), f.len());
    }

    #[test]
    fn exception_replies_decode_in_the_requests_transport(
        t in transport(), p in protocol(), strict in any::<bool>(), n in name(),
        seqid in any::<i32>(), h in header(), message in "[ -~]{0,80}",
        ty in prop_oneof![Just(ExceptionType::Unknown), Just(ExceptionType::UnknownMethod),
                          Just(ExceptionType::InternalError), Just(ExceptionType::ProtocolError)],
    ) {
        let bytes = build(t, p, strict, MessageType::Call, &n, seqid, &h, &echo_args(p, b"x"));
        let req = decode(&bytes);
        let reply = encode_exception(&ReplyTarget::of(&req), ty, &message, Some("no-route")).unwrap();
        let r = decode(&reply);
        prop_assert_eq!(r.transport(), t);
        prop_assert_eq!(r.protocol(), p);
        prop_assert_eq!(r.kind(), MessageType::Exception);
        prop_assert_eq!(r.name(), n.as_str());
        prop_assert_eq!(r.seqid(), seqid);
        prop_assert_eq!(read_app_exception(p, r.payload()), (message.clone(), ty as i32));
        prop_assert_eq!(exception_type(r.payload(), p, &Limits::default()), Some(ty as i32));
        // Every truncation: an answer or None, never a panic or a wrong type.
        for cut in 0..r.payload().len() {
            let got = exception_type(&r.payload()[..cut], p, &Limits::default());
            prop_assert!(got.is_none() || got == Some(ty as i32));
        }
        if let Some(tt) = r.ttheader() {
            prop_assert_eq!(tt.seqid, h.seqid);
            prop_assert_eq!(tt.inner_framed, h.inner_framed);
            prop_assert_eq!(tt.str_value(r.head(), FNMESH_ERROR_KEY.as_bytes()), Some(&b"no-route"[..]));
        }
    }
}

fn varint_width(mut v: u32) -> usize {
    let mut n = 1;
    while v >= 0x80 {
        v >>= 7;
        n += 1;
    }
    n
}

/// Reads `TApplicationException { 1: string message, 2: i32 type }` independently of the codec.
fn read_app_exception(p: Protocol, b: &[u8]) -> (String, i32) {
    match p {
        Protocol::Binary => {
            assert_eq!(&b[..3], &[11, 0, 1]);
            let len = u32::from_be_bytes(b[3..7].try_into().unwrap()) as usize;
            let msg = String::from_utf8(b[7..7 + len].to_vec()).unwrap();
            let rest = &b[7 + len..];
            assert_eq!(&rest[..3], &[8, 0, 2]);
            let ty = i32::from_be_bytes(rest[3..7].try_into().unwrap());
            assert_eq!(&rest[7..], &[0]);
            (msg, ty)
        }
        Protocol::Compact => {
            assert_eq!(b[0], 0x18);
            let (len, used) = read_varint(&b[1..]);
            let start = 1 + used;
            let msg = String::from_utf8(b[start..start + len as usize].to_vec()).unwrap();
            let rest = &b[start + len as usize..];
            assert_eq!(rest[0], 0x15);
            let (z, used) = read_varint(&rest[1..]);
            assert_eq!(&rest[1 + used..], &[0]);
            (msg, ((z >> 1) as i32) ^ -((z & 1) as i32))
        }
    }
}

fn read_varint(b: &[u8]) -> (u64, usize) {
    let mut v = 0u64;
    for (i, byte) in b.iter().enumerate() {
        v |= u64::from(byte & 0x7f) << (7 * i);
        if byte & 0x80 == 0 {
            return (v, i + 1);
        }
    }
    panic!("unterminated varint")
}

/// An unframed Compact EXCEPTION whose seqid varint puts 0x82 (Compact's protocol id) where a
/// Framed message's first byte would be: it is still read as the unframed exception it is
/// (found by `frames_round_trip`).
#[test]
fn an_unframed_compact_exception_is_not_mistaken_for_a_framed_message() {
    let h = Header {
        flags: 0,
        seqid: 0,
        str_kvs: Vec::new(),
        int_kvs: Vec::new(),
        acl: None,
        inner_framed: false,
    };
    let body = echo_args(Protocol::Compact, b"");
    let seqid = -1_870_610_433;
    let bytes = build(
        Transport::Unframed,
        Protocol::Compact,
        true,
        MessageType::Exception,
        "_",
        seqid,
        &h,
        &body,
    );
    assert_eq!(bytes[4], 0x82, "the case: a Framed-looking byte");
    assert!(fnmesh_codec::is_exception(&bytes));
}
