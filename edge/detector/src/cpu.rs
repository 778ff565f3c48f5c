//! The CPU kernel path, chosen once per process from the CPU's features, so that one binary runs
//! the widest kernels each machine has: AVX-512 with VNNI on a recent Xeon or EPYC, AVX-VNNI on
//! a recent client part, AVX2 on older ones, and a portable path everywhere else (on aarch64
//! the compiler vectorises it for NEON, which every aarch64 CPU has).
//!
//! `EDGE_CPU_KERNELS=portable|avx2|avx-vnni|avx512-vnni` forces a path (one the CPU has), for
//! comparisons and for a CPU whose wide units slow its clock; the edge daemon refuses to start
//! with a value it does not know or a path the CPU lacks, and logs the path it runs.

use std::sync::OnceLock;

/// The environment variable that forces a kernel path.
pub const ENV: &str = "EDGE_CPU_KERNELS";

/// A set of kernels, each for a class of CPUs; later variants need more of the CPU.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum KernelPath {
    /// Plain Rust in the compiler's baseline vectors (SSE2 on x86-64, NEON on aarch64): the
    /// reference the other paths are tested against. A quantized model runs its float layers.
    Portable,
    /// AVX2 + FMA: float kernels 8 wide; INT8 products through 16-bit multiply-adds
    /// (`vpmaddwd`, 16 multiply-adds per instruction).
    Avx2,
    /// AVX-VNNI (Alder Lake and later client cores, Sapphire Rapids, Zen 5): AVX2 floats; INT8
    /// byte dot products (`vpdpbusd`, 32 multiply-adds per instruction).
    AvxVnni,
    /// AVX-512 F/BW/VL with VNNI (Ice Lake and later Xeons, Zen 4 and later): float kernels
    /// 16 wide; INT8 byte dot products 64 multiply-adds per instruction.
    Avx512Vnni,
}

impl KernelPath {
    pub const ALL: [KernelPath; 4] = [
        KernelPath::Portable,
        KernelPath::Avx2,
        KernelPath::AvxVnni,
        KernelPath::Avx512Vnni,
    ];

    pub fn name(self) -> &'static str {
        match self {
            KernelPath::Portable => "portable",
            KernelPath::Avx2 => "avx2",
            KernelPath::AvxVnni => "avx-vnni",
            KernelPath::Avx512Vnni => "avx512-vnni",
        }
    }

    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|p| p.name() == name.trim())
    }

    /// The CPU features the path needs, as `is_x86_feature_detected!` spells them.
    pub fn features(self) -> &'static [&'static str] {
        match self {
            KernelPath::Portable => &[],
            KernelPath::Avx2 => &["avx2", "fma"],
            KernelPath::AvxVnni => &["avx2", "fma", "avxvnni"],
            KernelPath::Avx512Vnni => &[
                "avx2",
                "fma",
                "avx512f",
                "avx512bw",
                "avx512vl",
                "avx512vnni",
            ],
        }
    }

    /// Whether this CPU has every feature the path needs.
    pub fn supported(self) -> bool {
        self.features().iter().all(|f| has_feature(f))
    }

    /// The widest path this CPU runs.
    pub fn best() -> Self {
        Self::best_of(Self::supported)
    }

    fn best_of(supported: impl Fn(KernelPath) -> bool) -> Self {
        Self::ALL
            .into_iter()
            .rev()
            .find(|p| supported(*p))
            .unwrap_or(KernelPath::Portable)
    }

    /// The path for a request (`None`, empty or `auto`: the widest the CPU supports), given
    /// which paths the CPU supports.
    pub fn choose(
        requested: Option<&str>,
        supported: impl Fn(KernelPath) -> bool,
    ) -> Result<KernelPath, String> {
        let requested = requested.map(str::trim).unwrap_or("");
        if requested.is_empty() || requested == "auto" {
            return Ok(Self::best_of(supported));
        }
        let Some(path) = Self::from_name(requested) else {
            let names: Vec<&str> = Self::ALL.iter().map(|p| p.name()).collect();
            return Err(format!(
                "{ENV}={requested:?} is not a kernel path; use auto or one of {}",
                names.join(", ")
            ));
        };
        if !supported(path) {
            return Err(format!(
                "{ENV}={requested}: this CPU lacks {} (it has {})",
                path.features()
                    .iter()
                    .filter(|f| !has_feature(f))
                    .copied()
                    .collect::<Vec<_>>()
                    .join(", "),
                Self::best_of(&supported).name()
            ));
        }
        Ok(path)
    }
}

impl std::fmt::Display for KernelPath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

fn has_feature(name: &str) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        match name {
            "avx2" => std::arch::is_x86_feature_detected!("avx2"),
            "fma" => std::arch::is_x86_feature_detected!("fma"),
            "avxvnni" => std::arch::is_x86_feature_detected!("avxvnni"),
            "avx512f" => std::arch::is_x86_feature_detected!("avx512f"),
            "avx512bw" => std::arch::is_x86_feature_detected!("avx512bw"),
            "avx512vl" => std::arch::is_x86_feature_detected!("avx512vl"),
            "avx512vnni" => std::arch::is_x86_feature_detected!("avx512vnni"),
            "avx512bf16" => std::arch::is_x86_feature_detected!("avx512bf16"),
            _ => false,
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = name;
        false
    }
}

static ACTIVE: OnceLock<KernelPath> = OnceLock::new();

