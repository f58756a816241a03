package he_test

import (
	"context"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"syscall"
	"testing"
	"time"

	"github.com/kmsd-project/kmsd/he"
	"github.com/kmsd-project/kmsd/he/blobtest"
)

func TestDirBlobsConformance(t *testing.T) {
	blobtest.Run(t, func(t *testing.T) he.Blobs {
		b, err := he.OpenDirBlobs(t.TempDir())
		if err != nil {
			t.Fatal(err)
		}
		return b
	})
}

// TestDirBlobsCleanUp: a spool file a crash left is gone after open, and
// the blobs leave nothing but themselves in the directory.
func TestDirBlobsCleanUp(t *testing.T) {
	dir := t.TempDir()
	crashed := filepath.Join(dir, ".tmp-crashed")
	os.WriteFile(crashed, []byte("half"), 0o600)
	b, err := he.OpenDirBlobs(dir)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(crashed); err == nil {
		t.Fatal("a spool file from a crash survived OpenDirBlobs")
	}
	if _, _, err := he.Put(t.Context(), b, func(w io.Writer) error { _, err := io.WriteString(w, "alpha"); return err }); err != nil {
		t.Fatal(err)
	}
	ents, _ := os.ReadDir(dir)
	if len(ents) != 1 {
		t.Fatalf("%d files left, want 1 (no spool files)", len(ents))
	}
}

// TestDirBlobsOpenRegularFilesOnly: a link, a FIFO or a device put where a
// blob should be is not opened as the blob (a FIFO would hang the request,
// a link to /dev/zero would be hashed for ever).
func TestDirBlobsOpenRegularFilesOnly(t *testing.T) {
	dir := t.TempDir()
	b, err := he.OpenDirBlobs(dir)
	if err != nil {
		t.Fatal(err)
	}
	for i, mk := range []func(p string) error{
		func(p string) error { return os.Symlink("/dev/zero", p) },
		func(p string) error { return syscall.Mkfifo(p, 0o600) },
	} {
		d := he.Digest(fmt.Sprintf("sha256:%064x", i+1))
		p, err := b.Path(d)
		if err != nil {
			t.Fatal(err)
		}
		if err := mk(p); err != nil {
			t.Fatal(err)
		}
		done := make(chan error, 1)
		go func() {
			f, err := b.Open(context.Background(), d)
			if err == nil {
				f.Close()
			}
			done <- err
		}()
		select {
		case err := <-done:
			if err == nil {
				t.Errorf("case %d: opened", i)
			}
		case <-time.After(5 * time.Second):
			t.Fatalf("case %d: Open hangs", i)
		}
	}
}
