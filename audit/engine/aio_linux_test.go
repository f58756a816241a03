package engine

import (
	"errors"
	"os"
	"path/filepath"
	"syscall"
	"testing"
	"time"
)

// TestAsyncFdatasync: native AIO flushes a real file, many times in a row
// (each completion consumed before the next).
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

// BenchmarkFlushCPU is what one durable WAL frame costs: a 4 KiB pwrite
// into a preallocated file, then fdatasync, blocking or through native
// AIO. It reports the process's CPU time per flush (getrusage, user +
// system) beside the wall time: on a VM, a flush is mostly kernel CPU. With
// AIO the flush itself runs in a kernel worker, whose CPU the process's
// figure does not include.
func BenchmarkFlushCPU(b *testing.B) {
	for _, mode := range []string{"fdatasync", "aio"} {
		b.Run(mode, func(b *testing.B) {
			f, err := os.Create(filepath.Join(b.TempDir(), "wal"))
			if err != nil {
				b.Fatal(err)
			}
			defer f.Close()
			if _, err := f.Write(make([]byte, 64<<20)); err != nil {
				b.Fatal(err)
			}
			f.Sync()
			var a *asyncSyncer
			if mode == "aio" {
				if a, err = newAsyncSyncer(); err != nil {
					b.Fatal(err)
				}
				defer a.close()
			}
			frame := make([]byte, walAlign)
			cpu := func() time.Duration {
				var ru syscall.Rusage
				syscall.Getrusage(syscall.RUSAGE_SELF, &ru)
				return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
			}
			c0 := cpu()
			i := 0
			for b.Loop() {
				if _, err := f.WriteAt(frame, int64(i%(16<<10))*walAlign); err != nil {
					b.Fatal(err)
				}
				if a != nil {
					err = a.fdatasync(f)
				} else {
					err = fdatasync(f)
				}
				if err != nil {
					b.Fatal(err)
				}
				i++
			}
			b.ReportMetric(float64((cpu()-c0).Microseconds())/float64(b.N), "cpu-µs/op")
		})
	}
}
