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
}
