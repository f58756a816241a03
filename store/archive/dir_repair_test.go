package archive_test

import (
	"context"
	"os"
	"path/filepath"
	"testing"

	"github.com/kmsd-project/kmsd/store/archive"
)

// TestPutKilledBetweenLinkAndRemove: a Put of an immutable resource links
// its temporary file in, then removes it; kmsd killed between the two
// left the tile with two links, which every later read refused as "not a
// file kmsd wrote", so the archive stopped for good (the suite's
// TestAuditRetentionSurvivesKill9 caught it once). The temporary link is
// now dropped when found; a second link from anywhere else is still
// refused.
func TestPutKilledBetweenLinkAndRemove(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	d := archive.Dir{Root: dir}
	const p = "tile/entries/002"
	data := []byte("entries")
	if err := d.Put(ctx, p, data, true); err != nil {
		t.Fatal(err)
	}
	// What the kill left: the temporary name still linked to the tile.
	if err := os.Link(filepath.Join(dir, p), filepath.Join(dir, "tile/entries/.tmp-0123456789abcdef")); err != nil {
		t.Fatal(err)
	}
	if got, err := d.Get(ctx, p); err != nil || string(got) != string(data) {
		t.Fatalf("after a Put killed between its link and its remove: %q %v", got, err)
	}
	if _, err := os.Lstat(filepath.Join(dir, "tile/entries/.tmp-0123456789abcdef")); !os.IsNotExist(err) {
		t.Fatalf("the temporary link is still there: %v", err)
	}
	if err := d.Put(ctx, p, data, true); err != nil {
		t.Fatalf("the same tile written again: %v", err)
	}
	// A link from elsewhere is not kmsd's doing: refused.
	if err := os.Link(filepath.Join(dir, p), filepath.Join(dir, "elsewhere")); err != nil {
		t.Fatal(err)
	}
	if _, err := d.Get(ctx, p); err == nil {
		t.Fatal("a tile with a second link from elsewhere was read")
	}
}
