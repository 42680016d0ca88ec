//! Users and groups from the guest's `/etc/passwd` and `/etc/group`.
//!
//! Parsed here rather than through libc's `getpwnam`: envd is a static binary and must not depend on
//! NSS modules, and the files are all a sandbox image has.

use std::path::Path;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct User {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
    pub home: String,
    pub shell: String,
    /// Primary group first, then every group that lists the user as a member.
    pub groups: Vec<u32>,
}

#[derive(Debug, thiserror::Error)]
pub enum UserError {
    #[error("unknown user {0:?} (not in /etc/passwd)")]
    Unknown(String),
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
}

struct PasswdEntry<'a> {
    name: &'a str,
    uid: u32,
    gid: u32,
    home: &'a str,
    shell: &'a str,
}

fn passwd_entries(text: &str) -> impl Iterator<Item = PasswdEntry<'_>> {
    text.lines().filter_map(|line| {
        let f: Vec<&str> = line.split(':').collect();
        if f.len() < 7 || line.starts_with('#') {
            return None;
        }
        Some(PasswdEntry {
            name: f[0],
            uid: f[2].parse().ok()?,
            gid: f[3].parse().ok()?,
            home: f[5],
            shell: f[6],
        })
    })
}

/// Every group id whose member list names `user`.
fn supplementary_groups(group_text: &str, user: &str) -> Vec<u32> {
    group_text
        .lines()
        .filter_map(|line| {
            let f: Vec<&str> = line.split(':').collect();
            if f.len() < 4 || line.starts_with('#') {
                return None;
            }
            let gid = f[2].parse().ok()?;
            f[3].split(',').any(|m| m.trim() == user).then_some(gid)
        })
        .collect()
}

/// Resolves `name` (a user name, or a numeric uid present in passwd) from the given file contents.
pub fn resolve(passwd: &str, group: &str, name: &str) -> Result<User, UserError> {
    let by_name = passwd_entries(passwd).find(|e| e.name == name);
    let entry = match by_name {
        Some(e) => Some(e),
        None => name
            .parse::<u32>()
            .ok()
            .and_then(|uid| passwd_entries(passwd).find(|e| e.uid == uid)),
    }
    .ok_or_else(|| UserError::Unknown(name.to_string()))?;

    let mut groups = vec![entry.gid];
    for gid in supplementary_groups(group, entry.name) {
        if !groups.contains(&gid) {
            groups.push(gid);
        }
    }
    Ok(User {
        name: entry.name.to_string(),
        uid: entry.uid,
        gid: entry.gid,
        home: entry.home.to_string(),
        shell: if entry.shell.is_empty() {
            "/bin/sh".to_string()
        } else {
            entry.shell.to_string()
        },
        groups,
    })
}

/// Reads the user database under `etc` (normally `/etc`).
pub struct UserDb {
    pub passwd: String,
    pub group: String,
}

impl UserDb {
    pub fn load(etc: &Path) -> Result<UserDb, UserError> {
        let read = |file: &str| {
            let path = etc.join(file);
            match std::fs::read_to_string(&path) {
                Ok(s) => Ok(s),
                // An image without /etc/group simply has no supplementary groups.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound && file == "group" => {
                    Ok(String::new())
                }
                Err(source) => Err(UserError::Read {
                    path: path.display().to_string(),
                    source,
                }),
            }
        };
        Ok(UserDb {
            passwd: read("passwd")?,
            group: read("group")?,
        })
    }

    pub fn resolve(&self, name: &str) -> Result<User, UserError> {
        resolve(&self.passwd, &self.group, name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PASSWD: &str = "root:x:0:0:root:/root:/bin/bash\n\
        # a comment\n\
        nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n\
        broken line\n\
        alice:x:1000:1000:Alice,,,:/home/alice:\n\
        bad:x:notanumber:1:x:/:/bin/sh\n";
    const GROUP: &str = "root:x:0:\n\
        nogroup:x:65534:\n\
        alice:x:1000:\n\
        docker:x:999:alice,bob\n\
        wheel:x:10:bob, alice\n\
        garbage\n";

    #[test]
    fn resolves_users_with_supplementary_groups() {
        let alice = resolve(PASSWD, GROUP, "alice").unwrap();
        assert_eq!(alice.uid, 1000);
        assert_eq!(alice.gid, 1000);
        assert_eq!(alice.home, "/home/alice");
        assert_eq!(alice.shell, "/bin/sh", "an empty shell field means /bin/sh");
        assert_eq!(alice.groups, vec![1000, 999, 10]);

        let nobody = resolve(PASSWD, GROUP, "nobody").unwrap();
        assert_eq!((nobody.uid, nobody.gid), (65534, 65534));
        assert_eq!(nobody.groups, vec![65534]);
    }

    #[test]
    fn resolves_a_numeric_uid() {
        assert_eq!(resolve(PASSWD, GROUP, "0").unwrap().name, "root");
    }

    #[test]
    fn unknown_users_and_malformed_lines_are_errors_not_panics() {
        assert!(matches!(
            resolve(PASSWD, GROUP, "mallory"),
            Err(UserError::Unknown(_))
        ));
        assert!(matches!(
            resolve(PASSWD, GROUP, "bad"),
            Err(UserError::Unknown(_))
        ));
        assert!(matches!(
            resolve(PASSWD, GROUP, "broken line"),
            Err(UserError::Unknown(_))
        ));
        assert!(matches!(
            resolve("", "", "root"),
            Err(UserError::Unknown(_))
        ));
    }
}
