package archive_test

import (
	"bytes"
	"context"
	"testing"

	"golang.org/x/mod/sumdb/tlog"

	"github.com/kmsd-project/kmsd/audit"
	"github.com/kmsd-project/kmsd/audit/engine"
	"github.com/kmsd-project/kmsd/store/archive"
)

// TestKeepIsTheDecomposition: the rows a log pruned below B keeps are the
// last rows of the complete subtrees B decomposes into.
func TestKeepIsTheDecomposition(t *testing.T) {
	for _, c := range []struct {
		below uint64
		keep  []uint64
	}{{0, nil}, {1, []uint64{0}}, {12, []uint64{7, 11}}, {700, []uint64{511, 639, 671, 687, 695, 699}}} {
		k := engine.Keep(c.below)
		n := 0
		for i := uint64(0); i < c.below+10; i++ {
			if k(i) {
				n++
			}
		}
		if n != len(c.keep) {
			t.Errorf("Keep(%d) holds %d rows, want %v", c.below, n, c.keep)
		}
		for _, i := range c.keep {
			if !k(i) {
				t.Errorf("Keep(%d) lacks %d", c.below, i)
			}
		}
	}
}

// TestPrunedLogStaysWhole: a bbolt log pruned to its archive deletes the
// rows of the archived records (all but Keep's), and the log is whole to
// every reader: its records (the pruned ones from the archive), proofs of
// pruned records against later roots, new records and checkpoints, a
// reopened store; pruning further, and a prune cut short, leave it whole.
func TestPrunedLogStaysWhole(t *testing.T) {
	f := newLog(t)
	dir := t.TempDir()
	ctx := context.Background()
	l := f.store.Audit()
	w := &archive.Writer{Bucket: archive.Dir{Root: dir}, Store: l}
	f.add(t, 1000)
	if _, err := w.Sync(ctx); err != nil {
		t.Fatal(err)
	}
	before, err := l.AuditRecords(ctx, 0, 1000)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := l.Prune(ctx, 700); err == nil {
		t.Fatal("pruned without an archive to read from")
	}
	l.SetCold(&archive.Cold{Bucket: archive.Dir{Root: dir}})
	n, err := l.Prune(ctx, 700)
	if err != nil || n != 700-6 {
		t.Fatalf("prune below 700: %d rows, %v (want 694: six kept)", n, err)
	}
	if l.PrunedBelow() != 700 {
		t.Fatalf("pruned below %d", l.PrunedBelow())
	}
	after, err := l.AuditRecords(ctx, 0, 1000)
	if err != nil {
		t.Fatal(err)
	}
	for i := range before {
		if !bytes.Equal(before[i], after[i]) {
			t.Fatalf("record %d reads otherwise after pruning", i)
		}
	}
	// New records and checkpoints; proofs of pruned records.
	f.add(t, 300)
	res, _, err := audit.Verify(f.pub, mustRecords(t, l, 1300), [][]byte{latest(t, f)}, nil)
	if err != nil || res.Size != 1300 {
		t.Fatalf("verify after pruning: %v %v", res, err)
	}
	all := mustRecords(t, l, 1300)
	for _, i := range []uint64{0, 5, 511, 698, 699, 700, 1299} {
		p, err := f.log.InclusionProof(ctx, i, 1300)
		if err != nil {
			t.Fatalf("proof of %d: %v", i, err)
		}
		if err := tlog.CheckRecord(toHashes(p), 1300, res.Root, int64(i), tlog.RecordHash(all[i])); err != nil {
			t.Fatalf("proof of %d does not check: %v", i, err)
		}
	}
	// The tree of 600 records (all pruned but Keep's) is a prefix of the
	// tree of 1300: the proof checks against the roots recomputed here.
	tree := &audit.MemoryTree{}
	for _, r := range all {
		tree.Append(r)
	}
	old, _ := tree.Root(600)
	p, err := f.log.ConsistencyProof(ctx, 600, 1300)
	if err != nil {
		t.Fatalf("consistency proof from 600: %v", err)
	}
	if err := tlog.CheckTree(toHashes(p), 1300, res.Root, 600, old); err != nil {
		t.Fatalf("consistency proof from 600 does not check: %v", err)
	}
	// Reopened, the store loads its position from the rows it kept, and
	// knows where it was pruned; the log goes on, is pruned further, and
	// stays whole.
	f.reopen(t)
	l = f.store.Audit()
	if l.PrunedBelow() != 700 {
		t.Fatalf("after reopening, pruned below %d", l.PrunedBelow())
	}
	l.SetCold(&archive.Cold{Bucket: archive.Dir{Root: dir}})
	f.add(t, 500)
	w = &archive.Writer{Bucket: archive.Dir{Root: dir}, Store: l}
	if n, err := w.Sync(ctx); err != nil || n != 1800 {
		t.Fatalf("sync after reopening: %d %v", n, err)
	}
	if _, err := l.Prune(ctx, 1799); err != nil {
		t.Fatal(err)
	}
	f.add(t, 1)
	res, _, err = audit.Verify(f.pub, mustRecords(t, l, 1801), [][]byte{latest(t, f)}, nil)
	if err != nil || res.Size != 1801 {
		t.Fatalf("verify after pruning to 1799: %v %v", res, err)
	}
	rows, err := f.store.ReadRows(ctx, 1799, 1801)
	if err != nil || len(rows) != 2 {
		t.Fatalf("the rows past the prune: %d %v", len(rows), err)
	}
	if _, err := f.store.ReadRows(ctx, 0, 1); err == nil {
		t.Fatal("row 0 is still in the store")
	}
	if v, err := archive.Verify(ctx, archive.Dir{Root: dir}, f.pub); err != nil || v.Size != 1800 {
		t.Fatalf("the archive: %v %v", v, err)
	}
}

func mustRecords(t *testing.T, l *engine.Log, n uint64) [][]byte {
	t.Helper()
	recs, err := l.AuditRecords(context.Background(), 0, n)
	if err != nil {
		t.Fatal(err)
	}
	return recs
}

func latest(t *testing.T, f *logFixture) []byte {
	t.Helper()
	_, note, err := f.store.LatestCheckpoint(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	return note
}

func toHashes(p [][32]byte) []tlog.Hash {
	out := make([]tlog.Hash, len(p))
	for i := range p {
		out[i] = p[i]
	}
	return out
}
