//! Redis's glob patterns (`SCAN … MATCH`): `*`, `?`, `[abc]`, `[^a-z]` and `\` escapes,
//! matched on bytes as Redis's `stringmatchlen` does.

/// The longest pattern a command takes (`ERR` beyond): the cost of a match grows with the
/// pattern's length squared (a class is scanned at each step), and the event loop is shared.
pub const MAX_PATTERN: usize = 256;

/// Whether `text` matches `pattern`.
pub fn matches(pattern: &[u8], text: &[u8]) -> bool {
    matches_counting(pattern, text, &mut 0)
}

/// Whether `text` matches `pattern`, adding the steps taken to `steps` (what a command's
/// budget of matching counts).
pub fn matches_counting(pattern: &[u8], text: &[u8], steps: &mut u64) -> bool {
    // Iterative, with one backtracking point per `*`: linear in practice, and never recursive,
    // so a hostile pattern cannot blow the stack (only cost O(pattern × text)).
    let (mut p, mut t) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while t < text.len() {
        *steps += 1;
        if p < pattern.len() {
            match pattern[p] {
                b'*' => {
                    star = Some((p, t));
                    p += 1;
                    continue;
                }
                b'?' => {
                    p += 1;
                    t += 1;
                    continue;
                }
                b'[' => {
                    let class = class(pattern, p, text[t]);
                    *steps += class.map_or(pattern.len() - p, |(_, next)| next - p) as u64;
                    if let Some((matched, next)) = class
                        && matched
                    {
                        p = next;
                        t += 1;
                        continue;
                    }
                }
                b'\\' if p + 1 < pattern.len() && pattern[p + 1] == text[t] => {
                    p += 2;
                    t += 1;
                    continue;
                }
                b'\\' if p + 1 < pattern.len() => {}
                c if c == text[t] => {
                    p += 1;
                    t += 1;
                    continue;
                }
                _ => {}
            }
        }
        match star {
            Some((star_p, star_t)) => {
                star = Some((star_p, star_t + 1));
                p = star_p + 1;
                t = star_t + 1;
            }
            None => return false,
        }
    }
    pattern[p..].iter().all(|c| *c == b'*')
}

/// Whether the class at `pattern[at] == b'['` admits `c`, and where the pattern goes on.
fn class(pattern: &[u8], at: usize, c: u8) -> Option<(bool, usize)> {
    let mut i = at + 1;
    let negate = pattern.get(i) == Some(&b'^');
    if negate {
        i += 1;
    }
    let mut matched = false;
    loop {
        match *pattern.get(i)? {
            b']' => break,
            b'\\' if i + 1 < pattern.len() => {
                matched |= pattern[i + 1] == c;
                i += 2;
            }
            low if pattern.get(i + 1) == Some(&b'-') && pattern.get(i + 2).is_some_and(|b| *b != b']') => {
                let high = pattern[i + 2];
                let (low, high) = if low <= high { (low, high) } else { (high, low) };
                matched |= (low..=high).contains(&c);
                i += 3;
            }
            other => {
                matched |= other == c;
                i += 1;
            }
        }
    }
    Some((matched != negate, i + 1))
}

#[cfg(test)]
mod tests {
    use super::matches;

    #[test]
    fn patterns_match_as_redis_matches_them() {
        let cases: &[(&str, &str, bool)] = &[
            ("*", "", true),
            ("*", "anything", true),
            ("h?llo", "hello", true),
            ("h?llo", "hllo", false),
            ("h*llo", "heeeello", true),
            ("h[ae]llo", "hallo", true),
            ("h[ae]llo", "hillo", false),
            ("h[^e]llo", "hallo", true),
            ("h[^e]llo", "hello", false),
            ("h[a-b]llo", "hbllo", true),
            ("h[b-a]llo", "hallo", true),
            ("h\\*llo", "h*llo", true),
            ("h\\*llo", "hello", false),
            ("logs/*", "logs/2026", true),
            ("{job:r1}*", "{job:r1}b/k", true),
            ("*a*b*c", "xaybzc", true),
            ("*a*b*c", "xaybz", false),
            ("[", "a", false),
            ("a*", "b", false),
        ];
        for (pattern, text, expected) in cases {
            assert_eq!(matches(pattern.as_bytes(), text.as_bytes()), *expected, "{pattern} ~ {text}");
        }
        let hostile = "*a".repeat(100) + "b";
        assert!(!matches(hostile.as_bytes(), "a".repeat(2000).as_bytes()));
    }
}
