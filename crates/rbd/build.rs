// Links librbd and librados (Debian: librbd-dev, librados-dev, installed by
// scripts/install-deps.sh).
fn main() {
    println!("cargo:rustc-link-lib=dylib=rbd");
    println!("cargo:rustc-link-lib=dylib=rados");
}
