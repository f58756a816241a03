package archive_test

import (
	"bytes"
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/kmsd-project/kmsd/api/layout"
	"github.com/kmsd-project/kmsd/store/archive"
)

// Regression tests for an outside review of the archive: whoever can
// write the archive's directory must not reach beyond it, stall kmsd, or
// have kmsd take the archive's word for the log.

// TestDirStaysInsideItsRoot: a tile that is a link to a file outside the
// archive (kmsd's admin token, say) is not read; a link to a device, a
// FIFO or a sparse giant in place of the checkpoint is refused at once,
// without reading it; a linked directory is not written through.
func TestDirStaysInsideItsRoot(t *testing.T) {
	f := newLog(t)
	dir := t.TempDir()
	ctx := context.Background()
	d := archive.Dir{Root: dir}
	f.add(t, 300)
	if _, err := (&archive.Writer{Bucket: d, Store: f.store.Audit()}).Sync(ctx); err != nil {
		t.Fatal(err)
	}
	secret := filepath.Join(t.TempDir(), "admin.token")
	os.WriteFile(secret, []byte("kms_secret"), 0o600)
	tile := filepath.Join(dir, layout.TilePath(0, 0, 0))
	os.Remove(tile)
	os.Symlink(secret, tile)
	if b, err := d.Get(ctx, layout.TilePath(0, 0, 0)); err == nil || bytes.Contains(b, []byte("kms_secret")) {
		t.Fatalf("a tile linked outside the archive was read: %q %v", b, err)
	}
	cp := filepath.Join(dir, layout.CheckpointPath)
	for name, plant := range map[string]func() error{
		"a link to /dev/zero": func() error { return os.Symlink("/dev/zero", cp) },
		"a FIFO":              func() error { return syscall.Mkfifo(cp, 0o644) },
		"a sparse 1 GiB file": func() error {
			fh, err := os.Create(cp)
			if err != nil {
				return err
			}
			defer fh.Close()
			return fh.Truncate(1 << 30)
		},
	} {
		os.Remove(cp)
		if err := plant(); err != nil {
			t.Fatal(err)
		}
		done := make(chan error, 1)
		go func() { _, err := d.Get(ctx, layout.CheckpointPath); done <- err }()
		select {
		case err := <-done:
			if err == nil {
				t.Errorf("%s as the checkpoint was read", name)
			}
		case <-time.After(5 * time.Second):
			t.Fatalf("%s as the checkpoint: the read hangs", name)
		}
	}
	// A linked directory: new bundles are not written through it.
	out := t.TempDir()
	os.RemoveAll(filepath.Join(dir, "tile", "entries"))
	os.Symlink(out, filepath.Join(dir, "tile", "entries"))
	os.Remove(cp)
	f.add(t, 300)
	(&archive.Writer{Bucket: d, Store: f.store.Audit()}).Sync(ctx)
	if ents, _ := os.ReadDir(out); len(ents) > 0 {
		t.Fatalf("kmsd wrote %d files through a linked directory", len(ents))
	}
}

// TestWriterDoesNotTakeTheArchivesWord: a checkpoint edited to claim more
// (or fewer) records than the archive holds does not move a restarted
// writer on: it writes the archive again from the start (over nothing it
// has not written), and the archive ends whole.
func TestWriterDoesNotTakeTheArchivesWord(t *testing.T) {
	f := newLog(t)
	dir := t.TempDir()
	ctx := context.Background()
	d := archive.Dir{Root: dir}
	f.add(t, 300)
	if _, err := (&archive.Writer{Bucket: d, Store: f.store.Audit()}).Sync(ctx); err != nil {
		t.Fatal(err)
	}
	good, _ := os.ReadFile(filepath.Join(dir, layout.CheckpointPath))
	for _, size := range []string{"1099511627776", "100"} {
		forged := strings.Replace(string(good), "\n300\n", "\n"+size+"\n", 1)
		os.WriteFile(filepath.Join(dir, layout.CheckpointPath), []byte(forged), 0o644)
		f.add(t, 100)
		w := &archive.Writer{Bucket: d, Store: f.store.Audit()}
		n, err := w.Sync(ctx)
		if err != nil || n != uint64(f.n) {
			t.Fatalf("a checkpoint claiming %s: sync %d, %v (the log has %d)", size, n, err, f.n)
		}
		if _, err := archive.Verify(ctx, d, f.pub); err != nil {
			t.Fatalf("the archive after a checkpoint claiming %s: %v", size, err)
		}
	}
}

