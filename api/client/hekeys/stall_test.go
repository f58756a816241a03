package hekeys

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"
)

// stallingBlobServer serves one blob at /v1/blobs/sha256/<hex>. While
// stall is set, a request without Range gets the headers and half the
// body, then nothing (the connection stays open: the fault an outside
// review found holding a tool-call slot forever); with headersToo it
// does not even send the headers. A Range request is served normally.
type stallingBlobServer struct {
	*httptest.Server
	blob       []byte
	digest     string
	stall      atomic.Bool
	headersToo atomic.Bool
	ranges     atomic.Int32
}

func newStallingBlobServer(t *testing.T) *stallingBlobServer {
	s := &stallingBlobServer{blob: make([]byte, 256<<10)}
	rand.Read(s.blob)
	sum := sha256.Sum256(s.blob)
	s.digest = "sha256:" + hex.EncodeToString(sum[:])
	s.stall.Store(true)
	release := make(chan struct{})
	s.Server = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path != "/v1/blobs/sha256/"+s.digest[7:] {
			http.NotFound(w, r)
			return
		}
		if rg := r.Header.Get("Range"); rg != "" {
			s.ranges.Add(1)
			var from int
			fmt.Sscanf(rg, "bytes=%d-", &from)
			w.Header().Set("Content-Range", fmt.Sprintf("bytes %d-%d/%d", from, len(s.blob)-1, len(s.blob)))
			w.Header().Set("Content-Length", fmt.Sprint(len(s.blob)-from))
			w.WriteHeader(http.StatusPartialContent)
			w.Write(s.blob[from:])
			return
		}
		if s.stall.Load() {
			if !s.headersToo.Load() {
				w.Header().Set("Content-Length", fmt.Sprint(len(s.blob)))
				w.WriteHeader(http.StatusOK)
				w.Write(s.blob[:len(s.blob)/2])
				w.(http.Flusher).Flush()
			}
			select {
			case <-r.Context().Done():
			case <-release:
			}
			return
		}
		w.Write(s.blob)
	}))
	t.Cleanup(func() {
		close(release)
		s.Close()
	})
	return s
}

// within runs f and fails the test if it has not returned within d (the
// old code hung here forever).
func within(t *testing.T, d time.Duration, what string, f func() error) (error, time.Duration) {
	t.Helper()
	start := time.Now()
	done := make(chan error, 1)
	go func() { done <- f() }()
	select {
	case err := <-done:
		return err, time.Since(start)
	case <-time.After(d):
		t.Fatalf("%s: still blocked after %s", what, d)
		return nil, 0
	}
}

// TestDownloadStall (issue 25, part 7, from an outside review: a key
// download that stopped making progress held a kmsd-mcp tool-call slot
// forever): a blob download that stalls mid-body, or before its headers,
// fails after StallTimeout with ErrStalled, saying so; the part it got
// stays, and the next fetch resumes it with a Range request. A second
// call waiting for the same blob (the lock of its partial file) gives up
// when its own context ends, before the first one's deadline.
func TestDownloadStall(t *testing.T) {
	srv := newStallingBlobServer(t)
	size := int64(len(srv.blob))
	for _, headersToo := range []bool{false, true} {
		srv.headersToo.Store(headersToo)
		dir := t.TempDir()
		f := &Fetcher{BaseURL: srv.URL, Token: "t", CacheDir: dir, StallTimeout: 700 * time.Millisecond}

		// The waiter: it asks for the same blob while the first call
		// holds its lock, with a context that ends first.
		first := make(chan error, 1)
		go func() {
			_, err := f.blob(context.Background(), srv.digest, size, f.newProgress(&Manifest{}))
			first <- err
		}()
		time.Sleep(100 * time.Millisecond)
		wctx, cancel := context.WithTimeout(context.Background(), 150*time.Millisecond)
		err, took := within(t, 5*time.Second, "a call waiting for another's download", func() error {
			_, err := f.blob(wctx, srv.digest, size, f.newProgress(&Manifest{}))
			return err
		})
		cancel()
		if !errors.Is(err, context.DeadlineExceeded) || took > 500*time.Millisecond {
			t.Fatalf("headers too %v: the waiting call: %v after %s, want its own deadline at 150ms", headersToo, err, took)
		}

		err, took = within(t, 10*time.Second, "a stalled download", func() error {
			select {
			case err := <-first:
				return err
			case <-time.After(9 * time.Second):
				return errors.New("no answer")
			}
		})
		if !errors.Is(err, ErrStalled) || !strings.Contains(err.Error(), "no byte from kmsd for 700ms") {
			t.Fatalf("headers too %v: a stalled download ended with %v, want ErrStalled", headersToo, err)
		}
		t.Logf("headers too %v: %v", headersToo, err)
	}
	// What arrived before the stall is kept; the next fetch (the server
	// no longer stalls) resumes it with a Range request.
	srv.headersToo.Store(false)
	dir := t.TempDir()
	f := &Fetcher{BaseURL: srv.URL, Token: "t", CacheDir: dir, StallTimeout: 300 * time.Millisecond}
	if _, err := f.blob(context.Background(), srv.digest, size, f.newProgress(&Manifest{})); !errors.Is(err, ErrStalled) {
		t.Fatalf("stalled download: %v", err)
	}
	part, _ := os.ReadFile(filepath.Join(dir, srv.digest[7:]+".part"))
	if len(part) != len(srv.blob)/2 {
		t.Fatalf("the partial file holds %d bytes, want %d", len(part), len(srv.blob)/2)
	}
	srv.stall.Store(false)
	data, err := f.blob(context.Background(), srv.digest, size, f.newProgress(&Manifest{}))
	if err != nil || !bytes.Equal(data, srv.blob) || srv.ranges.Load() != 1 {
		t.Fatalf("resumed download: %v, %d range requests", err, srv.ranges.Load())
	}
}

