//! The twelve key hashes of twemproxy (nutcracker) 0.5.0's `hashkit`, each
//! returning exactly the 32-bit value nutcracker computes, quirks included:
//!
//! - nutcracker's C code takes keys as `const char *`, and `char` is signed
//!   on x86-64: where it widens a byte straight from `char`
//!   (`(uint32_t)key[x]`), a byte >= 0x80 is sign-extended (`0xe9` becomes
//!   `0xffffffe9`). That happens in the four FNVs, one-at-a-time and the
//!   last byte of hsieh's 3-byte tail; crc16 and crc32 mask it away again,
//!   the others read `unsigned char`. (On aarch64 Linux `char` is unsigned,
//!   so an arm64 build of nutcracker places such keys differently; rb
//!   follows the x86-64 build, which the vectors come from.)
//! - `fnv1_64` and `fnv1a_64` return only the low 32 bits, so they are the
//!   64-bit FNVs computed in 32 bits (`fnv1a_64` is even written that way):
//!   offset basis `0x84222325`, prime `0x1b3`.
//! - `crc16` is CRC-16/XMODEM accumulated in a `uint32_t` that is never
//!   masked: the bits shifted past 16 stay (its low 16 bits are the CRC).
//! - `crc32` is libmemcached's: bits 16..30 of the CRC-32; `crc32a` is the
//!   CRC-32 itself.
//! - `murmur` is MurmurHash2 seeded with `0xdeadbeef * len`, `jenkins` is
//!   lookup3's `hashlittle` with initval 13, `hsieh` is SuperFastHash, `md5`
//!   the first four digest bytes read little-endian.
//!
//! Each is checked against published vectors in the tests below.

use crate::digest::md5;

/// A byte widened the way nutcracker's `(uint32_t)key[x]` widens a signed `char`.
#[inline(always)]
fn sext(b: u8) -> u32 {
    b as i8 as i32 as u32
}

/// `hash_one_at_a_time`: Bob Jenkins' one-at-a-time, bytes sign-extended.
pub(crate) fn one_at_a_time(key: &[u8]) -> u32 {
    let mut v: u32 = 0;
    for &b in key {
        v = v.wrapping_add(sext(b));
        v = v.wrapping_add(v << 10);
        v ^= v >> 6;
    }
    v = v.wrapping_add(v << 3);
    v ^= v >> 11;
    v.wrapping_add(v << 15)
}

/// `hash_md5`: the first four bytes of the MD5 digest, little-endian.
pub(crate) fn md5_32(key: &[u8]) -> u32 {
    let d = md5(key);
    u32::from_le_bytes([d[0], d[1], d[2], d[3]])
}

/// The CRC-16/XMODEM table (polynomial 0x1021, not reflected) nutcracker
/// 0.5.0's `crc16tab` holds.
const CRC16_TABLE: [u16; 256] = {
    let mut table = [0u16; 256];
    let mut i = 0;
    while i < 256 {
        let mut crc = (i as u16) << 8;
        let mut bit = 0;
        while bit < 8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
            bit += 1;
        }
        table[i] = crc;
        i += 1;
    }
    table
};

/// `hash_crc16`: CRC-16/XMODEM in a `uint32_t` that keeps the bits
/// shifted out past 16 (`crc = (crc << 8) ^ crc16tab[((crc >> 8) ^ *key++) & 0x00ff]`).
pub(crate) fn crc16(key: &[u8]) -> u32 {
    let mut crc: u32 = 0;
    for &b in key {
        let index = ((crc >> 8) ^ sext(b)) & 0xff;
        crc = (crc << 8) ^ u32::from(CRC16_TABLE[index as usize]);
    }
    crc
}

/// `hash_crc32`: libmemcached's "CRC-32", `((~crc) >> 16) & 0x7fff`.
pub(crate) fn crc32(key: &[u8]) -> u32 {
    (crc32fast::hash(key) >> 16) & 0x7fff
}

/// `hash_crc32a`: the CRC-32 (IEEE 802.3) of the key.
pub(crate) fn crc32a(key: &[u8]) -> u32 {
    crc32fast::hash(key)
}

/// Low 32 bits of FNV-1 64's offset basis `0xcbf29ce484222325`.
const FNV64_INIT_LOW: u32 = 0xcbf2_9ce4_8422_2325_u64 as u32;
/// Low 32 bits of FNV-1 64's prime `0x100000001b3`.
const FNV64_PRIME_LOW: u32 = 0x0000_0100_0000_01b3_u64 as u32;
const FNV32_INIT: u32 = 2_166_136_261;
const FNV32_PRIME: u32 = 16_777_619;

