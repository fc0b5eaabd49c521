//! Path globs for `fault.paths`.
//!
//! Paths are relative to the volume root (`logs/app.log`, no leading slash). A pattern is a list
//! of `/`-separated segments: `*` matches any run of characters inside one name, `?` one
//! character, and a segment that is exactly `**` matches any number of whole names (zero
//! included). As in `.gitignore`, a pattern without a `/` is matched against the last name at
//! any depth, so `*.log` catches `a/b/c.log`. Hand-written because the rules fit in a page and
//! the fault layer calls it on the I/O path without allocating.

/// A validated glob pattern.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Glob {
    pattern: String,
    /// True for a pattern with no `/`: match the basename only.
    basename_only: bool,
    /// True for `**`: everything matches, no work at all.
    match_all: bool,
}

impl Glob {
    /// Parse a pattern; the error says what is wrong with it.
    pub fn new(pattern: &str) -> Result<Glob, String> {
        let pattern = pattern.trim_start_matches('/');
        if pattern.is_empty() {
            return Err("a non-empty glob such as ** or **/*.log".into());
        }
        for seg in pattern.split('/') {
            if seg.contains("**") && seg != "**" {
                return Err(format!(
                    "a glob where ** stands alone between slashes (found {seg:?})"
                ));
            }
        }
        Ok(Glob {
            match_all: pattern == "**",
            basename_only: !pattern.contains('/'),
            pattern: pattern.to_string(),
        })
    }

    pub fn as_str(&self) -> &str {
        &self.pattern
    }

    /// Whether `path` (relative to the volume root) matches.
    pub fn matches(&self, path: &str) -> bool {
        if self.match_all {
            return true;
        }
        let path = path.trim_start_matches('/');
        if self.basename_only {
            let base = path.rsplit('/').next().unwrap_or(path);
            return segment_matches(self.pattern.as_bytes(), base.as_bytes());
        }
        let pat: Vec<&str> = self.pattern.split('/').collect();
        let segs: Vec<&str> = if path.is_empty() {
            Vec::new()
        } else {
            path.split('/').collect()
        };
        segments_match(&pat, &segs)
    }
}

fn segments_match(pat: &[&str], path: &[&str]) -> bool {
    match pat.split_first() {
        None => path.is_empty(),
        Some((&"**", rest)) => (0..=path.len()).any(|skip| segments_match(rest, &path[skip..])),
        Some((p, rest)) => match path.split_first() {
            Some((s, path_rest)) => {
                segment_matches(p.as_bytes(), s.as_bytes()) && segments_match(rest, path_rest)
            }
            None => false,
        },
    }
}

/// `*` and `?` inside one name; iterative with one backtrack point (linear in practice).
fn segment_matches(pat: &[u8], name: &[u8]) -> bool {
    let (mut p, mut n) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while n < name.len() {
        if p < pat.len() && (pat[p] == b'?' || pat[p] == name[n]) {
            p += 1;
            n += 1;
        } else if p < pat.len() && pat[p] == b'*' {
            star = Some((p, n));
            p += 1;
        } else if let Some((sp, sn)) = star {
            p = sp + 1;
            n = sn + 1;
            star = Some((sp, sn + 1));
        } else {
            return false;
        }
    }
    pat[p..].iter().all(|&c| c == b'*')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs_match_as_documented() {
        let table: &[(&str, &str, bool)] = &[
            ("**", "", true),
            ("**", "a/b/c", true),
            ("*.log", "app.log", true),
            ("*.log", "deep/dir/app.log", true),
            ("*.log", "app.log.1", false),
            ("*.log", "logs/app.txt", false),
            ("app?.log", "app1.log", true),
            ("app?.log", "app12.log", false),
            ("logs/*.log", "logs/a.log", true),
            ("logs/*.log", "x/logs/a.log", false),
            ("logs/*.log", "logs/sub/a.log", false),
            ("logs/**", "logs/sub/a.log", true),
            ("logs/**", "logs", true),
            ("**/*.db", "a.db", true),
            ("**/*.db", "x/y/a.db", true),
            ("a/**/z", "a/z", true),
            ("a/**/z", "a/b/c/z", true),
            ("a/**/z", "a/b/c/y", false),
            ("*", "anything", true),
            ("*a*b*", "xxaxxbxx", true),
            ("*a*b*", "xxbxxaxx", false),
        ];
        for (pat, path, want) in table {
            let g = Glob::new(pat).unwrap();
            assert_eq!(g.matches(path), *want, "{pat} vs {path}");
        }
    }

    #[test]
    fn double_star_must_be_a_whole_segment() {
        assert!(Glob::new("a/**b").is_err());
        assert!(Glob::new("***").is_err());
        assert!(Glob::new("").is_err());
    }
}
