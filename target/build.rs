//! Compiles the NVMe/RDMA transport's verbs shim (`src/transport/rdma/shim.c`) against
//! rdma-core's headers (Debian: `libibverbs-dev`, `librdmacm-dev`) and links the libraries, with
//! the `rdma` feature.

fn main() {
    println!("cargo:rerun-if-changed=src/transport/rdma/shim.c");
    // Only with the `rdma` feature: without it nothing of rdma-core is needed to build.
    if std::env::var_os("CARGO_FEATURE_RDMA").is_none() {
        return;
    }
    cc::Build::new()
        .file("src/transport/rdma/shim.c")
        .warnings(true)
        .extra_warnings(true)
        .compile("ferroblk_rdma_shim");
    println!("cargo:rustc-link-lib=dylib=rdmacm");
    println!("cargo:rustc-link-lib=dylib=ibverbs");
}
