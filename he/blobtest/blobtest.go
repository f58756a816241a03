// Package blobtest is the conformance suite of the HE blob port
// (he.Blobs): every implementation (the local directory, S3) runs it.
package blobtest

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/kmsd-project/kmsd/he"
)

// Run runs the suite. open returns an empty store; each subtest opens its
// own.
func Run(t *testing.T, open func(t *testing.T) he.Blobs) {
	ctx := context.Background()
	mustOpen := func(t *testing.T) he.Blobs {
		t.Helper()
		b := open(t)
		if b == nil {
			t.Fatal("blobtest: open returned a nil store")
		}
		return b
	}
	t.Run("PutOpen", func(t *testing.T) {
		b := mustOpen(t)
		a := put(t, b, []byte("alpha"))
		if again := put(t, b, []byte("alpha")); again != a {
			t.Fatalf("the same content got digests %s and %s", a, again)
		}
		if want := digestOf([]byte("alpha")); a != want {
			t.Fatalf("digest %s, want %s", a, want)
		}
		if got := read(t, b, a); string(got) != "alpha" {
			t.Fatalf("blob holds %q", got)
		}
	})
	t.Run("Seek", func(t *testing.T) {
		b := mustOpen(t)
		data := randomBytes(100_000)
		d := put(t, b, data)
		r, err := b.Open(ctx, d)
		if err != nil {
			t.Fatal(err)
		}
		defer r.Close()
		if n, err := r.Seek(0, io.SeekEnd); err != nil || n != int64(len(data)) {
			t.Fatalf("Seek(end) = %d, %v; want %d", n, err, len(data))
		}
		if _, err := r.Seek(77_777, io.SeekStart); err != nil {
			t.Fatal(err)
		}
		got, err := io.ReadAll(r)
		if err != nil || !bytes.Equal(got, data[77_777:]) {
			t.Fatalf("read after Seek: %d bytes, %v; want the %d after 77777", len(got), err, len(data)-77_777)
		}
	})
	t.Run("Large", func(t *testing.T) {
		// Larger than one request of most S3 clients (multipart).
		b := mustOpen(t)
		data := randomBytes(40 << 20)
		d := put(t, b, data)
		if got := read(t, b, d); !bytes.Equal(got, data) {
			t.Fatalf("a %d-byte blob read back as %d other bytes", len(data), len(got))
		}
	})
	t.Run("FailedWriterAndAbortLeaveNothing", func(t *testing.T) {
		b := mustOpen(t)
		boom := errors.New("generation failed")
		if _, err := b.Stage(func(w io.Writer) error { io.WriteString(w, "half"); return boom }); !errors.Is(err, boom) {
			t.Fatalf("Stage with a failing writer = %v", err)
		}
		s, err := b.Stage(func(w io.Writer) error { _, err := io.WriteString(w, "aborted"); return err })
		if err != nil {
			t.Fatal(err)
		}
		b.Abort(s)
		if _, err := b.Open(ctx, digestOf([]byte("aborted"))); !errors.Is(err, he.ErrBlobNotFound) {
			t.Fatalf("Open of an aborted blob = %v, want ErrBlobNotFound", err)
		}
		if _, err := b.Open(ctx, digestOf([]byte("half"))); !errors.Is(err, he.ErrBlobNotFound) {
			t.Fatalf("Open of a failed blob = %v, want ErrBlobNotFound", err)
		}
		if n, err := b.RemoveOrphans(ctx, nil, time.Now().Add(time.Hour)); err != nil || n != 0 {
			t.Fatalf("RemoveOrphans after a failure and an abort = %d, %v; want 0 (nothing was stored)", n, err)
		}
	})
	t.Run("Remove", func(t *testing.T) {
		b := mustOpen(t)
		d := put(t, b, []byte("gone"))
		if err := b.Remove(ctx, d); err != nil {
			t.Fatal(err)
		}
		if _, err := b.Open(ctx, d); !errors.Is(err, he.ErrBlobNotFound) {
			t.Fatalf("Open after Remove = %v, want ErrBlobNotFound", err)
		}
		if err := b.Remove(ctx, d); err != nil {
			t.Fatalf("Remove of a missing blob = %v, want nil", err)
		}
	})
	t.Run("MalformedDigests", func(t *testing.T) {
		b := mustOpen(t)
		put(t, b, []byte("x"))
		for _, bad := range []he.Digest{"sha256:../../etc/passwd", "sha256:" + he.Digest(strings.Repeat("A", 64)), "md5:00", "", "sha256:" + he.Digest(strings.Repeat("0", 63)) + "/"} {
			if _, err := b.Open(ctx, bad); err == nil || !strings.Contains(err.Error(), "malformed digest") {
				t.Errorf("Open(%q) = %v, want malformed digest", bad, err)
			}
			if err := b.Remove(ctx, bad); err == nil || !strings.Contains(err.Error(), "malformed digest") {
				t.Errorf("Remove(%q) = %v, want malformed digest", bad, err)
			}
		}
	})
	t.Run("RemoveOrphans", func(t *testing.T) {
		b := mustOpen(t)
		keep := put(t, b, []byte("kept"))
		o1, o2 := put(t, b, []byte("orphan 1")), put(t, b, []byte("orphan 2"))
		// Written just now: a generation still running may own them.
		if n, err := b.RemoveOrphans(ctx, map[he.Digest]bool{keep: true}, time.Now().Add(-time.Minute)); err != nil || n != 0 {
			t.Fatalf("RemoveOrphans(before a minute ago) = %d, %v; want 0", n, err)
		}
		if n, err := b.RemoveOrphans(ctx, map[he.Digest]bool{keep: true}, time.Now().Add(time.Minute)); err != nil || n != 2 {
			t.Fatalf("RemoveOrphans = %d, %v; want 2", n, err)
		}
		for _, d := range []he.Digest{o1, o2} {
			if _, err := b.Open(ctx, d); !errors.Is(err, he.ErrBlobNotFound) {
				t.Fatalf("orphan %s: %v", d, err)
			}
		}
		if got := read(t, b, keep); string(got) != "kept" {
			t.Fatalf("kept blob holds %q", got)
		}
	})
	t.Run("ConcurrentCommits", func(t *testing.T) {
		b := mustOpen(t)
		var wg sync.WaitGroup
		errs := make(chan error, 16)
		for i := range 16 {
			wg.Go(func() {
				s, err := b.Stage(func(w io.Writer) error { _, err := fmt.Fprintf(w, "blob %d", i); return err })
				if err == nil {
					err = b.Commit(ctx, s)
				}
				errs <- err
			})
		}
		wg.Wait()
		close(errs)
		for err := range errs {
			if err != nil {
				t.Fatal(err)
			}
		}
		if err := b.Sync(ctx); err != nil {
			t.Fatal(err)
		}
		for i := range 16 {
			want := fmt.Sprintf("blob %d", i)
			if got := read(t, b, digestOf([]byte(want))); string(got) != want {
				t.Fatalf("blob %d holds %q", i, got)
			}
		}
	})
}

func put(t *testing.T, b he.Blobs, data []byte) he.Digest {
	t.Helper()
	d, n, err := he.Put(context.Background(), b, func(w io.Writer) error { _, err := w.Write(data); return err })
	if err != nil {
		t.Fatal(err)
	}
	if n != int64(len(data)) {
		t.Fatalf("Put stored %d bytes of %d", n, len(data))
	}
	return d
}

func read(t *testing.T, b he.Blobs, d he.Digest) []byte {
	t.Helper()
	r, err := b.Open(context.Background(), d)
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	data, err := io.ReadAll(r)
	if err != nil {
		t.Fatal(err)
	}
	return data
}

func digestOf(data []byte) he.Digest {
	s := sha256.Sum256(data)
	return he.Digest("sha256:" + hex.EncodeToString(s[:]))
}

func randomBytes(n int) []byte {
	r := rand.New(rand.NewPCG(uint64(n), 1))
	b := make([]byte, n)
	for i := range b {
		b[i] = byte(r.Uint32())
	}
	return b
}
