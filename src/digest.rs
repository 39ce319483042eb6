//! MD5 (for the ketama ring) and SHA-1 (for script hashes), hand-written to
//! keep the dependency list at three crates. Neither is used for security:
//! MD5 places keys on the ring exactly as Python rb does, SHA-1 names a Lua
//! script exactly as Redis' `SCRIPT LOAD` does. Both are checked against the
//! published test vectors (RFC 1321, FIPS 180 / RFC 3174).

/// Pads `data` the MD5/SHA-1 way and feeds 64-byte blocks to `block`.
fn blocks(data: &[u8], big_endian_len: bool, mut block: impl FnMut(&[u8; 64])) {
    let bit_len = (data.len() as u64).wrapping_mul(8);
    let mut chunks = data.chunks_exact(64);
    for chunk in chunks.by_ref() {
        let mut b = [0u8; 64];
        b.copy_from_slice(chunk);
        block(&b);
    }
    let rest = chunks.remainder();
    let mut tail = [0u8; 128];
    tail[..rest.len()].copy_from_slice(rest);
    tail[rest.len()] = 0x80;
    let total = if rest.len() < 56 { 64 } else { 128 };
    let len_bytes = if big_endian_len {
        bit_len.to_be_bytes()
    } else {
        bit_len.to_le_bytes()
    };
    tail[total - 8..total].copy_from_slice(&len_bytes);
    for chunk in tail[..total].chunks_exact(64) {
        let mut b = [0u8; 64];
        b.copy_from_slice(chunk);
        block(&b);
    }
}

/// The MD5 digest of `data`.
pub fn md5(data: &[u8]) -> [u8; 16] {
    const S: [u32; 64] = [
        7, 12, 17, 22, 7, 12, 17, 22, 7, 12, 17, 22, 7, 12, 17, 22, 5, 9, 14, 20, 5, 9, 14, 20, 5,
        9, 14, 20, 5, 9, 14, 20, 4, 11, 16, 23, 4, 11, 16, 23, 4, 11, 16, 23, 4, 11, 16, 23, 6, 10,
        15, 21, 6, 10, 15, 21, 6, 10, 15, 21, 6, 10, 15, 21,
    ];
    // K[i] = floor(abs(sin(i + 1)) * 2^32), as RFC 1321 tabulates.
    const K: [u32; 64] = [
        0xd76aa478, 0xe8c7b756, 0x242070db, 0xc1bdceee, 0xf57c0faf, 0x4787c62a, 0xa8304613,
        0xfd469501, 0x698098d8, 0x8b44f7af, 0xffff5bb1, 0x895cd7be, 0x6b901122, 0xfd987193,
        0xa679438e, 0x49b40821, 0xf61e2562, 0xc040b340, 0x265e5a51, 0xe9b6c7aa, 0xd62f105d,
        0x02441453, 0xd8a1e681, 0xe7d3fbc8, 0x21e1cde6, 0xc33707d6, 0xf4d50d87, 0x455a14ed,
        0xa9e3e905, 0xfcefa3f8, 0x676f02d9, 0x8d2a4c8a, 0xfffa3942, 0x8771f681, 0x6d9d6122,
        0xfde5380c, 0xa4beea44, 0x4bdecfa9, 0xf6bb4b60, 0xbebfbc70, 0x289b7ec6, 0xeaa127fa,
        0xd4ef3085, 0x04881d05, 0xd9d4d039, 0xe6db99e5, 0x1fa27cf8, 0xc4ac5665, 0xf4292244,
        0x432aff97, 0xab9423a7, 0xfc93a039, 0x655b59c3, 0x8f0ccc92, 0xffeff47d, 0x85845dd1,
        0x6fa87e4f, 0xfe2ce6e0, 0xa3014314, 0x4e0811a1, 0xf7537e82, 0xbd3af235, 0x2ad7d2bb,
        0xeb86d391,
    ];
    let mut h: [u32; 4] = [0x67452301, 0xefcdab89, 0x98badcfe, 0x10325476];
    blocks(data, false, |block| {
        let mut m = [0u32; 16];
        for (i, w) in m.iter_mut().enumerate() {
            *w = u32::from_le_bytes([
                block[4 * i],
                block[4 * i + 1],
                block[4 * i + 2],
                block[4 * i + 3],
            ]);
        }
        let [mut a, mut b, mut c, mut d] = h;
        for i in 0..64 {
            let (f, g) = match i / 16 {
                0 => ((b & c) | (!b & d), i),
                1 => ((d & b) | (!d & c), (5 * i + 1) % 16),
                2 => (b ^ c ^ d, (3 * i + 5) % 16),
                _ => (c ^ (b | !d), (7 * i) % 16),
            };
            let rotated = a
                .wrapping_add(f)
                .wrapping_add(K[i])
                .wrapping_add(m[g])
                .rotate_left(S[i]);
            a = d;
            d = c;
            c = b;
            b = b.wrapping_add(rotated);
        }
        h[0] = h[0].wrapping_add(a);
        h[1] = h[1].wrapping_add(b);
        h[2] = h[2].wrapping_add(c);
        h[3] = h[3].wrapping_add(d);
    });
    let mut out = [0u8; 16];
    for (i, word) in h.iter().enumerate() {
        out[4 * i..4 * i + 4].copy_from_slice(&word.to_le_bytes());
    }
    out
}

