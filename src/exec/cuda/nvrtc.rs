//! Run-time compilation of the kernels in `cuda/` through NVRTC, to a CUBIN for one
//! compute capability, cached on disk so that only the first use pays for the compile.
//!
//! The same [`compile`] serves the runtime and the compile check that CI runs without a
//! GPU: a kernel that NVRTC rejects fails there, before it can fail on a device.

use std::ffi::{c_char, CString};
use std::path::PathBuf;

use cudarc::nvrtc::{result, sys};

use crate::error::{Error, Result};

/// The kernel source, embedded in the library.
pub const SOURCE: &str = include_str!("../../../cuda/dynsparse.cu");

/// Every `extern "C"` kernel in [`SOURCE`]; the compile check loads each by name.
pub const KERNELS: &[&str] = &[
    "conv_igemm_tf32",
    "conv_igemm_3xtf32",
    "conv_igemm_f16",
    "conv_splitk_finish",
    "depthwise_conv",
    "init_skipped",
    "nchw_to_nhwc",
    "maxpool_nhwc",
    "adaptive_avgpool_nhwc",
    "linear",
    "gate_pool",
    "gate_fc",
    "gate_rank",
    "gate_compact",
];

/// A compiled module: the CUBIN and what ptxas said about each kernel.
#[derive(Debug, Clone)]
pub struct Compiled {
    /// Target architecture, e.g. `sm_90`.
    pub arch: String,
    /// The CUBIN image.
    pub cubin: Vec<u8>,
    /// NVRTC's log: with `-v`, registers, shared memory and spill bytes per kernel.
    pub log: String,
}

/// Resource use of one kernel, read from the ptxas log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelResources {
    /// Kernel name.
    pub name: String,
    /// Registers per thread.
    pub registers: u32,
    /// Bytes spilled to local memory (stores + loads).
    pub spill_bytes: u32,
    /// Stack frame bytes.
    pub stack_bytes: u32,
}

/// Whether the NVRTC shared library can be loaded (`libnvrtc.so.13` on the library path).
pub fn available() -> bool {
    // SAFETY: only tries to dlopen the library by its candidate names.
    unsafe { sys::is_culib_present() }
}

/// NVRTC's version as (major, minor).
pub fn version() -> Result<(i32, i32)> {
    ensure_available()?;
    let (mut major, mut minor) = (0, 0);
    // SAFETY: the library is present; both pointers are valid.
    unsafe { sys::nvrtcVersion(&mut major, &mut minor) }
        .result()
        .map_err(|e| Error::Cuda(format!("nvrtcVersion: {e:?}")))?;
    Ok((major, minor))
}

fn ensure_available() -> Result<()> {
    if available() {
        Ok(())
    } else {
        Err(Error::Cuda(
            "NVRTC (libnvrtc.so.13) was not found on the library path; install it \
             (pip install nvidia-cuda-nvrtc==13.0.88) and add its lib folder to LD_LIBRARY_PATH"
                .into(),
        ))
    }
}

