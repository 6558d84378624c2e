// kata-go-peer: a protocol peer for fsshare's tests, built on containerd's Go ttrpc (Debian's
// golang-github-containerd-ttrpc-dev) with message code generated from fsshare's copy of Kata's
// agent.proto, types.proto and health.proto (never committed: hack/peers/build generates it).
//
//	kata-go-peer server --socket PATH --share-dir DIR [--jitter-ms N]
//	    A concurrent ttrpc server with Kata's grpc.AgentService/CopyFile semantics as the Kata
//	    4.x agent applies them, and grpc.Health. containerd's server runs every request in its
//	    own goroutine; --jitter-ms adds a random delay to each, so replies come back (and are
//	    applied) out of order. Unknown services get ttrpc's own UNIMPLEMENTED answer.
//
//	kata-go-peer client --socket PATH --share-dir DIR [--files N]
//	    A ttrpc client with Kata's message and service names, against fsshare-agent: health,
//	    concurrent CopyFile calls on one connection, a chunked file, refusals. It checks the
//	    result on disk (DIR is the agent's share directory) and prints "ok: ..." or exits 1.
package main

import (
	"bytes"
	"context"
	"flag"
	"fmt"
	"math/rand"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/containerd/ttrpc"
	gogotypes "github.com/gogo/protobuf/types"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	pb "katapb/grpc"
)

func main() {
	if len(os.Args) < 2 {
		fmt.Fprintln(os.Stderr, "usage: kata-go-peer server|client [flags]")
		os.Exit(2)
	}
	fs := flag.NewFlagSet(os.Args[1], flag.ExitOnError)
	socket := fs.String("socket", "", "unix socket")
	shareDir := fs.String("share-dir", "", "the guest share directory")
	jitter := fs.Int("jitter-ms", 0, "random delay per request (server)")
	files := fs.Int("files", 64, "files copied concurrently (client)")
	_ = fs.Parse(os.Args[2:])
	if *socket == "" || *shareDir == "" {
		fmt.Fprintln(os.Stderr, "--socket and --share-dir are required")
		os.Exit(2)
	}
	switch os.Args[1] {
	case "server":
		serve(*socket, *shareDir, *jitter)
	case "client":
		if err := client(*socket, *shareDir, *files); err != nil {
			fmt.Fprintln(os.Stderr, "FAIL:", err)
			os.Exit(1)
		}
	default:
		os.Exit(2)
	}
}

// ---- server ----

func serve(socket, shareDir string, jitterMs int) {
	server, err := ttrpc.NewServer()
	if err != nil {
		panic(err)
	}
	delay := func() {
		if jitterMs > 0 {
			time.Sleep(time.Duration(rand.Intn(jitterMs*1000)) * time.Microsecond)
		}
	}
	// How many requests finished after one that arrived later: proof of out-of-order replies,
	// reported by grpc.Health/Version as agent_version "reordered=N of M".
	var mu sync.Mutex
	var arrivals, latestDone, reordered, total int64
	track := func() func() {
		mu.Lock()
		arrivals++
		me := arrivals
		mu.Unlock()
		return func() {
			mu.Lock()
			defer mu.Unlock()
			total++
			if me < latestDone {
				reordered++
			} else {
				latestDone = me
			}
		}
	}
	server.Register("grpc.AgentService", map[string]ttrpc.Method{
		"CopyFile": func(ctx context.Context, unmarshal func(interface{}) error) (interface{}, error) {
			var req pb.CopyFileRequest
			if err := unmarshal(&req); err != nil {
				return nil, err
			}
			done := track()
			defer done()
			delay()
			if err := copyFile(shareDir, &req); err != nil {
				return nil, status.Errorf(codes.Internal, "CopyFile %s: %v", req.Path, err)
			}
			return &gogotypes.Empty{}, nil
		},
	})
	server.Register("grpc.Health", map[string]ttrpc.Method{
		"Check": func(ctx context.Context, unmarshal func(interface{}) error) (interface{}, error) {
			var req pb.CheckRequest
			if err := unmarshal(&req); err != nil {
				return nil, err
			}
			return &pb.HealthCheckResponse{Status: pb.HealthCheckResponse_SERVING}, nil
		},
		"Version": func(ctx context.Context, unmarshal func(interface{}) error) (interface{}, error) {
			var req pb.CheckRequest
			if err := unmarshal(&req); err != nil {
				return nil, err
			}
			mu.Lock()
			defer mu.Unlock()
			return &pb.VersionCheckResponse{GrpcVersion: "containerd-ttrpc", AgentVersion: fmt.Sprintf("reordered=%d of %d", reordered, total)}, nil
		},
	})
	_ = os.Remove(socket)
	l, err := net.Listen("unix", socket)
	if err != nil {
		panic(err)
	}
	fmt.Println("listening")
	if err := server.Serve(context.Background(), l); err != nil {
		panic(err)
	}
}