/// Chooses the process's path from `EDGE_CPU_KERNELS` (or the CPU when it is unset). Call it
/// before the first kernel runs to turn a bad value into an error; later calls return the
/// path already chosen.
pub fn select_from_env() -> Result<KernelPath, String> {
    if let Some(path) = ACTIVE.get() {
        return Ok(*path);
    }
    let requested = std::env::var(ENV).ok();
    let path = KernelPath::choose(requested.as_deref(), KernelPath::supported)?;
    Ok(*ACTIVE.get_or_init(|| path))
}

/// The path every CPU kernel of this process runs (see [`select_from_env`]; a bad
/// `EDGE_CPU_KERNELS` here is logged and the CPU's widest path used).
pub fn active() -> KernelPath {
    *ACTIVE.get_or_init(|| {
        let requested = std::env::var(ENV).ok();
        KernelPath::choose(requested.as_deref(), KernelPath::supported).unwrap_or_else(|e| {
            let best = KernelPath::best();
            tracing::warn!("{e}; running the {best} kernels");
            best
        })
    })
}

/// One line for logs and `edge info`: the path and the CPU features behind the choice.
pub fn describe() -> String {
    let path = active();
    let extras = ["avx512bf16"];
    let seen: Vec<&str> = KernelPath::Avx512Vnni
        .features()
        .iter()
        .chain(KernelPath::AvxVnni.features())
        .chain(&extras)
        .copied()
        .filter(|f| has_feature(f))
        .fold(Vec::new(), |mut v, f| {
            if !v.contains(&f) {
                v.push(f);
            }
            v
        });
    format!(
        "CPU kernels: {path} (widest supported: {}; CPU features: {})",
        KernelPath::best(),
        if seen.is_empty() {
            "none of avx2/fma/avx512/vnni".to_string()
        } else {
            seen.join(" ")
        }
    )
}

/// Tells mimalloc (the global allocator of `edge`, `trainer` and the benchmarks) to keep freed
/// memory instead of returning it to the kernel after a delay. Each forward pass frees and
/// allocates the same megabytes of activations; returned pages came back as page faults and
/// zeroing, a quarter of the factory model's time at batch 1 (10.3-10.8 ms against 13.5-15.0
/// with `MIMALLOC_PURGE_DELAY=-1` in `cargo bench --bench models`). The process then holds its
/// peak working set, which for inference is its steady state. Call it first thing in `main`.
pub fn hold_freed_memory() {
    // SAFETY: setting an option is a plain store in mimalloc's option table.
    unsafe { libmimalloc_sys::mi_option_set(PURGE_DELAY, -1) };
}

/// `mi_option_purge_delay` in mimalloc.h: the option just before `use_numa_nodes`, which the
/// sys crate names (it does not name this one); the tests check its default.
const PURGE_DELAY: libmimalloc_sys::mi_option_t = libmimalloc_sys::mi_option_use_numa_nodes - 1;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_takes_the_widest_supported_path() {
        let only_avx2 = |p: KernelPath| p <= KernelPath::Avx2;
        assert_eq!(KernelPath::choose(None, only_avx2), Ok(KernelPath::Avx2));
        assert_eq!(
            KernelPath::choose(Some("auto"), only_avx2),
            Ok(KernelPath::Avx2)
        );
        // A Skylake-X-like CPU: AVX-512 but no VNNI of either kind.
        let no_vnni = |p: KernelPath| matches!(p, KernelPath::Portable | KernelPath::Avx2);
        assert_eq!(KernelPath::choose(Some(""), no_vnni), Ok(KernelPath::Avx2));
        let client = |p: KernelPath| p != KernelPath::Avx512Vnni;
        assert_eq!(KernelPath::choose(None, client), Ok(KernelPath::AvxVnni));
        let all = |_| true;
        assert_eq!(KernelPath::choose(None, all), Ok(KernelPath::Avx512Vnni));
        let none = |p: KernelPath| p == KernelPath::Portable;
        assert_eq!(KernelPath::choose(None, none), Ok(KernelPath::Portable));
    }

    #[test]
    fn a_forced_path_must_exist_and_be_supported() {
        let only_avx2 = |p: KernelPath| p <= KernelPath::Avx2;
        assert_eq!(
            KernelPath::choose(Some("portable"), only_avx2),
            Ok(KernelPath::Portable)
        );
        assert_eq!(
            KernelPath::choose(Some(" avx2 "), only_avx2),
            Ok(KernelPath::Avx2)
        );
        let err = KernelPath::choose(Some("avx512-vnni"), only_avx2).unwrap_err();
        assert!(
            err.contains("EDGE_CPU_KERNELS=avx512-vnni") && err.contains("it has avx2"),
            "{err}"
        );
        let err = KernelPath::choose(Some("sse9"), only_avx2).unwrap_err();
        assert!(
            err.contains("\"sse9\"") && err.contains("avx-vnni"),
            "{err}"
        );
    }

    /// The option index is mimalloc v3's purge delay: its documented default is 1000 ms.
    #[test]
    fn the_purge_delay_option_is_the_one_set() {
        if std::env::var_os("MIMALLOC_PURGE_DELAY").is_some() {
            return;
        }
        // SAFETY: reading an option.
        let delay = unsafe { libmimalloc_sys::mi_option_get(PURGE_DELAY) };
        assert_eq!(delay, 1000);
    }

    #[test]
    fn names_round_trip_and_the_active_path_is_supported() {
        for p in KernelPath::ALL {
            assert_eq!(KernelPath::from_name(p.name()), Some(p));
        }
        assert!(KernelPath::Portable.supported());
        assert!(active().supported());
        assert!(describe().contains(active().name()));
    }
}