fn c_chars_to_string(v: &[c_char]) -> String {
    let bytes: Vec<u8> = v
        .iter()
        .take_while(|&&c| c != 0)
        .map(|&c| c as u8)
        .collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

/// Compiles [`SOURCE`] to a CUBIN for `arch` (`"sm_80"`, `"sm_90"`, …) with ptxas'
/// resource report in the log. A compile error carries NVRTC's log.
pub fn compile(arch: &str) -> Result<Compiled> {
    ensure_available()?;
    let src = CString::new(SOURCE).map_err(|_| Error::Cuda("kernel source holds a NUL".into()))?;
    let name = CString::new("dynsparse.cu").expect("static name");
    let prog = result::create_program(&src, Some(name.as_c_str()))
        .map_err(|e| Error::Cuda(format!("nvrtcCreateProgram: {e:?}")))?;
    let options = [
        format!("--gpu-architecture={arch}"),
        "--std=c++17".to_string(),
        "--ptxas-options=-v".to_string(),
    ];
    // SAFETY: `prog` was created above and is destroyed once, at the end.
    let outcome = unsafe {
        let compiled = result::compile_program(prog, &options);
        let log = result::get_program_log(prog)
            .map(|l| c_chars_to_string(&l))
            .unwrap_or_default();
        let cubin = compiled.and_then(|()| {
            let mut size = 0usize;
            sys::nvrtcGetCUBINSize(prog, &mut size).result()?;
            let mut image = vec![0u8; size];
            sys::nvrtcGetCUBIN(prog, image.as_mut_ptr() as *mut c_char).result()?;
            Ok(image)
        });
        let _ = result::destroy_program(prog);
        (cubin, log)
    };
    match outcome {
        (Ok(cubin), log) => Ok(Compiled {
            arch: arch.to_string(),
            cubin,
            log,
        }),
        (Err(e), log) => Err(Error::Cuda(format!(
            "NVRTC failed to compile cuda/dynsparse.cu for {arch} ({e:?}):\n{log}"
        ))),
    }
}

/// Parses ptxas' `-v` report: one entry per kernel with registers, spills and stack.
pub fn resources(log: &str) -> Vec<KernelResources> {
    let mut out: Vec<KernelResources> = Vec::new();
    let number_before = |line: &str, unit: &str| -> Option<u32> {
        let at = line.find(unit)?;
        line[..at].split_whitespace().last()?.parse().ok()
    };
    for line in log.lines() {
        if let Some(rest) = line.split("Compiling entry function '").nth(1) {
            let name = rest.split('\'').next().unwrap_or("").to_string();
            out.push(KernelResources {
                name,
                registers: 0,
                spill_bytes: 0,
                stack_bytes: 0,
            });
        } else if let Some(k) = out.last_mut() {
            if line.contains("bytes stack frame") {
                k.stack_bytes = number_before(line, "bytes stack frame").unwrap_or(0);
                k.spill_bytes = number_before(line, "bytes spill stores").unwrap_or(0)
                    + number_before(line, "bytes spill loads").unwrap_or(0);
            } else if line.contains("Used") && line.contains("registers") {
                k.registers = number_before(line, "registers").unwrap_or(0);
            }
        }
    }
    out
}

/// Where compiled modules are cached: `$DYNSPARSE_CACHE`, else `$XDG_CACHE_HOME/dynsparse`,
/// else `~/.cache/dynsparse`.
fn cache_dir() -> Option<PathBuf> {
    if let Some(d) = std::env::var_os("DYNSPARSE_CACHE") {
        return Some(PathBuf::from(d));
    }
    if let Some(d) = std::env::var_os("XDG_CACHE_HOME") {
        return Some(PathBuf::from(d).join("dynsparse"));
    }
    std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache").join("dynsparse"))
}

fn source_hash() -> u64 {
    // FNV-1a: stable across builds and platforms, unlike std's hasher.
    SOURCE.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// The CUBIN for `arch`, from the disk cache when the same source was compiled by the
/// same NVRTC version before; otherwise compiled now and cached (a cache that cannot be
/// written is not an error).
pub fn cubin_cached(arch: &str) -> Result<Vec<u8>> {
    let (major, minor) = version()?;
    let file = cache_dir().map(|d| {
        d.join(format!(
            "kernels-{:016x}-{arch}-nvrtc{major}.{minor}.cubin",
            source_hash()
        ))
    });
    if let Some(f) = &file {
        if let Ok(bytes) = std::fs::read(f) {
            if !bytes.is_empty() {
                return Ok(bytes);
            }
        }
    }
    let compiled = compile(arch)?;
    if let Some(f) = &file {
        if let Some(dir) = f.parent() {
            let _ = std::fs::create_dir_all(dir);
        }
        let tmp = f.with_extension("partial");
        if std::fs::write(&tmp, &compiled.cubin).is_ok() {
            let _ = std::fs::rename(&tmp, f);
        }
    }
    Ok(compiled.cubin)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_ptxas_resource_lines() {
        let log = "ptxas info    : Compiling entry function 'conv_igemm_tf32' for 'sm_90'\n\
                   ptxas info    : Function properties for conv_igemm_tf32\n\
                   \x20   24 bytes stack frame, 8 bytes spill stores, 12 bytes spill loads\n\
                   ptxas info    : Used 128 registers, used 1 barriers, 18432 bytes smem\n\
                   ptxas info    : Compiling entry function 'linear' for 'sm_90'\n\
                   ptxas info    : Function properties for linear\n\
                   \x20   0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads\n\
                   ptxas info    : Used 16 registers\n";
        let r = resources(log);
        assert_eq!(r.len(), 2);
        assert_eq!(
            r[0],
            KernelResources {
                name: "conv_igemm_tf32".into(),
                registers: 128,
                spill_bytes: 20,
                stack_bytes: 24
            }
        );
        assert_eq!(r[1].registers, 16);
        assert_eq!(r[1].spill_bytes, 0);
    }

    #[test]
    fn every_listed_kernel_is_named_in_the_source() {
        // The compile test checks the converse (every compiled entry point is listed).
        for k in KERNELS {
            assert!(
                SOURCE.contains(k),
                "kernel {k} is listed but not in cuda/dynsparse.cu"
            );
        }
    }
}