/// `hash_fnv1_64`: FNV-1 64 truncated to 32 bits, bytes sign-extended.
/// Only the low halves of the state and prime reach the low 32 bits of
/// the product, so it is computed in 32 bits.
pub(crate) fn fnv1_64(key: &[u8]) -> u32 {
    let mut h = FNV64_INIT_LOW;
    for &b in key {
        h = h.wrapping_mul(FNV64_PRIME_LOW);
        h ^= sext(b);
    }
    h
}

/// `hash_fnv1a_64`: written by nutcracker in 32 bits (`uint32_t hash =
/// (uint32_t) FNV_64_INIT`), bytes sign-extended.
pub(crate) fn fnv1a_64(key: &[u8]) -> u32 {
    let mut h = FNV64_INIT_LOW;
    for &b in key {
        h ^= sext(b);
        h = h.wrapping_mul(FNV64_PRIME_LOW);
    }
    h
}

/// `hash_fnv1_32`: FNV-1 32, bytes sign-extended.
pub(crate) fn fnv1_32(key: &[u8]) -> u32 {
    let mut h = FNV32_INIT;
    for &b in key {
        h = h.wrapping_mul(FNV32_PRIME);
        h ^= sext(b);
    }
    h
}

/// `hash_fnv1a_32`: FNV-1a 32, bytes sign-extended.
pub(crate) fn fnv1a_32(key: &[u8]) -> u32 {
    let mut h = FNV32_INIT;
    for &b in key {
        h ^= sext(b);
        h = h.wrapping_mul(FNV32_PRIME);
    }
    h
}

/// Two bytes, little-endian (`get16bits` off i386).
#[inline(always)]
fn get16(d: &[u8]) -> u32 {
    u32::from(d[0]) | (u32::from(d[1]) << 8)
}

/// `hash_hsieh`: Paul Hsieh's SuperFastHash; the third byte of a 3-byte
/// tail is read through `char` (sign-extended), a 1-byte tail through
/// `unsigned char`. An empty key hashes to 0.
pub(crate) fn hsieh(key: &[u8]) -> u32 {
    if key.is_empty() {
        return 0;
    }
    let mut hash: u32 = 0;
    let mut chunks = key.chunks_exact(4);
    for c in chunks.by_ref() {
        hash = hash.wrapping_add(get16(c));
        let tmp = (get16(&c[2..]) << 11) ^ hash;
        hash = (hash << 16) ^ tmp;
        hash = hash.wrapping_add(hash >> 11);
    }
    match *chunks.remainder() {
        [b0, b1, b2] => {
            hash = hash.wrapping_add(get16(&[b0, b1]));
            hash ^= hash << 16;
            hash ^= sext(b2) << 18;
            hash = hash.wrapping_add(hash >> 11);
        }
        [b0, b1] => {
            hash = hash.wrapping_add(get16(&[b0, b1]));
            hash ^= hash << 11;
            hash = hash.wrapping_add(hash >> 17);
        }
        [b0] => {
            hash = hash.wrapping_add(u32::from(b0));
            hash ^= hash << 10;
            hash = hash.wrapping_add(hash >> 1);
        }
        _ => {}
    }
    hash ^= hash << 3;
    hash = hash.wrapping_add(hash >> 5);
    hash ^= hash << 4;
    hash = hash.wrapping_add(hash >> 17);
    hash ^= hash << 25;
    hash.wrapping_add(hash >> 6)
}

/// `hash_murmur`: MurmurHash2 (32-bit, little-endian reads) with seed
/// `0xdeadbeef * len`.
pub(crate) fn murmur(key: &[u8]) -> u32 {
    const M: u32 = 0x5bd1_e995;
    let len = key.len() as u32;
    let seed = 0xdead_beef_u32.wrapping_mul(len);
    let mut h = seed ^ len;
    let mut chunks = key.chunks_exact(4);
    for c in chunks.by_ref() {
        let mut k = u32::from_le_bytes([c[0], c[1], c[2], c[3]]);
        k = k.wrapping_mul(M);
        k ^= k >> 24;
        k = k.wrapping_mul(M);
        h = h.wrapping_mul(M);
        h ^= k;
    }
    let tail = chunks.remainder();
    if !tail.is_empty() {
        if let Some(&b) = tail.get(2) {
            h ^= u32::from(b) << 16;
        }
        if let Some(&b) = tail.get(1) {
            h ^= u32::from(b) << 8;
        }
        h ^= u32::from(tail[0]);
        h = h.wrapping_mul(M);
    }
    h ^= h >> 13;
    h = h.wrapping_mul(M);
    h ^ (h >> 15)
}

