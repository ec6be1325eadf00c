//! Which columns an UPDATE changed: a NULL-aware comparison, generic over how
//! two values are compared so it can be tested without a server.

/// Indexes of the positions where `old` and `new` differ.
pub fn changed<T>(
    old: &[Option<T>],
    new: &[Option<T>],
    same: impl Fn(&T, &T) -> bool,
) -> Vec<usize> {
    old.iter()
        .zip(new)
        .enumerate()
        .filter(|(_, (o, n))| match (o, n) {
            (None, None) => false,
            (Some(o), Some(n)) => !same(o, n),
            _ => true,
        })
        .map(|(i, _)| i)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nulls_and_values() {
        let old = [Some(1), None, Some(3), None, Some(5)];
        let new = [Some(1), None, Some(4), Some(0), None];
        assert_eq!(changed(&old, &new, |a, b| a == b), vec![2, 3, 4]);
    }

    #[test]
    fn nothing_changed() {
        let row = [Some("a"), None];
        assert!(changed(&row, &row, |a, b| a == b).is_empty());
    }

    // Fuzz / property tests (`cargo test --lib fuzz_`; see `crate::test_support`).

    use crate::test_support::{fuzz, no_panic, Rng};

    fn random_row(rng: &mut Rng, len: usize) -> Vec<Option<u8>> {
        // Few distinct values, so equal and unequal pairs are both common.
        (0..len)
            .map(|_| (!rng.one_in(3)).then(|| rng.below(4) as u8))
            .collect()
    }

    #[test]
    fn fuzz_changed() {
        fuzz("changed", 20_000, |rng| {
            let len = rng.len(40);
            let old = random_row(rng, len);
            let mut new = old.clone();
            for _ in 0..rng.len(6) {
                if len > 0 {
                    let i = rng.below(len);
                    new[i] = (!rng.one_in(3)).then(|| rng.below(4) as u8);
                }
            }
            // Rows of one relation have one length; a shorter one is compared
            // over the common prefix only.
            if rng.one_in(10) {
                let n = rng.len(40);
                new = random_row(rng, n);
            }
            // `same` need not be plain equality (binary equality of datums):
            // here, equal modulo 2.
            let same = |a: &u8, b: &u8| a % 2 == b % 2;
            let got = no_panic(&(&old, &new), || changed(&old, &new, same));
            let expected: Vec<usize> = (0..old.len().min(new.len()))
                .filter(|&i| match (old[i], new[i]) {
                    (None, None) => false,
                    (Some(a), Some(b)) => !same(&a, &b),
                    _ => true,
                })
                .collect();
            assert_eq!(got, expected, "{old:?} -> {new:?}");
            // Comparing a row with itself finds nothing; the comparison is symmetric.
            assert!(changed(&old, &old, same).is_empty());
            assert_eq!(changed(&new, &old, same), got);
        });
    }
}
