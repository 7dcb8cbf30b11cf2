//! The commands with more than a screen of setup, each beside its flags.

pub(crate) mod generate;
pub(crate) mod serve;
