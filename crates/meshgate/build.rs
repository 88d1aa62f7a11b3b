//! Link the binaries with packed relative relocations (`DT_RELR`, glibc 2.36+,
//! GNU ld 2.38+). A position-independent binary of this size carries ~47,000
//! relative relocations; as `RELA` entries they are 1.1 MiB that every process
//! reads at start, as `RELR` 13 KiB. Measured: 1.3 MiB less idle RSS per proxy.

fn main() {
    let os = std::env::var("CARGO_CFG_TARGET_OS").unwrap_or_default();
    let env = std::env::var("CARGO_CFG_TARGET_ENV").unwrap_or_default();
    if os == "linux" && env == "gnu" {
        println!("cargo:rustc-link-arg-bins=-Wl,-z,pack-relative-relocs");
    }
    println!("cargo:rerun-if-changed=build.rs");
}