/// Bob Jenkins' lookup3 `hashlittle` (little-endian reads) with `initval`.
fn hashlittle(key: &[u8], initval: u32) -> u32 {
    #[inline(always)]
    fn mix(a: &mut u32, b: &mut u32, c: &mut u32) {
        *a = a.wrapping_sub(*c);
        *a ^= c.rotate_left(4);
        *c = c.wrapping_add(*b);
        *b = b.wrapping_sub(*a);
        *b ^= a.rotate_left(6);
        *a = a.wrapping_add(*c);
        *c = c.wrapping_sub(*b);
        *c ^= b.rotate_left(8);
        *b = b.wrapping_add(*a);
        *a = a.wrapping_sub(*c);
        *a ^= c.rotate_left(16);
        *c = c.wrapping_add(*b);
        *b = b.wrapping_sub(*a);
        *b ^= a.rotate_left(19);
        *a = a.wrapping_add(*c);
        *c = c.wrapping_sub(*b);
        *c ^= b.rotate_left(4);
        *b = b.wrapping_add(*a);
    }
    #[inline(always)]
    fn fin(a: &mut u32, b: &mut u32, c: &mut u32) {
        *c ^= *b;
        *c = c.wrapping_sub(b.rotate_left(14));
        *a ^= *c;
        *a = a.wrapping_sub(c.rotate_left(11));
        *b ^= *a;
        *b = b.wrapping_sub(a.rotate_left(25));
        *c ^= *b;
        *c = c.wrapping_sub(b.rotate_left(16));
        *a ^= *c;
        *a = a.wrapping_sub(c.rotate_left(4));
        *b ^= *a;
        *b = b.wrapping_sub(a.rotate_left(14));
        *c ^= *b;
        *c = c.wrapping_sub(b.rotate_left(24));
    }
    /// Up to four bytes, little-endian, zero-padded.
    #[inline(always)]
    fn word(bytes: &[u8]) -> u32 {
        let mut w = [0u8; 4];
        let n = bytes.len().min(4);
        w[..n].copy_from_slice(&bytes[..n]);
        u32::from_le_bytes(w)
    }

    let init = 0xdead_beef_u32
        .wrapping_add(key.len() as u32)
        .wrapping_add(initval);
    let (mut a, mut b, mut c) = (init, init, init);
    let mut rest = key;
    while rest.len() > 12 {
        a = a.wrapping_add(word(&rest[0..4]));
        b = b.wrapping_add(word(&rest[4..8]));
        c = c.wrapping_add(word(&rest[8..12]));
        mix(&mut a, &mut b, &mut c);
        rest = &rest[12..];
    }
    if rest.is_empty() {
        return c;
    }
    a = a.wrapping_add(word(rest));
    if rest.len() > 4 {
        b = b.wrapping_add(word(&rest[4..]));
    }
    if rest.len() > 8 {
        c = c.wrapping_add(word(&rest[8..]));
    }
    fin(&mut a, &mut b, &mut c);
    c
}

