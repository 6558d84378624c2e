// Generates Rust message code from fsshare's copy of Kata's protos (FSSHARE_PROTO_DIR) into
// OUT_DIR, with the inner attributes removed so the files can be include!d into modules.
use std::{env, fs, path::PathBuf};

fn main() {
    let proto_dir = env::var("FSSHARE_PROTO_DIR").expect("FSSHARE_PROTO_DIR names the Proto directory");
    let out = PathBuf::from(env::var("OUT_DIR").unwrap());
    let inputs: Vec<String> = ["types.proto", "agent.proto", "health.proto"]
        .iter()
        .map(|f| format!("{}/{}", proto_dir, f))
        .collect();
    protobuf_codegen_pure::Codegen::new()
        .out_dir(&out)
        .include(&proto_dir)
        .inputs(&inputs)
        .run()
        .expect("protobuf code generation");
    for name in ["types.rs", "agent.rs", "health.rs"] {
        let path = out.join(name);
        let text = fs::read_to_string(&path).unwrap();
        let kept: Vec<&str> = text.lines().filter(|l| !l.starts_with("#![") && !l.starts_with("//!")).collect();
        fs::write(&path, kept.join("\n")).unwrap();
    }
    println!("cargo:rerun-if-env-changed=FSSHARE_PROTO_DIR");
}
