package he

import (
	"context"
	"errors"
	"os"
	"testing"
)

// TestGenerateFailureLeavesNothing: a generation cancelled after its first
// key returns the error and removes every file it wrote.
func TestGenerateFailureLeavesNothing(t *testing.T) {
	p := preset(t, CKKS, "ckks-logn13")
	sk, _ := SecretKey(p.RLWE(), seed(t))
	spec := KeySpec{Rotations: []int{1, 2, 4, 8}, Relinearization: true}
	gal, _ := GaloisElements(p, spec)
	dir := t.TempDir()
	store, _ := OpenDirBlobs(dir)
	ctx, cancel := context.WithCancel(context.Background())
	calls := 0
	_, err := Generate(ctx, p, sk, spec, gal, store, 2, func(done, total int, _ int64) {
		calls++
		cancel()
	}, true)
	if !errors.Is(err, context.Canceled) {
		t.Fatalf("Generate = %v, want context.Canceled", err)
	}
	if calls == 0 {
		t.Fatal("no key was stored before the cancel: the test cleaned up nothing")
	}
	ents, _ := os.ReadDir(dir)
	for _, e := range ents {
		t.Errorf("left behind: %s", e.Name())
	}
}
