//! Architecture-specific setup, as pure functions where possible (they compute what to write).

pub mod x86_64;
