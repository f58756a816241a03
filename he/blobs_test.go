package he_test

import (
	"io"
	"os"
	"path/filepath"
	"testing"

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
