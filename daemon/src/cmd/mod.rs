//! The commands with more than a few lines of setup, each beside its flags.

pub(crate) mod bench;
pub(crate) mod generate;
pub(crate) mod serve;