// TestSlowDownloadIsNotAStall: a download that keeps making progress
// (bytes more often than StallTimeout) completes, even if the whole of it
// takes several times StallTimeout.
func TestSlowDownloadIsNotAStall(t *testing.T) {
	blob := make([]byte, 64<<10)
	rand.Read(blob)
	sum := sha256.Sum256(blob)
	h := hex.EncodeToString(sum[:])
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Length", fmt.Sprint(len(blob)))
		for i := 0; i < 8; i++ {
			w.Write(blob[i*len(blob)/8 : (i+1)*len(blob)/8])
			w.(http.Flusher).Flush()
			time.Sleep(100 * time.Millisecond)
		}
	}))
	defer srv.Close()
	f := &Fetcher{BaseURL: srv.URL, Token: "t", CacheDir: t.TempDir(), StallTimeout: 300 * time.Millisecond}
	start := time.Now()
	data, err := f.blob(context.Background(), "sha256:"+h, int64(len(blob)), f.newProgress(&Manifest{}))
	if err != nil || !bytes.Equal(data, blob) {
		t.Fatalf("a slow download: %v", err)
	}
	if d := time.Since(start); d < 600*time.Millisecond {
		t.Fatalf("took %s: the test does not show a download longer than StallTimeout", d)
	}
}

// heldBlobLocks is how many blob locks this process keeps.
func heldBlobLocks() int {
	blobLocks.Lock()
	defer blobLocks.Unlock()
	return len(blobLocks.m)
}

// TestBlobLocksDoNotGrow: the per-blob locks of this process live while a
// call holds or waits for them; fetching ever new blobs (a long-running
// kmsd-mcp sees a new keyset at every rotation) leaves none behind, nor
// does a wait that gives up.
func TestBlobLocksDoNotGrow(t *testing.T) {
	blobs := map[string][]byte{}
	for range 50 {
		b := make([]byte, 1024)
		rand.Read(b)
		sum := sha256.Sum256(b)
		blobs[hex.EncodeToString(sum[:])] = b
	}
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Write(blobs[strings.TrimPrefix(r.URL.Path, "/v1/blobs/sha256/")])
	}))
	defer srv.Close()
	f := &Fetcher{BaseURL: srv.URL, Token: "t", CacheDir: t.TempDir()}
	before := heldBlobLocks()
	for h, b := range blobs {
		if _, err := f.blob(context.Background(), "sha256:"+h, int64(len(b)), f.newProgress(&Manifest{})); err != nil {
			t.Fatal(err)
		}
	}
	// A wait that gives up: the lock is held, the waiter's context ends.
	var h string
	for h = range blobs {
		break
	}
	unlock, err := lockBlob(context.Background(), filepath.Join(f.CacheDir, h))
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
	if _, err := f.blob(ctx, "sha256:"+h, int64(len(blobs[h])), f.newProgress(&Manifest{})); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("a wait for a held lock: %v", err)
	}
	cancel()
	unlock()
	if n := heldBlobLocks() - before; n != 0 {
		t.Fatalf("%d blob locks kept after 50 blobs fetched", n)
	}
}
