fn main() {
    // The `ceph` crate links librados; the RBD calls in src/ffi.rs need librbd too.
    // Building needs librbd-dev (librbd1 at run time).
    println!("cargo:rustc-link-lib=dylib=rbd");
}
