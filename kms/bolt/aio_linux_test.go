package bolt

import (
	"errors"
	"os"
	"path/filepath"
	"syscall"
	"testing"
)

// TestAsyncFdatasync: native AIO flushes a real file, many times in a row
// (each completion consumed before the next), and the store's WAL uses it.
func TestAsyncFdatasync(t *testing.T) {
	a, err := newAsyncSyncer()
	if err != nil {
		t.Fatalf("native AIO unavailable on this kernel: %v", err)
	}
	defer a.close()
	f, err := os.Create(filepath.Join(t.TempDir(), "f"))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	for i := 0; i < 100; i++ {
		if _, err := f.WriteAt([]byte("record"), int64(i)*4096); err != nil {
			t.Fatal(err)
		}
		if err := a.fdatasync(f); err != nil {
			t.Fatalf("flush %d: %v", i, err)
		}
	}
	s := openTest(t, filepath.Join(t.TempDir(), "kms.db"), 0)
	if s.wal.aio == nil {
		t.Fatal("the WAL does not use native AIO")
	}
	if err := s.AppendAudit(ctx, testRec("r")); err != nil || s.WALSyncs() != 1 {
		t.Fatalf("append through AIO: %v, %d WAL syncs", err, s.WALSyncs())
	}
}

// TestAsyncFdatasyncRefusedFallsBack: a file the kernel cannot flush
// asynchronously (a pipe has no fsync) makes the WAL drop AIO and use
// fdatasync, whose own error is returned: never a false success.
func TestAsyncFdatasyncRefusedFallsBack(t *testing.T) {
	r, pw, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	defer pw.Close()
	a, err := newAsyncSyncer()
	if err != nil {
		t.Fatal(err)
	}
	if err := a.fdatasync(pw); !errors.Is(err, errAIOUnsupported) {
		t.Fatalf("AIO flush of a pipe: %v, want errAIOUnsupported", err)
	}
	w := &wal{f: pw, aio: a}
	if err := w.sync(); !errors.Is(err, syscall.EINVAL) {
		t.Fatalf("sync of a pipe: %v, want EINVAL from fdatasync", err)
	}
	if w.aio != nil {
		t.Fatal("the WAL kept AIO after the kernel refused it")
	}
}
