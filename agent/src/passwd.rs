//! `/etc/passwd` and `/etc/group` parsing and user resolution, without NSS.

/// A resolved user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct User {
    /// The user id.
    pub uid: u32,
    /// The primary group id.
    pub gid: u32,
    /// The home directory.
    pub home: String,
}

/// A passwd entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PasswdEntry {
    /// Login name.
    pub name: String,
    /// User id.
    pub uid: u32,
    /// Primary group id.
    pub gid: u32,
    /// Home directory.
    pub home: String,
}

/// Parses passwd text; malformed lines and comments are skipped.
pub fn parse_passwd(text: &str) -> Vec<PasswdEntry> {
    text.lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .filter_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            if f.len() < 7 {
                return None;
            }
            Some(PasswdEntry {
                name: f[0].to_owned(),
                uid: f[2].parse().ok()?,
                gid: f[3].parse().ok()?,
                home: f[5].to_owned(),
            })
        })
        .collect()
}

/// Gids of the groups (in group text) that list `user` as a member.
pub fn supplementary_gids(group_text: &str, user: &str) -> Vec<u32> {
    group_text
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            if f.len() < 4 {
                return None;
            }
            let gid = f[2].parse().ok()?;
            f[3].split(',').any(|m| m == user).then_some(gid)
        })
        .collect()
}

/// Resolves a user by name, or a uid to its entry (home, default gid). An unknown uid
/// resolves to itself with gid = `default_gid` and home `/`.
pub fn resolve(passwd: &str, username: Option<&str>, uid: u32, default_gid: u32) -> Option<User> {
    let entries = parse_passwd(passwd);
    match username {
        Some(name) => entries.iter().find(|e| e.name == name).map(|e| User {
            uid: e.uid,
            gid: e.gid,
            home: e.home.clone(),
        }),
        None => Some(
            entries
                .iter()
                .find(|e| e.uid == uid)
                .map(|e| User {
                    uid,
                    gid: default_gid,
                    home: e.home.clone(),
                })
                .unwrap_or(User {
                    uid,
                    gid: default_gid,
                    home: "/".to_owned(),
                }),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PASSWD: &str =
        "root:x:0:0:root:/root:/bin/sh\n# c\nbad\nwww:x:33:34:w:/var/www:/bin/false\n";
    const GROUP: &str = "root:x:0:\nadm:x:4:www,other\nweb:x:34:\nx:x:99:www\n";

    #[test]
    fn resolves_users() {
        assert_eq!(parse_passwd(PASSWD).len(), 2);
        assert_eq!(
            resolve(PASSWD, Some("www"), 0, 0),
            Some(User {
                uid: 33,
                gid: 34,
                home: "/var/www".into()
            })
        );
        assert_eq!(resolve(PASSWD, Some("nobody"), 0, 0), None);
        assert_eq!(resolve(PASSWD, None, 0, 0).unwrap().home, "/root");
        assert_eq!(resolve(PASSWD, None, 1000, 5).unwrap().home, "/");
        assert_eq!(supplementary_gids(GROUP, "www"), vec![4, 99]);
    }
}
