//! Every CUDA kernel compiles through NVRTC for sm_80 and sm_90 by the same code path the
//! runtime uses. Needs no GPU, only libnvrtc: CI installs it and sets
//! `DYNSPARSE_REQUIRE_NVRTC=1`, so a missing library fails there instead of skipping.

use dynsparse::exec::cuda::nvrtc;

#[test]
fn every_kernel_compiles_for_sm80_and_sm90() {
    if !nvrtc::available() {
        assert!(
            std::env::var_os("DYNSPARSE_REQUIRE_NVRTC").is_none(),
            "DYNSPARSE_REQUIRE_NVRTC is set but libnvrtc.so.13 is not on the library path"
        );
        eprintln!("skipped: libnvrtc not found (set LD_LIBRARY_PATH to check the kernels)");
        return;
    }
    let (major, minor) = nvrtc::version().expect("nvrtc version");
    eprintln!("NVRTC {major}.{minor}");
    for arch in ["sm_80", "sm_90"] {
        let compiled = nvrtc::compile(arch).unwrap_or_else(|e| panic!("{e}"));
        // A CUBIN is an ELF image.
        assert_eq!(&compiled.cubin[..4], b"\x7fELF", "{arch}: not a CUBIN");
        let res = nvrtc::resources(&compiled.log);
        let mut compiled_names: Vec<&str> = res.iter().map(|r| r.name.as_str()).collect();
        compiled_names.sort_unstable();
        let mut listed = nvrtc::KERNELS.to_vec();
        listed.sort_unstable();
        assert_eq!(
            compiled_names, listed,
            "{arch}: compiled entry points differ from KERNELS"
        );
        for k in nvrtc::KERNELS {
            let r = res
                .iter()
                .find(|r| r.name == *k)
                .unwrap_or_else(|| panic!("{arch}: no ptxas report for {k}:\n{}", compiled.log));
            eprintln!(
                "{arch} {k}: {} registers, {} bytes spilled, {} bytes stack",
                r.registers, r.spill_bytes, r.stack_bytes
            );
            assert!(r.registers > 0, "{arch} {k}: no register count parsed");
            assert!(r.registers <= 255, "{arch} {k}: {} registers", r.registers);
        }
    }
}
