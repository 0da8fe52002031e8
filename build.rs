//! Compiles the node agent's BPF socket iterator (src/agent/kernel/bpf/sockets.bpf.c) with clang into
//! `$OUT_DIR/sockets.bpf.o`, which src/agent/kernel/bpf/mod.rs includes in the binary. The object is portable
//! (CO-RE): nothing of the build machine's kernel goes into it.
//!
//! `CLANG` names the compiler (default `clang`, any version from 11 on).

use std::{env, path::PathBuf, process::Command};

const SOURCE: &str = "src/agent/kernel/bpf/sockets.bpf.c";

fn main() {
    println!("cargo:rerun-if-changed={SOURCE}");
    println!("cargo:rerun-if-env-changed=CLANG");
    let clang = env::var_os("CLANG").unwrap_or_else(|| "clang".into());
    let out = PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR")).join("sockets.bpf.o");
    // The records are read in the machine's byte order: the program is built for the target's.
    let target = match env::var("CARGO_CFG_TARGET_ENDIAN").as_deref() {
        Ok("big") => "bpfeb",
        _ => "bpfel",
    };
    let result = Command::new(&clang)
        .args(["-O2", "-g", "-target", target, "-Wall", "-Werror", "-c", SOURCE, "-o"])
        .arg(&out)
        .status();
    match result {
        Ok(status) if status.success() => {}
        Ok(status) => fail(&format!("{} failed on {SOURCE} ({status})", clang.to_string_lossy())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => fail(&format!(
            "`{}` not found: the node agent's BPF program is compiled with clang. Install the Debian package \
             `clang` (`apt-get install clang`; `cargo xtask test` and `cargo xtask demo` install it when missing), \
             or point CLANG at a clang binary",
            clang.to_string_lossy()
        )),
        Err(e) => fail(&format!("cannot run {}: {e}", clang.to_string_lossy())),
    }
}

fn fail(message: &str) -> ! {
    eprintln!("error: {message}");
    std::process::exit(1);
}
