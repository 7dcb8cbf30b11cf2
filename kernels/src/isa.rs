//! Which instruction set the kernels use, chosen once at start-up by runtime
//! detection (a generic x86-64 or aarch64 build runs its best path on every
//! machine) and overridable with `LFM_ISA=scalar|avx2|avx512|neon`.

use std::fmt;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Isa {
    /// Plain Rust: the reference every other path is tested against.
    Scalar,
    /// x86-64 AVX2 + FMA + F16C.
    Avx2,
    /// x86-64 AVX-512 F/BW/VL (+ VNNI when present).
    Avx512,
    /// aarch64 NEON (+ dotprod when present).
    Neon,
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum IsaError {
    #[error("LFM_ISA={0:?} is not one of scalar, avx2, avx512, neon")]
    Unknown(String),
    #[error("LFM_ISA={0} but this CPU lacks it (available: {1})")]
    Unsupported(Isa, String),
}

impl Isa {
    pub const ALL: [Isa; 4] = [Isa::Scalar, Isa::Avx2, Isa::Avx512, Isa::Neon];

    pub fn name(self) -> &'static str {
        match self {
            Isa::Scalar => "scalar",
            Isa::Avx2 => "avx2",
            Isa::Avx512 => "avx512",
            Isa::Neon => "neon",
        }
    }

    pub fn from_name(s: &str) -> Option<Isa> {
        Isa::ALL
            .into_iter()
            .find(|i| i.name().eq_ignore_ascii_case(s.trim()))
    }

    /// Whether this CPU can run the path.
    pub fn available(self) -> bool {
        match self {
            Isa::Scalar => true,
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => {
                is_x86_feature_detected!("avx2")
                    && is_x86_feature_detected!("fma")
                    && is_x86_feature_detected!("f16c")
            }
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => {
                Isa::Avx2.available()
                    && is_x86_feature_detected!("avx512f")
                    && is_x86_feature_detected!("avx512bw")
                    && is_x86_feature_detected!("avx512vl")
            }
            #[cfg(target_arch = "aarch64")]
            Isa::Neon => std::arch::is_aarch64_feature_detected!("neon"),
            #[allow(unreachable_patterns)]
            _ => false,
        }
    }

    /// Optional extensions of the chosen path that this CPU has
    /// (`vnni`, `dotprod`, `i8mm`), for display.
    pub fn extensions(self) -> Vec<&'static str> {
        let mut v = Vec::new();
        #[cfg(target_arch = "x86_64")]
        if self == Isa::Avx512 && is_x86_feature_detected!("avx512vnni") {
            v.push("vnni");
        }
        #[cfg(target_arch = "aarch64")]
        if self == Isa::Neon {
            if std::arch::is_aarch64_feature_detected!("dotprod") {
                v.push("dotprod");
            }
            if std::arch::is_aarch64_feature_detected!("i8mm") {
                v.push("i8mm");
            }
        }
        v
    }

    /// The best path this CPU runs.
    pub fn detect() -> Isa {
        [Isa::Avx512, Isa::Avx2, Isa::Neon]
            .into_iter()
            .find(|i| i.available())
            .unwrap_or(Isa::Scalar)
    }

    /// `LFM_ISA` if set (an unknown or unsupported value is an error), else
    /// the detected best.
    pub fn from_env() -> Result<Isa, IsaError> {
        Isa::choose(std::env::var("LFM_ISA").ok().as_deref())
    }

    pub fn choose(requested: Option<&str>) -> Result<Isa, IsaError> {
        match requested.filter(|s| !s.trim().is_empty()) {
            None => Ok(Isa::detect()),
            Some(s) => {
                let isa = Isa::from_name(s).ok_or_else(|| IsaError::Unknown(s.to_owned()))?;
                if isa.available() {
                    Ok(isa)
                } else {
                    let avail: Vec<&str> = Isa::ALL
                        .into_iter()
                        .filter(|i| i.available())
                        .map(Isa::name)
                        .collect();
                    Err(IsaError::Unsupported(isa, avail.join(", ")))
                }
            }
        }
    }
}

impl fmt::Display for Isa {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())?;
        for e in self.extensions() {
            write!(f, "+{e}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn choice_follows_the_request() {
        assert_eq!(Isa::choose(None).unwrap(), Isa::detect());
        assert_eq!(Isa::choose(Some("")).unwrap(), Isa::detect());
        assert_eq!(Isa::choose(Some("SCALAR")).unwrap(), Isa::Scalar);
        assert_eq!(
            Isa::choose(Some("mmx")).unwrap_err(),
            IsaError::Unknown("mmx".into())
        );
        #[cfg(target_arch = "x86_64")]
        assert!(matches!(
            Isa::choose(Some("neon")),
            Err(IsaError::Unsupported(Isa::Neon, _))
        ));
        #[cfg(target_arch = "aarch64")]
        assert!(matches!(
            Isa::choose(Some("avx2")),
            Err(IsaError::Unsupported(Isa::Avx2, _))
        ));
        assert!(Isa::detect().available());
    }
}