// confine maps a request path to a path below shareDir, refusing anything outside it.
func confine(shareDir, path string) (string, error) {
	clean := filepath.Clean(path)
	if clean != path || !strings.HasPrefix(clean, shareDir+"/") {
		return "", fmt.Errorf("%s is not below %s", path, shareDir)
	}
	return clean, nil
}

// tmpPath is Rust's Path::set_extension(path, "tmp"), as Kata's agent names its temp file.
func tmpPath(path string) string {
	dir, name := filepath.Split(path)
	if i := strings.LastIndex(name, "."); i > 0 {
		return dir + name[:i] + ".tmp"
	}
	return path + ".tmp"
}

// copyFile applies one CopyFile request as Kata's agent does (src/agent/src/rpc.rs,
// do_copy_file, pathrs version): a directory is created alone (its parent must exist); for
// anything else the existing entry is removed first when offset is 0; a symlink is then
// created; a file is written to its temp name and renamed into place once it has its size.
func copyFile(shareDir string, req *pb.CopyFileRequest) error {
	path, err := confine(shareDir, req.Path)
	if err != nil {
		return err
	}
	perm := os.FileMode(req.FileMode & 0o7777)
	switch req.FileMode & syscall.S_IFMT {
	case syscall.S_IFDIR:
		if st, err := os.Lstat(path); err == nil && !st.IsDir() {
			if err := os.Remove(path); err != nil {
				return err
			}
		}
		if err := os.Mkdir(path, perm); err != nil && !os.IsExist(err) {
			return err
		}
		if err := os.Chmod(path, perm); err != nil {
			return err
		}
		return os.Lchown(path, int(req.Uid), int(req.Gid))
	}
	if req.Offset == 0 {
		if err := os.RemoveAll(path); err != nil {
			return err
		}
	}
	if req.FileMode&syscall.S_IFMT == syscall.S_IFLNK {
		if err := os.Symlink(string(req.Data), path); err != nil {
			return err
		}
		return os.Lchown(path, int(req.Uid), int(req.Gid))
	}
	tmp := tmpPath(path)
	flags := os.O_RDWR | os.O_CREATE
	if req.Offset == 0 {
		flags |= os.O_TRUNC
	}
	f, err := os.OpenFile(tmp, flags, perm)
	if err != nil {
		return err
	}
	defer f.Close()
	if _, err := f.WriteAt(req.Data, req.Offset); err != nil {
		return err
	}
	st, err := f.Stat()
	if err != nil {
		return err
	}
	if st.Size() != req.FileSize {
		return nil
	}
	if err := f.Chmod(perm); err != nil {
		return err
	}
	if err := f.Chown(int(req.Uid), int(req.Gid)); err != nil {
		return err
	}
	return os.Rename(tmp, path)
}

// ---- client ----