/// `hash_jenkins`: lookup3's `hashlittle` with initval 13 (`JENKINS_INITVAL`).
pub(crate) fn jenkins(key: &[u8]) -> u32 {
    hashlittle(key, 13)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// libmemcached's `tests/hash_results.h` keys: nutcracker's hashkit
    /// comes from libmemcached, whose suite publishes these values.
    const WORDS: [&str; 25] = [
        "apple",
        "beat",
        "carrot",
        "daikon",
        "eggplant",
        "flower",
        "green",
        "hide",
        "ick",
        "jack",
        "kick",
        "lime",
        "mushrooms",
        "nectarine",
        "orange",
        "peach",
        "quant",
        "ripen",
        "strawberry",
        "tang",
        "up",
        "volumne",
        "when",
        "yellow",
        "zip",
    ];

    fn check(name: &str, f: fn(&[u8]) -> u32, want: [u32; 25]) {
        for (word, want) in WORDS.iter().zip(want) {
            assert_eq!(f(word.as_bytes()), want, "{name}({word:?})");
        }
    }

    #[test]
    fn libmemcached_md5() {
        check(
            "md5",
            md5_32,
            [
                3195025439, 2556848621, 3724893440, 3332385401, 245758794, 2550894432, 121710495,
                3053817768, 1250994555, 1862072655, 2631955953, 2951528551, 1451250070, 2820856945,
                2060845566, 3646985608, 2138080750, 217675895, 2230934345, 1234361223, 3968582726,
                2455685270, 1293568479, 199067604, 2042482093,
            ],
        );
    }

    #[test]
    fn libmemcached_crc32() {
        check(
            "crc32",
            crc32,
            [
                10542, 22009, 14526, 19510, 19432, 10199, 20634, 9369, 11511, 10362, 7893, 31289,
                11313, 9354, 7621, 30628, 15218, 25967, 2695, 9380, 17300, 28156, 9192, 20484,
                16925,
            ],
        );
    }

    #[test]
    fn libmemcached_fnv() {
        check(
            "fnv1_64",
            fnv1_64,
            [
                473199127, 4148981457, 3971873300, 3257986707, 1722477987, 2991193800, 4147007314,
                3633179701, 1805162104, 3503289120, 3395702895, 3325073042, 2345265314, 3340346032,
                2722964135, 1173398992, 2815549194, 2562818319, 224996066, 2680194749, 3035305390,
                246890365, 2395624193, 4145193337, 1801941682,
            ],
        );
        check(
            "fnv1a_64",
            fnv1a_64,
            [
                1488911807, 2500855813, 1510099634, 1390325195, 3647689787, 3241528582, 1669328060,
                2604311949, 734810122, 1516407546, 560948863, 1767346780, 561034892, 4156330026,
                3716417003, 3475297030, 1518272172, 227211583, 3938128828, 126112909, 3043416448,
                3131561933, 1328739897, 2455664041, 2272238452,
            ],
        );
        check(
            "fnv1_32",
            fnv1_32,
            [
                67176023, 1190179409, 2043204404, 3221866419, 2567703427, 3787535528, 4147287986,
                3500475733, 344481048, 3865235296, 2181839183, 119581266, 510234242, 4248244304,
                1362796839, 103389328, 1449620010, 182962511, 3554262370, 3206747549, 1551306158,
                4127558461, 1889140833, 2774173721, 1180552018,
            ],
        );
        check(
            "fnv1a_32",
            fnv1a_32,
            [
                280767167, 2421315013, 3072375666, 855001899, 459261019, 3521085446, 18738364,
                1625305005, 2162232970, 777243802, 3323728671, 132336572, 3654473228, 260679466,
                1169454059, 2698319462, 1062177260, 235516991, 2218399068, 405302637, 1128467232,
                3579622413, 2138539289, 96429129, 2877453236,
            ],
        );
    }

    #[test]
    fn libmemcached_hsieh_murmur_jenkins() {
        check(
            "hsieh",
            hsieh,
            [
                3738850110, 3636226060, 3821074029, 3489929160, 3485772682, 80540287, 1805464076,
                1895033657, 409795758, 979934958, 3634096985, 1284445480, 2265380744, 707972988,
                353823508, 1549198350, 1327930172, 9304163, 4220749037, 2493964934, 2777873870,
                2057831732, 1510213931, 2027828987, 3395453351,
            ],
        );
        check(
            "murmur",
            murmur,
            [
                4142305122, 734504955, 3802834688, 4076891445, 387802650, 560515427, 3274673488,
                3150339524, 1527441970, 2728642900, 3613992239, 2938419259, 2321988328, 1145154116,
                4038540960, 2224541613, 264013145, 3995512858, 2400956718, 2346666219, 926327338,
                442757446, 1770805201, 560483147, 3902279934,
            ],
        );
        check(
            "jenkins",
            jenkins,
            [
                1442444624, 4253821186, 1885058256, 2120131735, 3261968576, 3515188778, 4232909173,
                4288625128, 1812047395, 3689182164, 2502979932, 1214050606, 2415988847, 1494268927,
                1025545760, 3920481083, 4153263658, 3824871822, 3072759809, 798622255, 3065432577,
                1453328165, 2691550971, 3408888387, 2629893356,
            ],
        );
    }

    #[test]
    fn fnv_reference_vectors() {
        // The FNV reference test suite (Noll, `test_fnv.c`): FNV-1/FNV-1a
        // 32-bit of "", "a", "foobar", and the low halves of the 64-bit ones.
        assert_eq!(fnv1_32(b""), 0x811c_9dc5);
        assert_eq!(fnv1_32(b"a"), 0x050c_5d7e);
        assert_eq!(fnv1_32(b"foobar"), 0x31f0_b262);
        assert_eq!(fnv1a_32(b""), 0x811c_9dc5);
        assert_eq!(fnv1a_32(b"a"), 0xe40c_292c);
        assert_eq!(fnv1a_32(b"foobar"), 0xbf9c_f968);
        assert_eq!(fnv1_64(b""), 0xcbf2_9ce4_8422_2325_u64 as u32);
        assert_eq!(fnv1_64(b"a"), 0xaf63_bd4c_8601_b7be_u64 as u32);
        assert_eq!(fnv1_64(b"foobar"), 0x340d_8765_a4dd_a9c2_u64 as u32);
        assert_eq!(fnv1a_64(b"a"), 0xaf63_dc4c_8601_ec8c_u64 as u32);
        assert_eq!(fnv1a_64(b"foobar"), 0x8594_4171_f739_67e8_u64 as u32);
    }

    #[test]
    fn crc_check_values() {
        // The catalogue's check input "123456789".
        assert_eq!(crc32a(b"123456789"), 0xcbf4_3926); // CRC-32
        assert_eq!(crc32(b"123456789"), 0xcbf4 & 0x7fff);
        assert_eq!(crc16(b"123456789") & 0xffff, 0x31c3); // CRC-16/XMODEM
        assert_eq!(CRC16_TABLE[1], 0x1021);
        assert_eq!(CRC16_TABLE[255], 0x1ef0);
        // Not masked: the bits past 16 stay.
        assert!(crc16(b"123456789") > 0xffff);
        assert_eq!(crc16(b""), 0);
        assert_eq!(crc16(b"a"), u32::from(CRC16_TABLE[0x61]));
    }

    #[test]
    fn one_at_a_time_vectors() {
        // Wikipedia's "Jenkins hash function" examples.
        assert_eq!(one_at_a_time(b"a"), 0xca2e_9442);
        assert_eq!(
            one_at_a_time(b"The quick brown fox jumps over the lazy dog"),
            0x519e_91f5
        );
        assert_eq!(one_at_a_time(b""), 0);
    }

    #[test]
    fn lookup3_driver_vectors() {
        // lookup3.c's driver5().
        assert_eq!(hashlittle(b"", 0), 0xdead_beef);
        assert_eq!(hashlittle(b"", 0xdead_beef), 0xbd5b_7dde);
        assert_eq!(
            hashlittle(b"Four score and seven years ago", 0),
            0x1777_0551
        );
        assert_eq!(
            hashlittle(b"Four score and seven years ago", 1),
            0xcd62_8161
        );
    }

    #[test]
    fn md5_of_empty_is_rfc1321s() {
        // d41d8cd9...: the first four bytes read little-endian.
        assert_eq!(md5_32(b""), 0xd98c_1dd4);
    }

    #[test]
    fn high_bytes_are_sign_extended_where_nutcracker_reads_char() {
        // One byte 0xe9: FNV-1a 32 xors 0xffffffe9, not 0xe9.
        let signed = (FNV32_INIT ^ 0xffff_ffe9).wrapping_mul(FNV32_PRIME);
        assert_eq!(fnv1a_32(&[0xe9]), signed);
        assert_ne!(
            fnv1a_32(&[0xe9]),
            (FNV32_INIT ^ 0xe9).wrapping_mul(FNV32_PRIME)
        );
        // one-at-a-time adds 0xffffffe9.
        let mut v: u32 = 0xffff_ffe9;
        v = v.wrapping_add(v << 10);
        v ^= v >> 6;
        v = v.wrapping_add(v << 3);
        v ^= v >> 11;
        v = v.wrapping_add(v << 15);
        assert_eq!(one_at_a_time(&[0xe9]), v);
        // hsieh: only the third byte of a 3-byte tail.
        assert_ne!(hsieh(&[1, 2, 0x80]), hsieh_unsigned_tail(&[1, 2, 0x80]));
        assert_eq!(hsieh(&[1, 2, 0x7f]), hsieh_unsigned_tail(&[1, 2, 0x7f]));
        // crc16 and crc32 mask the widened byte: no difference there.
        assert_eq!(crc16(&[0xe9]), u32::from(CRC16_TABLE[0xe9]));
    }

    /// hsieh with the 3-byte tail's last byte read unsigned (for contrast).
    fn hsieh_unsigned_tail(key: &[u8; 3]) -> u32 {
        let mut hash: u32 = 0;
        hash = hash.wrapping_add(get16(&key[..2]));
        hash ^= hash << 16;
        hash ^= u32::from(key[2]) << 18;
        hash = hash.wrapping_add(hash >> 11);
        hash ^= hash << 3;
        hash = hash.wrapping_add(hash >> 5);
        hash ^= hash << 4;
        hash = hash.wrapping_add(hash >> 17);
        hash ^= hash << 25;
        hash.wrapping_add(hash >> 6)
    }
}
