//! `Range` requests on blobs (RFC 9110 §14): single, open-ended, suffix and multiple
//! ranges. Lazy pullers (the stargz snapshotter) send several ranges at once and fall
//! back to one range only on a 400, so a valid multi-range request must never get a 416.
//!
//! Anyone may ask for blobs, so an answer is never larger than the blob: overlapping and
//! adjacent ranges are merged (as RFC 9110 §14.2 allows), and a set that still adds up
//! to the blob or more, or has more than `MAX_RANGES` ranges, gets the blob once, whole.

use std::ops::Range;

/// At most this many ranges in one request; more is served whole, as nginx's
/// `max_ranges` does (no sensible client asks for more, and each costs a part).
pub const MAX_RANGES: usize = 16;
/// About what each part of a `multipart/byteranges` answer adds to its bytes: the
/// boundary line and the part's two headers.
pub const PART_OVERHEAD_BYTES: u64 = 128;

/// How to answer a blob request of `size` bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ranges {
    /// No usable `Range` header: 200 with the whole blob.
    Whole,
    /// One satisfiable range: 206 with `Content-Range`.
    One(Range<u64>),
    /// Several satisfiable ranges, in the order asked: 206 `multipart/byteranges` (or 200).
    Many(Vec<Range<u64>>),
    /// None of the ranges overlaps the blob: 416 with `Content-Range: bytes */size`.
    Unsatisfiable,
}

/// Reads a `Range` header for a blob of `size` bytes. A header that is not a valid
/// `bytes=` range set is ignored, as the RFC allows: the whole blob is served.
pub fn parse(header: Option<&str>, size: u64) -> Ranges {
    let Some(header) = header else {
        return Ranges::Whole;
    };
    let Some(set) = header.trim().strip_prefix("bytes=") else {
        return Ranges::Whole;
    };
    let mut specs = Vec::new();
    for spec in set.split(',') {
        let spec = spec.trim();
        if spec.is_empty() {
            continue;
        }
        if specs.len() == MAX_RANGES {
            return Ranges::Whole;
        }
        match parse_spec(spec) {
            Some(parsed) => specs.push(parsed),
            None => return Ranges::Whole,
        }
    }
    if specs.is_empty() {
        return Ranges::Whole;
    }
    let asked = specs.len();
    let satisfiable = coalesce(
        specs
            .into_iter()
            .filter_map(|spec| spec.resolve(size))
            .collect(),
    );
    let answer_bytes: u64 = satisfiable
        .iter()
        .map(|r| r.end - r.start + PART_OVERHEAD_BYTES)
        .sum();
    match satisfiable.len() {
        0 => Ranges::Unsatisfiable,
        // Several ranges that merged into the whole blob: the blob, plainly.
        1 if asked > 1 && satisfiable[0] == (0..size) => Ranges::Whole,
        1 => Ranges::One(satisfiable[0].clone()),
        _ if answer_bytes >= size => Ranges::Whole,
        _ => Ranges::Many(satisfiable),
    }
}

/// The ranges sorted, with overlapping and adjacent ones merged.
fn coalesce(mut ranges: Vec<Range<u64>>) -> Vec<Range<u64>> {
    ranges.sort_by_key(|r| (r.start, r.end));
    let mut merged: Vec<Range<u64>> = Vec::with_capacity(ranges.len());
    for range in ranges {
        match merged.last_mut() {
            Some(last) if range.start <= last.end => last.end = last.end.max(range.end),
            _ => merged.push(range),
        }
    }
    merged
}

#[derive(Debug, Clone, Copy)]
enum Spec {
    /// `first-last` (inclusive) or `first-`.
    From { first: u64, last: Option<u64> },
    /// `-length`: the last `length` bytes.
    Suffix(u64),
}

fn number(text: &str) -> Option<u64> {
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    text.parse().ok()
}

fn parse_spec(spec: &str) -> Option<Spec> {
    let (first, last) = spec.split_once('-')?;
    let (first, last) = (first.trim(), last.trim());
    if first.is_empty() {
        return Some(Spec::Suffix(number(last)?));
    }
    let first = number(first)?;
    if last.is_empty() {
        return Some(Spec::From { first, last: None });
    }
    let last = number(last)?;
    (last >= first).then_some(Spec::From {
        first,
        last: Some(last),
    })
}

