//! Per-page state: a saturating age counter, a refault streak and the set of
//! pages this controller moved out, plus the age histogram.
//!
//! Memory: two bytes per 4 KiB page (512 KiB per GiB of guest RAM) plus one
//! bit per page for each bit set.

use serde::{Deserialize, Serialize};

/// A fixed-size bit set.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BitSet {
    words: Vec<u64>,
    len: usize,
}

impl BitSet {
    /// `len` bits, all clear.
    pub fn new(len: usize) -> Self {
        Self {
            words: vec![0; len.div_ceil(64)],
            len,
        }
    }

    /// Number of bits.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether it holds no bits.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Bit `i` (false out of range).
    pub fn get(&self, i: usize) -> bool {
        i < self.len && self.words[i / 64] & (1 << (i % 64)) != 0
    }

    /// Set bit `i` to `v` (ignored out of range).
    pub fn set(&mut self, i: usize, v: bool) {
        if i >= self.len {
            return;
        }
        let w = &mut self.words[i / 64];
        if v {
            *w |= 1 << (i % 64);
        } else {
            *w &= !(1 << (i % 64));
        }
    }

    /// Clear every bit.
    pub fn clear_all(&mut self) {
        self.words.iter_mut().for_each(|w| *w = 0);
    }

    /// Number of set bits.
    pub fn count(&self) -> usize {
        self.words.iter().map(|w| w.count_ones() as usize).sum()
    }

    /// Indices of the set bits, ascending.
    pub fn ones(&self) -> impl Iterator<Item = usize> + '_ {
        self.words.iter().enumerate().flat_map(|(wi, &w)| {
            let mut w = w;
            std::iter::from_fn(move || {
                if w == 0 {
                    return None;
                }
                let b = w.trailing_zeros() as usize;
                w &= w - 1;
                Some(wi * 64 + b)
            })
        })
    }
}

/// The largest age; ages saturate here.
pub const AGE_MAX: u8 = u8::MAX;
/// The largest refault streak.
pub const STREAK_MAX: u8 = 7;

/// What a tracker learned about one page in one scan.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Accessed since the previous scan: age back to 0.
    Accessed,
    /// Not accessed (or assumed so, by the probe): age + 1.
    Idle,
    /// No information: age unchanged.
    Unknown,
}

/// Per-page state of the managed mapping.
#[derive(Debug, Clone)]
pub struct PageTable {
    age: Vec<u8>,
    streak: Vec<u8>,
    /// Pages this controller moved out that have not come back.
    pub out: BitSet,
}

impl PageTable {
    /// State for `pages` pages, all age 0.
    pub fn new(pages: usize) -> Self {
        Self {
            age: vec![0; pages],
            streak: vec![0; pages],
            out: BitSet::new(pages),
        }
    }

    /// Number of pages.
    pub fn len(&self) -> usize {
        self.age.len()
    }

    /// Whether it tracks no pages.
    pub fn is_empty(&self) -> bool {
        self.age.is_empty()
    }

    /// Age of page `i` in scans.
    pub fn age(&self, i: usize) -> u8 {
        self.age.get(i).copied().unwrap_or(0)
    }

    /// Refault streak of page `i`.
    pub fn streak(&self, i: usize) -> u8 {
        self.streak.get(i).copied().unwrap_or(0)
    }

    /// Apply one observation to page `i`.
    pub fn observe(&mut self, i: usize, a: Access) {
        if let Some(age) = self.age.get_mut(i) {
            match a {
                Access::Accessed => *age = 0,
                Access::Idle => *age = age.saturating_add(1),
                Access::Unknown => {}
            }
        }
    }

    /// Page `i` was moved out by us.
    pub fn mark_out(&mut self, i: usize) {
        self.out.set(i, true);
    }

    /// Page `i`, which we moved out, was faulted back by the guest: it is
    /// hot, and the next time it must stay idle twice as long to move again.
    pub fn refault(&mut self, i: usize) {
        self.out.set(i, false);
        if let Some(s) = self.streak.get_mut(i) {
            *s = (*s + 1).min(STREAK_MAX);
        }
        self.observe(i, Access::Accessed);
    }

    /// Page `i` is resident again without the guest touching it (readahead,
    /// WILLNEED, vublk I/O): no longer out, age kept.
    pub fn back_in(&mut self, i: usize) {
        self.out.set(i, false);
    }

    /// The age at which page `i` is cold for a tier whose base cold age is
    /// `cold_age`: doubled for each refault in its streak, capped at AGE_MAX.
    pub fn threshold(&self, i: usize, cold_age: u8) -> u8 {
        let t = (cold_age as u32) << self.streak(i);
        t.min(AGE_MAX as u32) as u8
    }