// TestColdReadsAreProven: once pruned, a record edited in its bundle, or
// a tile edited, is refused by the engine's reads, naming the resource,
// instead of being served as the log's; so is a checkpoint that is not
// this log's.
func TestColdReadsAreProven(t *testing.T) {
	f := newLog(t)
	dir := t.TempDir()
	ctx := context.Background()
	l := f.store.Audit()
	d := archive.Dir{Root: dir}
	f.add(t, 600)
	if _, err := (&archive.Writer{Bucket: d, Store: l, Root: l.TrustedRoot}).Sync(ctx); err != nil {
		t.Fatal(err)
	}
	l.SetCold(&archive.Cold{Bucket: d, Root: l.TrustedRoot})
	if _, err := l.Prune(ctx, 512); err != nil {
		t.Fatal(err)
	}
	if _, err := l.AuditRecords(ctx, 0, 600); err != nil {
		t.Fatal(err)
	}
	p := filepath.Join(dir, layout.EntriesPath(0, 0))
	orig, _ := os.ReadFile(p)
	ents, _ := archive.Entries(orig)
	ents[7] = bytes.Replace(ents[7], []byte(`"status":200`), []byte(`"status":403`), 1)
	nb, _ := archive.Bundle(ents)
	os.WriteFile(p, nb, 0o644)
	l.SetCold(&archive.Cold{Bucket: d, Root: l.TrustedRoot})
	if _, err := l.AuditRecords(ctx, 0, 600); err == nil || !strings.Contains(err.Error(), layout.EntriesPath(0, 0)) {
		t.Fatalf("an edited bundle: %v", err)
	}
	os.WriteFile(p, orig, 0o644)
	tp := filepath.Join(dir, layout.TilePath(0, 0, 0))
	tb, _ := os.ReadFile(tp)
	tb[40] ^= 1
	os.WriteFile(tp, tb, 0o644)
	l.SetCold(&archive.Cold{Bucket: d, Root: l.TrustedRoot})
	if _, err := l.AuditRecords(ctx, 0, 10); err == nil {
		t.Fatal("records read through an edited tile")
	}
	if _, err := f.log.InclusionProof(ctx, 3, 600); err == nil {
		t.Fatal("a proof built from an edited tile")
	}
	tb[40] ^= 1
	os.WriteFile(tp, tb, 0o644)
	cp, _ := os.ReadFile(filepath.Join(dir, layout.CheckpointPath))
	os.WriteFile(filepath.Join(dir, layout.CheckpointPath), bytes.Replace(cp, []byte("\n600\n"), []byte("\n599\n"), 1), 0o644)
	l.SetCold(&archive.Cold{Bucket: d, Root: l.TrustedRoot})
	if _, err := l.AuditRecords(ctx, 0, 10); err == nil || !strings.Contains(err.Error(), "not the store's") {
		t.Fatalf("a checkpoint that is not this log's: %v", err)
	}
}

// TestHugeCheckpointSizeIsAnError: a checkpoint whose size line is 2^63
// or more (a negative tree size to the tree code, which panicked and took
// kmsd down) is an error to the writer and the reader, not a panic.
func TestHugeCheckpointSizeIsAnError(t *testing.T) {
	f := newLog(t)
	dir := t.TempDir()
	ctx := context.Background()
	l := f.store.Audit()
	d := archive.Dir{Root: dir}
	f.add(t, 300)
	if _, err := (&archive.Writer{Bucket: d, Store: l, Root: l.TrustedRoot}).Sync(ctx); err != nil {
		t.Fatal(err)
	}
	good, _ := os.ReadFile(filepath.Join(dir, layout.CheckpointPath))
	for _, size := range []string{"9223372036854775808", "18446744073709551615", "4611686018427387905"} {
		os.WriteFile(filepath.Join(dir, layout.CheckpointPath), bytes.Replace(good, []byte("\n300\n"), []byte("\n"+size+"\n"), 1), 0o644)
		if _, err := (&archive.Writer{Bucket: d, Store: l, Root: l.TrustedRoot}).Sync(ctx); err == nil {
			t.Errorf("size %s: a writer took it", size)
		}
		if _, err := (&archive.Cold{Bucket: d, Root: l.TrustedRoot}).ColdRecords(ctx, 0, 10); err == nil {
			t.Errorf("size %s: a reader took it", size)
		}
	}
}

