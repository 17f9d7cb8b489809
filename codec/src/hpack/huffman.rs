//! HPACK's Huffman code (RFC 7541 Appendix B). The code is canonical: codes are handed out in
//! order of length, then of symbol, so the table of code lengths is all that defines it; the codes
//! themselves are derived from it at compile time.

use super::HpackError;

/// The length in bits of each symbol's code; symbol 256 is EOS.
const LENGTHS: [u8; 257] = [
    13, 23, 28, 28, 28, 28, 28, 28, 28, 24, 30, 28, 28, 30, 28, 28, 28, 28, 28, 28, 28, 28, 30, 28,
    28, 28, 28, 28, 28, 28, 28, 28, 6, 10, 10, 12, 13, 6, 8, 11, 10, 10, 8, 11, 8, 6, 6, 6, 5, 5,
    5, 6, 6, 6, 6, 6, 6, 6, 7, 8, 15, 6, 12, 10, 13, 6, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7,
    7, 7, 7, 7, 7, 7, 7, 7, 8, 7, 8, 13, 19, 13, 14, 6, 15, 5, 6, 5, 6, 5, 6, 6, 6, 5, 7, 7, 6, 6,
    6, 5, 6, 7, 6, 5, 5, 6, 7, 7, 7, 7, 7, 15, 11, 14, 13, 28, 20, 22, 20, 20, 22, 22, 22, 23, 22,
    23, 23, 23, 23, 23, 24, 23, 24, 24, 22, 23, 24, 23, 23, 23, 23, 21, 22, 23, 22, 23, 23, 24, 22,
    21, 20, 22, 22, 23, 23, 21, 23, 22, 22, 24, 21, 22, 23, 23, 21, 21, 22, 21, 23, 22, 23, 23, 20,
    22, 22, 22, 23, 22, 22, 23, 26, 26, 20, 19, 22, 23, 22, 25, 26, 26, 26, 27, 27, 26, 24, 25, 19,
    21, 26, 27, 27, 26, 27, 24, 21, 21, 26, 26, 28, 27, 27, 27, 20, 24, 20, 21, 22, 21, 21, 23, 22,
    22, 25, 25, 24, 24, 26, 23, 26, 27, 26, 26, 27, 27, 27, 27, 27, 28, 27, 27, 27, 27, 27, 26, 30,
];

/// The longest code, in bits.
const MAX_LEN: usize = 30;

/// The canonical code, derived from [`LENGTHS`].
struct Canonical {
    /// Each symbol's code, right-aligned.
    codes: [u32; 257],
    /// Symbols in code order.
    sorted: [u16; 257],
    /// By length: the first code of that length, how many codes have it, and where they start in
    /// `sorted`.
    first: [u32; MAX_LEN + 1],
    count: [u32; MAX_LEN + 1],
    start: [u16; MAX_LEN + 1],
}

const fn canonical() -> Canonical {
    let mut c = Canonical {
        codes: [0; 257],
        sorted: [0; 257],
        first: [0; MAX_LEN + 1],
        count: [0; MAX_LEN + 1],
        start: [0; MAX_LEN + 1],
    };
    let mut code = 0u32;
    let mut at = 0usize;
    let mut len = 1;
    while len <= MAX_LEN {
        c.first[len] = code;
        c.start[len] = at as u16;
        let mut sym = 0;
        while sym < 257 {
            if LENGTHS[sym] as usize == len {
                c.codes[sym] = code;
                c.sorted[at] = sym as u16;
                at += 1;
                code += 1;
                c.count[len] += 1;
            }
            sym += 1;
        }
        code <<= 1;
        len += 1;
    }
    c
}

static CODE: Canonical = canonical();

/// For each byte value: the symbol whose code (of at most 8 bits) starts it, and that code's
/// length; length 0 where the byte starts a longer code.
const SHORT: [(u8, u8); 256] = short();

const fn short() -> [(u8, u8); 256] {
    let codes = canonical().codes;
    let mut t = [(0u8, 0u8); 256];
    let mut sym = 0;
    while sym < 256 {
        let len = LENGTHS[sym] as usize;
        if len <= 8 {
            let code = codes[sym] as usize;
            let first = code << (8 - len);
            let mut v = first;
            while v < first + (1 << (8 - len)) {
                t[v] = (sym as u8, len as u8);
                v += 1;
            }
        }
        sym += 1;
    }
    t
}

/// Decodes `src`, appending the symbols to `dst`. Padding must be the shortest run of 1s that fills
/// the last byte (fewer than 8 bits); EOS inside the string is an error (RFC 7541 5.2). Codes of
/// up to 8 bits (the common characters) are looked up a byte at a time; longer ones bit by bit.
pub fn decode(src: &[u8], dst: &mut Vec<u8>) -> Result<(), HpackError> {
    dst.reserve(src.len() + src.len() / 2);
    // Unread bits, left-aligned in `acc`; `bits` of them are valid.
    let mut acc = 0u64;
    let mut bits = 0u32;
    let mut next = src.iter();
    loop {
        while bits <= 56 {
            match next.next() {
                Some(&b) => {
                    acc |= u64::from(b) << (56 - bits);
                    bits += 8;
                }
                None => break,
            }
        }
        if bits == 0 {
            return Ok(());
        }
        let (sym, len) = SHORT[(acc >> 56) as usize];
        let len = u32::from(len);
        if len != 0 && len <= bits {
            dst.push(sym);
            acc <<= len;
            bits -= len;
            continue;
        }
        // A longer code, or the padding at the end.
        let mut code = 0u32;
        let mut len = 0usize;
        loop {
            if len as u32 == bits {
                // The input ends inside this code: it must be padding.
                if len > 7 {
                    return Err(HpackError::BadHuffman("padding longer than 7 bits"));
                }
                if code != (1 << len) - 1 {
                    return Err(HpackError::BadHuffman("padding is not a prefix of EOS"));
                }
                return Ok(());
            }
            code = (code << 1) | (acc >> 63) as u32;
            acc <<= 1;
            len += 1;
            let index = code.wrapping_sub(CODE.first[len]);
            if index < CODE.count[len] {
                let sym = CODE.sorted[usize::from(CODE.start[len]) + index as usize];
                if sym == 256 {
                    return Err(HpackError::BadHuffman("EOS inside a string"));
                }
                dst.push(sym as u8);
                bits -= len as u32;
                break;
            }
            if len == MAX_LEN {
                // Unreachable for a complete code; kept so no input can index past the tables.
                return Err(HpackError::BadHuffman("no symbol has this code"));
            }
        }
    }
}

/// The length of `src` Huffman-encoded, in bytes.
#[cfg(test)]
pub fn encoded_len(src: &[u8]) -> usize {
    let bits: usize = src
        .iter()
        .map(|&b| usize::from(LENGTHS[usize::from(b)]))
        .sum();
    bits.div_ceil(8)
}

/// Appends `src` Huffman-encoded, padded with 1s.
#[cfg(test)]
pub fn encode(src: &[u8], dst: &mut impl bytes::BufMut) {
    let mut acc = 0u64;
    let mut bits = 0u32;
    for &b in src {
        let len = u32::from(LENGTHS[usize::from(b)]);
        acc = (acc << len) | u64::from(CODE.codes[usize::from(b)]);
        bits += len;
        while bits >= 8 {
            bits -= 8;
            dst.put_u8((acc >> bits) as u8);
        }
        acc &= (1 << bits) - 1;
    }
    if bits > 0 {
        dst.put_u8(((acc << (8 - bits)) | (0xff >> bits)) as u8);
    }
}
