//! kata-rust-peer: a protocol peer for fsshare's tests on ttrpc-rust's async server, the stack
//! Kata's agent runs (every request in its own task, so replies come back in any order).
//!
//!     kata-rust-peer --socket PATH --share-dir DIR [--jitter-ms N]
//!
//! Serves grpc.AgentService/CopyFile with the Kata 4.x agent's semantics and grpc.Health/Check.
//! A service it does not have gets ttrpc-rust's own answer: INVALID_ARGUMENT "... does not exist".

#[allow(warnings, clippy::all)]
mod pb {
    pub mod types {
        include!(concat!(env!("OUT_DIR"), "/types.rs"));
    }
    pub mod agent {
        include!(concat!(env!("OUT_DIR"), "/agent.rs"));
    }
    pub mod health {
        include!(concat!(env!("OUT_DIR"), "/health.rs"));
    }
}

use async_trait::async_trait;
use protobuf::Message;
use std::collections::HashMap;
use std::fs;
use std::io::Write;
use std::os::unix::fs::{FileExt, OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use ttrpc::r#async::{convert_response_to_buf, MethodHandler, Server, TtrpcContext};
use ttrpc::{get_status, Code, Request, Response};

const S_IFMT: u32 = 0o170000;
const S_IFDIR: u32 = 0o040000;
const S_IFLNK: u32 = 0o120000;

/// How many requests finished after one that started later (proof of out-of-order replies),
/// reported by grpc.Health/Version as agent_version "reordered=N of M".
#[derive(Default)]
struct Order {
    started: u64,
    latest_done: u64,
    reordered: u64,
    total: u64,
}

struct CopyFile {
    share: PathBuf,
    jitter_us: u64,
    seed: AtomicU64,
    order: Arc<Mutex<Order>>,
}

struct HealthCheck;

struct HealthVersion {
    order: Arc<Mutex<Order>>,
}

fn reply(ctx: &TtrpcContext, result: Result<Vec<u8>, String>) -> ttrpc::Result<(u32, Vec<u8>)> {
    let mut res = Response::new();
    match result {
        Ok(payload) => {
            res.set_status(get_status(Code::OK, String::new()));
            res.payload = payload;
        }
        Err(e) => res.set_status(get_status(Code::INTERNAL, e)),
    }
    Ok((ctx.mh.stream_id, convert_response_to_buf(res)?))
}

#[async_trait]
impl MethodHandler for CopyFile {
    async fn handler(&self, ctx: TtrpcContext, req: Request) -> ttrpc::Result<(u32, Vec<u8>)> {
        let r = pb::agent::CopyFileRequest::parse_from_bytes(&req.payload)
            .map_err(|e| ttrpc::Error::Others(format!("decode: {}", e)))?;
        let me = {
            let mut o = self.order.lock().unwrap();
            o.started += 1;
            o.started
        };
        if self.jitter_us > 0 {
            // xorshift: a different delay per request, so later requests may finish first.
            let mut x = self.seed.fetch_add(0x9E37_79B9_7F4A_7C15, Ordering::Relaxed) ^ u64::from(ctx.mh.stream_id);
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            tokio::time::sleep(std::time::Duration::from_micros(x % self.jitter_us)).await;
        }
        let result = copy_file(&self.share, &r).map(|_| Vec::new());
        {
            let mut o = self.order.lock().unwrap();
            o.total += 1;
            if me < o.latest_done {
                o.reordered += 1;
            } else {
                o.latest_done = me;
            }
        }
        reply(&ctx, result)
    }
}

#[async_trait]
impl MethodHandler for HealthVersion {
    async fn handler(&self, ctx: TtrpcContext, _req: Request) -> ttrpc::Result<(u32, Vec<u8>)> {
        let mut v = pb::health::VersionCheckResponse::new();
        v.set_grpc_version("ttrpc-rust".to_string());
        {
            let o = self.order.lock().unwrap();
            v.set_agent_version(format!("reordered={} of {}", o.reordered, o.total));
        }
        let bytes = v.write_to_bytes().map_err(|e| ttrpc::Error::Others(format!("{}", e)))?;
        reply(&ctx, Ok(bytes))
    }
}

#[async_trait]
impl MethodHandler for HealthCheck {
    async fn handler(&self, ctx: TtrpcContext, req: Request) -> ttrpc::Result<(u32, Vec<u8>)> {
        let _ = pb::health::CheckRequest::parse_from_bytes(&req.payload)
            .map_err(|e| ttrpc::Error::Others(format!("decode: {}", e)))?;
        let mut health = pb::health::HealthCheckResponse::new();
        health.set_status(pb::health::HealthCheckResponse_ServingStatus::SERVING);
        let bytes = health.write_to_bytes().map_err(|e| ttrpc::Error::Others(format!("{}", e)))?;
        reply(&ctx, Ok(bytes))
    }
}

/// The request path below the share directory; anything else is refused.
fn confine(share: &Path, path: &str) -> Result<PathBuf, String> {
    let rel = Path::new(path).strip_prefix(share).map_err(|_| format!("{} is not below {:?}", path, share))?;
    if rel.components().any(|c| !matches!(c, Component::Normal(_))) {
        return Err(format!("{} is not canonical", path));
    }
    Ok(share.join(rel))
}

/// Rust's Path::set_extension("tmp"), as Kata's agent names its temp file.
fn tmp_path(path: &Path) -> PathBuf {
    let mut tmp = path.to_path_buf();
    tmp.set_extension("tmp");
    tmp
}

fn lchown(path: &Path, uid: i32, gid: i32) -> Result<(), String> {
    std::os::unix::fs::lchown(path, Some(uid as u32), Some(gid as u32)).map_err(|e| e.to_string())
}

/// One CopyFile as Kata's agent applies it (src/agent/src/rpc.rs, do_copy_file): a directory
/// alone (its parent must exist); otherwise, at offset 0, whatever is there is removed first; a
/// symlink is then created; a file goes to its temp name and is renamed in once complete.
fn copy_file(share: &Path, r: &pb::agent::CopyFileRequest) -> Result<(), String> {
    let path = confine(share, &r.path)?;
    let perm = r.file_mode & 0o7777;
    if r.file_mode & S_IFMT == S_IFDIR {
        if let Ok(md) = fs::symlink_metadata(&path) {
            if !md.is_dir() {
                fs::remove_file(&path).map_err(|e| e.to_string())?;
            }
        }
        match fs::create_dir(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e.to_string()),
        }
        fs::set_permissions(&path, fs::Permissions::from_mode(perm)).map_err(|e| e.to_string())?;
        return lchown(&path, r.uid, r.gid);
    }
    if r.offset == 0 {
        match fs::symlink_metadata(&path) {
            Ok(md) if md.is_dir() => fs::remove_dir_all(&path).map_err(|e| e.to_string())?,
            Ok(_) => fs::remove_file(&path).map_err(|e| e.to_string())?,
            Err(_) => {}
        }
    }
    if r.file_mode & S_IFMT == S_IFLNK {
        let target = String::from_utf8_lossy(&r.data).to_string();
        std::os::unix::fs::symlink(&target, &path).map_err(|e| e.to_string())?;
        return lchown(&path, r.uid, r.gid);
    }
    let tmp = tmp_path(&path);
    let file = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(r.offset == 0)
        .mode(perm)
        .open(&tmp)
        .map_err(|e| e.to_string())?;
    file.write_all_at(&r.data, r.offset as u64).map_err(|e| e.to_string())?;
    let size = file.metadata().map_err(|e| e.to_string())?.len();
    if size as i64 != r.file_size {
        return Ok(());
    }
    file.set_permissions(fs::Permissions::from_mode(perm)).map_err(|e| e.to_string())?;
    std::os::unix::fs::fchown(&file, Some(r.uid as u32), Some(r.gid as u32)).map_err(|e| e.to_string())?;
    fs::rename(&tmp, &path).map_err(|e| e.to_string())
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let mut socket = String::new();
    let mut share = String::new();
    let mut jitter_ms = 0u64;
    let mut i = 1;
    while i + 1 < args.len() {
        match args[i].as_str() {
            "--socket" => socket = args[i + 1].clone(),
            "--share-dir" => share = args[i + 1].clone(),
            "--jitter-ms" => jitter_ms = args[i + 1].parse().unwrap_or(0),
            _ => {}
        }
        i += 2;
    }
    if socket.is_empty() || share.is_empty() {
        eprintln!("usage: kata-rust-peer --socket PATH --share-dir DIR [--jitter-ms N]");
        std::process::exit(2);
    }
    let _ = fs::remove_file(&socket);
    let order = Arc::new(Mutex::new(Order::default()));
    let mut methods: HashMap<String, Box<dyn MethodHandler + Send + Sync>> = HashMap::new();
    methods.insert(
        "/grpc.AgentService/CopyFile".to_string(),
        Box::new(CopyFile {
            share: PathBuf::from(&share),
            jitter_us: jitter_ms * 1000,
            seed: AtomicU64::new(0x2545_F491_4F6C_DD1D),
            order: order.clone(),
        }),
    );
    methods.insert("/grpc.Health/Check".to_string(), Box::new(HealthCheck));
    methods.insert("/grpc.Health/Version".to_string(), Box::new(HealthVersion { order }));
    // Our own listening socket: ttrpc-rust 0.5's bind sets SO_REUSEPORT, which this kernel
    // refuses for unix sockets (EOPNOTSUPP).
    let listener = std::os::unix::net::UnixListener::bind(&socket).expect("bind");
    let mut server = Server::new()
        .set_domain_unix()
        .add_listener(std::os::unix::io::IntoRawFd::into_raw_fd(listener))
        .expect("listener")
        .register_service(methods);
    server.start().await.expect("start");
    println!("listening");
    let _ = std::io::stdout().flush();
    loop {
        tokio::time::sleep(std::time::Duration::from_secs(3600)).await;
    }
}