// TestHardLinksAndALinkedRootAreRefused: a tile that is a hard link to a
// file outside the archive (O_NOFOLLOW and the root do not see it) is not
// read, and an archive directory that is itself a symbolic link is not
// followed.
func TestHardLinksAndALinkedRootAreRefused(t *testing.T) {
	f := newLog(t)
	dir := t.TempDir()
	ctx := context.Background()
	d := archive.Dir{Root: dir}
	f.add(t, 300)
	if _, err := (&archive.Writer{Bucket: d, Store: f.store.Audit()}).Sync(ctx); err != nil {
		t.Fatal(err)
	}
	secret := filepath.Join(dir, "..", "outside-secret")
	os.WriteFile(secret, make([]byte, 8192), 0o600)
	tile := filepath.Join(dir, layout.TilePath(0, 0, 0))
	os.Remove(tile)
	if err := os.Link(secret, tile); err != nil {
		t.Fatal(err)
	}
	if _, err := d.Get(ctx, layout.TilePath(0, 0, 0)); err == nil {
		t.Fatal("a tile hard-linked to an outside file was read")
	}
	elsewhere := t.TempDir()
	link := filepath.Join(t.TempDir(), "archive")
	os.Symlink(elsewhere, link)
	if err := (archive.Dir{Root: link}).Put(ctx, layout.CheckpointPath, []byte("x\n1\nAAAA\n"), false); err == nil {
		t.Fatal("an archive that is a symbolic link was written through")
	}
	if ents, _ := os.ReadDir(elsewhere); len(ents) > 0 {
		t.Fatalf("wrote %d files through a linked archive directory", len(ents))
	}
}

// TestPutNeverBlocksOnADirectorySwappedForAFIFO: a directory swapped, over
// and over, with a link to a FIFO while kmsd writes into it makes a write
// fail, never hang (the directory's fsync opened the FIFO and blocked for
// ever, holding the archive).
func TestPutNeverBlocksOnADirectorySwappedForAFIFO(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	d := archive.Dir{Root: dir}
	if err := syscall.Mkfifo(filepath.Join(dir, "fifo"), 0o644); err != nil {
		t.Fatal(err)
	}
	os.MkdirAll(filepath.Join(dir, "tile", "0"), 0o755)
	stop := make(chan struct{})
	defer close(stop)
	go func() {
		real, link := filepath.Join(dir, "tile", "0"), filepath.Join(dir, "tile", "0.link")
		os.Symlink("../fifo", link)
		for {
			select {
			case <-stop:
				return
			default:
			}
			unix.Renameat2(unix.AT_FDCWD, real, unix.AT_FDCWD, link, unix.RENAME_EXCHANGE)
		}
	}()
	deadline := time.Now().Add(6 * time.Second)
	for i := 0; time.Now().Before(deadline); i++ {
		done := make(chan error, 1)
		go func() { done <- d.Put(ctx, layout.TilePath(0, uint64(i), 0), make([]byte, 32*256), true) }()
		select {
		case <-done:
		case <-time.After(3 * time.Second):
			t.Fatalf("Put %d still blocked after 3 s", i)
		}
	}
}

// TestArchiveRolledBackIsRefused: with the store keeping how far the
// archive went, an archive whose checkpoint was put back to an older
// (genuine) one, or that was wiped, is refused, at a restart and under a
// running writer, instead of being written on as if it were whole (which
// left a gap for good, or rewrote only what the store still held).
func TestArchiveRolledBackIsRefused(t *testing.T) {
	f := newLog(t)
	dir := t.TempDir()
	ctx := context.Background()
	l := f.store.Audit()
	d := archive.Dir{Root: dir}
	w := &archive.Writer{Bucket: d, Store: l, Root: l.TrustedRoot, Progress: f.store}
	f.add(t, 300)
	if _, err := w.Sync(ctx); err != nil {
		t.Fatal(err)
	}
	older, _ := os.ReadFile(filepath.Join(dir, layout.CheckpointPath))
	f.add(t, 300)
	if n, err := w.Sync(ctx); err != nil || n != 600 {
		t.Fatalf("sync: %d %v", n, err)
	}
	cp := filepath.Join(dir, layout.CheckpointPath)
	newer, _ := os.ReadFile(cp)
	os.WriteFile(cp, older, 0o644)
	if _, err := (&archive.Writer{Bucket: d, Store: l, Root: l.TrustedRoot, Progress: f.store}).Sync(ctx); !errors.Is(err, archive.ErrRolledBack) {
		t.Fatalf("an older checkpoint put back, at a restart: %v", err)
	}
	if _, err := w.Sync(ctx); !errors.Is(err, archive.ErrRolledBack) {
		t.Fatalf("an older checkpoint put back, under a running writer: %v", err)
	}
	os.RemoveAll(filepath.Join(dir, "tile"))
	os.Remove(cp)
	f.add(t, 10)
	if _, err := w.Sync(ctx); !errors.Is(err, archive.ErrRolledBack) {
		t.Fatalf("a wiped archive: %v", err)
	}
	if _, err := os.Stat(cp); err == nil {
		t.Fatal("a checkpoint was written over a wiped archive")
	}
	os.WriteFile(cp, newer, 0o644) // restored (its tiles are not: verify finds that)
	if _, err := archive.Verify(ctx, d, f.pub); err == nil {
		t.Fatal("a wiped archive verified")
	}
}