    /// Whether page `i` is cold for `cold_age`.
    pub fn is_cold(&self, i: usize, cold_age: u8) -> bool {
        self.age(i) >= self.threshold(i, cold_age)
    }

    /// The age histogram, split by residency.
    pub fn histogram(&self, resident: &BitSet) -> Vec<HistogramBucket> {
        let mut b: Vec<HistogramBucket> = BUCKETS
            .iter()
            .map(|&(lo, hi)| HistogramBucket {
                ages: if lo == hi {
                    format!("{lo}")
                } else {
                    format!("{lo}-{hi}")
                },
                resident_pages: 0,
                out_pages: 0,
            })
            .collect();
        for (i, &a) in self.age.iter().enumerate() {
            let k = bucket_of(a);
            if resident.get(i) {
                b[k].resident_pages += 1;
            } else {
                b[k].out_pages += 1;
            }
        }
        b
    }
}

/// Age buckets of the histogram: 0, 1, 2-3, 4-7, ..., 128-254, 255.
const BUCKETS: [(u8, u8); 10] = [
    (0, 0),
    (1, 1),
    (2, 3),
    (4, 7),
    (8, 15),
    (16, 31),
    (32, 63),
    (64, 127),
    (128, 254),
    (255, 255),
];

fn bucket_of(a: u8) -> usize {
    match a {
        0 => 0,
        AGE_MAX => 9,
        _ => (8 - a.leading_zeros()) as usize,
    }
}

/// One histogram bucket.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HistogramBucket {
    /// Age range in scans, e.g. `"4-7"`.
    pub ages: String,
    /// Resident pages with an age in the range.
    pub resident_pages: u64,
    /// Pages not resident (moved out, or never touched) with such an age.
    pub out_pages: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bitset_basics() {
        let mut b = BitSet::new(130);
        for i in [0, 63, 64, 129, 500] {
            b.set(i, true);
        }
        assert_eq!(b.count(), 4);
        assert!(b.get(129) && !b.get(128) && !b.get(500));
        assert_eq!(b.ones().collect::<Vec<_>>(), vec![0, 63, 64, 129]);
        b.set(63, false);
        assert_eq!(b.count(), 3);
        b.clear_all();
        assert_eq!(b.count(), 0);
    }

    #[test]
    fn age_saturates_and_resets() {
        let mut t = PageTable::new(2);
        for _ in 0..300 {
            t.observe(0, Access::Idle);
        }
        assert_eq!(t.age(0), AGE_MAX);
        t.observe(0, Access::Unknown);
        assert_eq!(t.age(0), AGE_MAX);
        t.observe(0, Access::Accessed);
        assert_eq!(t.age(0), 0);
        t.observe(5, Access::Idle); // out of range: ignored
    }

    #[test]
    fn refault_streak_doubles_threshold() {
        let mut t = PageTable::new(1);
        assert_eq!(t.threshold(0, 12), 12);
        for _ in 0..12 {
            t.observe(0, Access::Idle);
        }
        assert!(t.is_cold(0, 12));
        t.mark_out(0);
        assert!(t.out.get(0));
        t.refault(0);
        assert!(!t.out.get(0));
        assert_eq!(t.age(0), 0);
        assert_eq!(t.threshold(0, 12), 24);
        for _ in 0..10 {
            t.refault(0);
        }
        assert_eq!(t.streak(0), STREAK_MAX);
        assert_eq!(t.threshold(0, 12), AGE_MAX);
        assert_eq!(t.threshold(0, 1), 128);
    }

    #[test]
    fn histogram_buckets() {
        assert_eq!(bucket_of(0), 0);
        assert_eq!(bucket_of(1), 1);
        assert_eq!(bucket_of(2), 2);
        assert_eq!(bucket_of(3), 2);
        assert_eq!(bucket_of(4), 3);
        assert_eq!(bucket_of(127), 7);
        assert_eq!(bucket_of(128), 8);
        assert_eq!(bucket_of(254), 8);
        assert_eq!(bucket_of(255), 9);
        let mut t = PageTable::new(4);
        t.observe(1, Access::Idle);
        for _ in 0..5 {
            t.observe(2, Access::Idle);
        }
        let mut res = BitSet::new(4);
        res.set(0, true);
        res.set(2, true);
        let h = t.histogram(&res);
        assert_eq!(h.len(), 10);
        assert_eq!(h[0].ages, "0");
        assert_eq!((h[0].resident_pages, h[0].out_pages), (1, 1));
        assert_eq!((h[1].resident_pages, h[1].out_pages), (0, 1));
        assert_eq!(h[3].ages, "4-7");
        assert_eq!(h[3].resident_pages, 1);
        let total: u64 = h.iter().map(|b| b.resident_pages + b.out_pages).sum();
        assert_eq!(total, 4);
    }
}
