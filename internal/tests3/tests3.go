// Package tests3 starts a real S3-compatible server for tests: versitygw
// (github.com/versity/versitygw v1.8.0, which the test command installs)
// over a directory, on loopback, with one bucket.
package tests3

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"syscall"
	"testing"
	"time"

	"github.com/minio/minio-go/v7"
	"github.com/minio/minio-go/v7/pkg/credentials"
)

// Server is a running versitygw.
type Server struct {
	Endpoint  string // http://127.0.0.1:port
	AccessKey string
	SecretKey string
	Bucket    string // exists, empty at start
	Dir       string // the objects live under Dir/Bucket
	cmd       *exec.Cmd
	done      chan struct{}
}

// Binary is versitygw's path, or a test failure that says how to get it.
func Binary(t testing.TB) string {
	p, err := exec.LookPath("versitygw")
	if err != nil {
		t.Fatalf("versitygw not found on PATH (%v): ./deploy/test.sh installs it (go install github.com/versity/versitygw/cmd/versitygw@v1.8.0)", err)
	}
	return p
}

func random(n int) string {
	b := make([]byte, n)
	rand.Read(b)
	return hex.EncodeToString(b)
}

// Start starts versitygw and makes the bucket "kmsd-test"; the test's
// cleanup stops it.
func Start(t testing.TB) *Server {
	t.Helper()
	bin := Binary(t)
	dir := t.TempDir()
	root, side := filepath.Join(dir, "root"), filepath.Join(dir, "sidecar")
	for _, d := range []string{root, side} {
		if err := os.MkdirAll(d, 0o700); err != nil {
			t.Fatal(err)
		}
	}
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := l.Addr().String()
	l.Close()
	s := &Server{Endpoint: "http://" + addr, AccessKey: "test" + random(8), SecretKey: random(20), Bucket: "kmsd-test", Dir: root, done: make(chan struct{})}
	logf, err := os.Create(filepath.Join(dir, "versitygw.log"))
	if err != nil {
		t.Fatal(err)
	}
	// --sidecar keeps metadata in files: no need for extended attributes
	// on the test machine's file system.
	s.cmd = exec.Command(bin, "--port", addr, "--access", s.AccessKey, "--secret", s.SecretKey, "--quiet",
		"posix", "--sidecar", side, root)
	s.cmd.Stdout, s.cmd.Stderr = logf, logf
	s.cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := s.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() { s.cmd.Wait(); logf.Close(); close(s.done) }()
	t.Cleanup(s.Stop)
	c := s.Client(t)
	deadline := time.Now().Add(30 * time.Second)
	for {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		err := c.MakeBucket(ctx, s.Bucket, minio.MakeBucketOptions{})
		cancel()
		if err == nil {
			return s
		}
		select {
		case <-s.done:
			log, _ := os.ReadFile(logf.Name())
			t.Fatalf("versitygw exited: %s", log)
		default:
		}
		if time.Now().After(deadline) {
			log, _ := os.ReadFile(logf.Name())
			t.Fatalf("versitygw did not make the bucket in 30 s: %v\n%s", err, log)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// Stop kills the server.
func (s *Server) Stop() {
	s.cmd.Process.Kill()
	<-s.done
}

// Client is a client of the server with its root credentials.
func (s *Server) Client(t testing.TB) *minio.Client {
	c, err := minio.New(s.Endpoint[len("http://"):], &minio.Options{Creds: credentials.NewStaticV4(s.AccessKey, s.SecretKey, ""), BucketLookup: minio.BucketLookupPath, Region: "us-east-1"})
	if err != nil {
		t.Fatal(err)
	}
	return c
}
