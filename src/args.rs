//! [`ToArg`]: what can be a command argument.
//!
//! Every argument is written as bytes straight into the command's one buffer;
//! numbers are formatted the way Redis parses them back.

use crate::resp::{format_double, itoa};

/// A value that can be a command argument (a key, a field, a value, a number).
///
/// Implemented for strings, byte slices and vectors, every integer type,
/// `f32`/`f64` (`inf`, `-inf` and shortest round-trip digits, as Redis'
/// `strtold` reads them), `bool` (`1`/`0`), and references to any of them.
pub trait ToArg {
    /// Appends the argument's bytes to `out`.
    fn write_arg(&self, out: &mut Vec<u8>);

    /// An upper bound hint of the bytes [`ToArg::write_arg`] appends, used to
    /// size buffers once. Zero means unknown.
    fn size_hint(&self) -> usize {
        0
    }

    /// The exact number of bytes [`ToArg::write_arg`] appends, when known
    /// up front (strings and bytes): lets the encoder write the length
    /// header first instead of moving the bytes after it.
    fn exact_len(&self) -> Option<usize> {
        None
    }
}

impl<T: ToArg + ?Sized> ToArg for &T {
    fn write_arg(&self, out: &mut Vec<u8>) {
        (**self).write_arg(out)
    }
    fn size_hint(&self) -> usize {
        (**self).size_hint()
    }
    fn exact_len(&self) -> Option<usize> {
        (**self).exact_len()
    }
}

impl ToArg for [u8] {
    fn write_arg(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(self)
    }
    fn size_hint(&self) -> usize {
        self.len()
    }
    fn exact_len(&self) -> Option<usize> {
        Some(self.len())
    }
}

impl<const N: usize> ToArg for [u8; N] {
    fn write_arg(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(self)
    }
    fn size_hint(&self) -> usize {
        N
    }
    fn exact_len(&self) -> Option<usize> {
        Some(N)
    }
}

impl ToArg for Vec<u8> {
    fn write_arg(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(self)
    }
    fn size_hint(&self) -> usize {
        self.len()
    }
    fn exact_len(&self) -> Option<usize> {
        Some(self.len())
    }
}

impl ToArg for str {
    fn write_arg(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(self.as_bytes())
    }
    fn size_hint(&self) -> usize {
        self.len()
    }
    fn exact_len(&self) -> Option<usize> {
        Some(self.len())
    }
}

impl ToArg for String {
    fn write_arg(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(self.as_bytes())
    }
    fn size_hint(&self) -> usize {
        self.len()
    }
    fn exact_len(&self) -> Option<usize> {
        Some(self.len())
    }
}

impl ToArg for std::borrow::Cow<'_, str> {
    fn write_arg(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(self.as_bytes())
    }
    fn size_hint(&self) -> usize {
        self.len()
    }
    fn exact_len(&self) -> Option<usize> {
        Some(self.len())
    }
}

impl ToArg for std::sync::Arc<str> {
    fn write_arg(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(self.as_bytes())
    }
    fn size_hint(&self) -> usize {
        self.len()
    }
    fn exact_len(&self) -> Option<usize> {
        Some(self.len())
    }
}

macro_rules! int_args {
    ($($t:ty),*) => {$(
        impl ToArg for $t {
            fn write_arg(&self, out: &mut Vec<u8>) {
                out.extend_from_slice(itoa(*self as i64).as_bytes())
            }
            fn size_hint(&self) -> usize {
                20
            }
        }
    )*};
}
int_args!(i8, i16, i32, i64, isize, u8, u16, u32);

macro_rules! wide_uint_args {
    ($($t:ty),*) => {$(
        impl ToArg for $t {
            fn write_arg(&self, out: &mut Vec<u8>) {
                match i64::try_from(*self) {
                    Ok(n) => out.extend_from_slice(itoa(n).as_bytes()),
                    Err(_) => out.extend_from_slice(self.to_string().as_bytes()),
                }
            }
            fn size_hint(&self) -> usize {
                20
            }
        }
    )*};
}
wide_uint_args!(u64, usize);

impl ToArg for u128 {
    fn write_arg(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(self.to_string().as_bytes())
    }
    fn size_hint(&self) -> usize {
        39
    }
}

impl ToArg for i128 {
    fn write_arg(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(self.to_string().as_bytes())
    }
    fn size_hint(&self) -> usize {
        40
    }
}

impl ToArg for f64 {
    fn write_arg(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(format_double(*self).as_bytes())
    }
    fn size_hint(&self) -> usize {
        24
    }
}

impl ToArg for f32 {
    fn write_arg(&self, out: &mut Vec<u8>) {
        // Shortest digits of the f32 itself, not of its f64 widening
        // (`0.1f32` is sent as `0.1`, not `0.10000000149011612`).
        let text = if self.is_nan() {
            "nan".to_owned()
        } else if self.is_infinite() {
            if *self > 0.0 { "inf" } else { "-inf" }.to_owned()
        } else {
            format!("{self:?}")
        };
        out.extend_from_slice(text.as_bytes())
    }
    fn size_hint(&self) -> usize {
        16
    }
}

impl ToArg for bool {
    fn write_arg(&self, out: &mut Vec<u8>) {
        out.push(if *self { b'1' } else { b'0' })
    }
    fn size_hint(&self) -> usize {
        1
    }
}

impl ToArg for char {
    fn write_arg(&self, out: &mut Vec<u8>) {
        let mut buf = [0; 4];
        out.extend_from_slice(self.encode_utf8(&mut buf).as_bytes())
    }
    fn size_hint(&self) -> usize {
        4
    }
}

/// The bytes of one argument, as a fresh vector (for tests and routing).
pub fn to_bytes<T: ToArg + ?Sized>(arg: &T) -> Vec<u8> {
    let mut out = Vec::with_capacity(arg.size_hint());
    arg.write_arg(&mut out);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats() {
        assert_eq!(to_bytes("key"), b"key");
        assert_eq!(to_bytes(&b"\x00\xff"[..]), b"\x00\xff");
        assert_eq!(to_bytes(&-42i32), b"-42");
        assert_eq!(to_bytes(&u64::MAX), b"18446744073709551615");
        assert_eq!(to_bytes(&i64::MIN), b"-9223372036854775808");
        assert_eq!(to_bytes(&1.5f64), b"1.5");
        assert_eq!(to_bytes(&0.1f32), b"0.1");
        assert_eq!(to_bytes(&1e300f64), b"1e300");
        assert_eq!(to_bytes(&f64::INFINITY), b"inf");
        assert_eq!(to_bytes(&f64::NEG_INFINITY), b"-inf");
        assert_eq!(to_bytes(&3.0f64), b"3.0");
        assert_eq!(to_bytes(&true), b"1");
        assert_eq!(to_bytes(&String::from("s")), b"s");
    }
}
