//! The fast way to start a child that keeps envd's identity and needs no PTY: glibc's `posix_spawn`,
//! which clones with `CLONE_VM | CLONE_VFORK` (no copy of envd's page tables, no copy-on-write faults
//! in envd afterwards) and runs only the file actions below in the child.
//!
//! std's `Command` would do the same, but it falls back to a full `fork` when it cannot look up
//! `posix_spawn_file_actions_addchdir_np` at run time (as in envd's static build) or when the child's
//! `PATH` differs from envd's. In a guest, where every page-table change is expensive, that fork was
//! most of a command's start; here both are handled directly: the symbol is linked, and the program
//! is looked up in the child's own `PATH` before the spawn.

use std::ffi::{CString, OsStr};
use std::io;
use std::mem::MaybeUninit;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

/// What the child's fds 0, 1 and 2 become.
pub struct ChildStdio<'a> {
    pub stdin: &'a OwnedFd,
    pub stdout: &'a OwnedFd,
    pub stderr: &'a OwnedFd,
}

/// Where `execvp` looks when the child's env has no `PATH` (glibc's default).
const DEFAULT_PATH: &str = "/bin:/usr/bin";

/// Finds `program` the way `execvp` does, but in the child's `PATH` and relative to its `cwd`: a name
/// with a slash is used as is; otherwise the first regular, executable file named so in a `PATH` entry.
pub fn resolve_program(program: &str, path_var: Option<&str>, cwd: &Path) -> Option<PathBuf> {
    if program.is_empty() {
        return None;
    }
    if program.contains('/') {
        return Some(PathBuf::from(program));
    }
    path_var
        .unwrap_or(DEFAULT_PATH)
        .split(':')
        .map(|dir| {
            // An empty entry means the current directory, as in execvp.
            let dir = if dir.is_empty() {
                Path::new(".")
            } else {
                Path::new(dir)
            };
            cwd.join(dir).join(program)
        })
        .find(|candidate| is_executable_file(candidate))
}

/// A regular file envd may execute (access(X_OK) also holds root to "some execute bit is set").
fn is_executable_file(path: &Path) -> bool {
    std::fs::metadata(path).is_ok_and(|meta| meta.is_file())
        && rustix::fs::access(path, rustix::fs::Access::EXEC_OK).is_ok()
}

fn cstring(bytes: &[u8]) -> io::Result<CString> {
    CString::new(bytes).map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            "an argument, variable or path contains a NUL byte",
        )
    })
}

/// Owns a `posix_spawn_file_actions_t` and destroys it on every path out.
struct FileActions(libc::posix_spawn_file_actions_t);

impl FileActions {
    fn new() -> io::Result<FileActions> {
        let mut raw = MaybeUninit::<libc::posix_spawn_file_actions_t>::uninit();
        // SAFETY: init writes the whole struct; it is used only after init returned 0.
        check(unsafe { libc::posix_spawn_file_actions_init(raw.as_mut_ptr()) })?;
        // SAFETY: initialized just above.
        Ok(FileActions(unsafe { raw.assume_init() }))
    }

    fn dup2(&mut self, fd: RawFd, target: RawFd) -> io::Result<()> {
        // SAFETY: self.0 is initialized; the fds are plain integers checked by the child.
        check(unsafe { libc::posix_spawn_file_actions_adddup2(&mut self.0, fd, target) })
    }

    fn chdir(&mut self, dir: &CString) -> io::Result<()> {
        // SAFETY: self.0 is initialized; glibc copies the path.
        check(unsafe { libc::posix_spawn_file_actions_addchdir_np(&mut self.0, dir.as_ptr()) })
    }
}

impl Drop for FileActions {
    fn drop(&mut self) {
        // SAFETY: initialized in new(), destroyed once.
        unsafe { libc::posix_spawn_file_actions_destroy(&mut self.0) };
    }
}

/// Owns a `posix_spawnattr_t`.
struct Attributes(libc::posix_spawnattr_t);

impl Attributes {
    /// A new process group, no blocked signals, and every signal's disposition back to the default
    /// (envd ignores SIGPIPE, and an ignored signal would stay ignored across exec).
    fn new_group_default_signals() -> io::Result<Attributes> {
        let mut raw = MaybeUninit::<libc::posix_spawnattr_t>::uninit();
        // SAFETY: init writes the whole struct; it is used only after init returned 0.
        check(unsafe { libc::posix_spawnattr_init(raw.as_mut_ptr()) })?;
        // SAFETY: initialized just above.
        let mut attrs = Attributes(unsafe { raw.assume_init() });
        let mut empty = MaybeUninit::<libc::sigset_t>::uninit();
        let mut all = MaybeUninit::<libc::sigset_t>::uninit();
        // SAFETY: sigemptyset/sigfillset initialize the sets; the attr setters copy them.
        unsafe {
            libc::sigemptyset(empty.as_mut_ptr());
            libc::sigfillset(all.as_mut_ptr());
            check(libc::posix_spawnattr_setsigmask(
                &mut attrs.0,
                empty.as_ptr(),
            ))?;
            check(libc::posix_spawnattr_setsigdefault(
                &mut attrs.0,
                all.as_ptr(),
            ))?;
            check(libc::posix_spawnattr_setpgroup(&mut attrs.0, 0))?;
            let flags = libc::POSIX_SPAWN_SETPGROUP
                | libc::POSIX_SPAWN_SETSIGMASK
                | libc::POSIX_SPAWN_SETSIGDEF;
            check(libc::posix_spawnattr_setflags(
                &mut attrs.0,
                flags as libc::c_short,
            ))?;
        }
        Ok(attrs)
    }
}

