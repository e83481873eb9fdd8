//! Compiles the C side of the engine (`src/shim.c`) against the installed fio's own headers:
//! the configured source tree `fio/fetch-headers.sh` leaves in `out/fio-src` (or `FIO_SRC`).
//! Refuses to build when the tree is missing or is not the version of the installed `fio`.

use std::path::PathBuf;
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-env-changed=FIO_SRC");
    println!("cargo:rerun-if-changed=src/shim.c");
    let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets it"));
    let src = std::env::var_os("FIO_SRC")
        .map(PathBuf::from)
        .unwrap_or_else(|| manifest.join("../out/fio-src"));
    for f in [
        "fio.h",
        "ioengines.h",
        "optgroup.h",
        "config-host.h",
        "FIO-VERSION-GEN",
    ] {
        if !src.join(f).is_file() {
            panic!(
                "\n\nferroblk-fio: {} has no {f}: the engine is built against the installed fio's \
                 configured source tree. Run `bash fio/fetch-headers.sh` (it fetches Debian's \
                 source package of the installed fio and runs its ./configure), or set FIO_SRC \
                 to such a tree.\n",
                src.display()
            );
        }
    }
    println!(
        "cargo:rerun-if-changed={}",
        src.join("config-host.h").display()
    );
    let version_gen =
        std::fs::read_to_string(src.join("FIO-VERSION-GEN")).expect("read FIO-VERSION-GEN");
    let version = version_gen
        .lines()
        .find_map(|l| l.strip_prefix("DEF_VER="))
        .map(|v| v.trim().to_string())
        .expect("FIO-VERSION-GEN has a DEF_VER= line");
    // The fio that will load the engine must be the one these headers describe.
    match Command::new("fio").arg("--version").output() {
        Ok(o) if o.status.success() => {
            let installed = String::from_utf8_lossy(&o.stdout).trim().to_string();
            if installed != version {
                panic!(
                    "\n\nferroblk-fio: the headers in {} are {version} but the installed fio is \
                     {installed}: run `bash fio/fetch-headers.sh` again to fetch its source.\n",
                    src.display()
                );
            }
        }
        _ => println!(
            "cargo:warning=fio is not installed: the engine is built for {version} unchecked"
        ),
    }
    // The fio tests include the root package's daemon helpers (tests/common/daemon.rs), which
    // name the daemon binary by cargo's variable for the root package's tests; here it is the
    // same workspace build of it, found from this build's output directory
    // (<target>/<profile>/build/ferroblk-fio-*/out).
    if let Some(profile_dir) = std::env::var_os("OUT_DIR")
        .map(PathBuf::from)
        .and_then(|o| o.ancestors().nth(3).map(PathBuf::from))
    {
        println!(
            "cargo:rustc-env=CARGO_BIN_EXE_ferroblk={}",
            profile_dir.join("ferroblk").display()
        );
    }
    cc::Build::new()
        .file("src/shim.c")
        .include(&src)
        .flag("-include")
        .flag(src.join("config-host.h").to_str().expect("UTF-8 path"))
        .define("_GNU_SOURCE", None)
        .define("_LARGEFILE_SOURCE", None)
        .define("_FILE_OFFSET_BITS", "64")
        .define(
            "FERROBLK_FIO_VERSION",
            Some(format!("\"{version}\"").as_str()),
        )
        .flag("-std=gnu99")
        .warnings(true)
        .flag_if_supported("-Wno-unused-parameter")
        .flag_if_supported("-Wno-sign-compare")
        .flag_if_supported("-Wno-missing-field-initializers")
        .compile("ferroblk_fio_shim");
}