/// The SHA-1 digest of `data`.
pub fn sha1(data: &[u8]) -> [u8; 20] {
    let mut h: [u32; 5] = [0x67452301, 0xEFCDAB89, 0x98BADCFE, 0x10325476, 0xC3D2E1F0];
    blocks(data, true, |block| {
        let mut w = [0u32; 80];
        for i in 0..16 {
            w[i] = u32::from_be_bytes([
                block[4 * i],
                block[4 * i + 1],
                block[4 * i + 2],
                block[4 * i + 3],
            ]);
        }
        for i in 16..80 {
            w[i] = (w[i - 3] ^ w[i - 8] ^ w[i - 14] ^ w[i - 16]).rotate_left(1);
        }
        let [mut a, mut b, mut c, mut d, mut e] = h;
        for (i, word) in w.iter().enumerate() {
            let (f, k) = match i / 20 {
                0 => ((b & c) | (!b & d), 0x5A827999),
                1 => (b ^ c ^ d, 0x6ED9EBA1),
                2 => ((b & c) | (b & d) | (c & d), 0x8F1BBCDC),
                _ => (b ^ c ^ d, 0xCA62C1D6),
            };
            let t = a
                .rotate_left(5)
                .wrapping_add(f)
                .wrapping_add(e)
                .wrapping_add(k)
                .wrapping_add(*word);
            e = d;
            d = c;
            c = b.rotate_left(30);
            b = a;
            a = t;
        }
        for (slot, v) in h.iter_mut().zip([a, b, c, d, e]) {
            *slot = slot.wrapping_add(v);
        }
    });
    let mut out = [0u8; 20];
    for (i, word) in h.iter().enumerate() {
        out[4 * i..4 * i + 4].copy_from_slice(&word.to_be_bytes());
    }
    out
}

/// Lower-case hex, as Redis prints script hashes.
pub fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for &b in bytes {
        s.push(DIGITS[usize::from(b >> 4)] as char);
        s.push(DIGITS[usize::from(b & 15)] as char);
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn md5_rfc1321_vectors() {
        let cases: [(&str, &str); 7] = [
            ("", "d41d8cd98f00b204e9800998ecf8427e"),
            ("a", "0cc175b9c0f1b6a831c399e269772661"),
            ("abc", "900150983cd24fb0d6963f7d28e17f72"),
            ("message digest", "f96b697d7cb7938d525a2f31aaf161d0"),
            (
                "abcdefghijklmnopqrstuvwxyz",
                "c3fcd3d76192e4007dfb496cca67e13b",
            ),
            (
                "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789",
                "d174ab98d277d9f5a5611c2c9f419d9f",
            ),
            (
                "12345678901234567890123456789012345678901234567890123456789012345678901234567890",
                "57edf4a22be3c955ac49da2e2107b67a",
            ),
        ];
        for (input, want) in cases {
            assert_eq!(hex(&md5(input.as_bytes())), want, "md5({input:?})");
        }
    }

    #[test]
    fn sha1_fips_vectors() {
        let cases: [(&[u8], &str); 4] = [
            (b"", "da39a3ee5e6b4b0d3255bfef95601890afd80709"),
            (b"abc", "a9993e364706816aba3e25717850c26c9cd0d89d"),
            (
                b"abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq",
                "84983e441c3bd26ebaae4aa1f95129e5e54670f1",
            ),
            (
                &[b'a'; 1_000_000],
                "34aa973cd4c4daa4f61eeb2bdbad27316534016f",
            ),
        ];
        for (input, want) in cases {
            assert_eq!(hex(&sha1(input)), want, "sha1 of {} bytes", input.len());
        }
        // Redis' own: SCRIPT LOAD "return 1"
        assert_eq!(
            hex(&sha1(b"return 1")),
            "e0e1f9fabfc9d4800c877a703b823ac0578ff8db"
        );
    }

    #[test]
    fn padding_boundaries_match_python_hashlib() {
        // Lengths around the 55/56/64 byte boundaries exercise both tail shapes;
        // expected values from Python's hashlib.
        let data: Vec<u8> = (0..200u32).map(|i| (i * 7) as u8).collect();
        let cases = [
            (
                55,
                "8d24280288a696559fd8d5aa1b6d8c6e",
                "aecd1643c9903b9bae8cb94f53c50f8a4e18605b",
            ),
            (
                56,
                "ef2c72b7254c92459e498eddd4ace573",
                "f5d65c621c02cc8e785159feff8088e3072da1bc",
            ),
            (
                57,
                "5e319059f1ba9373988437b589fb9f21",
                "a69640f450b01dd44b096a2a697b52e3f2aeb117",
            ),
            (
                63,
                "c4c8c6d513f4e1604eb18508a1769364",
                "4952f0fe097e4d6410ae9eab4855aa836caf3bff",
            ),
            (
                64,
                "a2fcb39a253b9b785b1f97518fa37683",
                "1e17ae1fc093e5daca033553c97a5192ca164486",
            ),
            (
                65,
                "e49fe82d0bb12967a196c85de313e446",
                "ac44f5dbe3e9b5d2733fc9537fcad715c3c20bc3",
            ),
            (
                119,
                "1640deea49ebb258ec6ede18d4b2d2d7",
                "b4a4e69060d0b1e7e8ebbf7041a4211c63438b57",
            ),
            (
                120,
                "05f879f7b542a7ebf0605adff67d4423",
                "b651390c2996406336a3f6647e4b590c18cdd6f8",
            ),
            (
                128,
                "fe942895e9aae953f3e246e5fd00739d",
                "516846cd40bd1fe431119c3b0a0f362957992ee8",
            ),
        ];
        for (len, want_md5, want_sha1) in cases {
            assert_eq!(hex(&md5(&data[..len])), want_md5, "md5 of {len} bytes");
            assert_eq!(hex(&sha1(&data[..len])), want_sha1, "sha1 of {len} bytes");
        }
    }
}
