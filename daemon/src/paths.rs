//! Where lfmd looks for things on disk when not told: the model file.
//! One place, so the daemon, the CLI and the docs agree.

use std::path::PathBuf;

/// The file names of LiquidAI's LFM2-8B-A1B GGUFs, most preferred first.
pub const DEFAULT_MODEL_FILES: &[&str] = &[
    "LFM2-8B-A1B-Q4_0.gguf",
    "LFM2-8B-A1B-Q4_K_M.gguf",
    "LFM2-8B-A1B-Q5_K_M.gguf",
    "LFM2-8B-A1B-Q6_K.gguf",
    "LFM2-8B-A1B-Q8_0.gguf",
];

/// Model directories searched in order: `$LFMD_MODEL_DIR`, the user's
/// `$XDG_DATA_HOME/lfmd/models` (default `~/.local/share/lfmd/models`), then
/// the system service's `/var/lib/lfmd/models`.
pub fn model_dirs(env: impl Fn(&str) -> Option<String>) -> Vec<PathBuf> {
    let mut dirs = Vec::new();
    if let Some(d) = env("LFMD_MODEL_DIR").filter(|d| !d.is_empty()) {
        dirs.push(PathBuf::from(d));
    }
    match env("XDG_DATA_HOME").filter(|d| !d.is_empty()) {
        Some(d) => dirs.push(PathBuf::from(d).join("lfmd/models")),
        None => {
            if let Some(h) = env("HOME").filter(|h| !h.is_empty()) {
                dirs.push(PathBuf::from(h).join(".local/share/lfmd/models"));
            }
        }
    }
    dirs.push(PathBuf::from("/var/lib/lfmd/models"));
    dirs
}

/// The model to use when none is named: `$LFMD_MODEL` if set, else the first
/// default file name found in the model directories.
pub fn find_default_model(env: impl Fn(&str) -> Option<String>) -> Option<PathBuf> {
    if let Some(m) = env("LFMD_MODEL").filter(|m| !m.is_empty()) {
        return Some(PathBuf::from(m));
    }
    model_dirs(&env)
        .into_iter()
        .flat_map(|d| DEFAULT_MODEL_FILES.iter().map(move |f| d.join(f)))
        .find(|p| p.is_file())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn search_order_follows_env() {
        let env = |k: &str| match k {
            "LFMD_MODEL_DIR" => Some("/opt/m".to_owned()),
            "HOME" => Some("/home/u".to_owned()),
            _ => None,
        };
        assert_eq!(
            model_dirs(env),
            [
                PathBuf::from("/opt/m"),
                PathBuf::from("/home/u/.local/share/lfmd/models"),
                PathBuf::from("/var/lib/lfmd/models")
            ]
        );
        let env = |k: &str| (k == "XDG_DATA_HOME").then(|| "/x".to_owned());
        assert_eq!(model_dirs(env)[0], PathBuf::from("/x/lfmd/models"));
    }

    #[test]
    fn explicit_model_wins_and_files_are_found() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().to_str().unwrap().to_owned();
        let env = |k: &str| (k == "LFMD_MODEL_DIR").then(|| d.clone());
        assert_eq!(find_default_model(env), None);
        std::fs::write(dir.path().join("LFM2-8B-A1B-Q4_K_M.gguf"), b"x").unwrap();
        assert_eq!(
            find_default_model(env),
            Some(dir.path().join("LFM2-8B-A1B-Q4_K_M.gguf"))
        );
        let env2 = |k: &str| (k == "LFMD_MODEL").then(|| "/m.gguf".to_owned());
        assert_eq!(find_default_model(env2), Some(PathBuf::from("/m.gguf")));
    }
}