impl Spec {
    /// The bytes this asks for within a blob of `size` bytes, as a half-open range.
    fn resolve(self, size: u64) -> Option<Range<u64>> {
        match self {
            Spec::From { first, .. } if first >= size => None,
            Spec::From { first, last } => {
                let end = last.map_or(size, |l| l.saturating_add(1).min(size));
                Some(first..end)
            }
            Spec::Suffix(0) => None,
            Spec::Suffix(_) if size == 0 => None,
            Spec::Suffix(length) => Some(size.saturating_sub(length)..size),
        }
    }
}

/// The `Content-Range` value of a range of a blob of `size` bytes.
pub fn content_range(range: &Range<u64>, size: u64) -> String {
    format!("bytes {}-{}/{size}", range.start, range.end - 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn single_open_and_suffix_ranges() {
        assert_eq!(parse(None, 100), Ranges::Whole);
        assert_eq!(parse(Some("bytes=0-9"), 100), Ranges::One(0..10));
        assert_eq!(parse(Some("bytes=90-"), 100), Ranges::One(90..100));
        assert_eq!(parse(Some("bytes=-10"), 100), Ranges::One(90..100));
        assert_eq!(parse(Some("bytes=-1000"), 100), Ranges::One(0..100));
        // A last byte past the end is cut to the end.
        assert_eq!(parse(Some("bytes=50-999"), 100), Ranges::One(50..100));
        assert_eq!(parse(Some(" bytes=0-0 "), 100), Ranges::One(0..1));
        assert_eq!(content_range(&(90..100), 100), "bytes 90-99/100");
    }

    #[test]
    fn several_ranges_are_kept_and_never_unsatisfiable_when_one_fits() {
        assert_eq!(
            parse(Some("bytes=0-9, 20-29,-5"), 10_000),
            Ranges::Many(vec![0..10, 20..30, 9995..10_000])
        );
        // Only the ranges inside the blob count.
        assert_eq!(parse(Some("bytes=0-9,500-600"), 100), Ranges::One(0..10));
        assert_eq!(
            parse(Some("bytes=500-600,700-"), 100),
            Ranges::Unsatisfiable
        );
    }

    #[test]
    fn overlapping_and_adjacent_ranges_merge_in_order() {
        assert_eq!(
            parse(Some("bytes=5000-5009,0-9,5-14,15-19"), 10_000),
            Ranges::Many(vec![0..20, 5000..5010])
        );
        assert_eq!(parse(Some("bytes=0-9,10-19"), 10_000), Ranges::One(0..20));
        assert_eq!(parse(Some("bytes=0-99,10-19"), 10_000), Ranges::One(0..100));
    }

    #[test]
    fn no_answer_is_larger_than_the_blob() {
        // The amplification a review found: the same range again and again.
        let repeated = format!("bytes={}", vec!["0-"; MAX_RANGES].join(","));
        assert_eq!(parse(Some(&repeated), 20 << 20), Ranges::Whole);
        // Ranges that cover the blob together, with room for nothing else.
        assert_eq!(parse(Some("bytes=0-49,50-"), 100), Ranges::Whole);
        // Parts whose headers would outweigh what they leave out.
        assert_eq!(parse(Some("bytes=0-9,20-29,40-49"), 200), Ranges::Whole);
        // One range asked for: 206 even when it is all of it.
        assert_eq!(parse(Some("bytes=0-"), 100), Ranges::One(0..100));
    }

    #[test]
    fn unsatisfiable_ranges() {
        assert_eq!(parse(Some("bytes=100-"), 100), Ranges::Unsatisfiable);
        assert_eq!(parse(Some("bytes=200-300"), 100), Ranges::Unsatisfiable);
        assert_eq!(parse(Some("bytes=-0"), 100), Ranges::Unsatisfiable);
        assert_eq!(parse(Some("bytes=0-"), 0), Ranges::Unsatisfiable);
        assert_eq!(parse(Some("bytes=-5"), 0), Ranges::Unsatisfiable);
    }

    #[test]
    fn invalid_headers_are_ignored() {
        for header in [
            "items=0-9",
            "bytes=",
            "bytes=9-0",
            "bytes=a-b",
            "bytes=0-9,x",
            "bytes=--5",
            "bytes=+1-2",
            "bytes=0x10-20",
            "bytes=99999999999999999999999-",
        ] {
            assert_eq!(parse(Some(header), 100), Ranges::Whole, "{header}");
        }
        let many = format!(
            "bytes={}",
            (0..=MAX_RANGES)
                .map(|i| format!("{i}-{i}"))
                .collect::<Vec<_>>()
                .join(",")
        );
        assert_eq!(parse(Some(&many), 1000), Ranges::Whole);
    }
}