func client(socket, shareDir string, files int) error {
	conn, err := net.Dial("unix", socket)
	if err != nil {
		return err
	}
	c := ttrpc.NewClient(conn)
	defer c.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()

	var health pb.HealthCheckResponse
	if err := c.Call(ctx, "grpc.Health", "Check", &pb.CheckRequest{}, &health); err != nil {
		return fmt.Errorf("grpc.Health/Check: %v", err)
	}
	if health.Status != pb.HealthCheckResponse_SERVING {
		return fmt.Errorf("grpc.Health/Check answered %v", health.Status)
	}
	call := func(req *pb.CopyFileRequest) error {
		var empty gogotypes.Empty
		return c.Call(ctx, "grpc.AgentService", "CopyFile", req, &empty)
	}
	dir := shareDir + "/go-peer"
	if err := call(&pb.CopyFileRequest{Path: dir, FileMode: syscall.S_IFDIR | 0o755, DirMode: 0o755}); err != nil {
		return fmt.Errorf("mkdir: %v", err)
	}
	// Many calls in flight on one connection at once.
	var wg sync.WaitGroup
	errs := make(chan error, files)
	for i := 0; i < files; i++ {
		wg.Add(1)
		go func(i int) {
			defer wg.Done()
			data := []byte(fmt.Sprintf("file %d %s", i, strings.Repeat("x", i*13)))
			req := &pb.CopyFileRequest{Path: fmt.Sprintf("%s/f%03d", dir, i), FileMode: syscall.S_IFREG | 0o644,
				DirMode: 0o755, FileSize: int64(len(data)), Data: data}
			if err := call(req); err != nil {
				errs <- fmt.Errorf("f%03d: %v", i, err)
			}
		}(i)
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		return err
	}
	// A file in three chunks, sent in order, and a symlink to it.
	big := bytes.Repeat([]byte("0123456789abcdef"), 3*65536)
	for off := 0; off < len(big); off += 1 << 20 {
		end := off + 1<<20
		if end > len(big) {
			end = len(big)
		}
		req := &pb.CopyFileRequest{Path: dir + "/big", FileMode: syscall.S_IFREG | 0o600, DirMode: 0o755,
			FileSize: int64(len(big)), Offset: int64(off), Data: big[off:end]}
		if err := call(req); err != nil {
			return fmt.Errorf("big@%d: %v", off, err)
		}
	}
	if err := call(&pb.CopyFileRequest{Path: dir + "/link", FileMode: syscall.S_IFLNK | 0o777, Data: []byte("big")}); err != nil {
		return fmt.Errorf("symlink: %v", err)
	}
	// Refusals: a path outside the share and a method the agent does not have.
	if err := call(&pb.CopyFileRequest{Path: shareDir + "/../escape", FileMode: syscall.S_IFREG | 0o644, FileSize: 1, Data: []byte("x")}); err == nil {
		return fmt.Errorf("a path outside the share was accepted")
	}
	var empty gogotypes.Empty
	err = c.Call(ctx, "grpc.AgentService", "NoSuchMethod", &pb.CheckRequest{}, &empty)
	if s, ok := status.FromError(err); !ok || s.Code() != codes.Unimplemented {
		return fmt.Errorf("an unknown method answered %v, want UNIMPLEMENTED", err)
	}
	// What landed on disk.
	for i := 0; i < files; i++ {
		want := fmt.Sprintf("file %d %s", i, strings.Repeat("x", i*13))
		got, err := os.ReadFile(fmt.Sprintf("%s/f%03d", dir, i))
		if err != nil || string(got) != want {
			return fmt.Errorf("f%03d holds %q (%v)", i, got, err)
		}
	}
	if got, err := os.ReadFile(dir + "/big"); err != nil || !bytes.Equal(got, big) {
		return fmt.Errorf("big differs (%d bytes, %v)", len(got), err)
	}
	if target, err := os.Readlink(dir + "/link"); err != nil || target != "big" {
		return fmt.Errorf("link is %q (%v)", target, err)
	}
	if _, err := os.Lstat(filepath.Dir(shareDir) + "/escape"); err == nil {
		return fmt.Errorf("a file was written outside the share")
	}
	fmt.Printf("ok: health SERVING, %d concurrent CopyFile calls, a 3-chunk file, a symlink, 2 refusals\n", files)
	return nil
}
