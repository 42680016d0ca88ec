//! Processes: spawning (users, env, stdio), reaping, output pumping, stdin, and the process table.

pub mod fdio;
pub mod posix_spawn;
pub mod pump;
pub mod reaper;
pub mod spawn;
pub mod stdin;
pub mod table;