impl Drop for Attributes {
    fn drop(&mut self) {
        // SAFETY: initialized in new_group_default_signals(), destroyed once.
        unsafe { libc::posix_spawnattr_destroy(&mut self.0) };
    }
}

/// posix_spawn's functions return the error number instead of setting errno.
fn check(ret: libc::c_int) -> io::Result<()> {
    if ret == 0 {
        Ok(())
    } else {
        Err(io::Error::from_raw_os_error(ret))
    }
}

/// Starts `path` (already resolved) with `argv` (argv[0] included), exactly `env`, in `cwd`, in a new
/// process group, with `stdio` as its fds 0-2. Returns the child's pid. The stdio fds should be
/// close-on-exec in envd: the child gets its own copies through dup2.
pub fn spawn(
    path: &Path,
    argv: &[&OsStr],
    env: &[(String, String)],
    cwd: &Path,
    stdio: &ChildStdio<'_>,
) -> io::Result<u32> {
    let path = cstring(path.as_os_str().as_bytes())?;
    let argv = argv
        .iter()
        .map(|a| cstring(a.as_bytes()))
        .collect::<io::Result<Vec<_>>>()?;
    let envp = env
        .iter()
        .map(|(k, v)| cstring(format!("{k}={v}").as_bytes()))
        .collect::<io::Result<Vec<_>>>()?;
    let cwd = cstring(cwd.as_os_str().as_bytes())?;
    let mut argv_ptrs: Vec<*mut libc::c_char> =
        argv.iter().map(|a| a.as_ptr().cast_mut()).collect();
    argv_ptrs.push(std::ptr::null_mut());
    let mut envp_ptrs: Vec<*mut libc::c_char> =
        envp.iter().map(|e| e.as_ptr().cast_mut()).collect();
    envp_ptrs.push(std::ptr::null_mut());

    // A source fd below 3 could be overwritten by an earlier dup2 (or, equal to its target, keep its
    // close-on-exec flag); give such fds a number above 2 first. The copies close when this returns.
    let mut lifted = Vec::new();
    let mut source = |fd: &OwnedFd| -> io::Result<RawFd> {
        if fd.as_raw_fd() > 2 {
            return Ok(fd.as_raw_fd());
        }
        let copy = rustix::io::fcntl_dupfd_cloexec(fd, 3)?;
        let raw = copy.as_raw_fd();
        lifted.push(copy);
        Ok(raw)
    };
    let sources = [
        source(stdio.stdin)?,
        source(stdio.stdout)?,
        source(stdio.stderr)?,
    ];
    let mut actions = FileActions::new()?;
    for (target, fd) in sources.into_iter().enumerate() {
        actions.dup2(fd, target as RawFd)?;
    }
    actions.chdir(&cwd)?;
    let attrs = Attributes::new_group_default_signals()?;

    let mut pid: libc::pid_t = 0;
    // SAFETY: every pointer is valid for the call: path, argv and envp are NUL-terminated strings kept
    // alive above, both pointer arrays end with NULL, and actions and attrs are initialized. glibc's
    // posix_spawn runs only the file actions and exec in the CLONE_VFORK child.
    check(unsafe {
        libc::posix_spawn(
            &mut pid,
            path.as_ptr(),
            &actions.0,
            &attrs.0,
            argv_ptrs.as_ptr(),
            envp_ptrs.as_ptr(),
        )
    })?;
    drop(lifted);
    u32::try_from(pid).map_err(|_| io::Error::other(format!("posix_spawn returned pid {pid}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_name_is_looked_up_in_the_childs_path_not_envds() {
        let dir = tempfile::tempdir().unwrap();
        let bin = dir.path().join("bin");
        std::fs::create_dir(&bin).unwrap();
        let tool = bin.join("only-here");
        std::fs::write(&tool, "#!/bin/sh\n").unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&tool, std::fs::Permissions::from_mode(0o755)).unwrap();
        let path_var = format!("/nonexistent:{}", bin.display());
        assert_eq!(
            resolve_program("only-here", Some(&path_var), Path::new("/")),
            Some(tool.clone())
        );
        assert_eq!(
            resolve_program("only-here", Some("/bin"), Path::new("/")),
            None
        );
        // Not executable: skipped, as execvp does.
        std::fs::set_permissions(&tool, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert_eq!(
            resolve_program("only-here", Some(&path_var), Path::new("/")),
            None
        );
        // A directory is not a program.
        assert_eq!(
            resolve_program(
                "bin",
                Some(&dir.path().display().to_string()),
                Path::new("/")
            ),
            None
        );
        // With a slash, the name is the path; an empty name is nothing.
        assert_eq!(
            resolve_program("./x", None, Path::new("/")),
            Some(PathBuf::from("./x"))
        );
        assert_eq!(resolve_program("", None, Path::new("/")), None);
    }

    #[test]
    fn empty_path_entries_mean_the_working_directory() {
        let dir = tempfile::tempdir().unwrap();
        let tool = dir.path().join("here");
        std::fs::write(&tool, "").unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&tool, std::fs::Permissions::from_mode(0o755)).unwrap();
        assert_eq!(
            resolve_program("here", Some("/nonexistent:"), dir.path()),
            Some(dir.path().join(".").join("here"))
        );
    }
}
