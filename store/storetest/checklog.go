package storetest

import (
	"context"
	"encoding/hex"
	"testing"

	"golang.org/x/mod/sumdb/tlog"

	"github.com/kmsd-project/kmsd/kms"
)

// CheckLog reads the whole audit log and checks it: indexes from 0 without
// a gap, each record chained to the one before, and the tree built from
// the stored hashes equal to RFC 6962's tree recomputed from the records
// alone. It returns the records' operations, in log order.
func CheckLog(t testing.TB, a kms.AuditStore) []string {
	t.Helper()
	ctx := context.Background()
	n, err := a.AuditSize(ctx)
	if err != nil {
		t.Fatal(err)
	}
	recs, err := a.AuditRecords(ctx, 0, n)
	if err != nil {
		t.Fatal(err)
	}
	var leaves []tlog.Hash
	var ops []string
	for i, data := range recs {
		r, err := kms.DecodeAuditRecord(data)
		if err != nil {
			t.Fatal(err)
		}
		prev := ""
		if i > 0 {
			prev = hex.EncodeToString(leaves[i-1][:])
		}
		if r.Index != uint64(i) || r.PrevHash != prev {
			t.Fatalf("record %d: index %d, prev %q, want prev %q", i, r.Index, r.PrevHash, prev)
		}
		leaves = append(leaves, tlog.RecordHash(data))
		ops = append(ops, r.Operation)
	}
	if n == 0 {
		return ops
	}
	stored, err := tlog.TreeHash(int64(n), tlog.HashReaderFunc(func(idx []int64) ([]tlog.Hash, error) {
		hs, err := a.AuditHashes(ctx, idx)
		out := make([]tlog.Hash, len(hs))
		for i, h := range hs {
			out[i] = h
		}
		return out, err
	}))
	if err != nil {
		t.Fatal(err)
	}
	if stored != rootOf(leaves) {
		t.Fatal("the stored tree hashes do not match the records")
	}
	return ops
}

// rootOf is RFC 6962's Merkle tree hash, computed directly.
func rootOf(l []tlog.Hash) tlog.Hash {
	if len(l) == 1 {
		return l[0]
	}
	k := 1
	for k*2 < len(l) {
		k *= 2
	}
	return tlog.NodeHash(rootOf(l[:k]), rootOf(l[k:]))
}
